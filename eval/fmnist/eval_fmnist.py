"""Evaluate shipped Fashion-MNIST weights the way a user loads them, on the 10k test set.

    python eval/fmnist/eval_fmnist.py                                   # ldn_nano_convtok_28.fmnist, shipped copy
    python eval/fmnist/eval_fmnist.py --model ldn_nano_patch4_28.fmnist_v2 --file weights/ldn_nano_patch4_28.fmnist_v2/model.safetensors
    python eval/fmnist/eval_fmnist.py --hub                             # plain pretrained=True (Hub download)

Model: ``timm.create_model(NAME, pretrained=True)``; the weight file is the sha256-verified copy in
``weights/`` that the manifest lists (``local_file``), handed to timm as ``pretrained_cfg_overlay=dict(file=...)``
(``--hub`` lets timm download instead, ``--file`` loads another file). Preprocessing is nothing but timm's
standard eval transform from the tag's pretrained cfg: ``resolve_data_config`` + ``create_transform``.
Prints top-1/top-5 and per-class accuracy, writes the confusion matrix PNG and a JSON of the numbers
(default: ``eval/results/<arch>_<tag>_confusion.png`` / ``<arch>_<tag>_eval.json``).
"""
import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

import timm
from timm.data import create_dataset, create_transform, resolve_data_config

import timm_ldn  # noqa: F401  registers ldn_* with timm

HERE = Path(__file__).resolve().parent
EVAL_DIR = HERE.parent
DEFAULT_MODEL = 'ldn_nano_convtok_28.fmnist'  # the README main job's model
DEFAULT_DATA = EVAL_DIR / 'data' / 'fmnist'
RESULTS_DIR = EVAL_DIR / 'results'


def load_model(name: str, file: Optional[str] = None, hub: bool = False) -> torch.nn.Module:
    """``timm.create_model(name, pretrained=True)`` with the weight source a user would have."""
    overlay = None
    if file:
        overlay = dict(file=str(file))
    elif not hub:
        from timm_ldn.hub import local_weight_file
        local = local_weight_file(name)  # sha256-checked against weights/manifest.json
        if local is None:
            raise FileNotFoundError(
                f'No shipped copy of {name} in weights/ (manifest local_file); use --hub or --file.')
        overlay = dict(file=str(local))
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay).eval()


