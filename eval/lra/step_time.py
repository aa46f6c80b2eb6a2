"""Size runs before starting them: seconds per training step of each row on real batches of a task, rows
alternating round by round in one process (the recipe's batch, AdamW, 1 thread by default).

    python eval/lra/step_time.py --task listops --rows ldn transformer linear_transformer

Prints the mean padded length of the batches and, per round, each row's mean s / step over the same batches.
"""
import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import models  # noqa: E402
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from builder import build_model  # noqa: E402  eval/builder.py: the one builder
import tasks  # noqa: E402
import train_lra  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--task', choices=tasks.TASKS, default='listops')
    p.add_argument('--rows', nargs='+', choices=list(models.ROWS), default=['ldn', 'transformer'])
    p.add_argument('--steps', type=int, default=10, help='batches per round')
    p.add_argument('--rounds', type=int, default=2)
    p.add_argument('--batch-size', type=int, default=32)
    p.add_argument('--threads', type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    train = train_lra.TaskData(args.task, 'train')
    gen = torch.Generator().manual_seed(0)
    batches = [train.batch(train.sample(args.batch_size, gen)) for _ in range(args.steps)]
    print(f'{args.task}: {args.steps} batches of {args.batch_size}, mean padded length '
          f'{sum(x.shape[1] for x, _, _ in batches) / len(batches):.0f}, {args.threads} thread(s)')
    arch = dict(train_lra.ARCH, **train.model_kwargs())
    state = {}
    for row in args.rows:
        model = build_model(row, sequence=True, **arch).train()
        state[row] = (model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    for rnd in range(args.rounds):
        for row, (model, opt) in state.items():
            t0 = time.perf_counter()
            for x, mask, y in batches:
                loss = F.cross_entropy(model(x, mask), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            print(f'round {rnd}: {row} {(time.perf_counter() - t0) / len(batches):.3f} s/step', flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
