"""``ldn predict IMAGE_OR_DIR... --model NAME[.TAG]``: top-k classes of images and folders of images.

Weights, in order: ``--checkpoint FILE`` (your own), the verified copy shipped in ``weights/`` when the manifest
records one (offline), else ``pretrained=True`` (Hub download, sha256-verified). Preprocessing is timm's
``resolve_data_config`` + ``create_transform`` from the model's pretrained cfg.

Output: results on stdout, one line per image (``--json``: one JSON object per line, nothing else); notes and the
progress bar on stderr. The bar is drawn only when stdout and stderr are both terminals, and results are written
through tqdm so a bar line is cleared before a result is printed (never ``  40%|███ img.png: Coat``).
"""
import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch

__all__ = ['add_arguments', 'run', 'collect_images']

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.gif', '.webp', '.tif', '.tiff', '.ppm', '.pgm')
PROGRESS_MIN_IMAGES = 10  # below this a bar is noise


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('inputs', nargs='*', metavar='IMAGE_OR_DIR',
                        help='image files and/or folders (searched recursively for image files)')
    parser.add_argument('--samples', action='store_true',
                        help='also classify the sample images shipped with timm-ldn (Fashion-MNIST, see `ldn info`)')
    parser.add_argument('--model', '-m', required=True, metavar='NAME[.TAG]', help='e.g. ldn_tiny.<tag>')
    parser.add_argument('--checkpoint', metavar='FILE',
                        help='load these weights instead of the published ones (safetensors / train.py checkpoint)')
    parser.add_argument('--topk', type=int, default=5, help='classes shown per image (default 5)')
    parser.add_argument('--batch-size', type=int, default=16)
    parser.add_argument('--json', action='store_true', help='one JSON object per image on stdout')
    parser.add_argument('--no-progress', action='store_true',
                        help='no progress bar (shown for ≥10 images when stdout and stderr are terminals)')


def collect_images(inputs: Sequence[str]) -> Tuple[List[Path], List[Tuple[str, str]]]:
    """Files to classify (folders expanded, sorted) and (path, reason) for inputs that do not exist."""
    files, missing = [], []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob('*') if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS))
        elif path.is_file():
            files.append(path)  # named explicitly: try it whatever the extension
        else:
            missing.append((item, 'no such file or directory'))
    return files, missing


def _class_names(model: torch.nn.Module) -> Optional[List[str]]:
    names = model.pretrained_cfg.get('label_names')
    if names and len(names) == model.num_classes:
        return [str(n) for n in names]
    if model.num_classes in (1000, 11821, 21841, 21843):
        from timm.data import ImageNetInfo, infer_imagenet_subset
        subset = infer_imagenet_subset(model)
        if subset:
            info = ImageNetInfo(subset)
            return [info.index_to_description(i) for i in range(model.num_classes)]
    return None


def load_model(name: str, checkpoint: Optional[str] = None) -> Tuple[torch.nn.Module, str]:
    """Model with weights for ``name`` and a word on where the weights came from."""
    import timm
    from timm_ldn.hub import local_weight_file

    if checkpoint:
        source, overlay = checkpoint, dict(file=checkpoint)
    else:
        local = local_weight_file(name)  # raises ChecksumError on a tampered copy
        source, overlay = (f'{local} (verified local copy)', dict(file=str(local))) if local else ('hub', None)
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay)
    if source == 'hub':
        source = f'{model.pretrained_cfg.get("hf_hub_id")} ({model.pretrained_cfg.get("file")})'
    return model.eval(), source


def run(args: argparse.Namespace) -> int:
    from PIL import Image
    from timm.data import create_transform, resolve_data_config
    from tqdm import tqdm
    import timm_ldn  # noqa: F401  registers ldn_* with timm
    from timm_ldn.hub import WeightsError, samples_dir

    inputs = list(args.inputs) + ([str(samples_dir())] if args.samples else [])
    if not inputs:
        print('ldn predict: give image files / folders, or --samples for the bundled sample images.', file=sys.stderr)
        return 2
    files, skipped = collect_images(inputs)
    try:
        model, source = load_model(args.model, args.checkpoint)
    except (WeightsError, RuntimeError, FileNotFoundError) as e:
        print(f'ldn predict: cannot load {args.model}: {e}', file=sys.stderr)
        return 2
    print(f'# {args.model}: weights from {source}', file=sys.stderr)
    data_cfg = resolve_data_config({}, model=model)
    transform = create_transform(**data_cfg)
    mode = 'L' if data_cfg['input_size'][0] == 1 else 'RGB'
    names = _class_names(model)
    topk = max(1, min(args.topk, model.num_classes))

    done = 0
    interactive = sys.stdout.isatty() and sys.stderr.isatty()  # a bar in a pipe or log file is only noise
    bar = tqdm(total=len(files), unit='img', file=sys.stderr,
               disable=args.no_progress or len(files) < PROGRESS_MIN_IMAGES or not interactive)
    for start in range(0, len(files), args.batch_size):
        batch, paths = [], []
        for path in files[start:start + args.batch_size]:
            try:
                with Image.open(path) as img:
                    batch.append(transform(img.convert(mode)))
                paths.append(path)
            except Exception as e:  # PIL raises many types for broken / non-image files
                skipped.append((str(path), f'{type(e).__name__}: {e}'))
        bar.update(len(files[start:start + args.batch_size]))
        if not batch:
            continue
        with torch.no_grad():
            probs = model(torch.stack(batch)).softmax(-1)
        values, indices = probs.topk(topk, dim=-1)
        for path, vals, idxs in zip(paths, values.tolist(), indices.tolist()):
            preds = [dict(index=i, label=names[i] if names else str(i), prob=round(v, 6)) for v, i in zip(vals, idxs)]
            if args.json:
                line = json.dumps(dict(image=str(path), topk=preds))
            else:
                line = f'{path}: ' + ', '.join(f'{p["label"]} ({100 * p["prob"]:.1f}%)' for p in preds)
            tqdm.write(line, file=sys.stdout)  # clears the bar first, then redraws it below the result
            done += 1
    bar.close()

    for path, reason in skipped:
        print(f'skipped {path}: {reason}', file=sys.stderr)
    if not done:
        print(f'ldn predict: no readable image in {" ".join(inputs)} ({len(skipped)} skipped).', file=sys.stderr)
        return 1
    print(f'# {done} image(s) classified, {len(skipped)} skipped', file=sys.stderr)
    return 0
