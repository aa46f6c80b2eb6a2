"""Train an LDN variant or its same-size ViT/DeiT baseline on Fashion-MNIST with timm's own components.

timm's ``train.py`` is not part of the pip package, so this short driver calls exactly the pieces it uses:
``create_dataset`` / ``create_loader`` (timm transforms), ``create_optimizer_v2``, ``create_scheduler_v2``,
``ModelEmaV3`` and ``CheckpointSaver``. The recipe is a train.py-format yaml (``eval/fmnist/recipes/fmnist.yaml``),
applied identically to both models.

    python eval/fmnist/fmnist_data.py                                   # once: ImageFolder tree in eval/data/fmnist
    nice -n 19 python eval/fmnist/train_fmnist.py --model ldn_nano_patch4_28
    nice -n 19 python eval/fmnist/train_fmnist.py --model vit_nano_patch4_28      # baseline (eval/fmnist/study_models.py BASELINES)
    nice -n 19 python eval/fmnist/train_fmnist.py --model ldn_nano_patch4_28 --resume   # continue after interruption
    python eval/fmnist/train_fmnist.py --summarize ldn_nano_patch4_28 vit_nano_patch4_28  # results json/csv/png

Per run (``eval/runs/<model>/``): ``last.pth.tar`` / ``model_best.pth.tar`` (CheckpointSaver), ``log.csv``
(one row per epoch). After the last epoch the best-on-validation weights (raw or EMA, whichever validates
higher) are evaluated once on the test split and ``eval/results/fmnist_<model>.json`` is written.
"""
import argparse
import csv
import json
import os
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import yaml

from timm.data import create_dataset, create_loader
from timm.loss import LabelSmoothingCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import CheckpointSaver, ModelEmaV3, ParseKwargs, accuracy

import timm_ldn  # noqa: F401  registers ldn_* with timm
from timm_ldn.profiling import count_cost

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
import fmnist_tensors  # noqa: E402
import study_models  # noqa: E402
from builder import build_model  # noqa: E402

HERE = Path(__file__).resolve().parent
EVAL_DIR = HERE.parent
ROOT = EVAL_DIR.parent
DEFAULT_RECIPE = HERE / 'recipes' / 'fmnist.yaml'
RUNS_DIR = EVAL_DIR / 'runs'
RESULTS_DIR = EVAL_DIR / 'results'

def load_recipe(path: Path) -> Dict[str, Any]:
    with open(path) as f:
        return yaml.safe_load(f)


def model_args(recipe: Dict[str, Any], model_kwargs: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The recipe's classes / channels / drop-path for ``build_model``, with ``model_kwargs`` (e.g. ``mlp_ratio=3.5``)
    on top."""
    return {'num_classes': recipe['num_classes'], 'in_chans': recipe['in_chans'], 'drop_path_rate': recipe['drop_path'],
            **(model_kwargs or {})}


def count_macs(model: nn.Module, input_size: Tuple[int, int, int]) -> float:
    """GMACs of one forward at batch 1, with the project's one counter (``timm_ldn.profiling.count_cost``: meta
    device, attention as explicit matmuls), so the study, the budget table and ``ldn info`` agree."""
    return count_cost(model, input_size)['gmacs']


def make_loader(recipe: Dict[str, Any], split: str, training: bool, batch_size: int) -> torch.utils.data.DataLoader:
    """timm's own input pipeline on the ImageFolder tree (what train.py runs; slow: PIL per sample)."""
    root = Path(recipe['data_dir'])
    if not root.is_absolute():
        root = ROOT / root
    if not (root / split).is_dir():
        raise FileNotFoundError(f'{root / split} missing: run `python eval/fmnist/fmnist_data.py` first.')
    ds = create_dataset(
        recipe['dataset'], root=str(root), split=split, is_training=training,
        input_img_mode=recipe['input_img_mode'])
    kw = dict(
        input_size=tuple(recipe['input_size']), batch_size=batch_size, is_training=training,
        interpolation=recipe['interpolation'], mean=tuple(recipe['mean']), std=tuple(recipe['std']),
        crop_pct=recipe['crop_pct'], num_workers=recipe['workers'], use_prefetcher=False,
        device=torch.device('cpu'), persistent_workers=recipe['workers'] > 0)
    if training:
        kw.update(
            scale=tuple(recipe['scale']), ratio=tuple(recipe['ratio']), hflip=recipe['hflip'], vflip=recipe['vflip'],
            color_jitter=recipe['color_jitter'], re_prob=recipe['reprob'], re_mode=recipe['remode'])
    return create_loader(ds, **kw)


