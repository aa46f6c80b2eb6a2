"""Shared helpers for the training tests: a tiny on-disk ImageFolder and train.py's create_model call.

Kept import-light (no timm_ldn import at module level) so subprocess workers can use it too.
"""
import random
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch


def make_image_folder(root: Path, num_classes: int = 2, per_class: int = 8, size: int = 40, seed: int = 0) -> Path:
    """``root/train/c{k}/*.png``: each class a distinct colour plus noise, so a few steps can learn it."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    for c in range(num_classes):
        d = root / 'train' / f'c{c}'
        d.mkdir(parents=True, exist_ok=True)
        base = np.zeros(3)
        base[c % 3] = 200.
        for i in range(per_class):
            img = np.clip(base + rng.normal(0, 40, size=(size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(d / f'{i}.png')
    return root


def seed_everything(seed: int) -> None:
    """Seed every RNG a training step draws from (loader order, augmentation, mixup, drop-path)."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def train_py_model_kwargs(num_classes: int, **overrides: Any) -> Dict[str, Any]:
    """The keyword arguments timm's train.py passes to create_model, with its defaults."""
    kwargs: Dict[str, Any] = dict(
        pretrained=False,
        in_chans=3,
        num_classes=num_classes,
        drop_rate=0.,
        drop_path_rate=None,
        drop_block_rate=None,
        global_pool=None,
        bn_momentum=None,
        bn_eps=None,
        scriptable=False,
        checkpoint_path='',
    )
    kwargs.update(overrides)
    return kwargs


def make_loader(data_root: Path, img_size: int, batch_size: int, is_training: bool = True,
                num_workers: int = 0, distributed: bool = False, **loader_kwargs: Any):
    """timm's own dataset + loader factory, the way train.py builds them (CPU, no prefetcher)."""
    from timm.data import create_dataset, create_loader
    dataset = create_dataset('', root=str(data_root), split='train', is_training=is_training)
    return create_loader(
        dataset, input_size=(3, img_size, img_size), batch_size=batch_size, is_training=is_training,
        use_prefetcher=False, num_workers=num_workers, distributed=distributed, device=torch.device('cpu'),
        **loader_kwargs)


def fixed_eval_loss(model: torch.nn.Module, loader, max_batches: Optional[int] = None) -> float:
    """Plain cross-entropy over the (deterministic, eval-mode) loader: the number that must go down."""
    was_training = model.training
    model.eval()
    total, count = 0., 0
    with torch.no_grad():
        for i, (x, y) in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            total += torch.nn.functional.cross_entropy(model(x), y, reduction='sum').item()
            count += y.numel()
    model.train(was_training)
    return total / count
