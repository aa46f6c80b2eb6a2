"""The job runner and resumable snapshots that both studies use (``eval/fmnist/block_study.py``, ``eval/lra/study.py``).

* :func:`run_jobs`: each job is one training process (its stdout to ``<runs>/<name>/stdout.log``), ``parallel`` at a
  time, one thread each by the callers' commands; a job counts as finished when its process exits 0 and the caller's
  ``finished(name)`` says its result exists.
* :class:`Snapshots`: copies of an unfinished run's resumable files in a committed folder, so another machine continues
  it (``restore``, then the study's ``run``). Checkpoints are committed only for that, and a finished run keeps only
  its log there (:meth:`Snapshots.keep_log`).
"""
import shutil
import subprocess
import time
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

__all__ = ['Job', 'run_jobs', 'Snapshots']

Job = Tuple[str, List[str]]  # (experiment name, command)


def run_jobs(jobs: Sequence[Job], runs_dir: Path, parallel: int, finished: Callable[[str], bool],
             on_finish: Optional[Callable[[str], None]] = None,
             on_poll: Optional[Callable[[List[str]], None]] = None, cwd: Optional[Path] = None,
             poll_s: float = 10.) -> int:
    """Run ``jobs`` ``parallel`` at a time; ``on_finish(name)`` after each success, ``on_poll(running names)`` every
    poll (snapshots). Returns 1 if any job failed, else 0."""
    todo = list(jobs)
    running: List[Tuple[subprocess.Popen, str]] = []
    failures = 0
    while todo or running:
        while todo and len(running) < parallel:
            name, cmd = todo.pop(0)
            (runs_dir / name).mkdir(parents=True, exist_ok=True)
            with open(runs_dir / name / 'stdout.log', 'a') as log:
                running.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=cwd), name))
            print(f'started {name}', flush=True)
        time.sleep(poll_s)
        for proc, name in list(running):
            if proc.poll() is None:
                continue
            running.remove((proc, name))
            ok = proc.returncode == 0 and finished(name)
            failures += not ok
            print(f'{"finished" if ok else "FAILED"} {name} (rc={proc.returncode})', flush=True)
            if ok and on_finish is not None:
                on_finish(name)
        if on_poll is not None:
            on_poll([name for _, name in running])
    return 1 if failures else 0


class Snapshots:
    """Resumable copies of runs: ``files`` are ``(name in the run folder, name in the snapshot)`` pairs; a run is
    snapshotted only once its ``resume_file`` (e.g. ``last.pt``) exists, and restored where it is missing."""

    def __init__(self, runs_dir: Path, snapshot_dir: Path, files: Sequence[Tuple[str, str]], resume_file: str,
                 log_file: str = 'log.csv'):
        self.runs_dir, self.snapshot_dir = Path(runs_dir), Path(snapshot_dir)
        self.files = list(files)
        self.resume_file, self.log_file = resume_file, log_file

    def _snapshot_name(self, run_name: str) -> str:
        return dict(self.files).get(run_name, run_name)

    def save(self, experiments: Sequence[str]) -> None:
        """Copy each unfinished run's resumable files (newer than the snapshot's) into the snapshot folder."""
        for exp in experiments:
            src = self.runs_dir / exp
            if not (src / self.resume_file).is_file():
                continue
            self._copy(exp, self.files)

    def keep_log(self, exp: str) -> None:
        """A finished run: its snapshot keeps the log alone (the reports rebuild from it), no checkpoint."""
        self._copy(exp, [(self.log_file, self._snapshot_name(self.log_file))])
        for _, target in self.files:
            if target != self._snapshot_name(self.log_file):
                (self.snapshot_dir / exp / target).unlink(missing_ok=True)

    def _copy(self, exp: str, files: Sequence[Tuple[str, str]]) -> None:
        src, dst = self.runs_dir / exp, self.snapshot_dir / exp
        for name, target in files:
            if not (src / name).is_file():
                continue
            dst.mkdir(parents=True, exist_ok=True)
            if not (dst / target).is_file() or (src / name).stat().st_mtime > (dst / target).stat().st_mtime:
                shutil.copy2(src / name, dst / target)

    def restore(self) -> List[str]:
        """Put committed snapshots back where the trainer's ``--resume`` looks; a run that got further here (its
        files exist) is never overwritten."""
        restored = []
        for snap in sorted(self.snapshot_dir.glob(f'*/{self._snapshot_name(self.resume_file)}')):
            exp = snap.parent.name
            run_dir = self.runs_dir / exp
            run_dir.mkdir(parents=True, exist_ok=True)
            for name, target in self.files:
                if (snap.parent / target).is_file() and not (run_dir / name).is_file():
                    shutil.copy2(snap.parent / target, run_dir / name)
            print(f'restored {exp}')
            restored.append(exp)
        return restored
