"""The job runner and snapshots both studies share (``eval/runner.py``): jobs run and are judged by their result,
unfinished runs travel as snapshots, and a finished run leaves only its log in git (no checkpoint)."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'eval'))
from runner import Snapshots, run_jobs  # noqa: E402


def test_jobs_run_in_parallel_and_fail_without_exit_0_or_a_result(tmp_path):
    results = tmp_path / 'results'
    results.mkdir()
    write = f'import sys, pathlib; pathlib.Path({str(results)!r}, sys.argv[1]).write_text("ok"); print("trained")'
    jobs = [('good', [sys.executable, '-c', write, 'good']),
            ('no_result', [sys.executable, '-c', 'print(1)']),
            ('crash', [sys.executable, '-c', 'raise SystemExit(3)'])]
    finished, polled = [], []
    rc = run_jobs(jobs, tmp_path / 'runs', 2, finished=lambda exp: (results / exp).is_file(),
                  on_finish=finished.append, on_poll=polled.append, poll_s=0.2)
    assert rc == 1 and finished == ['good']
    assert (tmp_path / 'runs' / 'good' / 'stdout.log').read_text() == 'trained\n'
    assert polled and max(len(p) for p in polled) <= 2
    assert run_jobs(jobs[:1], tmp_path / 'runs', 1, finished=lambda exp: True, poll_s=0.2) == 0


def test_snapshots_travel_and_a_finished_run_keeps_only_its_log(tmp_path):
    runs, snaps = tmp_path / 'runs', tmp_path / 'checkpoints'
    s = Snapshots(runs, snaps, [('last.pt', 'last.pt'), ('best.pt', 'best.pt'), ('log.csv', 'log.csv')], 'last.pt')
    (runs / 'a').mkdir(parents=True)
    (runs / 'a' / 'last.pt').write_bytes(b'step 7')
    (runs / 'a' / 'best.pt').write_bytes(b'step 6')
    (runs / 'a' / 'log.csv').write_text('step\n7\n')
    (runs / 'b').mkdir()
    (runs / 'b' / 'log.csv').write_text('step\n')  # not resumable yet: nothing to snapshot
    s.save(['a', 'b'])
    assert sorted(p.name for p in (snaps / 'a').iterdir()) == ['best.pt', 'last.pt', 'log.csv']
    assert not (snaps / 'b').exists()
    (runs / 'a' / 'last.pt').unlink()
    assert s.restore() == ['a'] and (runs / 'a' / 'last.pt').read_bytes() == b'step 7'
    (runs / 'a' / 'last.pt').write_bytes(b'step 9')
    s.restore()
    assert (runs / 'a' / 'last.pt').read_bytes() == b'step 9'  # a run that got further here is kept
    s.keep_log('a')
    assert sorted(p.name for p in (snaps / 'a').iterdir()) == ['log.csv']


def test_lra_resume_maps_optimizer_state_by_name_across_a_change_of_groups():
    """A checkpoint written with the old hand-built groups ([decay, no decay]) resumes under timm's factory, whose
    groups differ in order and membership: every parameter gets its own moments back. A checkpoint from another
    model is refused with the fix named, not loaded into the wrong parameters."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'eval' / 'lra'))
    import torch
    from timm.optim import create_optimizer_v2
    from train_lra import legacy_param_names, load_optimizer_state, optimizer_param_names
    from timm_ldn.sequence import ImplicitPathDiffusion, LdnSequenceClassifier

    def model(depth: int = 2) -> torch.nn.Module:
        torch.manual_seed(0)
        return LdnSequenceClassifier(vocab_size=12, num_classes=3, embed_dim=16, depth=depth, num_heads=2,
                                     max_len=32, diffusion_layer=ImplicitPathDiffusion)

    def train(m: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
        for _ in range(2):
            opt.zero_grad()
            m(torch.randint(0, 12, (4, 32))).logsumexp(-1).mean().backward()
            opt.step()

    old = model()
    params = dict(old.named_parameters())
    legacy = torch.optim.AdamW([dict(params=[params[n] for n in names]) for names in legacy_param_names(old)])
    train(old, legacy)
    moments = {n: legacy.state[params[n]]['exp_avg_sq'].clone() for n in params}

    new = model()
    new.load_state_dict(old.state_dict())
    opt = create_optimizer_v2(new, 'adamw', lr=1e-3, weight_decay=0.05)
    assert optimizer_param_names(opt, new) != legacy_param_names(new)  # the grouping really changed
    load_optimizer_state(opt, new, legacy.state_dict(), None)
    for n, p in new.named_parameters():
        torch.testing.assert_close(opt.state[p]['exp_avg_sq'], moments[n])

    train(new, opt)  # and a checkpoint of the new kind round-trips through its saved names
    again = create_optimizer_v2(new, 'adamw', lr=1e-3, weight_decay=0.05)
    load_optimizer_state(again, new, opt.state_dict(), optimizer_param_names(opt, new))
    for p in new.parameters():
        torch.testing.assert_close(again.state[p]['exp_avg'], opt.state[p]['exp_avg'])

    deeper = model(depth=3)
    with pytest.raises(ValueError, match='without --resume'):
        load_optimizer_state(create_optimizer_v2(deeper, 'adamw', lr=1e-3), deeper, opt.state_dict(),
                             optimizer_param_names(opt, new))


def test_lra_long_runs_are_named_apart_from_the_main_table_and_take_the_device(tmp_path, monkeypatch):
    import json
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'eval' / 'lra'))
    import study
    launched = []
    monkeypatch.setattr(study, 'RESULTS', tmp_path)
    monkeypatch.setattr(study, 'run_jobs', lambda commands, *a, **k: launched.extend(commands) or 0)
    study.main(['long', '--task', 'listops', '--rows', 'transformer', '--seeds', '0', '1', '--steps', '100',
                '--device', 'cuda'])
    assert [name for name, _ in launched] == ['long100-listops-transformer-s0', 'long100-listops-transformer-s1']
    for name, cmd in launched:
        assert cmd[cmd.index('--device') + 1] == 'cuda' and cmd[cmd.index('--experiment') + 1] == name
        assert cmd[cmd.index('--steps') + 1] == '100' and '--resume' in cmd
    launched.clear()
    study.main(['run', '--task', 'listops', '--rows', 'transformer', '--steps', '100'])
    (name, cmd), = launched
    assert name == 'listops_transformer_s0' and cmd[cmd.index('--device') + 1] == 'cpu'
    (tmp_path / 'long100-listops-transformer-s0.json').write_text(json.dumps(
        dict(task='listops', row='transformer', steps=100, val_acc=40.0, test_acc=40.0)))
    assert study.report() == []  # a long run never enters the equal-step table


