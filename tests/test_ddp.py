"""Two-process DistributedDataParallel training of LDN on CPU with gloo, launched through torchrun."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

import timm
import timm_ldn  # noqa: F401

from ldn_train_utils import make_image_folder

WORKER = Path(__file__).with_name('ddp_worker.py')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_torchrun_two_process_gloo(tmp_path):
    data = make_image_folder(tmp_path / 'data', num_classes=2, per_class=8, size=36)
    out = tmp_path / 'out'
    out.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS='1')
    # `python -m torch.distributed.run` is the torchrun entry point, run with this interpreter
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--nnodes=1',
           f'--master_addr=127.0.0.1', f'--master_port={_free_port()}',
           str(WORKER), '--data', str(data), '--out', str(out), '--steps', '3']
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=170)
    log = proc.stdout + proc.stderr
    print(log[-4000:])  # kept in the pytest report (-rA / on failure)
    assert proc.returncode == 0, log[-4000:]
    assert 'unused parameters' not in log and 'Expected to have finished reduction' not in log

    r0, r1 = (json.loads((out / f'rank{r}.json').read_text()) for r in (0, 1))
    for r in (r0, r1):
        assert r['world_size'] == 2 and r['backend'] == 'gloo'
        assert r['no_grad'] == []  # every parameter gets a gradient: no unused-parameter errors possible
        assert r['syncbn_noop']
        assert r['max_rank_diff'] == 0.0
        assert len(r['losses']) == 3 and all(v == v for v in r['losses'])
        assert r['num_samples'] == 8  # DistributedSampler split 16 images over 2 ranks
    assert r0['param_sum'] == r1['param_sum']
    assert r0['losses'] != r1['losses']  # the ranks saw different shards

    # rank 0's checkpoint is a plain (unwrapped) LDN state dict that loads strictly
    ckpt = torch.load(r0['checkpoint'], map_location='cpu', weights_only=False)
    assert ckpt['arch'] == 'ldn_tiny' and not any(k.startswith('module.') for k in ckpt['state_dict'])
    model = timm.create_model('ldn_tiny', num_classes=2, depth=2)
    model.load_state_dict(ckpt['state_dict'])
    ref = torch.load(out / 'rank0_ref.pt', map_location='cpu')
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref[k]), k
