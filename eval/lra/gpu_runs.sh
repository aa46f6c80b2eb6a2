#!/bin/bash
# Sequence-benchmark runs on a lent GPU, in one device call, resumable across calls (study.py on CUDA).
#
#   Issue 27's long runs (>= 1 M sequences, 32k steps x batch 32), the default:
#     device run: command="bash eval/lra/gpu_runs.sh", carry=["eval/data/lra/listops.pt", "eval/runs/lra"]
#   Issue 28's Path-X (Pathfinder-128 hard, 16,384 pixel steps; generated on the machine's cores if missing):
#     device run: command="TASK=pathx bash eval/lra/gpu_runs.sh", carry=["eval/runs/lra"]
#   On CPU, tiny (what tests/test_study_runner.py runs): DEVICE=cpu TASK=pathx N=20 STEPS=2 BATCH=2 ROWS=ldn ...
#
# env: TASK (listops), ROWS (the best LDN row and the Transformer; Path-X: + ldn and the linear Transformer),
#      STEPS (32000 long / 4000 Path-X), BATCH (32), BUDGET (seconds, 540), N (Path-X images, 20000), DEVICE (cuda)
# ListOps runs are `study.py long` (long<steps>-listops-<row>-s0), Path-X runs `study.py run` (the LRA table's
# pathx_<row>_s0). Runs checkpoint every 250 steps (eval/runs/lra/<run>/last.pt); the command stops itself before
# BUDGET and copies each run's log, result and checkpoints under $OUT: put eval/runs/lra back from there (and carry
# it) to resume, and commit eval/results/lra/*.json and the logs when a run is done.
set -u
cd "$(dirname "$0")/../.."
TASK=${TASK:-listops}
DEVICE=${DEVICE:-cuda}
BUDGET=${BUDGET:-540}
BATCH=${BATCH:-32}
OUT=${OUT:-/tmp/gpu_runs_out}
export PYTHONPATH=$PWD
if [ "$DEVICE" = cuda ]; then
    python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'" || exit 3
    nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
fi
if [ "$TASK" = pathx ]; then
    ROWS=${ROWS:-"ldn_implicit_sinpos_torch_init transformer ldn linear_transformer"}
    STEPS=${STEPS:-4000}
    N=${N:-20000}
    # the data is made here (a minute on 16 cores) rather than carried: 20k images are ~30 MB compressed
    [ -f eval/data/lra/pathfinder128_hard.npz ] || python eval/lra/pathfinder.py --size 128 --difficulty hard \
        --n "$N" --workers "$(nproc)" || exit 4
    MODE=(run --task pathx --seeds 0)
    PATTERN="pathx_*"
else
    ROWS=${ROWS:-"ldn_implicit_sinpos_torch_init transformer"}
    STEPS=${STEPS:-32000}
    [ -f eval/data/lra/listops.pt ] || python eval/lra/tasks.py || exit 4
    MODE=(long --task "$TASK")
    PATTERN="long*-$TASK-*"
fi
JOBS=$(echo $ROWS | wc -w)
# GNU timeout signals the whole process group: the runner and its training processes stop together
timeout "$BUDGET" python eval/lra/study.py "${MODE[@]}" --rows $ROWS --steps "$STEPS" --batch-size "$BATCH" \
    --jobs "$JOBS" --device "$DEVICE"
status=$?
mkdir -p "$OUT/results" "$OUT/runs"
for d in eval/runs/lra/$PATTERN; do
    [ -d "$d" ] || continue
    run=$(basename "$d")
    mkdir -p "$OUT/runs/$run"
    cp eval/results/lra/"$run".json "$OUT/results/" 2>/dev/null
    cp "$d"/log.csv "$d"/stdout.log "$d"/last.pt "$d"/best.pt "$OUT/runs/$run/" 2>/dev/null
    tail -n 1 "$d/stdout.log"
done
exit $status
