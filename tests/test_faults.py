"""Faults: a run SIGKILLed mid-epoch resumes from its last checkpoint without losing a finished epoch, and a
checkpoint of another architecture fails with one clear message naming the mismatch."""
import argparse
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import timm
import timm_ldn  # noqa: F401
from timm.models import load_checkpoint, resume_checkpoint
from timm.utils import CheckpointSaver
from timm_ldn._checkpoint import CheckpointArchitectureError

from ldn_train_utils import make_image_folder

SCRIPT = Path(__file__).with_name('fault_train_script.py')


def _wait_for(path: Path, pattern: str, proc: subprocess.Popen, timeout: float = 150.) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text() if path.exists() else ''
        if re.search(pattern, text, re.M):
            return text
        if proc.poll() is not None:
            raise AssertionError(f'training exited early ({proc.returncode}):\n{text}\n{proc.stderr.read()}')
        time.sleep(0.1)
    raise AssertionError(f'timed out waiting for {pattern!r}')


def test_sigkill_mid_epoch_then_resume(tmp_path):
    data = make_image_folder(tmp_path / 'data', num_classes=2, per_class=8, size=36)  # 4 steps per epoch
    out = tmp_path / 'run'
    log = out / 'progress.log'
    cmd = [sys.executable, str(SCRIPT), '--data', str(data), '--out', str(out), '--epochs', '3']
    env = dict(os.environ, OMP_NUM_THREADS='1')

    proc = subprocess.Popen(cmd + ['--step-sleep', '0.4'], env=env, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(log, r'^epoch 1 step 1 ', proc)  # epoch 0 is checkpointed, epoch 1 half done
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    before = log.read_text()
    assert 'epoch 0 done' in before and 'epoch 1 done' not in before
    digest_epoch0 = re.search(r'^epoch 0 done digest=(\w+)', before, re.M).group(1)
    assert (out / 'checkpoint-0.pth.tar').is_file() and (out / 'last.pth.tar').is_file()
    assert not (out / 'checkpoint-1.pth.tar').exists()

    done = subprocess.run(cmd + ['--resume', 'auto'], env=env, capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stderr[-3000:]
    after = log.read_text()[len(before):]
    # resumed with exactly the weights epoch 0 ended with, at epoch 1: the finished epoch is kept, not redone
    assert re.search(rf'^resumed last\.pth\.tar start_epoch=1 digest={digest_epoch0}$', after, re.M), after
    assert 'epoch 0 step' not in after
    assert re.findall(r'^epoch (\d) done', after, re.M) == ['1', '2'] and after.rstrip().endswith('finished')
    for e in range(3):
        assert (out / f'checkpoint-{e}.pth.tar').is_file()
    last = torch.load(out / 'last.pth.tar', map_location='cpu', weights_only=False)
    assert last['epoch'] == 2 and last['arch'] == 'ldn_tiny'


def _save_like_train_py(model: torch.nn.Module, arch: str, out: Path) -> Path:
    """A checkpoint exactly as train.py's CheckpointSaver writes it."""
    out.mkdir(parents=True, exist_ok=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    CheckpointSaver(model, opt, args=argparse.Namespace(model=arch), checkpoint_dir=str(out),
                    recovery_dir=str(out)).save_checkpoint(0, metric=1.0)
    return out / 'checkpoint-0.pth.tar'


def test_other_ldn_size_is_named(tmp_path):
    ckpt = _save_like_train_py(timm.create_model('ldn_small', depth=2), 'ldn_small', tmp_path / 's')
    model = timm.create_model('ldn_tiny', depth=2)
    with pytest.raises(RuntimeError) as err:  # train.py --resume
        resume_checkpoint(model, str(ckpt), optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    msg = str(err.value)
    assert isinstance(err.value, CheckpointArchitectureError)
    assert 'embed_dim 384 in the checkpoint vs 192 in the model' in msg and len(msg) < 500, msg

    # same width, other head: named as well (train.py --initial-checkpoint)
    ckpt10 = _save_like_train_py(timm.create_model('ldn_tiny', depth=2, num_classes=10), 'ldn_tiny', tmp_path / 't')
    with pytest.raises(CheckpointArchitectureError, match='num_classes 10 in the checkpoint vs 1000 in the model'):
        load_checkpoint(model, str(ckpt10))
    # other depth only: torch's strict check names the extra blocks
    ckpt3 = _save_like_train_py(timm.create_model('ldn_tiny', depth=3), 'ldn_tiny', tmp_path / 'd')
    with pytest.raises(RuntimeError, match=r'Unexpected key\(s\) in state_dict: "blocks\.2\.'):
        load_checkpoint(model, str(ckpt3))


def test_foreign_architecture_is_named(tmp_path):
    ckpt = _save_like_train_py(timm.create_model('resnet18', num_classes=10), 'resnet18', tmp_path / 'r')
    model = timm.create_model('ldn_tiny', depth=2)
    with pytest.raises(CheckpointArchitectureError) as err:
        resume_checkpoint(model, str(ckpt))
    msg = str(err.value)
    assert msg.startswith('Not an LDN checkpoint') and 'conv1.weight' in msg and len(msg) < 600, msg


def test_valid_loads_still_work(tmp_path):
    """The check must not reject what torch accepts: same arch strict, and non-strict partial loads."""
    src = timm.create_model('ldn_tiny', depth=3)
    ckpt = _save_like_train_py(src, 'ldn_tiny', tmp_path / 'ok')
    same = timm.create_model('ldn_tiny', depth=3)
    assert resume_checkpoint(same, str(ckpt)) == 1
    assert torch.equal(same.blocks[2].attn.qkv.weight, src.blocks[2].attn.qkv.weight)

    pruned = timm.create_model('ldn_tiny', depth=3)
    pruned.prune_intermediate_layers(indices=[1])  # keeps blocks 0..1 and drops the head
    missing, unexpected = pruned.load_state_dict(src.state_dict(), strict=False)
    assert not missing and any(k.startswith('blocks.2.') for k in unexpected)
    assert torch.equal(pruned.blocks[1].mlp.fc1.weight, src.blocks[1].mlp.fc1.weight)
