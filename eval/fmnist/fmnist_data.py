"""Fashion-MNIST -> ImageFolder tree that timm's train.py / validate.py / ``create_dataset`` read unchanged.

Source: the Debian package ``dataset-fashion-mnist`` (IDX files, optionally gzipped, in
``/usr/share/datasets/fashion-mnist/``). Output (default ``eval/data/fmnist``)::

    train/<class>/<idx>.png        60k minus the held-out validation images
    validation/<class>/<idx>.png   a fixed, class-stratified hold-out from the *training* set (model selection)
    test/<class>/<idx>.png         the official 10k test set (final numbers only)

Class folders are prefixed with the label index (``0_tshirt_top`` …) so that the alphabetical folder order
timm's ImageFolder parser uses is exactly the Fashion-MNIST label order.

Usage: ``python eval/fmnist/fmnist_data.py [--src DIR] [--out DIR] [--val-per-class 500]``
"""
import argparse
import gzip
import os
import struct
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np

DEFAULT_SRC = Path('/usr/share/datasets/fashion-mnist')
DEFAULT_OUT = Path(__file__).resolve().parents[1] / 'data' / 'fmnist'
APT_HINT = 'apt-get update && apt-get install -y dataset-fashion-mnist'

# label order of the official dataset; index prefix keeps ImageFolder's sorted order == label order
CLASS_NAMES: Tuple[str, ...] = (
    'tshirt_top', 'trouser', 'pullover', 'dress', 'coat', 'sandal', 'shirt', 'sneaker', 'bag', 'ankle_boot',
)
CLASS_DIRS: Tuple[str, ...] = tuple(f'{i}_{n}' for i, n in enumerate(CLASS_NAMES))

# IDX magic: 0x00 0x00 <dtype 0x08 = ubyte> <ndim>
IDX_UBYTE = 0x08
SPLIT_FILES: Dict[str, Tuple[str, str, int]] = {
    # split: (images stem, labels stem, expected count)
    'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte', 60000),
    'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte', 10000),
}


class IdxFormatError(ValueError):
    """An IDX file whose header or size does not match what Fashion-MNIST must be."""


def _open_bytes(path: Path) -> bytes:
    with open(path, 'rb') as f:
        raw = f.read()
    # gzip magic 1f 8b: the Debian package ships .gz, the upstream mirrors both forms
    if raw[:2] == b'\x1f\x8b':
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise IdxFormatError(f'{path}: corrupt gzip stream ({e}).') from e
    return raw


def read_idx(path: Path, expected_ndim: int, expected_count: int = -1) -> np.ndarray:
    """Read an unsigned-byte IDX file (plain or gzipped) with header and size checks.

    Args:
        path: IDX file.
        expected_ndim: 3 for images (count, rows, cols), 1 for labels.
        expected_count: Number of items the header must declare; -1 to skip the check.
    Returns:
        ``uint8`` array of the declared shape.
    Raises:
        IdxFormatError: bad magic, wrong dtype/ndim, wrong count, or a truncated / oversized payload.
    """
    path = Path(path)
    raw = _open_bytes(path)
    if len(raw) < 4:
        raise IdxFormatError(f'{path}: {len(raw)} bytes, too short for an IDX header.')
    zero0, zero1, dtype, ndim = raw[0], raw[1], raw[2], raw[3]
    if zero0 != 0 or zero1 != 0:
        raise IdxFormatError(f'{path}: bad IDX magic {raw[:4].hex()} (must start with 0000).')
    if dtype != IDX_UBYTE:
        raise IdxFormatError(f'{path}: IDX dtype 0x{dtype:02x}, expected 0x08 (unsigned byte).')
    if ndim != expected_ndim:
        raise IdxFormatError(f'{path}: IDX has {ndim} dims, expected {expected_ndim} (magic {raw[:4].hex()}).')
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise IdxFormatError(f'{path}: truncated IDX header.')
    shape = struct.unpack('>' + 'I' * ndim, raw[4:header])
    if expected_count >= 0 and shape[0] != expected_count:
        raise IdxFormatError(f'{path}: header declares {shape[0]} items, expected {expected_count}.')
    n = int(np.prod(shape))
    if len(raw) - header != n:
        raise IdxFormatError(
            f'{path}: payload is {len(raw) - header} bytes, header shape {tuple(shape)} needs {n}.')
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _find(src: Path, stem: str) -> Path:
    for name in (stem, stem + '.gz'):
        if (src / name).is_file():
            return src / name
    raise FileNotFoundError(
        f'Fashion-MNIST file {stem}[.gz] not found in {src}. Install the data with:\n    {APT_HINT}\n'
        f'or pass --src to a folder holding the IDX files.')


