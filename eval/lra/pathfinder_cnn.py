"""Sanity check of the generated Pathfinder: a small residual CNN must learn it before any sequence row runs on it.

    python eval/lra/pathfinder.py --size 32 --difficulty easy --n 50000      # once per difficulty
    python eval/lra/pathfinder_cnn.py --difficulty easy --epochs 12 --threads 1
    python eval/lra/pathfinder_cnn.py --difficulty hard --epochs 12 --threads 1

If the CNN does not clear 90 % test on the easy split, suspect the generator or the sample size first (issue 28).
The CNN sees the 32x32 image as an image (no sequence), about the sequence rows' parameter budget (~0.2 M):
a 3x3 stem (16 channels, full resolution, so one-pixel contours are seen whole), then three stages of two basic
residual blocks (widths 32 / 48 / 64 at 16 / 8 / 4 px: stride 2 at each stage's first block; BatchNorm, ReLU),
global average pool, linear head. Recipe: timm's AdamW (lr 2e-3, weight decay 0.05 except norms and biases)
and cosine schedule with warm-up, batch 64, random flips and 90-degree rotations (the task is invariant to both).
Validation is scored every epoch; the test split is read once with the best-validation weights.
Writes ``eval/results/lra/pathfinder_cnn_<difficulty>.json`` and its per-epoch log.
"""
import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import pathfinder  # noqa: E402

RESULTS = HERE.parent / 'results' / 'lra'


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class PathfinderCNN(nn.Module):
    """Residual CNN for 1x32x32 Pathfinder images (stages at 16, 8 and 4 px)."""

    def __init__(self, stem_width: int = 16, widths=(32, 48, 64), num_classes: int = 2):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, stem_width, 3, 1, 1, bias=False), nn.BatchNorm2d(stem_width), nn.ReLU())
        blocks, cin = [], stem_width
        for w in widths:
            blocks += [BasicBlock(cin, w, 2), BasicBlock(w, w, 1)]
            cin = w
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def to_input(images) -> torch.Tensor:
    """uint8 (N, 32, 32) -> float (N, 1, 32, 32), zero mean and unit scale (pixels / 255 − 0.5) * 4."""
    return (torch.as_tensor(images).float().unsqueeze(1) / 255. - 0.5) * 4.


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and 90-degree rotation per batch (both keep a path a path)."""
    if torch.rand((), generator=gen) < 0.5:
        x = x.flip(-1)
    return torch.rot90(x, int(torch.randint(0, 4, (), generator=gen)), (-2, -1))


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 500) -> float:
    model.eval()
    correct = sum((model(x[i:i + batch]).argmax(-1) == y[i:i + batch]).sum().item() for i in range(0, len(y), batch))
    model.train()
    return 100. * correct / len(y)


def run(args: argparse.Namespace) -> Dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    data = pathfinder.load_pathfinder(32, args.difficulty)
    (xtr, ytr), (xva, yva), (xte, yte) = [(to_input(i), torch.as_tensor(l).long()) for i, l in
                                          (data[s] for s in pathfinder.SPLITS)]
    if args.train_subset:
        xtr, ytr = xtr[:args.train_subset], ytr[:args.train_subset]
    model = PathfinderCNN()
    params = sum(p.numel() for p in model.parameters())
    steps_per_epoch = len(ytr) // args.batch_size
    opt = create_optimizer_v2(model, 'adamw', lr=args.lr, weight_decay=args.weight_decay)
    sched, _ = create_scheduler_v2(opt, 'cosine', num_epochs=args.epochs, warmup_epochs=1, warmup_lr=args.lr / 10,
                                   min_lr=0., step_on_epochs=False, updates_per_epoch=steps_per_epoch)
    gen = torch.Generator().manual_seed(args.seed)
    log: List[Dict] = []
    best, best_state, t_train = -1., None, 0.
    for epoch in range(args.epochs):
        t0, loss_sum, correct = time.perf_counter(), 0., 0
        order = torch.randperm(len(ytr), generator=gen)
        for step in range(steps_per_epoch):
            idx = order[step * args.batch_size:(step + 1) * args.batch_size]
            x, y = augment(xtr[idx], gen), ytr[idx]
            out = model(x)
            loss = F.cross_entropy(out, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step_update(epoch * steps_per_epoch + step + 1)
            loss_sum += loss.item() * len(y)
            correct += (out.argmax(-1) == y).sum().item()
        t_train += time.perf_counter() - t0
        val = accuracy(model, xva, yva)
        seen = steps_per_epoch * args.batch_size
        log.append(dict(epoch=epoch + 1, train_loss=loss_sum / seen, train_acc=100. * correct / seen, val_acc=val,
                        train_s=t_train))
        if val > best:
            best, best_state = val, {k: v.clone() for k, v in model.state_dict().items()}
        print(f'epoch {epoch + 1}/{args.epochs} loss {log[-1]["train_loss"]:.3f} train {log[-1]["train_acc"]:.1f} '
              f'val {val:.2f} (best {best:.2f}) {t_train / 60:.1f} min', flush=True)
    model.load_state_dict(best_state)
    result = dict(difficulty=args.difficulty, contour_length=pathfinder.DIFFICULTY[args.difficulty], params=params,
                  train_images=len(ytr), epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                  best_val_acc=best, test_acc=accuracy(model, xte, yte), train_min=t_train / 60,
                  threads=args.threads, log=log)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f'pathfinder_cnn_{args.difficulty}.json'
    out.write_text(json.dumps(result, indent=1))
    print(f'{args.difficulty}: test {result["test_acc"]:.2f} % (best val {best:.2f}), {params / 1e3:.0f} k params '
          f'-> {out}', flush=True)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--difficulty', choices=list(pathfinder.DIFFICULTY), default='easy')
    p.add_argument('--epochs', type=int, default=12)
    p.add_argument('--batch-size', type=int, default=64)
    p.add_argument('--lr', type=float, default=2e-3)
    p.add_argument('--weight-decay', type=float, default=0.05)
    p.add_argument('--train-subset', type=int, default=0)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--threads', type=int, default=1)
    run(p.parse_args(argv))
    return 0


if __name__ == '__main__':
    sys.exit(main())
