"""The job runner and snapshots both studies share (``eval/runner.py``): jobs run and are judged by their result,
unfinished runs travel as snapshots, and a finished run leaves only its log in git (no checkpoint)."""
import sys
from pathlib import Path

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
