#!/usr/bin/env bash
# Every GPU figure of issue 13, on a GPU machine, in commands of at most 10 minutes.
# See benchmarks/gpu/README.md for how to stage the data and call it through the device tool.
#
#   benchmarks/gpu/run_all.sh            # 1. step time (eager, then compiled), 2. input pipeline,
#                                        # 3. the converged runs with the time left
#   benchmarks/gpu/run_all.sh converged  # a later call on the same machine: continue 3
#
# Environment (all optional):
#   BUDGET      seconds this command may take in all (default 560; the device tool stops a
#               command at 600)
#   NPZ         the CIFAR-10 subset (default benchmarks/out/data/cifar10_5k.npz, git-ignored)
#   SEEDS       seeds of the converged runs (default 3), FIRST_SEED (default 0)
#   EPOCHS      (default 200), PARALLEL runs at once (default 3), AMP off|bf16 (default off)
#   PYTHON      the interpreter (default: .venv/bin/python if it sees CUDA, else python3)
#   RESULTS     where the result files go (default benchmarks/results, or with $OUT set
#               benchmarks/out/gpu-results), RUNS the run directories with their checkpoints
#               (default runs/converged/<npz stem>-<model>-e<epochs>, git-ignored)
#   SMOKE=1     tiny models, steps and epochs, for checking this script on a CPU with
#               DEVICE=cpu (default DEVICE=cuda); its numbers mean nothing
#
# Results go to benchmarks/results/ (step_time-gpu*, pipeline-gpu*, converged-cifar10_5k*);
# when $OUT is set (the device tool sets it) they are also packed into $OUT/gpu-results.tar.gz
# after every phase, with the Markdown tables and this script's log beside it, so a command cut
# off at its time limit still returns what it finished.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2

MODE=${1:-all}
BUDGET=${BUDGET:-560}
NPZ=${NPZ:-benchmarks/out/data/cifar10_5k.npz}
SEEDS=${SEEDS:-3}
FIRST_SEED=${FIRST_SEED:-0}
EPOCHS=${EPOCHS:-200}
PARALLEL=${PARALLEL:-3}
AMP=${AMP:-off}
# On the device machine (OUT set) results go to a git-ignored folder, which a warm machine keeps
# from one call to the next (a call re-sends the working tree), and are packed into $OUT.
if [ -n "${OUT:-}" ]; then RESULTS=${RESULTS:-benchmarks/out/gpu-results}; fi
RESULTS=${RESULTS:-benchmarks/results}
DEVICE=${DEVICE:-cuda}
STEM=$(basename "$NPZ" .npz)
export PYTHONUNBUFFERED=1

# The figures of the issue; SMOKE=1 swaps in sizes a CPU runs in a few minutes.
STEP_MODELS=(--model wrn28_10:256 --model pyramidnet272_200:64)
COMPILE_MODELS=("${STEP_MODELS[@]}")
STEP_REPEATS=(--repeats 10 --warmup 3)
PIPELINE_SIZES=(--model wrn16_8 --batch-size 256 --workers 8 --repeats 3 --warmup 1
                --train-steps 40 --train-warmup 5)
CONVERGED_MODEL=wrn16_8
if [ "${SMOKE:-0}" = 1 ]; then
  STEP_MODELS=(--model wrn10_1:8 --model pyramidnet29_8:4)
  COMPILE_MODELS=(--model wrn10_1:8)
  STEP_REPEATS=(--repeats 1 --warmup 0)
  PIPELINE_SIZES=(--model wrn10_1 --batch-size 16 --workers 2 --repeats 1 --warmup 0
                  --train-steps 2 --train-warmup 1)
  CONVERGED_MODEL=wrn10_1
  EPOCHS=${SMOKE_EPOCHS:-1}
fi
RUNS=${RUNS:-runs/converged/$STEM-$CONVERGED_MODEL-e$EPOCHS}

case "$MODE" in
  all | converged) ;;
  *) echo "run_all.sh: unknown mode '$MODE'; expected all or converged" >&2; exit 2 ;;
esac

LOG=${OUT:-benchmarks/out}/run_all-$MODE.log
mkdir -p "$(dirname "$LOG")" "$RESULTS"
exec > >(tee -a "$LOG") 2>&1

left() { echo $((BUDGET - SECONDS)); }
say() { echo "[run_all $(date -u +%H:%M:%S), ${SECONDS}s, $(left)s left] $*"; }

