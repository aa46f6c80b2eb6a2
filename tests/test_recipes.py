"""The ImageNet recipes ship with the package, are valid train.py args files, and their settings train (CPU smoke)."""
import argparse
import importlib.util
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import timm
import timm_ldn.recipes as recipes
from timm.data import Mixup, create_transform
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.utils import ModelEmaV3, dispatch_clip_grad

VARIANTS = ['ldn_tiny', 'ldn_small', 'ldn_base']

# train.py argument names (argparse dests) the recipes may use; checked against timm's train.py
# (pytorch-image-models, 2026-08) -- a misspelt key would otherwise be silently ignored by train.py's
# `parser.set_defaults(**cfg)`. With TIMM_TRAIN_PY set, the real parser is used as well.
TRAIN_PY_ARGS = {
    'aa', 'amp', 'amp_dtype', 'aug_repeats', 'batch_size', 'checkpoint_hist', 'clip_grad', 'clip_mode',
    'color_jitter', 'cutmix', 'drop', 'drop_path', 'epochs', 'img_size', 'layer_decay', 'log_interval', 'lr',
    'lr_base', 'lr_base_scale', 'lr_base_size', 'min_lr', 'mixup', 'mixup_prob', 'mixup_switch_prob', 'model',
    'model_ema', 'model_ema_decay', 'num_classes', 'opt', 'opt_eps', 'pin_mem', 'recovery_interval', 'remode',
    'reprob', 'sched', 'seed', 'smoothing', 'train_interpolation', 'validation_batch_size', 'warmup_epochs',
    'warmup_lr', 'weight_decay', 'workers',
}


def test_recipes_are_package_data():
    assert recipes.names() == sorted(VARIANTS)
    for name in VARIANTS:
        p = recipes.path(name)
        assert p.parent.name == 'recipes' and p.parent.parent.name == 'timm_ldn'
        text = p.read_text()
        assert 'validate.py' in text and f'--model {name}' in text  # the matching eval command
        assert 'A100-hours' in text and 'GiB' in text and 'ESTIMATED' in text
    with pytest.raises(FileNotFoundError, match='available'):
        recipes.path('ldn_huge')


@pytest.mark.parametrize('name', VARIANTS)
def test_recipe_is_deit_style(name):
    cfg = recipes.load(name)
    assert set(cfg) <= TRAIN_PY_ARGS, set(cfg) - TRAIN_PY_ARGS
    assert cfg['model'] == name and name in timm.list_models('ldn_*')
    assert cfg['opt'] == 'adamw' and cfg['weight_decay'] == 0.05
    assert cfg['lr_base_scale'] == 'linear' and cfg['lr_base'] == 5e-4 and cfg['lr_base_size'] == 512
    assert 'lr' not in cfg  # so train.py scales lr to the global batch
    assert cfg['epochs'] == 300 and cfg['sched'] == 'cosine' and cfg['warmup_epochs'] > 0
    assert cfg['aa'].startswith('rand-') and cfg['mixup'] > 0 and cfg['cutmix'] > 0 and cfg['smoothing'] > 0
    assert cfg['model_ema'] is True and 0.999 < cfg['model_ema_decay'] < 1
    assert cfg['amp'] is True and cfg['amp_dtype'] == 'bfloat16'


def test_drop_path_grows_with_size():
    rates = [recipes.load(n)['drop_path'] for n in VARIANTS]
    assert rates == sorted(rates) and rates[0] < rates[-1]


@pytest.mark.skipif(not os.environ.get('TIMM_TRAIN_PY'), reason='set TIMM_TRAIN_PY=/path/to/timm/train.py')
@pytest.mark.parametrize('name', VARIANTS)
def test_recipe_parses_with_real_train_py(name, tmp_path):
    spec = importlib.util.spec_from_file_location('timm_train_script', os.environ['TIMM_TRAIN_PY'])
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)  # module level only: builds the parsers, main() is not run
    dests = {a.dest for a in train.parser._actions}
    cfg = recipes.load(name)
    assert set(cfg) <= dests
    train.parser.set_defaults(**cfg)
    args = train.parser.parse_args(['--data-dir', str(tmp_path)])
    assert args.model == name and args.drop_path == cfg['drop_path']


