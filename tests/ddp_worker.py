"""DDP worker for tests/test_ddp.py, launched by ``torchrun --nproc_per_node=2`` (gloo, CPU).

timm's train.py cannot run DDP on CPU (it passes ``device_ids`` for a CPU module), so this drives the same
pieces directly: timm's distributed init, DistributedSampler loader, SyncBatchNorm conversion, DDP, the
optimizer factory, and CheckpointSaver on rank 0. Each rank writes ``rank{r}.json`` with what it observed.
"""
import argparse
import importlib
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import timm
from timm.layers import convert_sync_batchnorm
from timm.optim import create_optimizer_v2
from timm.utils import CheckpointSaver
from timm.utils.distributed import init_distributed_device_so

sys.path.insert(0, str(Path(__file__).parent))
from ldn_train_utils import make_loader, seed_everything, train_py_model_kwargs  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument('--data', required=True)
    parser.add_argument('--out', required=True)
    parser.add_argument('--model', default='ldn_tiny')
    parser.add_argument('--depth', type=int, default=2)
    parser.add_argument('--img-size', type=int, default=32)
    parser.add_argument('--batch-size', type=int, default=4)
    parser.add_argument('--steps', type=int, default=3)
    parser.add_argument('--device-modules', nargs='*', default=['timm_ldn'])
    args = parser.parse_args()
    for module in args.device_modules:  # what train.py --device-modules does
        importlib.import_module(module)
    torch.set_num_threads(1)

    info = init_distributed_device_so(device='cpu')
    assert info['distributed'] and dist.get_backend() == 'gloo', info
    rank, world = info['global_rank'], info['world_size']

    seed_everything(42 + rank)  # different init per rank on purpose: DDP must broadcast rank 0's weights
    model = timm.create_model(
        args.model, **train_py_model_kwargs(2, drop_path_rate=0.1), depth=args.depth)
    keys_before = list(model.state_dict().keys())
    types_before = [type(m) for m in model.modules()]
    model = convert_sync_batchnorm(model)  # train.py --sync-bn; LDN has no BatchNorm -> must be a no-op
    syncbn_noop = (list(model.state_dict().keys()) == keys_before
                   and [type(m) for m in model.modules()] == types_before)
    model.set_grad_checkpointing(True)

    ddp = DistributedDataParallel(model)  # find_unused_parameters=False: any unused parameter errors out
    optimizer = create_optimizer_v2(ddp, opt='adamw', lr=1e-3, weight_decay=0.05)
    loader = make_loader(Path(args.data), args.img_size, args.batch_size, is_training=True, distributed=True)
    loader.sampler.set_epoch(0)

    losses, no_grad = [], []
    step = 0
    while step < args.steps:
        for x, y in loader:
            with torch.autocast(device_type='cpu', dtype=torch.bfloat16):
                loss = torch.nn.functional.cross_entropy(ddp(x), y)
            optimizer.zero_grad()
            loss.backward()
            if step == 0:
                no_grad = [n for n, p in ddp.module.named_parameters() if p.requires_grad and p.grad is None]
            optimizer.step()
            losses.append(loss.item())
            step += 1
            if step == args.steps:
                break

    # parameters must be identical on every rank after the synchronised updates
    flat = torch.cat([p.detach().reshape(-1) for p in ddp.module.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    max_rank_diff = max((g - gathered[0]).abs().max().item() for g in gathered)

    ckpt = ''
    if rank == 0:
        saver = CheckpointSaver(
            model=ddp, optimizer=optimizer, args=argparse.Namespace(model=args.model),
            checkpoint_dir=args.out, recovery_dir=args.out, max_history=1)
        saver.save_checkpoint(0, metric=losses[-1])
        ckpt = os.path.join(args.out, 'checkpoint-0.pth.tar')
        torch.save({k: v.detach() for k, v in ddp.module.state_dict().items()}, os.path.join(args.out, 'rank0_ref.pt'))
    dist.barrier()

    result = dict(
        rank=rank, world_size=world, backend=dist.get_backend(), losses=losses, no_grad=no_grad,
        max_rank_diff=max_rank_diff, syncbn_noop=syncbn_noop, checkpoint=ckpt,
        num_samples=len(loader.sampler), param_sum=flat.double().sum().item(),
    )
    with open(os.path.join(args.out, f'rank{rank}.json'), 'w') as f:
        json.dump(result, f)
    print(f'[rank {rank}/{world}] backend={result["backend"]} losses={[round(v, 4) for v in losses]} '
          f'max_param_diff_across_ranks={max_rank_diff:.3g} unused={no_grad} syncbn_noop={syncbn_noop}', flush=True)
    dist.destroy_process_group()


if __name__ == '__main__':
    main()