@torch.no_grad()
def evaluate(model: torch.nn.Module, data_dir: Path, split: str, batch_size: int) -> Dict[str, Any]:
    cfg = resolve_data_config({}, model=model)
    transform = create_transform(**cfg)  # timm's standard eval transform for this pretrained cfg
    root = Path(data_dir)
    if not (root / split).is_dir():
        raise FileNotFoundError(f'{root / split} missing: run `python eval/fmnist/fmnist_data.py` first.')
    ds = create_dataset(
        '', root=str(root), split=split, transform=transform,
        input_img_mode='L' if cfg['input_size'][0] == 1 else 'RGB')
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=1)
    n_cls = model.num_classes
    confusion = torch.zeros(n_cls, n_cls, dtype=torch.long)
    top5 = 0
    t0 = time.perf_counter()
    for x, y in loader:
        logits = model(x)
        pred = logits.argmax(-1)
        confusion.index_put_((y, pred), torch.ones_like(y), accumulate=True)
        top5 += (logits.topk(5, -1).indices == y[:, None]).any(-1).sum().item()
    n = int(confusion.sum())
    return dict(
        split=split, images=n, top1=100. * confusion.diag().sum().item() / n, top5=100. * top5 / n,
        per_class_top1=(100. * confusion.diag() / confusion.sum(1).clamp_min(1)).tolist(),
        confusion=confusion.tolist(), data_config={k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
        seconds=time.perf_counter() - t0)


def plot_confusion(confusion: List[List[int]], labels: List[str], title: str, path: Path) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    import numpy as np
    cm = np.asarray(confusion)
    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    im = ax.imshow(cm, cmap='Blues')
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha='right')
    ax.set_yticks(range(len(labels)), labels)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha='center', va='center', fontsize=7,
                    color='white' if cm[i, j] > cm.max() / 2 else 'black')
    ax.set(xlabel='predicted', ylabel='true', title=title)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def write_samples(model: torch.nn.Module, out: Path, subset: int = 2000) -> Dict[str, Any]:
    """Bundle the first official test image of each class as PNG (README demo) with what the model predicts.

    ``samples.json`` records label and prediction per file, and the top-1 on the first ``subset`` official test
    images read straight from the IDX file: tests/test_fmnist.py checks the shipped weights against both.
    """
    from PIL import Image
    sys.path[:0] = [str(HERE), str(EVAL_DIR)]
    import fmnist_data
    images, labels = fmnist_data.load_split(fmnist_data.DEFAULT_SRC, 'test')
    tf = create_transform(**resolve_data_config({}, model=model))

    @torch.no_grad()
    def predict(arrs) -> torch.Tensor:
        return model(torch.stack([tf(Image.fromarray(a, mode='L')) for a in arrs])).argmax(-1)

    out.mkdir(parents=True, exist_ok=True)
    picks = [int(next(i for i in range(len(labels)) if labels[i] == c)) for c in range(len(fmnist_data.CLASS_NAMES))]
    preds = predict(images[picks]).tolist()
    meta: Dict[str, Any] = dict(source='Fashion-MNIST test split (t10k), first image of each class', images={})
    for i, p in zip(picks, preds):
        name = f'{i:05d}_{fmnist_data.CLASS_NAMES[labels[i]]}.png'
        Image.fromarray(images[i], mode='L').save(out / name)
        meta['images'][name] = dict(test_index=i, label=int(labels[i]), predicted=int(p))
    sub = predict(images[:subset])
    meta['test_subset'] = dict(
        images=subset, top1=100. * (sub == torch.from_numpy(labels[:subset].astype('int64'))).float().mean().item())
    meta['model'] = model.pretrained_cfg.get('architecture', '') + '.' + model.pretrained_cfg.get('tag', '')
    (out / 'samples.json').write_text(json.dumps(meta, indent=2) + '\n')
    print(f'wrote {len(picks)} samples to {out} ({sum(p == labels[i] for i, p in zip(picks, preds))} correct); '
          f'first {subset} test images top-1 {meta["test_subset"]["top1"]:.2f}%')
    return meta


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', default=DEFAULT_MODEL, help='timm name with pretrained tag')
    src = p.add_mutually_exclusive_group()
    src.add_argument('--file', help='weight file to load instead of the shipped copy')
    src.add_argument('--hub', action='store_true', help='plain pretrained=True: let timm download from the Hub')
    p.add_argument('--data-dir', type=Path, default=DEFAULT_DATA)
    p.add_argument('--split', default='test')
    p.add_argument('--batch-size', type=int, default=500)
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--confusion-png', type=Path, default=None, help='default: eval/results/<arch>_<tag>_confusion.png')
    p.add_argument('--json', type=Path, default=None, help='default: eval/results/<arch>_<tag>_eval.json')
    p.add_argument('--expect', type=float, default=None, help='fail unless top-1 is within --tol of this')
    p.add_argument('--tol', type=float, default=0.1)
    p.add_argument('--write-samples', type=Path, metavar='DIR', help='also bundle demo samples (weights/samples)')
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    stem = args.model.replace('.', '_')
    args.confusion_png = args.confusion_png or RESULTS_DIR / f'{stem}_confusion.png'
    args.json = args.json or RESULTS_DIR / f'{stem}_eval.json'

    model = load_model(args.model, args.file, args.hub)
    res = evaluate(model, args.data_dir, args.split, args.batch_size)
    labels = model.pretrained_cfg.get('label_names') or [str(i) for i in range(model.num_classes)]
    print(f'{args.model} on Fashion-MNIST {args.split} ({res["images"]} images, {res["seconds"]:.1f}s): '
          f'top-1 {res["top1"]:.2f}%  top-5 {res["top5"]:.2f}%')
    for name, acc in zip(labels, res['per_class_top1']):
        print(f'  {name:<12s} {acc:6.2f}%')
    plot_confusion(res['confusion'], list(labels), f'{args.model}: {args.split} top-1 {res["top1"]:.2f}%',
                   args.confusion_png)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    with open(args.json, 'w') as f:
        json.dump(dict(model=args.model, **res), f, indent=2)
    print(f'wrote {args.confusion_png} and {args.json}')
    if args.write_samples:
        write_samples(model, args.write_samples)
    if args.expect is not None and abs(res['top1'] - args.expect) > args.tol:
        print(f'FAIL: top-1 {res["top1"]:.2f}% differs from the expected {args.expect:.2f}% by more than '
              f'{args.tol}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
