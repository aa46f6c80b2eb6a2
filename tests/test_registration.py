"""ldn_* reach timm's registry in processes that never import timm_ldn (timm's train.py, validate.py, ...).

Every check runs in a fresh interpreter: the hook acts at interpreter start-up and on the first ``import timm``,
neither of which can be observed again inside the pytest process.
"""
import json
import os
import site
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path
from typing import Dict, Optional

import pytest

import _timm_ldn_autoregister as hook

PTH_NAME = 'timm_ldn_autoregister.pth'


def _env(**overrides: Optional[str]) -> Dict[str, str]:
    env = dict(os.environ)
    env.pop(hook.ENV_VAR, None)
    for k, v in overrides.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


def _run(code: str, env: Optional[Dict[str, str]] = None, cwd: Optional[str] = None) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one JSON object on its last line."""
    proc = subprocess.run(
        [sys.executable, '-c', textwrap.dedent(code)], env=env or _env(), cwd=cwd,
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), '_stderr': proc.stderr}


def test_pth_installed_in_site_packages():
    """The one piece a plain ``pip install`` / ``pip install -e .`` must put next to the installed packages."""
    dirs = {sysconfig.get_paths()['purelib'], *site.getsitepackages()}
    found = [Path(d, PTH_NAME) for d in dirs if Path(d, PTH_NAME).is_file()]
    assert found, f'{PTH_NAME} is in none of {sorted(dirs)}: reinstall with `pip install -e .`'
    line = found[0].read_text().strip()
    assert line.startswith('import ') and '_timm_ldn_autoregister' in line and hook.ENV_VAR in line


def test_plain_import_timm_registers_ldn(tmp_path):
    """What train.py does: import timm, then create_model by name; cwd outside the repo so only the install counts."""
    out = _run('''
        import json, sys
        assert 'torch' not in sys.modules  # the start-up hook itself must not pull torch in
        import timm
        m = timm.create_model('ldn_tiny', depth=1, num_classes=3)
        print(json.dumps({
            'models': timm.list_models('ldn_*'),
            'cls': type(m).__name__,
            'plugin_loaded': 'timm_ldn' in sys.modules,
            'finders': [type(f).__name__ for f in sys.meta_path],
            'timm_loader': type(timm.__spec__.loader).__name__,
        }))
    ''', cwd=str(tmp_path))
    assert {'ldn_tiny', 'ldn_small', 'ldn_base'} <= set(out['models'])
    assert out['cls'] == 'LinearDiffusionNet' and out['plugin_loaded']
    assert '_TimmImportFinder' not in out['finders']  # one-shot: gone after timm's import
    assert out['timm_loader'] != '_PostImportLoader'  # timm's real loader was put back
    assert 'automatic registration' not in out['_stderr']


def test_probe_for_timm_before_import_still_registers(tmp_path):
    """transformers checks ``importlib.util.find_spec('timm')`` before it imports timm; that probe must not use up
    the hook (it did: TimmWrapper then failed with 'Unknown model (ldn_nano_patch4_28)')."""
    out = _run('''
        import importlib.util, json, sys
        assert importlib.util.find_spec('timm') is not None and 'timm' not in sys.modules
        import timm
        print(json.dumps({'models': timm.list_models('ldn_*'),
                          'finders': [type(f).__name__ for f in sys.meta_path]}))
    ''', cwd=str(tmp_path))
    assert 'ldn_small' in out['models']
    assert '_TimmImportFinder' not in out['finders']  # removed once timm was imported


def test_startup_hook_is_cheap_and_lazy(tmp_path):
    """Without ``import timm``: the finder is installed, nothing heavy is imported, and it costs < 5 ms."""
    out = _run('''
        import json, sys
        print(json.dumps({
            'heavy': sorted(m for m in ('torch', 'timm', 'timm_ldn', 'numpy') if m in sys.modules),
            'finder_installed': any(type(f).__name__ == '_TimmImportFinder' for f in sys.meta_path),
        }))
    ''', cwd=str(tmp_path))
    assert out['heavy'] == [] and out['finder_installed']

    # -X importtime reports the hook module's own import time (µs, cumulative); best of three runs
    costs = []
    for _ in range(3):
        proc = subprocess.run(
            [sys.executable, '-X', 'importtime', '-c', 'pass'], env=_env(), cwd=str(tmp_path),
            capture_output=True, text=True, timeout=60)
        rows = [ln for ln in proc.stderr.splitlines() if ln.rstrip().endswith('_timm_ldn_autoregister')]
        assert rows, proc.stderr[-2000:]
        costs.append(int(rows[0].split('|')[1]))
    assert min(costs) < 5000, f'start-up hook costs {min(costs)} µs'


def test_env_var_switches_hook_off(tmp_path):
    """TIMM_LDN_NO_AUTOREGISTER=1: plain timm, no finder, no plugin; then the explicit route of train.py.

    ``train.py --device-modules timm_ldn`` runs ``importlib.import_module('timm_ldn')`` before ``create_model``;
    this reproduces that order.
    """
    out = _run('''
        import importlib, json, sys
        finder = any(type(f).__name__ == '_TimmImportFinder' for f in sys.meta_path)
        import timm
        before = timm.list_models('ldn_*')
        try:
            timm.create_model('ldn_tiny')
            err = ''
        except RuntimeError as e:
            err = str(e)
        loaded = 'timm_ldn' in sys.modules
        for module in ['timm_ldn']:  # train.py: for module in args.device_modules: importlib.import_module(module)
            importlib.import_module(module)
        m = timm.create_model('ldn_tiny', depth=1)
        print(json.dumps({'finder': finder, 'before': before, 'err': err, 'loaded': loaded,
                          'after': timm.list_models('ldn_*'), 'cls': type(m).__name__}))
    ''', env=_env(**{hook.ENV_VAR: '1'}), cwd=str(tmp_path))
    assert not out['finder'] and out['before'] == [] and not out['loaded']
    assert 'Unknown model' in out['err']
    assert 'ldn_tiny' in out['after'] and out['cls'] == 'LinearDiffusionNet'


def test_import_plugin_first_and_broken_plugin(tmp_path):
    """Importing timm_ldn before timm must not recurse; a plugin that fails to import only warns."""
    out = _run('''
        import json, sys
        import timm_ldn, timm
        print(json.dumps({'models': timm.list_models('ldn_*')}))
    ''', cwd=str(tmp_path))
    assert 'ldn_small' in out['models']

    # a shadowing, broken timm_ldn earlier on sys.path: `import timm` must still work, with a clear warning
    fake = tmp_path / 'shadow' / 'timm_ldn'
    fake.mkdir(parents=True)
    (fake / '__init__.py').write_text('raise ImportError("simulated broken install")\n')
    out = _run('''
        import json, timm
        print(json.dumps({'models': timm.list_models('ldn_*'), 'resnet': 'resnet18' in timm.list_models('resnet1*')}))
    ''', env=_env(PYTHONPATH=str(fake.parent)), cwd=str(tmp_path))
    assert out['models'] == [] and out['resnet']
    assert 'automatic registration of the ldn_* models failed' in out['_stderr']
    assert 'simulated broken install' in out['_stderr']


def test_install_is_idempotent_and_one_shot(monkeypatch):
    """In-process unit check of the finder: ignores other names, installs once, removes itself on 'timm'."""
    monkeypatch.setattr(sys, 'meta_path', [f for f in sys.meta_path if not isinstance(f, hook._TimmImportFinder)])
    monkeypatch.delenv(hook.ENV_VAR, raising=False)
    monkeypatch.delitem(sys.modules, 'timm', raising=False)
    hook.install()
    hook.install()
    finders = [f for f in sys.meta_path if isinstance(f, hook._TimmImportFinder)]
    assert len(finders) == 1 and sys.meta_path[0] is finders[0]
    assert finders[0].find_spec('numpy') is None and finders[0] in sys.meta_path
    spec = finders[0].find_spec('timm')
    assert spec is not None and isinstance(spec.loader, hook._PostImportLoader)
    assert finders[0] in sys.meta_path  # a probe (find_spec without loading) keeps it for the real import
    assert finders[0].find_spec('timm') is not None and len([f for f in sys.meta_path if f is finders[0]]) == 1
    hook._uninstall()  # what the real import does (test_plain_import_timm_registers_ldn runs it end to end)
    assert finders[0] not in sys.meta_path

    monkeypatch.setenv(hook.ENV_VAR, '1')
    hook.install()
    assert not any(isinstance(f, hook._TimmImportFinder) for f in sys.meta_path)


@pytest.mark.skipif(not os.environ.get('TIMM_TRAIN_PY'), reason='set TIMM_TRAIN_PY=/path/to/timm/train.py')
def test_real_train_py_runs_ldn_tiny(tmp_path):
    """Optional: timm's own train.py (from a timm checkout) resolves --model ldn_tiny with no code change."""
    train_py = Path(os.environ['TIMM_TRAIN_PY'])
    data = tmp_path / 'data' / 'train'
    from PIL import Image
    for c in range(2):
        (data / f'c{c}').mkdir(parents=True)
        for i in range(4):
            Image.new('RGB', (40, 40), (100 * c, 50 * i, 30)).save(data / f'c{c}' / f'{i}.png')
    # copy train.py alone so `import timm` resolves to the installed timm, not the checkout next to it
    script = tmp_path / 'train.py'
    script.write_text(train_py.read_text())
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path / 'data'), '--model', 'ldn_tiny', '--model-kwargs', 'depth=1',
         '--num-classes', '2', '--img-size', '32', '--batch-size', '4', '--epochs', '1', '--workers', '0',
         '--no-prefetcher', '--device', 'cpu', '--opt', 'adamw', '--lr', '1e-3', '--output', str(tmp_path / 'out'),
         '--val-split', ''],
        env=_env(), cwd=str(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'Model ldn_tiny created' in proc.stderr + proc.stdout
