""" Release check: build the sdist and the wheel, install the wheel alone into a fresh venv and use it as a user would.

    python .ci/release_check.py [--project DIR] [--keep]

1. ``python -m build`` (the wheel is built from the sdist, so the sdist is proven to contain what the build needs),
   ``twine check --strict`` on both artifacts.
2. The sdist's file list: every build input present (tracked package files, manifest, shipped weights, samples,
   LICENSE), nothing else (no tests/, eval/, .ci/, untracked files, checkpoints, caches).
   The wheel's: the manifest, the weight files it lists, the samples, the start-up hook, the license.
3. A venv without system site-packages gets the wheel (``pip install --no-deps``); the runtime dependencies are
   then made importable by a ``.pth`` that lists this interpreter's site-packages folders as plain paths. Plain
   path lines do not run the ``.pth`` hooks inside those folders, so an editable timm-ldn install there (its
   finder, its start-up hook) stays invisible; the client checks that timm_ldn, the hook, the manifest and the
   dist-info all come from the venv and that no sys.path entry lies in the checkout.
4. From an empty folder outside the checkout, with the venv's ``ldn`` / ``python``: ``import timm`` registers
   ``ldn_*``; ``ldn info ldn_small`` and ``ldn predict --samples`` offline; every tag of the shipped manifest by
   ``pretrained=True`` and ``hf-hub:`` through the loopback Hub (tests/hub_helpers.py), then offline from the cache;
   altered bytes on the Hub and an altered shipped copy are refused; transformers' TimmWrapper, when installed.

Every check runs and reports; the exit code is 1 if any failed. Takes about 1-2 minutes on 2 CPU cores.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import site
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / 'tests'))  # the loopback Hub of the test suite

FAILURES: List[str] = []


def check(name: str, ok: bool, detail: str = '') -> bool:
    print(f'{"ok  " if ok else "FAIL"} {name}{": " + detail if detail else ""}', flush=True)
    if not ok:
        FAILURES.append(name)
    return ok


def run(cmd: List[str], cwd: Path, env: Optional[Dict[str, str]] = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], cwd=str(cwd), env=env, capture_output=True, text=True,
                          timeout=timeout)


def tail(proc: subprocess.CompletedProcess, n: int = 1500) -> str:
    return (proc.stdout + proc.stderr)[-n:].strip()


def ensure_tools() -> None:
    missing = [m for m in ('build', 'twine') if shutil.which(m) is None and not _importable(m)]
    if missing:
        proc = run([sys.executable, '-m', 'pip', 'install', '-q', *missing], cwd=HERE)
        check(f'pip install {" ".join(missing)}', proc.returncode == 0, tail(proc))


def _importable(module: str) -> bool:
    return run([sys.executable, '-c', f'import {module}'], cwd=HERE).returncode == 0


def git_tracked(project: Path) -> Optional[set]:
    proc = run(['git', 'ls-files', '-z'], cwd=project)
    return set(proc.stdout.split('\0')) - {''} if proc.returncode == 0 else None


def build(project: Path, dist: Path) -> Tuple[Optional[Path], Optional[Path]]:
    had_egg_info = (project / 'timm_ldn.egg-info').exists()
    proc = run([sys.executable, '-m', 'build', '--outdir', dist, project], cwd=project)
    if not had_egg_info:  # the sdist step leaves setuptools' metadata in the source tree
        shutil.rmtree(project / 'timm_ldn.egg-info', ignore_errors=True)
    sdists, wheels = sorted(dist.glob('*.tar.gz')), sorted(dist.glob('*.whl'))
    ok = proc.returncode == 0 and len(sdists) == 1 and len(wheels) == 1
    check('python -m build (sdist, then the wheel from the sdist)', ok, '' if ok else tail(proc))
    if not ok:
        return None, None
    for path in (sdists[0], wheels[0]):
        print(f'     {path.name}: {path.stat().st_size} bytes')
    proc = run([sys.executable, '-m', 'twine', 'check', '--strict', sdists[0], wheels[0]], cwd=project)
    check('twine check --strict (both artifacts)', proc.returncode == 0, tail(proc, 600))
    return sdists[0], wheels[0]


SEQUENCE = 'LdnSequenceClassifier'  # manifest architecture of non-timm sequence models (timm_ldn.sequence)


def manifest_of(project: Path) -> dict:
    return json.loads((project / 'weights' / 'manifest.json').read_text(encoding='utf-8'))


def shipped_weight_files(project: Path) -> List[str]:
    """Paths under weights/ that the release ships: the manifest, its local_file copies, the samples."""
    entries = manifest_of(project)['weights'].values()
    samples = sorted(p.name for p in (project / 'weights' / 'samples').glob('*') if p.is_file())
    local = [e['local_file'] for e in entries if e.get('local_file')]
    configs = [c for c in (str(Path(f).parent / 'config.json') for f in local)
               if (project / 'weights' / c).is_file()]  # a sequence model is rebuilt from it
    return ['manifest.json'] + local + configs + [f'samples/{n}' for n in samples]


def check_sdist(sdist: Path, project: Path) -> None:
    with tarfile.open(sdist) as tar:
        root = tar.getnames()[0].split('/')[0]
        files = {m.name[len(root) + 1:] for m in tar.getmembers() if m.isfile()}
    tracked = git_tracked(project)
    package = {f for f in (tracked or set()) if f.startswith('timm_ldn/')}
    required = ({'pyproject.toml', 'setup.py', 'MANIFEST.in', 'LICENSE', 'README.md', '_timm_ldn_autoregister.py'}
                | package | {f'weights/{f}' for f in shipped_weight_files(project)})
    missing = sorted(required - files)
    check('sdist has every build input (tracked package files, manifest, shipped weights, samples, LICENSE)',
          not missing and tracked is not None, f'missing {missing}' if missing else f'{len(files)} files')
    generated = {'PKG-INFO', 'setup.cfg'}
    unwanted = sorted(
        f for f in files if f not in generated and not f.startswith('timm_ldn.egg-info/') and (
            f.split('/')[0] in ('tests', 'eval', '.ci', 'export', 'build', 'dist')
            or '__pycache__' in f or f.endswith(('.pyc', '.pth.tar', '.tmp'))
            or (tracked is not None and f not in tracked)))
    listed = {f'weights/{f}' for f in shipped_weight_files(project)}
    unwanted += sorted(f for f in files if f.endswith('.safetensors') and f not in listed)  # stale weight copies
    check('sdist ships nothing else (no tests/eval/.ci, untracked files, checkpoints, unlisted weights)',
          not unwanted, f'unexpected {unwanted}' if unwanted else '')
    print('     sdist files: ' + ' '.join(sorted(files)))


def check_wheel(wheel: Path, project: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        files = set(zf.namelist())
    dist_info = next((f.split('/')[0] for f in files if f.split('/')[0].endswith('.dist-info')), '')
    required = ({'timm_ldn_autoregister.pth', '_timm_ldn_autoregister.py', f'{dist_info}/licenses/LICENSE'}
                | {f'timm_ldn/weights/{f}' for f in shipped_weight_files(project)}
                | {f for f in (git_tracked(project) or ()) if f.startswith('timm_ldn/')})
    missing = sorted(required - files)
    check('wheel has the package, manifest, shipped weights, samples, start-up hook and LICENSE', not missing,
          f'missing {missing}' if missing else f'{len(files)} files')
    unwanted = sorted(f for f in files if f.split('/')[0] in ('tests', 'eval', 'weights', 'export'))
    check('wheel ships no tests/eval/top-level weights', not unwanted, str(unwanted) if unwanted else '')
    with zipfile.ZipFile(wheel) as zf:
        same = zf.read('timm_ldn/weights/manifest.json') == (project / 'weights/manifest.json').read_bytes() \
            if 'timm_ldn/weights/manifest.json' in files else False
    check('wheel manifest is weights/manifest.json byte for byte (one source)', same)
    print('     wheel files: ' + ' '.join(sorted(files)))


def site_dirs(project: Path) -> List[str]:
    """This interpreter's site-packages folders (where the runtime dependencies are), never the checkout."""
    dirs = [sysconfig.get_paths()['purelib'], sysconfig.get_paths()['platlib'], *site.getsitepackages()]
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    out = []
    for d in dirs:
        path = Path(d).resolve()
        if path.is_dir() and not path.is_relative_to(project) and str(path) not in out:
            out.append(str(path))
    return out