def _train_py_args(cfg: dict, world_size: int) -> argparse.Namespace:
    """What train.py's namespace holds for this recipe, including its lr-from-batch rule."""
    args = argparse.Namespace(momentum=0.9, lr=None, **cfg)
    global_batch = cfg['batch_size'] * world_size
    ratio = global_batch / cfg['lr_base_size']
    args.lr = cfg['lr_base'] * (ratio ** 0.5 if cfg['lr_base_scale'] == 'sqrt' else ratio)
    return args


@pytest.mark.parametrize('name', VARIANTS)
def test_recipe_two_step_smoke(name):
    """The recipe's model, optimiser, schedule, augmentation, mixup, EMA, AMP and clipping for two steps."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = recipes.load(name)
    args = _train_py_args(cfg, world_size=8)
    assert args.lr == pytest.approx(1e-3)  # DeiT: 5e-4 x 1024 / 512

    num_classes, img, batch = 10, 64, 4  # tiny stand-ins for ImageNet's 1000 classes / 224 px / 128 per GPU
    model = timm.create_model(args.model, num_classes=num_classes, drop_path_rate=args.drop_path)
    optimizer = create_optimizer_v2(model, **optimizer_kwargs(cfg=args))
    assert type(optimizer).__name__ == 'AdamW' and optimizer.param_groups[0]['lr'] == pytest.approx(args.lr)
    scheduler, num_epochs = create_scheduler_v2(optimizer, **scheduler_kwargs(args), updates_per_epoch=2)
    assert num_epochs == 300
    ema = ModelEmaV3(model, decay=args.model_ema_decay)
    mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, prob=args.mixup_prob,
                  switch_prob=args.mixup_switch_prob, label_smoothing=args.smoothing, num_classes=num_classes)
    transform = create_transform(
        img, is_training=True, auto_augment=args.aa, interpolation=args.train_interpolation,
        re_prob=args.reprob, re_mode=args.remode, color_jitter=args.color_jitter)
    rng = np.random.default_rng(0)
    random.seed(0)  # timm's RandAugment draws from Python's random: the same ops and magnitudes in every run

    loss_fn = SoftTargetCrossEntropy()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    losses = []
    for step in range(2):
        images = [Image.fromarray(rng.integers(0, 255, (80, 80, 3), dtype=np.uint8)) for _ in range(batch)]
        x = torch.stack([transform(im) for im in images])
        y = torch.arange(batch) % num_classes
        x, y = mixup(x, y)
        with torch.autocast(device_type='cpu', dtype=getattr(torch, args.amp_dtype)):
            loss = loss_fn(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        if getattr(args, 'clip_grad', None):
            dispatch_clip_grad(model.parameters(), value=args.clip_grad, mode=args.clip_mode)
        optimizer.step()
        ema.update(model, step=step + 1)
        scheduler.step_update(num_updates=step + 1)
        losses.append(loss.item())
    assert all(np.isfinite(losses)), losses
    moved = [k for k, v in model.state_dict().items() if not torch.equal(v, start[k])]
    assert 'blocks.0.diffusion.tau' in moved and 'head.fc.weight' in moved
    assert not torch.equal(ema.module.head.fc.weight, model.head.fc.weight)
    # warmup: lr after two updates is still tiny compared to the peak
    assert optimizer.param_groups[0]['lr'] < 0.01 * args.lr


@pytest.mark.parametrize('name', VARIANTS)
def test_recipe_randaugment_never_asks_pillow_for_zero_bits(name):
    """The recipe's RandAugment at its largest magnitude: posterize keeps >= 1 bit (timm's increasing posterize keeps
    0 at magnitude 10, which Pillow >= 13 refuses mid-epoch), and every op runs on an image at that magnitude."""
    from timm.data.auto_augment import rand_augment_transform
    cfg = recipes.load(name)
    ra = rand_augment_transform(cfg['aa'], dict(translate_const=100, img_mean=(124, 116, 104)))
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    for op in ra.ops:
        top = op.magnitude_max or 10
        if op.name.startswith('Posterize'):
            assert op.level_fn(top, op.hparams)[0] >= 1, (op.name, top)
        op.prob, op.magnitude, op.magnitude_std = 1., top, 0.
        op(img)  # raises where Pillow refuses the argument