pack() {
  [ -n "${OUT:-}" ] || return 0
  local files=()
  for f in step_time-gpu.json step_time-gpu.md step_time-gpu-compile.json \
           step_time-gpu-compile.md pipeline-gpu.json pipeline-gpu.md \
           "converged-$STEM.json" "converged-$STEM.md" "converged-$STEM.png" \
           "converged-$STEM-runs"; do
    [ -e "$RESULTS/$f" ] && files+=("$f")
  done
  [ ${#files[@]} -gt 0 ] || return 0
  tar czf "$OUT/gpu-results.tar.gz" -C "$RESULTS" "${files[@]}"
  for f in step_time-gpu.md step_time-gpu-compile.md pipeline-gpu.md "converged-$STEM.md"; do
    [ -e "$RESULTS/$f" ] && cp "$RESULTS/$f" "$OUT/"
  done
  say "packed ${files[*]} into $OUT/gpu-results.tar.gz"
}

# -- the interpreter and the package (nothing is downloaded: the machine has no network) -------
if [ -z "${PYTHON:-}" ]; then
  PYTHON=python3
  if [ -x .venv/bin/python ] && .venv/bin/python -c 'import torch, sys; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
    PYTHON=.venv/bin/python
  fi
fi
if ! "$PYTHON" -c 'import aace' 2>/dev/null; then
  # Install nothing: torch, torchvision, numpy, scikit-learn, matplotlib and tqdm are in the
  # machine's image, and aace is pure Python, so it is imported from src/ (the scripts run the
  # CLI as `python -m aace`). An offline `pip install --no-deps --no-build-isolation -e .` would
  # need setuptools >= 77 for pyproject's license field, which the image may not have.
  export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
  say "aace is imported from src/ (PYTHONPATH)"
fi
if ! "$PYTHON" - "$DEVICE" <<'EOF'
import sys

import matplotlib, numpy, sklearn, torch, torchvision, tqdm  # noqa: F401 (the dependencies)

import aace

print(f"python {sys.version.split()[0]} ({sys.executable}); torch {torch.__version__}, "
      f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}; "
      f"torchvision {torchvision.__version__}; aace {aace.__version__} ({aace.__file__})")
if torch.cuda.is_available():
    print(f"device: {torch.cuda.get_device_name(0)}, "
          f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
elif sys.argv[1] == "cuda":
    sys.exit("run_all.sh: torch sees no CUDA device")
EOF
then
  say "the Python environment is not usable (see above); stopping"
  exit 2
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null || true
if [ ! -f "$NPZ" ]; then
  say "dataset '$NPZ' not found: copy ../shared/data/cifar10_5k.npz to benchmarks/out/data/ and carry benchmarks/out/data (README.md)"
  exit 2
fi

run_timed() {  # run_timed SECONDS command...: at most SECONDS, and never past the budget
  local limit=$1; shift
  local cap=$(( $(left) - 30 ))
  [ "$limit" -gt "$cap" ] && limit=$cap
  if [ "$limit" -lt 30 ]; then say "skipped (too little time left): $*"; return 0; fi
  say "start (at most ${limit}s): $*"
  timeout --signal=TERM --kill-after=20 "$limit" "$@"
  local status=$?
  say "exit $status: $1 $2"
  return 0
}

if [ "$MODE" = all ]; then
  # 1a. Step time, eager: fp32 (cuDNN's TF32 defaults) and bf16, contiguous and channels-last.
  run_timed 180 "$PYTHON" -m benchmarks.micro.step_time --device "$DEVICE" "${STEP_MODELS[@]}" \
    --setting fp32 --setting fp32+channels-last --setting bf16 --setting bf16+channels-last \
    "${STEP_REPEATS[@]}" --name step_time-gpu --out-dir "$RESULTS"
  pack
  # 2. The input pipeline on the GPU: WRN-16-8 at the converged runs' batch of 256.
  run_timed 150 "$PYTHON" -m benchmarks.micro.pipeline --device "$DEVICE" --dataset "npz:$NPZ" \
    "${PIPELINE_SIZES[@]}" --amp off --amp bf16 --name pipeline-gpu --out-dir "$RESULTS"
  pack
  # 1b. Step time, compiled (the first call of each variant compiles: about a minute for
  # WRN-28-10, several for PyramidNet-272; so WRN-28-10's settings first). Results are rewritten
  # after every block, so a cut leaves the finished ones (marked partial).
  run_timed 240 "$PYTHON" -m benchmarks.micro.step_time --device "$DEVICE" "${COMPILE_MODELS[@]}" \
    --setting bf16+compile --setting fp32+compile --outer models \
    "${STEP_REPEATS[@]}" --name step_time-gpu-compile --out-dir "$RESULTS"
  pack
fi

# 3. The converged runs, resumable: a later `run_all.sh converged` continues them.
CONVERGED_BUDGET=$(( $(left) - 45 ))
if [ "$CONVERGED_BUDGET" -ge 120 ]; then
  say "converged runs for ${CONVERGED_BUDGET}s"
  timeout --signal=TERM --kill-after=30 $((CONVERGED_BUDGET + 30)) \
    "$PYTHON" -m benchmarks.studies.converged --dataset "npz:$NPZ" --model "$CONVERGED_MODEL" \
    --epochs "$EPOCHS" --seeds "$SEEDS" --first-seed "$FIRST_SEED" --parallel "$PARALLEL" \
    --amp "$AMP" --device "$DEVICE" --budget "$CONVERGED_BUDGET" --runs-dir "$RUNS" \
    --out-dir "$RESULTS" --copy-runs "$RESULTS/converged-$STEM-runs"
  say "benchmarks.studies.converged exit $? (75: stopped at the budget, resumable with: benchmarks/gpu/run_all.sh converged)"
else
  say "no time left for the converged runs in this call; next: benchmarks/gpu/run_all.sh converged"
fi
pack
say "done"
