# Each target creates (once) and reuses a local virtual environment in .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# The main job: SGD, SAM and SAM+AACE on scikit-learn's digits, 2 seeds each, then the
# comparison table and the paper's figures. Rerunning it resumes (finished runs are kept).
DEMO := runs/demo
demo: $(STAMP)
	@for optimizer in sgd sam sam-aace; do for seed in 0 1; do \
	  $(BIN)/aace train --preset digits-demo --optimizer $$optimizer --seed $$seed \
	    --out $(DEMO)/$$optimizer-s$$seed --resume || exit 1; \
	done; done
	$(BIN)/aace compare $(DEMO)/*-s*
	$(BIN)/aace plot $(DEMO)/*-s* --out $(DEMO)/curves.png

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples

test: lint
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache .ruff_cache
