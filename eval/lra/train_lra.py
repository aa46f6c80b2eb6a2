"""Train one row of the sequence benchmark on one task under the shared recipe; resumable.

    python eval/lra/train_lra.py --task listops --row ldn --seed 0 --steps 6000 --threads 1

Recipe (every row, every task): timm's AdamW (lr 1e-3, weight decay 0.05 except norms, biases and the model's
``no_weight_decay()``, K's a_raw / tau) and cosine schedule with a linear warm-up over 5 % of the steps, batch 32, gradient clipping 1.0, cross-entropy. ListOps batches
are drawn from a window of length-sorted sequences (uniform coverage, little padding) and padded to their longest
sequence with the padding mask; pixel tasks are fixed length and sampled uniformly. Every
``--eval-every`` steps the validation split is scored and the best checkpoint (on validation) kept; the test split is
read once, at the end, with that checkpoint. The log (``eval/runs/lra/<run>/log.csv``) records training time per
interval, so accuracy can be read at equal steps and at equal wall-clock time.
"""
import argparse
import csv
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
import models  # noqa: E402
from builder import build_model  # noqa: E402  eval/builder.py: the one builder
import tasks  # noqa: E402

RUNS = HERE.parent / 'runs' / 'lra'
RESULTS = HERE.parent / 'results' / 'lra'
ARCH = dict(embed_dim=64, depth=4, num_heads=4, mlp_ratio=4.)


def length_window_sample(by_length: torch.Tensor, batch_size: int, gen: torch.Generator,
                         window: int = 1024) -> torch.Tensor:
    """``batch_size`` indices drawn uniformly from a cyclic window of ``window`` consecutive entries of
    ``by_length`` (indices sorted by sequence length) at a uniform random start: a batch pads to nearly its own
    lengths, and every sequence lies in exactly ``window`` of the ``n`` windows, so each is drawn with the same
    probability as under uniform sampling (a clipped, non-cyclic window would under-draw the shortest and longest)."""
    n = len(by_length)
    if window >= n:
        return by_length[torch.randint(0, n, (batch_size,), generator=gen)]
    start = int(torch.randint(0, n, (1,), generator=gen))
    return by_length[(start + torch.randint(0, window, (batch_size,), generator=gen)) % n]


class TaskData:
    """One task's split as (inputs, padding mask, labels) batches."""

    def __init__(self, task: str, split: str, subset: int = 0, seed: int = 0):
        self.task = task
        self.pairs = None  # retrieval: (P, 2) chunk indices; an example is a pair, its length the longer one's
        if task in tasks.TOKEN_TASKS:
            data = tasks.load_listops()[split] if task == 'listops' else tasks.load_text(split, task)
            self.ids, self.lengths, self.labels = data['ids'], data['lengths'], data['labels']
            self.pairs = data.get('pairs')
        else:
            self.x, self.labels = tasks.load_pixel_task(task, split)
        if subset and subset < len(self.labels):
            keep = torch.randperm(len(self.labels), generator=torch.Generator().manual_seed(1000 + seed))[:subset]
            keep = keep.sort().values
            if self.pairs is not None:
                self.pairs = self.pairs[keep]
            elif task in tasks.TOKEN_TASKS:
                self.ids, self.lengths = self.ids[keep], self.lengths[keep]
            else:
                self.x = self.x[keep]
            self.labels = self.labels[keep]

        # training batches come from a window of length-sorted sequences (see sample): ListOps lengths run 32-512,
        # and a batch of 32 random ones pads to ~500 tokens where its median is ~250 (text: 1-4 kB, median 1.75)
        self.by_length = None
        if task in tasks.TOKEN_TASKS:
            self.by_length = (self.lengths if self.pairs is None else self.lengths[self.pairs].amax(1)).argsort(stable=True)

    def __len__(self) -> int:
        return len(self.labels)

    def sample(self, batch_size: int, gen: torch.Generator) -> torch.Tensor:
        """Training batch indices: uniform (pixel tasks) or :func:`length_window_sample` (ListOps)."""
        if self.by_length is None:
            return torch.randint(0, len(self), (batch_size,), generator=gen)
        return length_window_sample(self.by_length, batch_size, gen)

    def batch(self, idx: torch.Tensor) -> Tuple[torch.Tensor, Any, torch.Tensor]:
        if self.pairs is not None:  # both documents of each pair, first ones then second ones: (2B, L)
            docs = torch.cat([self.pairs[idx, 0], self.pairs[idx, 1]])
            L = int(self.lengths[docs].max())
            mask = torch.arange(L)[None, :] >= self.lengths[docs][:, None]
            return self.ids[docs, :L].long(), mask, self.labels[idx]
        if self.task in tasks.TOKEN_TASKS:
            L = int(self.lengths[idx].max())
            ids = self.ids[idx, :L].long()
            mask = torch.arange(L)[None, :] >= self.lengths[idx][:, None]
            return ids, mask, self.labels[idx]
        return self.x[idx], None, self.labels[idx]

    def model_kwargs(self) -> Dict[str, Any]:
        if self.task == 'listops':
            return dict(num_classes=10, vocab_size=len(tasks.listops.VOCAB), max_len=tasks.LISTOPS['max_len'])
        if self.task == 'text':
            return dict(num_classes=len(tasks.text_classes()), vocab_size=256, max_len=self.ids.shape[1])
        if self.task == 'retrieval':
            return dict(num_classes=2, vocab_size=256, max_len=self.ids.shape[1])
        return dict(num_classes=2 if self.task in tasks.PATHFINDER_TASKS else 10, in_features=1,
                    max_len=self.x.shape[1])