def make_venv(work: Path, wheel: Path, project: Path) -> Optional[Path]:
    venv = work / 'venv'
    proc = run([sys.executable, '-m', 'venv', venv], cwd=work)
    if not check('fresh venv', proc.returncode == 0, tail(proc)):
        return None
    python = venv / 'bin' / 'python'
    proc = run([python, '-m', 'pip', 'install', '-q', '--no-deps', '--no-index', wheel], cwd=work)
    if not check('pip install --no-deps <wheel> into the venv', proc.returncode == 0, tail(proc)):
        return None
    purelib = run([python, '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'], cwd=work)
    # plain paths only: the .pth files inside those folders (an editable timm-ldn, its hook) are not run
    (Path(purelib.stdout.strip()) / '_release_check_runtime_deps.pth').write_text(
        '\n'.join(site_dirs(project)) + '\n', encoding='utf-8')
    return venv


def user_env(venv: Path, hf_home: Path, endpoint: Optional[str]) -> Dict[str, str]:
    drop = ('PYTHONPATH', 'PYTHONHOME', 'PYTHONSTARTUP', 'PYTHONSAFEPATH', 'LDN_WEIGHTS_MANIFEST',
            'TIMM_LDN_NO_AUTOREGISTER', 'VIRTUAL_ENV')
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith(('HF_', 'HUGGINGFACE_'))}
    env.update(PATH=f'{venv / "bin"}{os.pathsep}{env.get("PATH", "")}', HF_HOME=str(hf_home),
               HF_HUB_DISABLE_TELEMETRY='1', HF_HUB_DISABLE_PROGRESS_BARS='1', HF_HUB_DISABLE_XET='1',
               OMP_NUM_THREADS='1', TOKENIZERS_PARALLELISM='false', TRANSFORMERS_NO_ADVISORY_WARNINGS='1')
    if endpoint:
        env['HF_ENDPOINT'] = endpoint
    else:
        env['HF_HUB_OFFLINE'] = '1'
    return env