PIPELINES = ('memory', 'timm')
_SPLIT_CACHE: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}


def make_batches(recipe: Dict[str, Any], split: str, training: bool, batch_size: int, pipeline: str = 'memory',
                 seed: int = 0):
    """The split as batches: ``'memory'`` (uint8 tensors, batched torch augmentation) or ``'timm'`` (make_loader)."""
    if pipeline == 'timm':
        return make_loader(recipe, split, training, batch_size)
    if pipeline != 'memory':
        raise ValueError(f'unknown pipeline {pipeline!r}, use one of {PIPELINES}.')
    if split not in _SPLIT_CACHE:
        _SPLIT_CACHE[split] = fmnist_tensors.load_split_tensors(split)
    images, labels = _SPLIT_CACHE[split]
    return fmnist_tensors.TensorBatches(images, labels, batch_size, recipe, training, seed=seed)


@torch.no_grad()
def evaluate(model: nn.Module, loader, max_batches: int = 0) -> Dict[str, float]:
    model.eval()
    n, loss_sum, top1, top5 = 0, 0., 0., 0.
    for i, (x, y) in enumerate(loader):
        if max_batches and i >= max_batches:
            break
        out = model(x)
        loss_sum += nn.functional.cross_entropy(out, y, reduction='sum').item()
        a1, a5 = accuracy(out, y, topk=(1, 5))
        top1 += a1.item() * len(y) / 100
        top5 += a5.item() * len(y) / 100
        n += len(y)
    return dict(loss=loss_sum / n, top1=100 * top1 / n, top5=100 * top5 / n)


