"""A small train.py-shaped training run for tests/test_faults.py, meant to be killed and resumed.

Per epoch it trains on the ImageFolder, then saves with timm's CheckpointSaver (checkpoint-<epoch>.pth.tar and
last.pth.tar), like train.py. ``--resume auto`` continues from ``<out>/last.pth.tar`` if present, the way
``train.py --resume <out>/last.pth.tar`` does. Progress goes to ``<out>/progress.log`` (one flushed line per event)
so the test can kill the process at a known point.
"""
import argparse
import hashlib
import os
import sys
import time
from pathlib import Path

import torch

import timm
from timm.models import resume_checkpoint
from timm.optim import create_optimizer_v2
from timm.utils import CheckpointSaver

sys.path.insert(0, str(Path(__file__).parent))
from ldn_train_utils import make_loader, seed_everything, train_py_model_kwargs  # noqa: E402


def param_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument('--data', required=True)
    parser.add_argument('--out', required=True)
    parser.add_argument('--epochs', type=int, default=3)
    parser.add_argument('--resume', default='')
    parser.add_argument('--step-sleep', type=float, default=0.)
    args = parser.parse_args()
    import timm_ldn  # noqa: F401  (train.py --device-modules timm_ldn; explicit so the test is self-contained)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / 'progress.log', 'a', buffering=1)

    seed_everything(0)
    model = timm.create_model('ldn_tiny', **train_py_model_kwargs(2, drop_path_rate=0.1), depth=2)
    optimizer = create_optimizer_v2(model, opt='adamw', lr=1e-3, weight_decay=0.05)
    loader = make_loader(Path(args.data), 32, 4, is_training=True)

    start_epoch = 0
    resume = str(out / 'last.pth.tar') if args.resume == 'auto' else args.resume
    if resume and os.path.isfile(resume):
        start_epoch = resume_checkpoint(model, resume, optimizer=optimizer)
        log.write(f'resumed {os.path.basename(resume)} start_epoch={start_epoch} digest={param_digest(model)}\n')
    saver = CheckpointSaver(
        model=model, optimizer=optimizer, args=argparse.Namespace(model='ldn_tiny'),
        checkpoint_dir=str(out), recovery_dir=str(out), decreasing=True, max_history=5)
    if start_epoch:
        saver.load_state_dict_from_checkpoint(resume)  # keep ranking / history across the restart

    for epoch in range(start_epoch, args.epochs):
        seed_everything(100 + epoch)
        model.train()
        total = 0.
        for step, (x, y) in enumerate(loader):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item()
            log.write(f'epoch {epoch} step {step} loss {loss.item():.4f}\n')
            time.sleep(args.step_sleep)
        saver.save_checkpoint(epoch, metric=total)
        log.write(f'epoch {epoch} done digest={param_digest(model)}\n')
    log.write('finished\n')


if __name__ == '__main__':
    main()