def optimizer_param_names(opt: torch.optim.Optimizer, model: nn.Module) -> List[List[str]]:
    """The parameter names of each optimizer group, saved beside its state so a resume maps the state by name."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [[name_of[id(p)] for p in group['params']] for group in opt.param_groups]


def legacy_param_names(model: nn.Module) -> List[List[str]]:
    """Groups of checkpoints written before the trainer used timm's factories (before 0ec41ae): [decay, no decay],
    no decay on parameters under 2-D and on K's a_raw / tau."""
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (no_decay if p.ndim < 2 or n.endswith(('a_raw', 'tau')) else decay).append(n)
    return [decay, no_decay]


def load_optimizer_state(opt: torch.optim.Optimizer, model: nn.Module, saved: Dict[str, Any],
                         saved_names: Optional[List[List[str]]]) -> None:
    """Load ``saved`` into ``opt`` by parameter name, whatever the groups were when it was saved, so a change of the
    grouping (as timm's factory made) never makes a run unresumable. Hyper-parameters stay the current ones."""
    saved_names = saved_names or legacy_param_names(model)
    if [len(n) for n in saved_names] != [len(g['params']) for g in saved['param_groups']]:
        raise ValueError('the checkpoint\'s optimizer groups do not match its parameter names: resume from a checkpoint '
                         'this trainer wrote, or start the run again without --resume')
    state_by_name = {}
    for names, group in zip(saved_names, saved['param_groups']):
        for n, idx in zip(names, group['params']):
            if idx in saved['state']:
                state_by_name[n] = saved['state'][idx]
    current = opt.state_dict()
    cur_names = optimizer_param_names(opt, model)
    missing = sorted(set(sum(cur_names, [])) - set(sum(saved_names, [])))
    if missing:
        raise ValueError(f'the checkpoint has no optimizer state for {missing[:3]}: the model changed since it was saved; '
                         'resume with the row it was trained with, or start again without --resume')
    params = dict(model.named_parameters())
    wrong = [n for n, st in state_by_name.items() if 'exp_avg' in st and st['exp_avg'].shape != params[n].shape]
    if wrong:
        raise ValueError(f'the checkpoint\'s optimizer state does not fit {wrong[:3]}: it was saved from another model')
    state = {idx: state_by_name[n] for names, group in zip(cur_names, current['param_groups'])
             for n, idx in zip(names, group['params']) if n in state_by_name}
    opt.load_state_dict(dict(state=state, param_groups=current['param_groups']))


def to_device(batch: Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor], device: torch.device,
              ) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """``(x, padding_mask or None, labels)`` on ``device`` (the data stays on the CPU; batches travel)."""
    return tuple(None if t is None else t.to(device, non_blocking=True) for t in batch)


@torch.no_grad()
def evaluate(model: nn.Module, data: TaskData, batch_size: int = 100, device: Any = 'cpu') -> float:
    model.eval()
    correct = 0
    order = data.by_length if data.by_length is not None else torch.arange(len(data))  # batches pad less
    for start in range(0, len(data), batch_size):
        x, mask, y = to_device(data.batch(order[start:start + batch_size]), device)
        correct += (model(x, mask).argmax(-1) == y).sum().item()
    model.train()
    return 100. * correct / len(data)