def client(phase: str, venv: Path, cwd: Path, env: Dict[str, str], project: Path) -> Dict[str, dict]:
    proc = run([venv / 'bin' / 'python', cwd / 'release_client.py', phase, project, cwd / 'expected_manifest.json'],
               cwd=cwd, env=env)
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith('{"check"'):
            d = json.loads(line)
            results[d.pop('check')] = d
    if proc.returncode != 0 or not results:
        check(f'client {phase} ran', False, tail(proc))
    for name, d in results.items():
        detail = {k: v for k, v in d.items() if k not in ('ok', 'trace')}
        check(name, d['ok'], json.dumps(detail, default=str)[:400] + (('\n' + d['trace']) if 'trace' in d else ''))
    return results


def hub_repos(venv: Path, work: Path, project: Path, env: Dict[str, str]) -> Dict[Tuple[str, str], bytes]:
    """Every manifest tag as the Hub will serve it: the published bytes, plus config.json / README.md written by
    the installed ``ldn export`` from those bytes. A tag whose file is neither shipped (``--local-copy``) nor in
    ``export/<tag>/`` cannot be served offline and fails the check."""
    files = {}
    for name, entry in manifest_of(project)['weights'].items():
        candidates = [project / 'weights' / entry['local_file']] if entry.get('local_file') else []
        candidates.append(project / 'export' / name / entry['filename'])
        source = next((p for p in candidates if p.is_file()), None)
        if not check(f'published file of {name} available to serve',
                     source is not None, '' if source else f'none of {[str(c) for c in candidates]}'):
            continue
        if entry['architecture'] == SEQUENCE:  # not a timm model: its repo is save_pretrained's folder as shipped
            files[(entry['hf_hub_id'], entry['filename'])] = source.read_bytes()
            files[(entry['hf_hub_id'], 'config.json')] = (source.parent / 'config.json').read_bytes()
            continue
        out = work / 'hub' / name
        proc = run([venv / 'bin' / 'ldn', 'export', source, '--model', name, '--output', out, '--no-manifest',
                    '--model-args', json.dumps(entry.get('model_args') or {}),
                    '--eval', f'top1={entry["eval"].get("top1", 0)}', '--eval-dataset', str(entry['eval'].get('dataset', '')),
                    '--recipe', entry['provenance']['recipe'], '--data', entry['provenance']['data'],
                    '--commit', entry['provenance']['commit'], '--reproduce', entry['reproduce']],
                   cwd=work / 'outside', env=env)
        if not check(f'ldn export (from the wheel) writes the Hub folder of {name}', proc.returncode == 0, tail(proc)):
            continue
        files[(entry['hf_hub_id'], entry['filename'])] = source.read_bytes()
        for extra in ('config.json', 'README.md'):
            files[(entry['hf_hub_id'], extra)] = (out / extra).read_bytes()
    return files


