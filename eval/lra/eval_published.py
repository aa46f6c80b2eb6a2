"""Score a published sequence model, loaded as users load it (``load_published``: sha256-verified), on its task's
test split, and compare with the manifest's figure.

    python eval/lra/eval_published.py ldn_seq_listops_512.lra --expect 35.06
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_lra import TaskData, evaluate  # noqa: E402

from timm_ldn.hub import load_manifest  # noqa: E402
from timm_ldn.sequence import load_published  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('name')
    p.add_argument('--task', default='listops')
    p.add_argument('--expect', type=float, default=None, help='fail unless the accuracy is within --tol of this')
    p.add_argument('--tol', type=float, default=0.01)
    p.add_argument('--threads', type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_published(args.name).eval()
    acc = evaluate(model, TaskData(args.task, 'test'))
    published = load_manifest()['weights'][args.name]['eval'].get('test_acc')
    print(f'{args.name} on {args.task} test: {acc:.2f} % (manifest: {published})')
    if args.expect is not None and abs(acc - args.expect) > args.tol:
        print(f'FAIL: {acc:.2f} % differs from the expected {args.expect:.2f} % by more than {args.tol}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
