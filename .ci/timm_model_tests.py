""" timm's own model test-suite on the ldn_* models: ``tests/test_models.py -k ldn`` of the installed timm.

    python .ci/timm_model_tests.py [--sdist TARBALL] [-k EXPR] [--keep] [-- EXTRA PYTEST ARGS]

timm's wheel carries no tests, its sdist does. This script

1. reads the installed timm's version (``importlib.metadata``) and downloads the sdist of exactly that version
   (``pip download --no-binary :all: --no-deps timm==X``; ``--sdist`` uses a tarball you already have);
2. extracts only its ``tests/`` folder into a fresh temporary folder (nothing fetched lands in the checkout) and
   writes a ``pytest.ini`` there with the markers timm declares in its ``pyproject.toml``, so neither this
   project's pytest configuration nor timm's package sources are involved: the installed timm is tested;
3. checks that a bare ``import timm`` registers ``ldn_*`` (the ``timm_ldn_autoregister.pth`` start-up hook;
   timm's test module never imports timm_ldn, and it builds its parametrisation from ``list_models()`` at
   import time, so that hook is what puts the ldn models into the suite);
4. runs ``python -m pytest -q tests/test_models.py -k ldn`` from the temporary folder and prints pytest's
   summary line.

Exit status: pytest's (non-zero when any test fails or errors), 5 when no ldn test was collected, 2 when the sdist
could not be fetched or read (the tests did NOT run: this is never reported as a pass), 1 when ldn_* is not
registered by ``import timm``.

The child process gets ``HF_HUB_OFFLINE=1`` (unless set): the only Hub access of the selected tests is
``test_model_load_pretrained`` on the published ldn tags, which then loads the verified copies shipped in
``weights/`` instead of waiting on an unreachable Hub; and ``GITHUB_ACTIONS`` is removed, because timm's
test_models.py selects different tests and exclusion lists when it is set. ``TIMEOUT`` (seconds per test,
timm's default 120 / 240 / 360 by test) and ``TORCH_DEVICE`` are passed through. Takes about 5 minutes on
2 CPU cores.
"""
import argparse
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import List, Optional

PREFIX = 'timm-model-tests-'  # must not contain the -k expression: -k also matches the names of parent folders


def fail(msg: str, code: int) -> None:
    print(f'\nERROR (timm model tests): {msg}', file=sys.stderr, flush=True)
    sys.exit(code)


def download_sdist(version: str, dest: Path) -> Path:
    cmd = [sys.executable, '-m', 'pip', 'download', '--no-binary', ':all:', '--no-deps', '--no-cache-dir',
           f'timm=={version}', '-d', str(dest)]
    print('$ ' + ' '.join(cmd), flush=True)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        fail(f'downloading the timm {version} sdist timed out; timm\'s model tests did NOT run.', 2)
    if proc.returncode != 0:
        print((proc.stdout + proc.stderr)[-3000:], file=sys.stderr)
        fail(f'could not download the sdist of timm=={version} (pip download exit {proc.returncode}; no network '
             f'to the package index?). timm\'s model tests did NOT run. Pass --sdist PATH to use a local copy.', 2)
    found = sorted(p for p in dest.iterdir() if p.name.startswith('timm-') and p.name.endswith('.tar.gz'))
    if len(found) != 1:
        fail(f'pip download left {[p.name for p in dest.iterdir()]} in {dest}, expected one timm-{version}.tar.gz.', 2)
    return found[0]


