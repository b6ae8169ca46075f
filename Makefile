# Each target creates (once) and reuses a local virtual environment in .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test lint docs docs-serve bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --no-compile -e '.[test,docs,all]'
	touch $(STAMP)

# The main job: SGD, SAM and SAM+AACE on scikit-learn's digits, 2 seeds each, then the
# comparison table and the paper's figures, also written to benchmarks/results/demo.md and .png
# (the manual's Getting started page shows them). Rerunning it resumes (finished runs are kept).
DEMO := runs/demo
demo: $(STAMP)
	@for optimizer in sgd sam sam-aace; do for seed in 0 1; do \
	  $(BIN)/aace train --preset digits-demo --optimizer $$optimizer --seed $$seed \
	    --out $(DEMO)/$$optimizer-s$$seed --resume || exit 1; \
	done; done
	$(BIN)/aace compare $(DEMO)/sgd-s* $(DEMO)/sam-s* $(DEMO)/sam-aace-s*
	$(BIN)/aace plot $(DEMO)/sgd-s* $(DEMO)/sam-s* $(DEMO)/sam-aace-s* --figure $(DEMO)/curves.png
	$(BIN)/python scripts/demo_results.py $(DEMO)

# The main tables and plots of the manual's Performance and Studies pages (about 1.5 h on 2 CPU
# cores). CIFAR5K is the real CIFAR-10 subset the team provides; pass another path if needed.
CIFAR5K ?= ../shared/data/cifar10_5k.npz
bench: $(STAMP)
	$(BIN)/python -m benchmarks.micro.step_time --model wrn16_4 --model pyramidnet110_48_basic --batch-size 128 --repeats 5 --warmup 1
	$(BIN)/python -m benchmarks.micro.loss_cost
	$(BIN)/python -m benchmarks.micro.memory
	$(BIN)/python -m benchmarks.micro.pipeline --dataset npz:$(CIFAR5K)
	$(BIN)/python -m benchmarks.studies.replicate --dataset digits --model wrn16_1 --epochs 15 --batch-size 64 --lr 0.05 --seeds 3
	$(BIN)/python -m benchmarks.studies.replicate --dataset npz:$(CIFAR5K) --model wrn10_1 --epochs 10 --batch-size 128 --lr 0.1 --seeds 3

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples scripts docs/*.py
	$(BIN)/ruff format --check src tests benchmarks examples scripts docs/*.py

# The documentation site (mkdocs.yml, docs/) into site/; strict: a broken link, a reference to a
# missing name or a docstring that does not parse fails the build. No network is needed.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

docs-serve: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve

# The suite in parallel (pytest-xdist), one file per worker at a time: most of its time is
# multi-process tests that wait on process start-up, so two workers on two cores finish sooner
# (2 cores: about 9 min against 13.5 min serial). tests/conftest.py gives each worker its share
# of the cores; `$(BIN)/python -m pytest` alone runs it serially.
test: lint docs
	$(BIN)/python -m pytest -n auto --maxprocesses 4 --dist loadfile

clean:
	rm -rf $(VENV) site build *.egg-info src/*.egg-info .pytest_cache .ruff_cache