def test_lra_table_takes_main_runs_over_screens_and_marks_what_is_published(tmp_path, monkeypatch):
    import json
    sys.path.insert(0, str(ROOT / 'eval' / 'lra'))
    import study
    monkeypatch.setattr(study, 'RESULTS', tmp_path)
    main_runs = [dict(task='listops', row='ldn', seeds=[0, 1], steps=4000, test_acc=35.0)]
    screens = [dict(task='listops', row='ldn', lr=1e-3, steps=2000, val_acc=40.0, test_acc=39.0),  # main run wins
               dict(task='listops', row='transformer', lr=1e-3, steps=2000, val_acc=36.0, test_acc=35.5),
               dict(task='listops', row='transformer', lr=1e-3, steps=1000, val_acc=37.0, test_acc=36.5),  # best val
               dict(task='listops', row='linear_transformer', lr=5e-4, steps=2000, val_acc=50.0, test_acc=50.0)]
    for i, r in enumerate(screens):
        (tmp_path / f'screen{r["steps"]}-{i}.json').write_text(json.dumps(r))
    (tmp_path / 'pathfinder_cnn_hard.json').write_text(json.dumps(dict(test_acc=56.0, epochs=15)))
    (tmp_path / 'long32000-listops-ldn-s0.json').write_text(json.dumps(  # its own column, beside the main run
        dict(task='listops', row='ldn', steps=32000, batch_size=32, val_acc=55.0, test_acc=54.321)))
    (tmp_path / 'long64-listops-transformer-s0.json').write_text(json.dumps(  # a smoke run at another batch
        dict(task='listops', row='transformer', steps=64, batch_size=2, val_acc=90.0, test_acc=90.0)))
    table = study.lra_table(main_runs)
    rows = {r['model']: r['cells'] for r in table['rows']}
    assert rows['ldn'] == {'listops': dict(test_acc=35.0, seeds=2, steps=4000, kind='main'),
                           'listops_long': dict(test_acc=54.32, val_acc=55.0, seeds=1, steps=32000, kind='long')}
    assert 'listops_long' not in rows['transformer']
    assert rows['transformer']['listops']['test_acc'] == 36.5 and rows['transformer']['listops']['kind'] == 'screen'
    assert 'linear_transformer' not in rows  # an lr screen tunes a row; it is not the row's result
    assert rows['CNN (2-D image, sanity check)'] == {'pathfinder': dict(test_acc=56.0, seeds=1, steps=15,
                                                                        kind='epochs')}
    md = (tmp_path / 'lra_table.md').read_text()
    assert '| ldn | 35.00 (2x4000) |' in md and '36.50 (1x1000 screen)' in md and '| 54.32 (1x32000) |' in md
    assert [c['key'] for c in table['columns']][-2:] == ['listops_long', 'pathfinder_easy_long']
    assert md.count('ListOps, long') == 2 and md.count('Pathfinder (easy), long') == 2
    assert '| Transformer (published) | 36.37 |' in md and md.count('(published)') == len(study.LRA_PUBLISHED)
    assert json.loads((tmp_path / 'lra_table.json').read_text()) == table


