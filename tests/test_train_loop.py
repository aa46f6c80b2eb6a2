"""LDN through the training path of timm's train.py, step by step, on a tiny ImageFolder (CPU).

create_model with train.py's keyword arguments -> grad checkpointing -> create_optimizer_v2 (AdamW, layer
decay) -> ModelEmaV3 -> cosine schedule with warmup -> Mixup/CutMix + SoftTargetCrossEntropy -> bf16 autocast ->
CheckpointSaver -> resume_checkpoint / load_checkpoint(use_ema=True), as train.py does them.
"""
import argparse
from pathlib import Path
from typing import Dict, List

import pytest
import torch

import timm
import timm_ldn  # noqa: F401  (explicit, so the test does not depend on the start-up hook)
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.models import load_checkpoint, resume_checkpoint
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import CheckpointSaver, ModelEmaV3, dispatch_clip_grad

from ldn_train_utils import fixed_eval_loss, make_image_folder, make_loader, seed_everything, train_py_model_kwargs

NUM_CLASSES = 2
IMG = 32
BATCH = 8
EPOCHS = 3


class Run:
    """Everything train.py keeps between steps."""

    def __init__(self, init_seed: int, updates_per_epoch: int):
        seed_everything(init_seed)
        self.model = timm.create_model(
            'ldn_tiny', **train_py_model_kwargs(NUM_CLASSES, drop_rate=0.1, drop_path_rate=0.1), depth=2)
        self.model.set_grad_checkpointing(True)  # train.py --grad-checkpointing
        self.optimizer = create_optimizer_v2(
            self.model, opt='adamw', lr=2e-3, weight_decay=0.05, layer_decay=0.75)
        self.ema = ModelEmaV3(self.model, decay=0.9)
        self.scheduler, self.num_epochs = create_scheduler_v2(
            self.optimizer, sched='cosine', num_epochs=EPOCHS, warmup_epochs=1, warmup_lr=2e-4,
            updates_per_epoch=updates_per_epoch)
        self.mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=NUM_CLASSES)
        self.loss_fn = SoftTargetCrossEntropy()
        self.updates_per_epoch = updates_per_epoch

    def train_epoch(self, epoch: int, loader) -> List[float]:
        # train.py seeds once per run; seeding per epoch makes the data order, augmentation, mixup and
        # drop-path of an epoch independent of whether the run was resumed, so losses can be compared exactly
        seed_everything(10_000 + epoch)
        self.model.train()
        losses = []
        num_updates = epoch * self.updates_per_epoch
        for x, y in loader:
            x, y = self.mixup(x, y)
            with torch.autocast(device_type='cpu', dtype=torch.bfloat16):
                loss = self.loss_fn(self.model(x), y)
            assert torch.isfinite(loss)
            self.optimizer.zero_grad()
            loss.backward()
            dispatch_clip_grad(self.model.parameters(), value=1.0, mode='norm')
            self.optimizer.step()
            num_updates += 1
            self.ema.update(self.model, step=num_updates)
            self.scheduler.step_update(num_updates=num_updates)
            losses.append(loss.item())
        self.scheduler.step(epoch + 1)
        return losses


def _state(module: torch.nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.fixture(scope='module')
def data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp('imgs'), NUM_CLASSES, per_class=16, size=40)


def test_optimizer_groups_follow_ldn_layout():
    """layer_decay uses LDN's group_matcher (stem < blocks < head); a_raw/τ are excluded from weight decay."""
    model = timm.create_model('ldn_tiny', **train_py_model_kwargs(NUM_CLASSES), depth=3)
    opt = create_optimizer_v2(model, opt='adamw', lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    names = {id(p): n for n, p in model.named_parameters()}
    scale = {}
    for g in opt.param_groups:
        for p in g['params']:
            scale[names[id(p)]] = (g['lr_scale'], g['weight_decay'])
    assert len(scale) == len(names)  # every parameter is optimised
    assert scale['patch_embed.proj.weight'][0] < scale['blocks.0.mlp.fc1.weight'][0] \
        < scale['blocks.2.mlp.fc1.weight'][0] < scale['head.fc.weight'][0] == 1.0
    for n, (_, wd) in scale.items():
        if n.endswith(('diffusion.a_raw', 'diffusion.tau')) or n.endswith('.bias'):
            assert wd == 0., n
    assert scale['blocks.1.attn.qkv.weight'][1] == 0.05


def test_train_py_loop_learns_and_resumes_exactly(data, tmp_path):
    torch.set_num_threads(1)  # the 2-core CI box is shared; also keeps bf16 reductions in one fixed order
    loader = make_loader(data, IMG, BATCH, is_training=True)
    eval_loader = make_loader(data, IMG, 16, is_training=False)
    updates_per_epoch = len(loader)
    assert updates_per_epoch >= 2

    # uninterrupted run, checkpointing with timm's saver after every epoch, as train.py does
    a = Run(init_seed=0, updates_per_epoch=updates_per_epoch)
    before = fixed_eval_loss(a.model, eval_loader)
    ckpt_dir = tmp_path / 'out'
    ckpt_dir.mkdir()
    saver = CheckpointSaver(
        model=a.model, optimizer=a.optimizer, args=argparse.Namespace(model='ldn_tiny'), model_ema=a.ema,
        checkpoint_dir=str(ckpt_dir), recovery_dir=str(ckpt_dir), decreasing=True, max_history=2)
    losses_a = {}
    for epoch in range(2):
        losses_a[epoch] = a.train_epoch(epoch, loader)
        saver.save_checkpoint(epoch, metric=sum(losses_a[epoch]))
        if epoch == 0:
            ckpt = ckpt_dir / 'checkpoint-0.pth.tar'
            assert ckpt.is_file()
            lrs_epoch_1 = [g['lr'] for g in a.optimizer.param_groups]
    model_after_1, ema_after_1 = _state(a.model), _state(a.ema.module)
    losses_a[2] = a.train_epoch(2, loader)
    after = fixed_eval_loss(a.model, eval_loader)
    assert after < before - 0.05, f'eval loss did not decrease: {before:.4f} -> {after:.4f}'
    assert after < 0.69  # below chance for two classes

    # a new process would start from different weights; resume the way train.py --resume does
    b = Run(init_seed=1234, updates_per_epoch=updates_per_epoch)
    assert not torch.equal(b.model.blocks[0].attn.qkv.weight, model_after_1['blocks.0.attn.qkv.weight'])
    resume_epoch = resume_checkpoint(b.model, str(ckpt), optimizer=b.optimizer)
    load_checkpoint(b.ema.module, str(ckpt), use_ema=True)
    assert resume_epoch == 1  # epoch 0 finished, continue with epoch 1
    b.scheduler.step(resume_epoch)
    assert [g['lr'] for g in b.optimizer.param_groups] == pytest.approx(lrs_epoch_1)
    losses_b = b.train_epoch(resume_epoch, loader)

    # step 0 checks the weights, later steps the optimizer moments and the schedule
    assert losses_b == pytest.approx(losses_a[1], rel=1e-6, abs=1e-7), (losses_b, losses_a[1])
    for k, v in _state(b.model).items():
        assert torch.allclose(v, model_after_1[k], rtol=1e-5, atol=1e-7), k
    for k, v in _state(b.ema.module).items():
        assert torch.allclose(v, ema_after_1[k], rtol=1e-5, atol=1e-7), k