def altered(files: Dict[Tuple[str, str], bytes]) -> Dict[Tuple[str, str], bytes]:
    out = dict(files)
    for key, blob in files.items():
        if key[1].endswith('.safetensors'):
            flipped = bytearray(blob)
            flipped[-64:] = bytes(b ^ 0xFF for b in flipped[-64:])  # same size, still parseable, other tensors
            out[key] = bytes(flipped)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--project', type=Path, default=HERE.parent, help='source tree to release (default: this one)')
    parser.add_argument('--keep', action='store_true', help='keep the work folder (printed) for inspection')
    args = parser.parse_args()
    project = args.project.resolve()
    start = time.time()
    work = Path(tempfile.mkdtemp(prefix='ldn-release-'))
    if work.resolve().is_relative_to(project):
        raise SystemExit(f'work folder {work} is inside the checkout; set TMPDIR elsewhere')
    try:
        ensure_tools()
        sdist, wheel = build(project, work / 'dist')
        if sdist is None:
            return 1
        check_sdist(sdist, project)
        check_wheel(wheel, project)
        venv = make_venv(work, wheel, project)
        if venv is None:
            return 1
        outside = work / 'outside'
        outside.mkdir()
        shutil.copy(HERE / 'release_client.py', outside)  # run from outside: the checkout never reaches sys.path
        shutil.copy(project / 'weights' / 'manifest.json', outside / 'expected_manifest.json')  # tags that must load
        offline_env = user_env(venv, work / 'hf_home', None)
        client('isolation', venv, outside, offline_env, project)

        proc = run([venv / 'bin' / 'ldn', 'info', 'ldn_small'], cwd=outside, env=offline_env)
        check('ldn info ldn_small (offline)', proc.returncode == 0 and proc.stdout.startswith('ldn_small: '),
              proc.stdout.splitlines()[0] if proc.returncode == 0 else tail(proc))
        samples = json.loads((project / 'weights' / 'samples' / 'samples.json').read_text())
        proc = run([venv / 'bin' / 'ldn', 'predict', '--samples', '--model', samples['model'], '--topk', '1', '--json'],
                   cwd=outside, env=offline_env)
        rows = [json.loads(line) for line in proc.stdout.splitlines()] if proc.returncode == 0 else []
        hits = sum(r['topk'][0]['index'] == samples['images'][Path(r['image']).name]['predicted'] for r in rows)
        check(f'ldn predict --samples --model {samples["model"]} (offline, shipped weights)',
              proc.returncode == 0 and len(rows) == len(samples['images']) == hits,
              f'{hits}/{len(samples["images"])} as recorded in samples.json' if rows else tail(proc))

        from hub_helpers import LoopbackHub  # noqa: E402  (imports torch: only now)
        files = hub_repos(venv, work, project, offline_env)
        if files:  # export in a wheel install must not write into the wheel's manifest (the release rebuilds it)
            proc = run([venv / 'bin' / 'ldn', 'export', 'x.safetensors', '--model', 'ldn_tiny.x', '--eval', 'top1=0',
                        '--recipe', 'r', '--data', 'd', '--reproduce', 'x'], cwd=outside, env=offline_env)
            check('ldn export in the wheel install refuses to edit the installed manifest',
                  proc.returncode == 2 and 'belongs to an installed wheel' in proc.stderr, tail(proc, 300))
        with LoopbackHub(files) as hub:
            client('online', venv, outside, user_env(venv, work / 'hf_home', hub.endpoint), project)
        client('offline', venv, outside, offline_env, project)
        with LoopbackHub(altered(files)) as hub:
            client('tampered', venv, outside, user_env(venv, work / 'hf_home_tampered', hub.endpoint), project)

        # an altered copy of the weights shipped in the wheel is refused too
        installed = run([venv / 'bin' / 'python', '-c', 'import timm_ldn; print(timm_ldn.__file__)'],
                        cwd=outside, env=offline_env).stdout.strip()
        for name, entry in manifest_of(project)['weights'].items():
            if not entry.get('local_file'):
                continue
            shipped = Path(installed).parent / 'weights' / entry['local_file']
            if not check(f'shipped copy of {name} installed', shipped.is_file(), str(shipped)):
                continue
            original = shipped.read_bytes()
            shipped.write_bytes(original[:-1] + bytes([original[-1] ^ 0xFF]))
            try:
                if entry['architecture'] == SEQUENCE:  # offline with an empty cache: only the shipped copy is left
                    proc = run([venv / 'bin' / 'python', '-c',
                                f'from timm_ldn.sequence import load_published; load_published({name!r})'],
                               cwd=outside, env=user_env(venv, work / 'hf_home_empty', None))
                else:
                    proc = run([venv / 'bin' / 'ldn', 'predict', '--samples', '--model', name], cwd=outside,
                               env=offline_env)
            finally:
                shipped.write_bytes(original)
            check(f'altered shipped copy of {name} refused',
                  proc.returncode != 0 and ('Checksum mismatch' in proc.stderr or 'sha256' in proc.stderr),
                  tail(proc, 300))
    finally:
        if args.keep:
            print(f'work folder kept: {work}')
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(f'release check: {len(FAILURES)} failed ({time.time() - start:.0f} s)' +
          (': ' + ', '.join(FAILURES) if FAILURES else ''))
    return 1 if FAILURES else 0


if __name__ == '__main__':
    sys.exit(main())