def extract_tests(sdist: Path, version: str, dest: Path) -> List[str]:
    """Extract ``<top>/tests/**`` to ``dest/tests``; returns timm's pytest markers (from its pyproject.toml)."""
    markers: List[str] = []
    try:
        with tarfile.open(sdist, 'r:gz') as tar:
            members = tar.getmembers()
            tops = {m.name.split('/', 1)[0] for m in members}
            if len(tops) != 1:
                fail(f'{sdist.name}: expected one top-level folder, found {sorted(tops)}.', 2)
            top = tops.pop()
            if top != f'timm-{version}':
                fail(f'{sdist.name} unpacks to {top}/, not timm-{version}/: not the installed version\'s sdist.', 2)
            n = 0
            for m in members:
                rel = m.name[len(top) + 1:]
                if not rel.startswith('tests/') or not m.isfile():
                    continue
                parts = rel.split('/')
                if any(p in ('', '.', '..') for p in parts):
                    fail(f'{sdist.name}: refusing unsafe member {m.name!r}.', 2)
                target = dest.joinpath(*parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(m) as src, open(target, 'wb') as out:
                    shutil.copyfileobj(src, out)
                n += 1
            try:
                import tomllib  # Python >= 3.11
                pyproject = tar.extractfile(f'{top}/pyproject.toml')
                ini = tomllib.loads(pyproject.read().decode('utf-8'))['tool']['pytest']['ini_options']
                markers = [str(x) for x in ini.get('markers', [])]
            except Exception as e:  # markers are cosmetic (PytestUnknownMarkWarning otherwise)
                print(f'note: timm\'s pytest markers not read from its pyproject.toml ({e!r})', flush=True)
    except (OSError, tarfile.TarError) as e:
        fail(f'cannot read {sdist}: {e!r}', 2)
    if not (dest / 'tests' / 'test_models.py').is_file():
        fail(f'{sdist.name} has no tests/test_models.py.', 2)
    print(f'extracted {n} files of {top}/tests/ to {dest / "tests"}', flush=True)
    return markers


def child_env() -> dict:
    env = dict(os.environ)
    env.pop('GITHUB_ACTIONS', None)
    env.setdefault('HF_HUB_OFFLINE', '1')
    env.pop('PYTEST_ADDOPTS', None)
    env.pop('TIMM_LDN_NO_AUTOREGISTER', None)  # the start-up hook is what registers ldn_* for timm's tests
    return env


def check_registration(cwd: Path, env: dict) -> List[str]:
    # torchvision's FX feature extraction missing would make timm skip every FX test (silently, as a skip)
    code = ('import json, timm; import torchvision.models.feature_extraction; '
            'print(json.dumps([timm.__version__, timm.list_models("ldn_*")]))')
    proc = subprocess.run([sys.executable, '-c', code], cwd=str(cwd), env=env, capture_output=True, text=True,
                          timeout=600)
    names: List[str] = []
    if proc.returncode == 0:
        version, names = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f'import timm ({version}) registers: {", ".join(names) or "nothing"}', flush=True)
    if not names:
        print(proc.stdout[-2000:] + proc.stderr[-3000:], file=sys.stderr)
        probe = subprocess.run([sys.executable, '-c', 'import timm_ldn'], cwd=str(cwd), env=env,
                               capture_output=True, text=True, timeout=600)
        print('$ python -c "import timm_ldn"\n' + (probe.stdout + probe.stderr)[-4000:], file=sys.stderr)
        fail('a bare `import timm` does not register ldn_* (see above), or torchvision.models.feature_extraction '
             '(timm\'s FX tests) is missing. Is timm-ldn installed (pip install -e ".[test]"), with its '
             'timm_ldn_autoregister.pth start-up hook, and torchvision?', 1)
    return names


def run_pytest(cwd: Path, env: dict, keyword: str, extra: List[str]) -> int:
    cmd = [sys.executable, '-m', 'pytest', '-q', '-c', 'pytest.ini', '--rootdir', '.', '-p', 'no:cacheprovider',
           '-rfEs', '--durations=10', 'tests/test_models.py', '-k', keyword] + extra
    print(f'$ cd {cwd} && python -m ' + ' '.join(cmd[2:]), flush=True)
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=str(cwd), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1)
    summary: Optional[str] = None
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stdout.write(line)
        if re.search(r'\b(passed|failed|error|errors|skipped|deselected|no tests ran)\b', line) and \
                re.search(r' in \d+(\.\d+)?s', line):
            summary = line.strip().strip('=').strip()
    rc = proc.wait()
    sys.stdout.flush()
    print(f'\ntimm model tests (tests/test_models.py -k {keyword}): {summary or "no pytest summary line"}; '
          f'pytest exit {rc}; {time.time() - t0:.0f}s', flush=True)
    if rc == 5:
        print(f'ERROR (timm model tests): no test matched -k {keyword!r}.', file=sys.stderr, flush=True)
    return rc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument('--sdist', type=Path, help='use this timm-<version>.tar.gz instead of downloading it')
    ap.add_argument('-k', dest='keyword', default='ldn', help='pytest -k expression (default: ldn)')
    ap.add_argument('--keep', action='store_true', help='keep the temporary folder')
    ap.add_argument('pytest_args', nargs='*', help='after --: extra pytest arguments')
    args = ap.parse_args()

    try:
        version = importlib.metadata.version('timm')
    except importlib.metadata.PackageNotFoundError:
        fail('timm is not installed in this interpreter.', 1)
    print(f'timm {version} (installed) :: {sys.executable}', flush=True)

    tmp = Path(tempfile.mkdtemp(prefix=PREFIX)).resolve()
    if args.keyword.lower() in str(tmp).lower():
        # -k matches the names of an item's parent folders too: every test of the file would be selected
        shutil.rmtree(tmp, ignore_errors=True)
        fail(f'the temporary folder {tmp} contains {args.keyword!r}; set TMPDIR to another folder.', 1)
    try:
        if args.sdist:
            sdist = args.sdist.resolve()
            if not sdist.is_file():
                fail(f'--sdist {sdist} does not exist.', 2)
        else:
            sdist = download_sdist(version, tmp / 'download')
        markers = extract_tests(sdist, version, tmp)
        ini = ['[pytest]', '# written by timm-ldn .ci/timm_model_tests.py: markers from timm\'s pyproject.toml']
        if markers:
            ini += ['markers ='] + [f'    {m}' for m in markers]
        ini += ['filterwarnings =', '    ignore::pytest.PytestUnknownMarkWarning'] if not markers else []
        (tmp / 'pytest.ini').write_text('\n'.join(ini) + '\n', encoding='utf-8')

        env = child_env()
        check_registration(tmp, env)
        return run_pytest(tmp, env, args.keyword, args.pytest_args)
    finally:
        if args.keep:
            print(f'kept {tmp}', flush=True)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == '__main__':
    sys.exit(main())