def run(args: argparse.Namespace) -> Dict[str, Any]:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name = args.experiment or f'{args.task}_{args.row}_s{args.seed}'
    run_dir = RUNS / name
    run_dir.mkdir(parents=True, exist_ok=True)
    train = TaskData(args.task, 'train', args.train_subset, args.seed)
    val = TaskData(args.task, 'validation', args.val_subset, args.seed)
    torch.manual_seed(args.seed)
    arch = dict(ARCH, **train.model_kwargs())
    if args.task == 'retrieval':  # two towers, one shared encoder (LRA's AAN setup)
        model = models.DualEncoderClassifier(build_model(args.row, sequence=True, **dict(arch, num_classes=0)),
                                             arch['embed_dim'], num_classes=arch['num_classes'])
    else:
        model = build_model(args.row, sequence=True, **arch)
    model = model.to(device)
    params = sum(p.numel() for p in model.parameters())
    # timm's factories: no weight decay on 1-D parameters and on model.no_weight_decay() (K's a_raw / τ); a linear
    # warm-up over 5 % of the steps (from lr / warm-up steps), then a cosine to 0 over the rest, stepped per update
    opt = create_optimizer_v2(model, 'adamw', lr=args.lr, weight_decay=args.weight_decay)
    warmup = max(1, int(0.05 * args.steps))
    sched = CosineLRScheduler(opt, t_initial=max(1, args.steps - warmup), lr_min=0., warmup_t=warmup,
                              warmup_lr_init=args.lr / warmup, warmup_prefix=True, t_in_epochs=False)

    step, rows, best = 0, [], -1.
    gen = torch.Generator().manual_seed(args.seed)
    last = run_dir / 'last.pt'
    if args.resume and last.is_file():
        ckpt = torch.load(last, weights_only=False, map_location=device)
        model.load_state_dict(ckpt['model'])
        load_optimizer_state(opt, model, ckpt['opt'], ckpt.get('opt_names'))
        step, rows, best = ckpt['step'], ckpt['rows'], ckpt['best']
        gen.set_state(ckpt['gen'])
        print(f'resumed {name} at step {step}', flush=True)
    model.train()
    t0, seen, loss_sum, correct = time.perf_counter(), 0, 0., 0
    while step < args.steps:
        idx = train.sample(args.batch_size, gen)
        x, mask, y = to_device(train.batch(idx), device)
        sched.step_update(step)
        out = model(x, mask)
        loss = F.cross_entropy(out, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        seen += len(y)
        loss_sum += loss.item() * len(y)
        correct += (out.argmax(-1) == y).sum().item()
        if step % args.eval_every == 0 or step == args.steps:
            train_s = time.perf_counter() - t0
            val_acc = evaluate(model, val, device=device)
            cum = (rows[-1]['cum_train_s'] if rows else 0.) + train_s
            rows.append(dict(step=step, train_loss=loss_sum / seen, train_acc=100. * correct / seen, val_acc=val_acc,
                             train_s=train_s, cum_train_s=cum, seq_s=seen / train_s, lr=opt.param_groups[0]['lr']))
            if val_acc > best:
                best = val_acc
                torch.save(model.state_dict(), run_dir / 'best.pt')
            torch.save(dict(model=model.state_dict(), opt=opt.state_dict(), opt_names=optimizer_param_names(opt, model), step=step, rows=rows, best=best,
                            gen=gen.get_state()), last)
            with open(run_dir / 'log.csv', 'w', newline='') as f:
                w = csv.DictWriter(f, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(rows)
            print(f'{name} step {step}/{args.steps} loss {rows[-1]["train_loss"]:.3f} train {rows[-1]["train_acc"]:.1f} '
                  f'val {val_acc:.2f} (best {best:.2f}) {rows[-1]["seq_s"]:.0f} seq/s', flush=True)
            t0, seen, loss_sum, correct = time.perf_counter(), 0, 0., 0
    model.load_state_dict(torch.load(run_dir / 'best.pt', weights_only=True, map_location=device))
    best_row = max(rows, key=lambda r: r['val_acc'])
    test_acc = evaluate(model, TaskData(args.task, 'test'), device=device)
    summary = dict(task=args.task, row=args.row, seed=args.seed, steps=args.steps, batch_size=args.batch_size,
                   lr=args.lr, arch=arch, params=params, train_subset=args.train_subset or len(train),
                   val_subset=len(val), best_step=best_row['step'], val_acc=best_row['val_acc'], test_acc=test_acc,
                   train_seq_s=sum(r['seq_s'] * r['train_s'] for r in rows) / sum(r['train_s'] for r in rows),
                   train_s=rows[-1]['cum_train_s'], threads=args.threads, device=str(device), log=str((run_dir / 'log.csv').relative_to(HERE.parent.parent)))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f'{name}.json').write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1), flush=True)
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--task', choices=tasks.TASKS, required=True)
    p.add_argument('--row', choices=list(models.ROWS), required=True)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--steps', type=int, default=5000)
    p.add_argument('--batch-size', type=int, default=32)
    p.add_argument('--lr', type=float, default=1e-3)
    p.add_argument('--weight-decay', type=float, default=0.05)
    p.add_argument('--eval-every', type=int, default=250)
    p.add_argument('--train-subset', type=int, default=0, help='train on a fixed random subset (0: all)')
    p.add_argument('--val-subset', type=int, default=2000, help='validation sequences scored per evaluation')
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--device', default='cpu', help="'cpu' or 'cuda' (eval/lra/gpu_runs.sh)")
    p.add_argument('--experiment', default='')
    p.add_argument('--resume', action='store_true')
    run(p.parse_args(argv))
    return 0


if __name__ == '__main__':
    sys.exit(main())