def _read_log(path: Path) -> List[Dict[str, str]]:
    if not path.is_file():
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def _write_log(path: Path, rows: List[Dict[str, Any]]) -> None:
    with open(path, 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows(rows)


def run_recipe(args: argparse.Namespace) -> Dict[str, Any]:
    """The recipe with the command line's overrides (schedule, batch, lr, seed, workers; ``--fp32``: no autocast)."""
    recipe = load_recipe(args.config)
    for k in ('epochs', 'batch_size', 'lr', 'seed', 'workers'):
        if getattr(args, k) is not None:
            recipe[k] = getattr(args, k)
    if args.fp32:
        recipe['amp'] = False
    return recipe


def train(args: argparse.Namespace) -> Dict[str, Any]:
    recipe = run_recipe(args)
    torch.set_num_threads(args.threads)
    torch.manual_seed(recipe['seed'])

    run_dir = RUNS_DIR / (args.experiment or args.model)
    run_dir.mkdir(parents=True, exist_ok=True)
    model = build_model(args.model, **model_args(recipe, args.model_kwargs))
    input_size = tuple(recipe['input_size'])
    params = sum(p.numel() for p in model.parameters())
    gmacs = count_macs(model, input_size)
    print(f'{args.model}: {params / 1e6:.3f} M params, {gmacs:.4f} GMACs @ {input_size}', flush=True)

    train_loader = make_batches(
        recipe, recipe['train_split'], True, recipe['batch_size'], args.pipeline, seed=recipe['seed'])
    val_loader = make_batches(recipe, recipe['val_split'], False, recipe['validation_batch_size'], args.pipeline)
    updates_per_epoch = len(train_loader)

    optimizer = create_optimizer_v2(
        model, opt=recipe['opt'], lr=recipe['lr'], weight_decay=recipe['weight_decay'],
        betas=tuple(recipe['opt_betas']))
    scheduler, num_epochs = create_scheduler_v2(
        optimizer, sched=recipe['sched'], num_epochs=recipe['epochs'], warmup_epochs=recipe['warmup_epochs'],
        warmup_lr=recipe['warmup_lr'], min_lr=recipe['min_lr'], step_on_epochs=not recipe['sched_on_updates'],
        updates_per_epoch=updates_per_epoch)
    model_ema = ModelEmaV3(model, decay=recipe['model_ema_decay'], use_warmup=recipe['model_ema_warmup']) \
        if recipe['model_ema'] else None
    loss_fn = LabelSmoothingCrossEntropy(smoothing=recipe['smoothing'])
    # bf16 autocast as train.py's --amp --amp-dtype bfloat16: on avx512_bf16 CPUs it speeds up both models'
    # matmuls; weights, optimizer and EMA stay fp32, the final test evaluation runs in fp32
    amp_dtype = getattr(torch, recipe.get('amp_dtype', 'bfloat16'))
    amp_ctx = partial(torch.autocast, 'cpu', dtype=amp_dtype, enabled=bool(recipe.get('amp')))
    saver = CheckpointSaver(
        model, optimizer, model_ema=model_ema, checkpoint_dir=str(run_dir), recovery_dir=str(run_dir),
        max_history=recipe['checkpoint_hist'])

    log_path = run_dir / 'log.csv'
    start_epoch, rows = 0, []
    if args.resume:
        ckpt_path = run_dir / 'last.pth.tar' if args.resume == 'auto' else Path(args.resume)
        if ckpt_path.is_file():
            ckpt = torch.load(ckpt_path, map_location='cpu', weights_only=True)
            model.load_state_dict(ckpt['state_dict'])
            optimizer.load_state_dict(ckpt['optimizer'])
            if model_ema is not None and 'state_dict_ema' in ckpt:
                model_ema.module.load_state_dict(ckpt['state_dict_ema'])
            start_epoch = ckpt['epoch'] + 1  # saver writes the epoch just completed
            saver.load_state_dict_from_checkpoint(str(ckpt_path))
            rows = [r for r in _read_log(log_path) if int(r['epoch']) < start_epoch]
            print(f'resumed from {ckpt_path} at epoch {start_epoch}', flush=True)
        else:
            print(f'--resume: no checkpoint at {ckpt_path}, starting from scratch', flush=True)

    num_updates = start_epoch * updates_per_epoch
    train_time = sum(float(r['train_s']) for r in rows)
    for epoch in range(start_epoch, num_epochs):
        model.train()
        if hasattr(train_loader, 'set_epoch'):  # resumed runs see the same shuffle/augmentation per epoch
            train_loader.set_epoch(epoch)
        t0 = time.perf_counter()
        n, loss_sum, correct = 0, 0., 0
        for i, (x, y) in enumerate(train_loader):
            if args.max_batches and i >= args.max_batches:
                break
            loss, out = train_step(
                model, x, y, optimizer, loss_fn, amp_ctx, recipe['clip_grad'], model_ema, num_updates + 1)
            num_updates += 1
            scheduler.step_update(num_updates=num_updates)
            n += len(y)
            loss_sum += loss.item() * len(y)
            correct += (out.argmax(-1) == y).sum().item()
            if args.log_interval and (i + 1) % args.log_interval == 0:
                el = time.perf_counter() - t0
                print(f'  epoch {epoch} step {i + 1}/{updates_per_epoch} loss {loss_sum / n:.4f} '
                      f'{n / el:.0f} img/s', flush=True)
        epoch_train_s = time.perf_counter() - t0
        train_time += epoch_train_s
        scheduler.step(epoch + 1)

        with amp_ctx():
            val = evaluate(model, val_loader, args.max_batches)
            val_ema = evaluate(model_ema.module, val_loader, args.max_batches) if model_ema is not None else None
        metric = max(val['top1'], val_ema['top1'] if val_ema else -1.)
        saver.save_checkpoint(epoch, metric=metric)
        epoch_s = time.perf_counter() - t0
        row = dict(
            epoch=epoch, lr=optimizer.param_groups[0]['lr'], train_loss=loss_sum / n, train_top1=100 * correct / n,
            val_loss=val['loss'], val_top1=val['top1'], val_ema_top1=val_ema['top1'] if val_ema else '',
            img_s=n / epoch_train_s, train_s=epoch_train_s, epoch_s=epoch_s, cum_train_s=train_time)
        rows.append(row)
        _write_log(log_path, rows)
        eta = epoch_s * (num_epochs - epoch - 1)
        print(f'epoch {epoch + 1}/{num_epochs} loss {row["train_loss"]:.4f} train {row["train_top1"]:.2f}% '
              f'val {val["top1"]:.2f}% val_ema {val_ema["top1"] if val_ema else float("nan"):.2f}% '
              f'{row["img_s"]:.0f} img/s epoch {epoch_s:.0f}s ETA {eta / 60:.1f} min', flush=True)

    return final_test(args, recipe, run_dir, params, gmacs, rows)


def final_test(
        args: argparse.Namespace, recipe: Dict[str, Any], run_dir: Path, params: int, gmacs: float,
        rows: List[Dict[str, Any]],
) -> Dict[str, Any]:
    """Pick the best validation checkpoint and weights (raw or EMA), then touch the test split once."""
    best = torch.load(run_dir / 'model_best.pth.tar', map_location='cpu', weights_only=True)
    ep = best['epoch']
    row = next(r for r in rows if int(r['epoch']) == ep)
    use_ema = 'state_dict_ema' in best and row['val_ema_top1'] != '' and \
        float(row['val_ema_top1']) >= float(row['val_top1'])
    model = build_model(args.model, **model_args(recipe, args.model_kwargs))
    model.load_state_dict(best['state_dict_ema' if use_ema else 'state_dict'])
    torch.save(model.state_dict(), run_dir / 'best_weights.pth')
    test = evaluate(
        model, make_batches(recipe, 'test', False, recipe['validation_batch_size'], args.pipeline), args.max_batches)
    summary = dict(
        model=args.model,         model_kwargs=args.model_kwargs, experiment=args.experiment or args.model, seed=recipe['seed'],
        pipeline=args.pipeline, precision=recipe.get('amp_dtype', 'bfloat16') if recipe.get('amp') else 'float32',
        params=params, gmacs=gmacs, epochs=len(rows), best_epoch=ep + 1, weights='ema' if use_ema else 'raw',
        val_top1=float(row['val_ema_top1'] if use_ema else row['val_top1']),
        test_top1=test['top1'], test_top5=test['top5'],
        train_img_s=sum(float(r['img_s']) * float(r['train_s']) for r in rows) / sum(float(r['train_s']) for r in rows),
        train_wall_s=sum(float(r['epoch_s']) for r in rows), threads=args.threads,
        recipe=str(Path(args.config).resolve().relative_to(ROOT)) if Path(args.config).resolve().is_relative_to(ROOT)
        else str(args.config),
        log=str((run_dir / 'log.csv').relative_to(ROOT)),
    )
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    with open(RESULTS_DIR / f'fmnist_{args.experiment or args.model}.json', 'w') as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary, indent=2), flush=True)
    return summary


