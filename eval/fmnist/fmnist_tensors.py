"""Fashion-MNIST as in-memory ``uint8`` tensors with batched augmentation in torch (the fast training input path).

The ImageFolder tree of ``fmnist_data.py`` is what timm's ``train.py`` / ``validate.py`` read; decoding 55k PNGs
through PIL per sample and per epoch costs more than the 0.3 M-parameter models' own training step on 2 CPU
cores. Here the same splits (same stratified validation hold-out, same seed) stay in memory as one ``uint8``
tensor each, and the recipe's augmentation runs on whole batches:

* random-resized crop (``scale``, ``ratio``) and horizontal flip as one ``affine_grid`` / ``grid_sample`` per batch,
* normalisation with the recipe's mean/std,
* random erasing in timm's ``pixel`` mode (per-pixel normal noise, area 2–33 %, log-uniform aspect 0.3–3.3),
  applied after normalisation as timm does.

The eval path is the identity transform of the recipe (``crop_pct`` 1.0 at 28 px) plus normalisation, i.e. what
timm's eval transform gives on these images.
"""
import math
from pathlib import Path
from typing import Dict, Iterator, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

import fmnist_data

SPLITS = ('train', 'validation', 'test')


def load_split_tensors(
        split: str,
        src: Path = fmnist_data.DEFAULT_SRC,
        val_per_class: int = 500,
        seed: int = 0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(images uint8 (N, 1, 28, 28), labels int64 (N,))`` of the split ``fmnist_data.prepare`` would write."""
    if split not in SPLITS:
        raise ValueError(f'unknown split {split!r}; use one of {SPLITS}.')
    if not Path(src).is_dir():
        raise FileNotFoundError(
            f'{src} does not exist: the Fashion-MNIST data is not installed. Run:\n    {fmnist_data.APT_HINT}')
    if split == 'test':
        x, y = fmnist_data.load_split(src, 'test')
    else:
        x, y = fmnist_data.load_split(src, 'train')
        val = fmnist_data.stratified_holdout(y, val_per_class, seed)
        keep = val if split == 'validation' else ~val
        x, y = x[keep], y[keep]
    # a copy: the IDX buffer of the test split is read-only
    return torch.from_numpy(np.array(x)).unsqueeze(1), torch.from_numpy(y.astype(np.int64))


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``uint8`` or ``[0, 255]`` float images -> normalised float32."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (images.float() / 255. - m) / s


def random_resized_crop_flip(
        x: torch.Tensor,
        scale: Tuple[float, float],
        ratio: Tuple[float, float],
        hflip: float,
        generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Per-sample random-resized crop back to the input size, plus horizontal flip, as one batched resample.

    Crop area fraction ~ U(scale), aspect log-uniform in ``ratio`` (torchvision's sampling; sides are clipped to the
    image instead of re-drawn), position uniform over the valid range, bilinear resampling.
    """
    B, _, H, W = x.shape
    area = torch.empty(B).uniform_(scale[0], scale[1], generator=generator)
    log_r = torch.empty(B).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    aspect = log_r.exp()
    w = (area * aspect).sqrt().clamp(max=1.)  # crop width / image width
    h = (area / aspect).sqrt().clamp(max=1.)
    # centre in normalised coords [-1, 1]: anywhere that keeps the crop inside the image
    cx = (torch.rand(B, generator=generator) * 2 - 1) * (1 - w)
    cy = (torch.rand(B, generator=generator) * 2 - 1) * (1 - h)
    flip = torch.where(torch.rand(B, generator=generator) < hflip, -1., 1.)
    theta = torch.zeros(B, 2, 3)
    theta[:, 0, 0] = w * flip
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = h
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta, [B, 1, H, W], align_corners=False)
    return F.grid_sample(x, grid, mode='bilinear', padding_mode='border', align_corners=False)


def random_erase_pixels(
        x: torch.Tensor,
        prob: float,
        area: Tuple[float, float] = (0.02, 1 / 3),
        log_aspect: Tuple[float, float] = (math.log(0.3), math.log(1 / 0.3)),
        generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """timm's ``RandomErasing(mode='pixel')`` on a normalised batch: one rectangle of N(0, 1) noise per chosen image."""
    B, C, H, W = x.shape
    chosen = torch.rand(B, generator=generator) < prob
    if prob <= 0 or not bool(chosen.any()):
        return x
    target = torch.empty(B).uniform_(area[0], area[1], generator=generator) * H * W
    aspect = torch.empty(B).uniform_(log_aspect[0], log_aspect[1], generator=generator).exp()
    h = (target * aspect).sqrt().round().clamp(1, H).long()
    w = (target / aspect).sqrt().round().clamp(1, W).long()
    top = (torch.rand(B, generator=generator) * (H - h + 1).float()).long()
    left = (torch.rand(B, generator=generator) * (W - w + 1).float()).long()
    rows = torch.arange(H).view(1, H, 1)
    cols = torch.arange(W).view(1, 1, W)
    inside = ((rows >= top.view(B, 1, 1)) & (rows < (top + h).view(B, 1, 1))
              & (cols >= left.view(B, 1, 1)) & (cols < (left + w).view(B, 1, 1)) & chosen.view(B, 1, 1))
    noise = torch.randn(x.shape, generator=generator)
    return torch.where(inside.unsqueeze(1), noise, x)


class TensorBatches:
    """Shuffled (training) or ordered (eval) batches of one split, augmented and normalised in torch.

    Iterating yields ``(images float32 (B, 1, 28, 28), labels int64 (B,))``; ``len()`` is the number of batches.
    Training drops the last partial batch (as timm's training loader does), eval keeps it.
    """

    def __init__(
            self,
            images: torch.Tensor,
            labels: torch.Tensor,
            batch_size: int,
            recipe: Dict,
            training: bool,
            seed: int = 0,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f'images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}.')
        if len(images) != len(labels):
            raise ValueError(f'{len(images)} images but {len(labels)} labels.')
        self.images, self.labels = images, labels
        self.batch_size = batch_size
        self.training = training
        self.mean, self.std = tuple(recipe['mean']), tuple(recipe['std'])
        self.scale, self.ratio = tuple(recipe['scale']), tuple(recipe['ratio'])
        self.hflip, self.reprob = float(recipe['hflip']), float(recipe['reprob'])
        if training and (recipe.get('vflip') or recipe.get('color_jitter') or recipe.get('mixup')
                         or recipe.get('cutmix') or recipe.get('aa') or recipe.get('remode', 'pixel') != 'pixel'):
            raise ValueError('the in-memory pipeline implements scale/ratio/hflip/reprob (pixel mode) only; '
                             'use --pipeline timm for other augmentations.')
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)

    def set_epoch(self, epoch: int) -> None:
        """Make the shuffle and augmentation of ``epoch`` independent of how many epochs ran in this process."""
        self.generator.manual_seed(self.seed * 100003 + epoch)

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.training else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.labels)
        order = torch.randperm(n, generator=self.generator) if self.training else torch.arange(n)
        for b in range(len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            x = self.images[idx].float()
            if self.training:
                x = random_resized_crop_flip(x, self.scale, self.ratio, self.hflip, self.generator)
            x = normalize(x, self.mean, self.std)
            if self.training:
                x = random_erase_pixels(x, self.reprob, generator=self.generator)
            yield x, self.labels[idx]