def load_split(src: Path, split: str) -> Tuple[np.ndarray, np.ndarray]:
    """Images ``(N, 28, 28)`` and labels ``(N,)`` of the official ``train`` or ``test`` split, validated."""
    img_stem, lbl_stem, count = SPLIT_FILES[split]
    images = read_idx(_find(src, img_stem), 3, count)
    labels = read_idx(_find(src, lbl_stem), 1, count)
    if images.shape[1:] != (28, 28):
        raise IdxFormatError(f'{split} images are {images.shape[1:]}, expected 28x28.')
    if labels.max() >= len(CLASS_NAMES):
        raise IdxFormatError(f'{split} labels reach {labels.max()}, expected < {len(CLASS_NAMES)}.')
    return images, labels


def stratified_holdout(labels: np.ndarray, per_class: int, seed: int = 0) -> np.ndarray:
    """Boolean mask of ``per_class`` images per class, fixed by ``seed`` (same split on every machine)."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(labels), dtype=bool)
    for c in range(len(CLASS_NAMES)):
        idx = np.flatnonzero(labels == c)
        mask[rng.choice(idx, size=per_class, replace=False)] = True
    return mask


def write_folder(root: Path, images: np.ndarray, labels: np.ndarray, ids: np.ndarray) -> None:
    from PIL import Image  # only needed when writing
    for d in CLASS_DIRS:
        (root / d).mkdir(parents=True, exist_ok=True)
    for img, lbl, i in zip(images, labels, ids):
        # grayscale 'L' PNGs: timm reads them with input_img_mode='L' for in_chans=1 models
        Image.fromarray(img, mode='L').save(root / CLASS_DIRS[lbl] / f'{i:05d}.png', optimize=False)


def prepare(src: Path = DEFAULT_SRC, out: Path = DEFAULT_OUT, val_per_class: int = 500, seed: int = 0) -> Path:
    """Write the train/validation/test tree under ``out`` (skipped when a complete tree is already there)."""
    out = Path(out)
    marker = out / '.complete'
    if marker.is_file():
        print(f'{out} already prepared ({marker.read_text().strip()})')
        return out
    if not Path(src).is_dir():
        raise FileNotFoundError(f'{src} does not exist: the Fashion-MNIST data is not installed. Run:\n    {APT_HINT}')
    tr_x, tr_y = load_split(src, 'train')
    te_x, te_y = load_split(src, 'test')
    val = stratified_holdout(tr_y, val_per_class, seed)
    ids = np.arange(len(tr_y))
    write_folder(out / 'train', tr_x[~val], tr_y[~val], ids[~val])
    write_folder(out / 'validation', tr_x[val], tr_y[val], ids[val])
    write_folder(out / 'test', te_x, te_y, np.arange(len(te_y)))
    counts = f'train={int((~val).sum())} validation={int(val.sum())} test={len(te_y)} seed={seed}'
    marker.write_text(counts + '\n')
    print(f'wrote {out}: {counts}')
    return out


def pixel_stats(src: Path = DEFAULT_SRC, val_per_class: int = 500, seed: int = 0) -> Tuple[float, float]:
    """Mean and std of the training pixels in [0, 1] (validation hold-out excluded): the model cfg's mean/std."""
    x, y = load_split(src, 'train')
    x = x[~stratified_holdout(y, val_per_class, seed)].astype(np.float64) / 255.
    return float(x.mean()), float(x.std())


def main(argv: List[str] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--src', type=Path, default=DEFAULT_SRC, help='folder with the IDX files')
    p.add_argument('--out', type=Path, default=DEFAULT_OUT, help='output ImageFolder root')
    p.add_argument('--val-per-class', type=int, default=500, help='validation hold-out per class (from train)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--stats', action='store_true', help='print the training-pixel mean/std and exit')
    args = p.parse_args(argv)
    try:
        if args.stats:
            print('mean=%.4f std=%.4f' % pixel_stats(args.src, args.val_per_class, args.seed))
        else:
            prepare(args.src, args.out, args.val_per_class, args.seed)
    except (FileNotFoundError, IdxFormatError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