def test_ablation_compares_like_with_like_over_the_seeds_both_ran(tmp_path, monkeypatch):
    import json
    sys.path.insert(0, str(ROOT / 'eval' / 'lra'))
    import models
    import study
    monkeypatch.setattr(study, 'RESULTS', tmp_path)
    winner, euler, fixed = models.ABLATION_WINNER, models.ABLATION[0][1], models.ABLATION[1][1]
    main_runs = [dict(task='psfmnist', row=winner, seeds=[0, 1], test_acc_runs=[75.0, 73.0], steps=1500),
                 dict(task='psfmnist', row=euler, seeds=[0], test_acc_runs=[70.0], steps=1500),
                 dict(task='psfmnist', row=fixed, seeds=[0], test_acc_runs=[60.0], steps=999),  # another budget
                 dict(task='listops', row=euler, seeds=[0, 1], test_acc_runs=[36.0, 36.0], steps=4000)]
    for r in (dict(task='listops', row=winner, lr=1e-3, steps=2000, test_acc=35.0),
              dict(task='listops', row=fixed, lr=1e-3, steps=2000, test_acc=34.0),
              dict(task='listops', row=fixed, lr=1e-3, steps=1000, test_acc=99.0)):  # shorter: not the budget
        (tmp_path / f"screen{r['steps']}-listops-{r['row']}.json").write_text(json.dumps(r))
    out = {(a['task'], a['row']): a for a in study.ablation_table(main_runs)}
    assert out[('psfmnist', euler)]['delta'] == -5.0  # against the winner's seed 0 (75), not its mean (74)
    assert out[('psfmnist', fixed)]['seeds'] == [] and out[('psfmnist', fixed)]['delta'] is None
    assert out[('listops', winner)]['kind'] == 'screen' and out[('listops', fixed)]['delta'] == -1.0
    assert out[('listops', euler)]['seeds'] == []  # a 4000-step run is no 2000-step screen's peer
    md = (tmp_path / 'ablation.md').read_text()
    assert f'| psfmnist | main 1500 steps | (the winner) | `{winner}` | 74.00 (75.00, 73.00; seeds 0, 1) |  |' in md


def test_gpu_runs_script_trains_path_x_end_to_end_on_cpu_tiny(tmp_path):
    """eval/lra/gpu_runs.sh (TASK=pathx), as a lent GPU would run it, on CPU at a tiny size in a copy of eval/:
    it generates Path-X, trains a row, writes the result and copies run and result under $OUT."""
    import os
    import shutil
    import subprocess
    work = tmp_path / 'repo'
    for path in ROOT.glob('eval/**/*'):
        rel = path.relative_to(ROOT)
        if path.is_file() and path.suffix in ('.py', '.sh') and not {'data', 'runs', 'checkpoints'} & set(rel.parts):
            (work / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, work / rel)
    env = dict(os.environ, DEVICE='cpu', TASK='pathx', N='20', STEPS='2', BATCH='2', ROWS='ldn', BUDGET='300',
               OUT=str(tmp_path / 'out'), OMP_NUM_THREADS='2')
    proc = subprocess.run(['bash', str(work / 'eval' / 'lra' / 'gpu_runs.sh')], env=env, capture_output=True,
                          text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    import json
    result = json.loads((tmp_path / 'out' / 'results' / 'pathx_ldn_s0-b2.json').read_text())
    assert result['task'] == 'pathx' and result['steps'] == 2 and result['batch_size'] == 2
    assert 0 <= result['test_acc'] <= 100
    assert {'log.csv', 'last.pt', 'best.pt'} <= {p.name for p in (tmp_path / 'out' / 'runs' / 'pathx_ldn_s0-b2').iterdir()}
    import numpy as np
    with np.load(work / 'eval' / 'data' / 'lra' / 'pathfinder128_hard.npz') as f:
        assert f['train_images'].shape == (16, 128, 128)


def test_saved_tensor_breakdown_sums_over_layers_and_counts_a_storage_once():
    sys.path.insert(0, str(ROOT / 'eval' / 'lra'))
    import cost
    import torch
    from torch import nn

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 64)  # saves its input: 8 x 64 float32 = 2 KiB

        def forward(self, x):
            h = self.fc(x)
            return h * h  # saves h twice (both operands): one storage, counted once under the layer

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([Layer(), Layer()])

        def forward(self, x):
            for b in self.blocks:
                x = b(x)
            return x
    x = torch.randn(8, 64, requires_grad=True)
    mb = cost.saved_tensor_mb(Model(), x)
    kib = {k: round(v * 1024, 3) for k, v in mb.items()}
    assert kib == {'fc': 4.0, '(layer)': 4.0}  # 2 layers x 2 KiB each; the weights are not activations
