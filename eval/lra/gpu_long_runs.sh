#!/bin/bash
# Issue 27's long runs (>= 1 M sequences: 32k steps x batch 32) on a lent GPU, in one device call, resumable across
# calls; the same `study.py long` runs on CPU across sessions with --snapshot (about 10 h per row on one core).
#
#   device run:  command="bash eval/lra/gpu_long_runs.sh", carry=["eval/data/lra/listops.pt", "eval/runs/lra"]
#   env:         ROWS (default: the best LDN row and the Transformer), STEPS (32000), BUDGET (seconds, 540)
#
# Each run checkpoints every 250 steps (eval/runs/lra/<run>/last.pt); the command stops itself before BUDGET and
# copies every run's log, result and checkpoints under $OUT: put eval/runs/lra back from there (and carry it) to
# resume, commit eval/results/lra/long*.json and the logs when a run is done.
set -u
cd "$(dirname "$0")/../.."
ROWS=${ROWS:-"ldn_implicit_sinpos_torch_init transformer"}
STEPS=${STEPS:-32000}
BUDGET=${BUDGET:-540}
OUT=${OUT:-/tmp/gpu_long_runs_out}
export PYTHONPATH=$PWD
python -c "import torch, timm; assert torch.cuda.is_available(), 'no CUDA device'" || exit 3
[ -f eval/data/lra/listops.pt ] || python eval/lra/tasks.py || exit 4
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
# GNU timeout signals the whole process group: the runner and its training processes stop together
timeout "$BUDGET" python eval/lra/study.py long --task listops --rows $ROWS --steps "$STEPS" --jobs 2 --device cuda
status=$?
mkdir -p "$OUT/results" "$OUT/runs"
cp eval/results/lra/long*.json "$OUT/results/" 2>/dev/null
for d in eval/runs/lra/long*; do
    [ -d "$d" ] || continue
    mkdir -p "$OUT/runs/$(basename "$d")"
    cp "$d"/log.csv "$d"/stdout.log "$d"/last.pt "$d"/best.pt "$OUT/runs/$(basename "$d")/" 2>/dev/null
    tail -n 1 "$d/stdout.log"
done
exit $status