def summarize(names: List[str]) -> None:
    """Side-by-side table (json + csv) and learning curves of finished runs."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    runs = []
    for name in names:
        with open(RESULTS_DIR / f'fmnist_{name}.json') as f:
            s = json.load(f)
        s['curve'] = _read_log(ROOT / s['log'])
        runs.append(s)
    keys = ['model', 'architecture', 'params', 'gmacs', 'epochs', 'best_epoch', 'weights', 'val_top1', 'test_top1',
            'test_top5', 'train_img_s', 'train_wall_s']
    with open(RESULTS_DIR / 'fmnist_results.csv', 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for s in runs:
            w.writerow({k: s[k] for k in keys})
    ldn, base = runs[0], runs[1] if len(runs) > 1 else None
    out = dict(runs={s['model']: {k: v for k, v in s.items() if k != 'curve'} for s in runs})
    if base is not None:
        out['comparison'] = dict(
            ldn_minus_baseline_test_top1=ldn['test_top1'] - base['test_top1'],
            ldn_over_baseline_train_img_s=ldn['train_img_s'] / base['train_img_s'],
            ldn_over_baseline_params=ldn['params'] / base['params'],
            ldn_over_baseline_gmacs=ldn['gmacs'] / base['gmacs'],
            targets=dict(
                ldn_test_top1_ge_92=ldn['test_top1'] >= 92.0,
                ldn_ge_baseline=ldn['test_top1'] >= base['test_top1'],
                ldn_throughput_ge_0_8x=ldn['train_img_s'] >= 0.8 * base['train_img_s']))
    if base is not None:
        # the two runs were started together and ran concurrently: compare throughput over the epochs that both
        # finished while the other was still running (after one ends the other gets its CPU share too)
        def ends(s: Dict[str, Any]) -> List[float]:
            t, out_ = 0., []
            for r in s['curve']:
                t += float(r['epoch_s'])
                out_.append(t)
            return out_
        overlap = min(ends(ldn)[-1], ends(base)[-1])

        def concurrent_img_s(s: Dict[str, Any], overlap: float = overlap) -> float:
            rows_ = [r for r, e in zip(s['curve'], ends(s)) if e <= overlap]
            return sum(float(r['img_s']) * float(r['train_s']) for r in rows_) / sum(float(r['train_s']) for r in rows_)
        out['comparison']['concurrent_window_s'] = overlap
        out['comparison']['concurrent_img_s'] = {s['model']: concurrent_img_s(s) for s in runs}
        ratio = concurrent_img_s(ldn) / concurrent_img_s(base)
        out['comparison']['ldn_over_baseline_concurrent_img_s'] = ratio
        out['comparison']['targets']['ldn_throughput_ge_0_8x'] = ratio >= 0.8  # judged on the fair window
    # further seeds of the same pair (``--experiment <model>_s<k> --seed k``): mean and spread of test top-1
    seeds = {}
    for s in runs:
        extra = sorted(RESULTS_DIR.glob(f"fmnist_{s['model']}_s*.json"))
        vals = [s['test_top1']] + [json.loads(p.read_text())['test_top1'] for p in extra]
        speeds = [s['train_img_s']] + [json.loads(p.read_text())['train_img_s'] for p in extra]
        seeds[s['model']] = dict(
            runs=['seed 0'] + [p.stem[len('fmnist_'):] for p in extra], test_top1=vals,
            test_top1_mean=sum(vals) / len(vals), test_top1_spread=max(vals) - min(vals), train_img_s=speeds)
    if any(len(v['test_top1']) > 1 for v in seeds.values()):
        out['seeds'] = seeds
        if base is not None:
            # throughput of each extra seed pair over the window both of its runs shared (same rule as above)
            pair_ratio = {}
            for p in sorted(RESULTS_DIR.glob(f"fmnist_{ldn['model']}_s*.json")):
                suffix = p.stem[len('fmnist_' + ldn['model']):]
                bp = RESULTS_DIR / f"fmnist_{base['model']}{suffix}.json"
                if bp.is_file():
                    pair = [json.loads(p.read_text()), json.loads(bp.read_text())]
                    for s_ in pair:
                        s_['curve'] = _read_log(ROOT / s_['log'])
                    overlap = min(ends(pair[0])[-1], ends(pair[1])[-1])
                    pair_ratio[suffix.lstrip('_')] = concurrent_img_s(pair[0], overlap) / concurrent_img_s(pair[1], overlap)
            out['seeds']['ldn_over_baseline_concurrent_img_s'] = pair_ratio
    bench_path = RESULTS_DIR / 'fmnist_bench.json'
    if bench_path.is_file():
        out['controlled_benchmark'] = json.loads(bench_path.read_text())
    with open(RESULTS_DIR / 'fmnist_results.json', 'w') as f:
        json.dump(out, f, indent=2)

    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4))
    for s in runs:
        ep = [int(r['epoch']) + 1 for r in s['curve']]
        ax0.plot(ep, [float(r['train_loss']) for r in s['curve']], label=f"{s['model']} train loss")
        ax0.plot(ep, [float(r['val_loss']) for r in s['curve']], '--', label=f"{s['model']} val loss")
        ax1.plot(ep, [float(r['val_top1']) for r in s['curve']], label=f"{s['model']} val")
        if s['curve'] and s['curve'][0]['val_ema_top1']:
            ax1.plot(ep, [float(r['val_ema_top1']) for r in s['curve']], '--', label=f"{s['model']} val (EMA)")
        ax1.plot(ep, [float(r['train_top1']) for r in s['curve']], ':', label=f"{s['model']} train (aug)")
    ax0.set(xlabel='epoch', ylabel='loss', title='Fashion-MNIST: loss')
    ax1.set(xlabel='epoch', ylabel='top-1 (%)', title='Fashion-MNIST: accuracy', ylim=(60, 100))
    for ax in (ax0, ax1):
        ax.grid(alpha=.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS_DIR / 'fmnist_curves.png', dpi=120)
    print(json.dumps(out, indent=2))


def bench(names: List[str], pipelines: List[str], threads: int, steps: int = 20, rounds: int = 5,
          reference: Optional[str] = None, amp: Optional[bool] = None) -> Dict[str, Any]:
    """End-to-end training throughput (input pipeline + step) of models × input pipelines, in one process.

    Every (model, pipeline) pair runs ``steps`` real training steps per round (same step as ``train``: recipe
    batch, bf16 autocast, label smoothing, clip, AdamW, EMA) on the real training split, the pairs alternating
    within each round so they share the machine's state; reports the median img/s per pair and the medians of
    per-round ratios (this machine is shared and noisy).

    Names are anything :func:`build_model` takes: study rows, baselines, registered models.
    With ``reference``, every name also gets its median per-round img/s ratio to that name, per pipeline.
    ``amp`` overrides the recipe's bf16 autocast (False: the fp32 step).
    """
    import statistics
    recipe = load_recipe(DEFAULT_RECIPE)
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    loss_fn = LabelSmoothingCrossEntropy(smoothing=recipe['smoothing'])
    amp = bool(recipe.get('amp')) if amp is None else amp
    amp_ctx = partial(torch.autocast, 'cpu', dtype=getattr(torch, recipe.get('amp_dtype', 'bfloat16')), enabled=amp)
    state = {}
    for name in names:
        for pipeline in pipelines:
            model = build_model(name, **model_args(recipe)).train()
            opt = create_optimizer_v2(model, opt=recipe['opt'], lr=recipe['lr'], weight_decay=recipe['weight_decay'])
            batches = make_batches(recipe, recipe['train_split'], True, recipe['batch_size'], pipeline)
            state[(name, pipeline)] = (model, opt, ModelEmaV3(model, decay=recipe['model_ema_decay']), iter(batches))

    def run(key: Tuple[str, str], n: int) -> float:
        model, opt, ema, it = state[key]
        seen = 0
        t0 = time.perf_counter()
        for _ in range(n):
            x, y = next(it)
            train_step(model, x, y, opt, loss_fn, amp_ctx, recipe['clip_grad'], ema)
            seen += len(y)
        return seen / (time.perf_counter() - t0)

    for key in state:
        run(key, 3)  # warm-up: workers started, allocator and oneDNN primitives ready
    per_round = {key: [] for key in state}
    for _ in range(rounds):
        for key in state:
            per_round[key].append(run(key, steps))

    def median_ratio(a: Tuple[str, str], b: Tuple[str, str]) -> float:
        return statistics.median(x / y for x, y in zip(per_round[a], per_round[b]))

    import subprocess
    commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT, capture_output=True, text=True).stdout
    out = dict(
        commit=commit.strip(), threads=threads, batch_size=recipe['batch_size'], workers=recipe['workers'],
        steps=steps, rounds=rounds,
        img_s={f'{n}/{p}': statistics.median(v) for (n, p), v in per_round.items()},
        img_s_per_round={f'{n}/{p}': v for (n, p), v in per_round.items()})
    if len(pipelines) > 1:  # speed-up of the first pipeline over the second, per model
        out['pipeline_speedup'] = {
            n: median_ratio((n, pipelines[0]), (n, pipelines[1])) for n in names}
    if len(names) > 1:  # first model over second, per pipeline
        out['model_ratio'] = {p: median_ratio((names[0], p), (names[1], p)) for p in pipelines}
    if reference is not None:
        out['reference'] = reference
        out['ratio_vs_reference'] = {
            f'{n}/{p}': median_ratio((n, p), (reference, p)) for n in names for p in pipelines}
    print(json.dumps({k: v for k, v in out.items() if k != 'img_s_per_round'}, indent=2))
    return out


def train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer,
               loss_fn: nn.Module, amp_ctx, clip_grad: float, model_ema: Optional[ModelEmaV3] = None,
               num_updates: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step as train.py does it (autocast forward, backward, clip, step, EMA); (loss, logits)."""
    with amp_ctx():
        out = model(x)
        loss = loss_fn(out, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip_grad:
        nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    optimizer.step()
    if model_ema is not None:
        model_ema.update(model, step=num_updates)
    return loss, out


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--config', type=Path, default=DEFAULT_RECIPE, help='train.py-format recipe yaml')
    p.add_argument('--model', help='a study row, a baseline (' + ', '.join(study_models.BASELINES)
                   + ') or a registered ldn_* model; rows: eval/fmnist/study_models.py ROWS')
    p.add_argument('--experiment', default='', help='run folder name under eval/runs (default: model name)')
    p.add_argument('--resume', nargs='?', const='auto', default='',
                   help='continue from eval/runs/<run>/last.pth.tar (or a given checkpoint)')
    p.add_argument('--epochs', type=int, default=None)
    p.add_argument('--batch-size', dest='batch_size', type=int, default=None)
    p.add_argument('--lr', type=float, default=None)
    p.add_argument('--seed', type=int, default=None)
    p.add_argument('--workers', type=int, default=None)
    p.add_argument('--threads', type=int, default=os.cpu_count(), help='torch intra-op threads (default: all cores)')
    p.add_argument('--pipeline', choices=PIPELINES, default='memory',
                   help="input path: 'memory' (uint8 tensors, batched torch augmentation) or 'timm' (ImageFolder + "
                        "timm's create_loader, as train.py)")
    p.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs, metavar='KEY=VALUE',
                   help='architecture overrides, values read as Python literals (timm convention), e.g. mlp_ratio=3.5')
    p.add_argument('--fp32', action='store_true',
                   help="train without the recipe's bf16 autocast (CPUs without avx512_bf16 / AMX emulate bf16 "
                        'matmuls many times slower); the result records its precision')
    p.add_argument('--max-batches', type=int, default=0, help='smoke test: stop each epoch after N batches')
    p.add_argument('--log-interval', type=int, default=50)
    p.add_argument('--summarize', nargs='+', metavar='RUN', help='write fmnist_results.{json,csv} + curves')
    p.add_argument('--bench', nargs='+', metavar='MODEL',
                   help='end-to-end training throughput of these models in one process, alternating '
                        '(see --bench-pipelines)')
    p.add_argument('--bench-pipelines', nargs='+', choices=PIPELINES, default=list(PIPELINES))
    args = p.parse_args(argv)
    if args.summarize:
        summarize(args.summarize)
        return 0
    if args.bench:
        res = bench(args.bench, args.bench_pipelines, args.threads)
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        with open(RESULTS_DIR / 'fmnist_bench.json', 'w') as f:
            json.dump(res, f, indent=2)
        return 0
    if not args.model:
        p.error('--model is required')
    train(args)
    return 0


if __name__ == '__main__':
    sys.exit(main())
