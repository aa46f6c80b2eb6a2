"""The sequence benchmark: every (task, row, seed) run under one recipe, resumable, and its report.

    python eval/lra/tasks.py                                                  # once: generate ListOps
    python eval/lra/study.py run --task listops --rows ldn transformer --seeds 0 1 --steps 6000 --snapshot
    python eval/lra/study.py run --task listops --rows linear_transformer ldn_no_adiff ldn_no_k --seeds 0
    python eval/lra/study.py report        # -> eval/results/lra/lra.{csv,json,md}, lra_table.{md,json}, ablation.{md,json}, lra_curves.png
    python eval/lra/study.py screen --task listops --rows ldn ldn_sinpos ldn_k_local ldn_k_weak --steps 1000
    python eval/lra/study.py screen-report  # -> eval/results/lra/screen.md
    python eval/lra/study.py long --task listops --rows ldn_implicit_sinpos_torch_init transformer --steps 32000 --snapshot

``screen`` runs short single-seed variants (its own cosine schedule over ``--steps``) for choosing what to run in
full; its runs are named ``screen<steps>-<task>-<row>[-lr<lr>]`` and stay out of the main table.

``run`` skips finished runs and resumes unfinished ones from ``eval/runs/lra/<run>/last.pt``; ``--jobs`` runs that
many at once, one thread each. ``--snapshot`` copies each unfinished run's last checkpoint and log to
``eval/checkpoints/lra/<run>/`` (committed only while the run must continue on another machine, after ``restore``);
when the run finishes, its snapshot keeps the log alone.
Accuracy is reported at the end of training (equal steps: every row has the same step budget) and at equal
wall-clock time: each row's best validation accuracy within the training time LDN needed for the step budget
(mean over its seeds; the fastest row's time when no ``ldn`` run exists), read from the logs, test unseen. A row
slower than LDN is read part-way through its schedule; a faster one at its end (it had no more steps to use).
"""
import argparse
import csv
import json
import statistics
import sys
from pathlib import Path
from typing import Dict, List

HERE = Path(__file__).resolve().parent
EVAL = HERE.parent
RUNS = EVAL / 'runs' / 'lra'
RESULTS = EVAL / 'results' / 'lra'
SNAPSHOTS = EVAL / 'checkpoints' / 'lra'
BATCH_SIZE = 32  # the recipe's (train_lra.py)
# best.pt too: the run's final test reads the best-validation weights, which a resumed run must not lose
SNAPSHOT_FILES = ('last.pt', 'best.pt', 'log.csv')
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(EVAL))
import models  # noqa: E402
import tasks  # noqa: E402
from runner import Snapshots, run_jobs  # noqa: E402


def name(task: str, row: str, seed: int) -> str:
    return f'{task}_{row}_s{seed}'


def screen_name(task: str, row: str, steps: int, lr: float) -> str:
    return f'screen{steps}-{task}-{row}' + (f'-lr{lr:g}' if lr != 1e-3 else '')


def long_name(task: str, row: str, steps: int, seed: int) -> str:
    return f'long{steps}-{task}-{row}-s{seed}'


def run(task: str, rows: List[str], seeds: List[int], steps: int, jobs: int, snapshot: bool, extra: List[str],
        screen_lr: float = 0., long: bool = False, batch_size: int = BATCH_SIZE) -> int:
    """The runs (``screen_lr`` > 0: screening runs at that learning rate, seed 0 only; ``long``: long runs, named
    apart from the main table's equal-step runs). A batch other than the recipe's is named ``…-b<batch>`` and stays
    out of the tables (tiny smoke runs)."""
    if long:
        base = lambda r, s: long_name(task, r, steps, s)  # noqa: E731
    elif screen_lr:
        base = lambda r, s: screen_name(task, r, steps, screen_lr)  # noqa: E731
        extra = extra + ['--lr', str(screen_lr)]
    else:
        base = lambda r, s: name(task, r, s)  # noqa: E731
    name_of = lambda r, s: base(r, s) + ('' if batch_size == BATCH_SIZE else f'-b{batch_size}')  # noqa: E731
    extra = extra + ['--batch-size', str(batch_size)]
    todo = [(r, s) for s in seeds for r in rows if not (RESULTS / f'{name_of(r, s)}.json').is_file()]
    print(f'{task}: {len(todo)} runs to do', flush=True)
    commands = [(name_of(row, seed), [
        sys.executable, str(HERE / 'train_lra.py'), '--task', task, '--row', row, '--seed', str(seed), '--steps',
        str(steps), '--threads', '1', '--resume', '--experiment', name_of(row, seed)] + extra) for row, seed in todo]
    snaps = _snapshots()
    # a finished run keeps its log only: checkpoints stay out of git
    return run_jobs(commands, RUNS, jobs, finished=lambda exp: (RESULTS / f'{exp}.json').is_file(),
                    on_finish=snaps.keep_log if snapshot else None, on_poll=snaps.save if snapshot else None)


def _snapshots() -> Snapshots:
    return Snapshots(RUNS, SNAPSHOTS, [(f, f) for f in SNAPSHOT_FILES], resume_file='last.pt')


def restore() -> None:
    _snapshots().restore()


def _log(run: Dict) -> List[Dict[str, float]]:
    path = EVAL.parent / run['log']
    if not path.is_file():
        path = SNAPSHOTS / Path(run['log']).parent.name / 'log.csv'
    with open(path) as f:
        return [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]


def report() -> List[Dict]:
    results = [json.loads(p.read_text()) for p in sorted(RESULTS.glob('*_s[0-9]*.json'))
               if not p.name.startswith(('screen', 'long'))]
    results = [r for r in results if r.get('batch_size', BATCH_SIZE) == BATCH_SIZE]  # one recipe
    table = []
    for task in tasks.TASKS:
        runs = [r for r in results if r['task'] == task]
        if not runs:
            continue
        logs = {(r['row'], r['seed']): _log(r) for r in runs}
        ldn_s = [r['train_s'] for r in runs if r['row'] == 'ldn']
        budget_s = statistics.mean(ldn_s) if ldn_s else min(r['train_s'] for r in runs)  # LDN's time for the budget
        for row in models.ROWS:
            mine = [r for r in runs if r['row'] == row]
            if not mine:
                continue
            test = [r['test_acc'] for r in mine]
            equal_time = [max((x['val_acc'] for x in logs[(row, r['seed'])] if x['cum_train_s'] <= budget_s),
                              default=float('nan')) for r in mine]
            table.append(dict(
                task=task, row=row, seeds=[r['seed'] for r in mine], steps=mine[0]['steps'], params=mine[0]['params'],
                train_subset=mine[0]['train_subset'], test_acc=statistics.mean(test), test_acc_runs=test,
                test_acc_spread=max(test) - min(test), val_acc=statistics.mean(r['val_acc'] for r in mine),
                val_acc_equal_time=statistics.mean(equal_time), equal_time_s=budget_s,
                train_seq_s=statistics.mean(r['train_seq_s'] for r in mine),
                train_s=statistics.mean(r['train_s'] for r in mine)))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / 'lra.json').write_text(json.dumps(table, indent=1))
    keys = ['task', 'row', 'seeds', 'steps', 'params', 'train_subset', 'test_acc', 'test_acc_spread', 'val_acc',
            'val_acc_equal_time', 'equal_time_s', 'train_seq_s', 'train_s']
    with open(RESULTS / 'lra.csv', 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for t in table:
            w.writerow({k: t[k] for k in keys})
    lines = ['# Sequence benchmark (tasks generated here; eval/lra/README.md)', '',
             'Generated by `python eval/lra/study.py report`. Equal steps: test accuracy of the best-validation '
             'checkpoint at the end of the step budget. Equal time: best validation accuracy reached within the '
             'training time LDN needed for that budget. One thread per run, two runs sharing 2 cores.', '',
             '| task | row | params | steps x batch 32 | test acc (mean; runs) | val acc | val acc at equal time '
             '| train seq/s | train time |', '|---|---|---|---|---|---|---|---|---|']
    for t in table:
        runs = ', '.join(f'{v:.2f}' for v in t['test_acc_runs'])
        lines.append(f"| {t['task']} | {t['row']} | {t['params'] / 1e3:.0f} k | {t['steps']} | "
                     f"**{t['test_acc']:.2f}** ({runs}) | {t['val_acc']:.2f} | {t['val_acc_equal_time']:.2f} "
                     f"(in {t['equal_time_s'] / 60:.0f} min) | {t['train_seq_s']:.1f} | {t['train_s'] / 60:.0f} min |")
    (RESULTS / 'lra.md').write_text('\n'.join(lines) + '\n')
    lra_table(table)
    ablation_table(table)
    if not table:  # nothing finished yet (a fresh clone): the tables say so, no empty figure
        print(f'no finished runs in {RESULTS}')
        return table
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
        task_names = sorted({t['task'] for t in table})
        fig, axes = plt.subplots(2, len(task_names), figsize=(6 * len(task_names), 8), squeeze=False)
        for j, task in enumerate(task_names):
            for r in (r for r in results if r['task'] == task):
                log = _log(r)
                label = f"{r['row']} s{r['seed']}"
                axes[0][j].plot([x['step'] for x in log], [x['val_acc'] for x in log], label=label)
                axes[1][j].plot([x['cum_train_s'] / 60 for x in log], [x['val_acc'] for x in log], label=label)
            axes[0][j].set(title=f'{task}: validation accuracy vs steps', xlabel='step', ylabel='%')
            axes[1][j].set(title=f'{task}: vs training time (1 thread)', xlabel='minutes', ylabel='%')
            for ax in axes[:, j]:
                ax.grid(alpha=.3)
                ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(RESULTS / 'lra_curves.png', dpi=110)
    except ImportError:
        pass
    print((RESULTS / 'lra.md').read_text())
    return table


# LRA's six tasks and our analogue of each (Image has two: sequential and permuted sequential Fashion-MNIST; Path-X
# is generated and costed here but not trainable on 2 CPU cores). (column key, LRA task, our task or None, what ours is)
LRA_COLUMNS = (
    ('listops', 'ListOps', 'listops', 'ListOps, 32-512 tokens (LRA: 500-2,000), 50k train'),
    ('text', 'Text', 'text', 'byte-level Linux-doc book classification, 1-4 kB, 14 classes, 6.1k train (LRA: IMDb)'),
    ('retrieval', 'Retrieval', 'retrieval', 'byte-level same-file pairs, 2 x 1-4 kB, 30k train (LRA: AAN)'),
    ('image', 'Image', 'sfmnist', 'sequential Fashion-MNIST, 784 pixels (LRA: CIFAR-10, 1,024)'),
    ('image_permuted', 'Image (permuted)', 'psfmnist', 'permuted sequential Fashion-MNIST, 784 pixels'),
    ('pathfinder_easy', 'Pathfinder (easy)', 'pathfinder32_easy', 'Pathfinder-32, contour 6, 40k train'),
    ('pathfinder', 'Pathfinder', 'pathfinder32_hard', 'Pathfinder-32, contour 14 (LRA reports hard), 40k train'),
    ('path_x', 'Path-X', 'pathx', 'Pathfinder-128 hard, 16,384 pixel steps, 16k train: trains only on a GPU '
                                  '(gpu_runs.sh), out of reach of 2 CPU cores'),
)
# long runs (``study.py long``) get a column of their own beside their task's: another budget, one seed
# (column key, header, our task, what the budget is)
LONG_COLUMNS = (
    ('listops_long', 'ListOps, long', 'listops', 'ListOps at 32,000 steps x 32 = 1.02 M sequences, one seed, the '
                                                  'same recipe (issue 27: S4 reaches ~50 % only after ~1 M)'),
    ('pathfinder_easy_long', 'Pathfinder (easy), long', 'pathfinder32_easy',
     'Pathfinder-32 easy at 8,000 steps x 32 = 256 k sequences (6.4 epochs of 40k), one seed, the same recipe: '
     'which row leaves chance first (issue 28)'),
)
# published test accuracy (Tay et al. 2021; S4: Gu et al. 2022; Mega-chunk: Ma et al. 2023; LRU: Orvieto et al. 2023)
# on LRA's own data and budgets; 0 = the model failed the task (chance)
LRA_PUBLISHED = {
    'Transformer': dict(listops=36.37, text=64.27, retrieval=57.46, image=42.44, pathfinder=71.40, path_x=0.),
    'S4': dict(listops=59.60, text=86.82, retrieval=90.90, image=88.65, pathfinder=94.20, path_x=96.35),
    'Mega-chunk': dict(listops=58.76, text=90.19, retrieval=90.97, image=85.80, pathfinder=94.41, path_x=93.81),
    'LRU': dict(listops=60.2, text=89.4, retrieval=89.9, image=89.0, pathfinder=95.1, path_x=94.2),
}


def lra_table(table: List[Dict]) -> Dict:
    """``lra_table.{md,json}``: one row per model, one column per LRA task. Ours: mean test accuracy of the main
    runs (seeds x steps), else the best screening run's test (marked 'screen'); the CNN sanity check on Pathfinder;
    the published figures beside them, on LRA's data and budgets."""
    cells: Dict[str, Dict[str, Dict]] = {}
    for t in table:
        cells.setdefault(t['row'], {})[t['task']] = dict(
            test_acc=round(t['test_acc'], 2), seeds=len(t['seeds']), steps=t['steps'], kind='main')
    for p in sorted(RESULTS.glob('screen[0-9]*.json')):
        r = json.loads(p.read_text())
        if r['lr'] != 1e-3:  # learning-rate screens tune a row, they are not its result
            continue
        mine = cells.setdefault(r['row'], {})
        if r['task'] not in mine or (mine[r['task']]['kind'] == 'screen'
                                      and r['val_acc'] > mine[r['task']]['val_acc']):
            mine[r['task']] = dict(test_acc=round(r['test_acc'], 2), val_acc=r['val_acc'], seeds=1,
                                   steps=r['steps'], kind='screen')
    for p in sorted(RESULTS.glob('long[0-9]*.json')):
        r = json.loads(p.read_text())
        if r.get('batch_size', BATCH_SIZE) == BATCH_SIZE:
            cells.setdefault(r['row'], {})[f"long:{r['task']}"] = dict(
                test_acc=round(r['test_acc'], 2), val_acc=r['val_acc'], seeds=1, steps=r['steps'], kind='long')
    cnn = {}
    for task, difficulty in (('pathfinder32_easy', 'easy'), ('pathfinder32_hard', 'hard')):
        p = RESULTS / f'pathfinder_cnn_{difficulty}.json'
        if p.is_file():
            r = json.loads(p.read_text())
            cnn[task] = dict(test_acc=r['test_acc'], seeds=1, steps=r['epochs'], kind='epochs')
    if cnn:
        cells['CNN (2-D image, sanity check)'] = cnn
    columns = [(col, name, task, task, what) for col, name, task, what in LRA_COLUMNS]
    columns += [(col, name, task, f'long:{task}', what) for col, name, task, what in LONG_COLUMNS]
    rows = [dict(model=m, ours=True, cells={col: cells[m][key] for col, _, _, key, _ in columns if key in cells[m]})
            for m in list(models.ROWS) + ['CNN (2-D image, sanity check)'] if m in cells]
    rows += [dict(model=f'{m} (published)', ours=False, cells={k: dict(test_acc=v) for k, v in pub.items()})
             for m, pub in LRA_PUBLISHED.items()]

    def cell(c: Dict) -> str:
        if 'kind' not in c:
            return 'fail' if c['test_acc'] == 0 else f"{c['test_acc']:.2f}"
        if c['kind'] == 'epochs':
            return f"{c['test_acc']:.2f} ({c['steps']} ep)"
        budget = f"{c['seeds']}x{c['steps']}" + (' screen' if c['kind'] == 'screen' else '')
        return f"{c['test_acc']:.2f} ({budget})"
    lines = ['# LRA table: our analogues of the six tasks, and the published figures',
             '', 'Generated by `python eval/lra/study.py report` from `eval/results/lra/`. Ours: test accuracy (%) of '
             'the best-validation checkpoint, mean over seeds, `(seeds x steps)` at batch 32, one recipe for every '
             'row (eval/lra/README.md); `screen` = a single-seed screening run, not a finished result; `—` = not run. '
             'Published rows are on LRA\'s own data, lengths and budgets (3.8-5.8 M sequences for S4 / Mega / LRU '
             'against our 48k-128k, 1 M in the long column), for reference only.', '',
             '| model | ' + ' | '.join(name for _, name, _, _, _ in columns) + ' |',
             '|---' * (1 + len(columns)) + '|']
    for r in rows:
        lines.append(f"| {r['model']} | " + ' | '.join(cell(r['cells'][col]) if col in r['cells'] else '—'
                                                       for col, _, _, _, _ in columns) + ' |')
    lines += ['', 'Our tasks:', ''] + [f'- **{name}** (`{task}`): {what}' for _, name, task, _, what in columns]
    cost_path = RESULTS / 'cost_long_range_layers.json'
    if cost_path.is_file():  # Path-X's length: what each row costs there (eval/lra/cost.py)
        cost = json.loads(cost_path.read_text())
        at_16k = {row: r['16384'] for row, r in cost['results'].items() if '16384' in r}
        lines += ['', f"Cost at Path-X's 16,384 tokens (forward + backward, batch 1, {cost['threads']} threads, "
                      f"{cost['date']}; `cost_long_range_layers.md`): "
                  + ', '.join(f"{row} {c['seconds']:.2f} s / {c['peak_mb']:.0f} MiB" for row, c in at_16k.items())
                  + '.']
    result = dict(columns=[dict(key=k, lra_task=n, our_task=t, description=w) for k, n, t, _, w in columns],
                  rows=rows)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / 'lra_table.json').write_text(json.dumps(result, indent=1))
    (RESULTS / 'lra_table.md').write_text('\n'.join(lines) + '\n')
    return result


def _screens() -> Dict[tuple, Dict]:
    """Screening runs at the recipe's learning rate, by (task, row, steps)."""
    found = {}
    for p in sorted(RESULTS.glob('screen[0-9]*.json')):
        r = json.loads(p.read_text())
        if r['lr'] == 1e-3:
            found[(r['task'], r['row'], r['steps'])] = r
    return found


def ablation_table(table: List[Dict]) -> List[Dict]:
    """``ablation.{md,json}``: ``models.ABLATION_WINNER`` and each row that takes one lever out of it, per task, like
    against like: the main runs where the winner has one (same steps), else the screens of the winner's longest
    screen budget. Δ is the row's test accuracy minus the winner's over the seeds both ran."""
    main = {(t['task'], t['row']): t for t in table}
    screens = _screens()
    winner = models.ABLATION_WINNER
    out = []
    for task in tasks.TASKS:
        w = main.get((task, winner))
        if w is not None:
            kind, steps = 'main', w['steps']
            ref = dict(zip(w['seeds'], w['test_acc_runs']))
        else:
            budgets = [st for (tk, row, st) in screens if tk == task and row == winner]
            if not budgets:
                continue
            kind, steps = 'screen', max(budgets)
            ref = {0: screens[(task, winner, steps)]['test_acc']}
        if not any((task, row) in main or (task, row, steps) in screens for _, row in models.ABLATION):
            continue  # the winner alone: nothing to compare yet
        for lever, row in (('(the winner)', winner),) + models.ABLATION:
            if kind == 'main':
                t = main.get((task, row))
                got = dict(zip(t['seeds'], t['test_acc_runs'])) if t is not None and t['steps'] == steps else {}
            else:
                r = screens.get((task, row, steps))
                got = {0: r['test_acc']} if r is not None else {}
            common = [s for s in got if s in ref]
            delta = (statistics.mean(got[s] for s in common) - statistics.mean(ref[s] for s in common)
                     if common and row != winner else None)
            out.append(dict(task=task, kind=kind, steps=steps, lever=lever, row=row,
                            test_acc=statistics.mean(got.values()) if got else None,
                            test_acc_runs=[got[s] for s in sorted(got)], seeds=sorted(got), delta=delta))
    lines = ['# Ablation of the long-range winner (issue 27)', '',
             f'Generated by `python eval/lra/study.py report`. Winner: `{winner}`. Each row takes one lever out of it '
             '(A_diff: puts a selective kernel in); test accuracy (%) of the best-validation checkpoint, mean over '
             'the seeds run; Δ against the winner over the seeds both ran. Like against like: the main runs '
             '(`run`) where the winner has them, else the screens (`screen`) of the same budget; `—` = not run '
             'yet (commands: eval/lra/README.md).', '',
             '| task | budget | lever | row | test acc (seeds) | Δ vs winner |', '|---|---|---|---|---|---|']
    for a in out:
        runs = ', '.join(f'{v:.2f}' for v in a['test_acc_runs'])
        acc = f"{a['test_acc']:.2f} ({runs}; seeds {', '.join(map(str, a['seeds']))})" if a['seeds'] else '—'
        delta = '' if a['delta'] is None else f"{a['delta']:+.2f}"
        lines.append(f"| {a['task']} | {a['kind']} {a['steps']} steps | {a['lever']} | `{a['row']}` | {acc} | "
                     f"{delta} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / 'ablation.json').write_text(json.dumps(out, indent=1))
    (RESULTS / 'ablation.md').write_text('\n'.join(lines) + '\n')
    return out


def screen_report() -> List[Dict]:
    """``screen.md``: every screening run and long run, with the final training loss (underfitting shows there
    first)."""
    rows = []
    for p in sorted(RESULTS.glob('screen[0-9]*.json')) + sorted(RESULTS.glob('long[0-9]*.json')):
        r = json.loads(p.read_text())
        _snapshots().keep_log(p.stem)  # the log only: the report must rebuild on a fresh clone
        log = _log(r)
        rows.append(dict(run=p.stem, task=r['task'], row=r['row'], lr=r['lr'], steps=r['steps'], params=r['params'],
                         train_loss=log[-1]['train_loss'], train_acc=log[-1]['train_acc'], val_acc=r['val_acc'],
                         test_acc=r['test_acc'], train_seq_s=r['train_seq_s']))
    lines = ['# Screening runs (seed 0, short schedules) and long runs (`long<steps>-…`); '
             '`python eval/lra/study.py screen-report`', '',
             'Each run has its own warm-up + cosine schedule over its step budget, batch 32, one thread. Selection '
             'reads validation; test is shown for the record.', '',
             '| run | row | lr | steps | final train loss | final train acc | best val acc | test acc | train seq/s |',
             '|---|---|---|---|---|---|---|---|---|']
    for t in rows:
        lines.append(f"| {t['run']} | {t['row']} | {t['lr']:g} | {t['steps']} | {t['train_loss']:.3f} | "
                     f"{t['train_acc']:.1f} | **{t['val_acc']:.2f}** | {t['test_acc']:.2f} | {t['train_seq_s']:.0f} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / 'screen.json').write_text(json.dumps(rows, indent=1))
    (RESULTS / 'screen.md').write_text('\n'.join(lines) + '\n')
    print((RESULTS / 'screen.md').read_text())
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest='cmd', required=True)
    r = sub.add_parser('run')
    r.add_argument('--task', choices=tasks.TASKS, required=True)
    r.add_argument('--rows', nargs='+', choices=list(models.ROWS), default=list(models.ROWS))
    r.add_argument('--seeds', nargs='+', type=int, default=[0])
    r.add_argument('--steps', type=int, default=5000)
    r.add_argument('--jobs', type=int, default=2)
    r.add_argument('--snapshot', action='store_true')
    r.add_argument('--train-subset', type=int, default=0)
    r.add_argument('--device', default='cpu', help="'cpu' (one thread per run) or 'cuda'")
    r.add_argument('--batch-size', type=int, default=BATCH_SIZE, help='other than 32: a smoke run, outside the tables')
    lg = sub.add_parser('long', help='long runs (issue 27: >= 1 M sequences), outside the main table')
    lg.add_argument('--task', choices=tasks.TASKS, required=True)
    lg.add_argument('--rows', nargs='+', choices=list(models.ROWS), required=True)
    lg.add_argument('--seeds', nargs='+', type=int, default=[0])
    lg.add_argument('--steps', type=int, default=32000)
    lg.add_argument('--jobs', type=int, default=2)
    lg.add_argument('--snapshot', action='store_true')
    lg.add_argument('--device', default='cpu', help="'cpu' (one thread per run) or 'cuda'")
    lg.add_argument('--batch-size', type=int, default=BATCH_SIZE, help='other than 32: a smoke run, outside the tables')
    sc = sub.add_parser('screen')
    sc.add_argument('--task', choices=tasks.TASKS, required=True)
    sc.add_argument('--rows', nargs='+', choices=list(models.ROWS), required=True)
    sc.add_argument('--steps', type=int, default=1000)
    sc.add_argument('--lr', type=float, default=1e-3)
    sc.add_argument('--jobs', type=int, default=1)
    sub.add_parser('report')
    sub.add_parser('screen-report')
    sub.add_parser('restore')
    args = p.parse_args(argv)
    if args.cmd == 'run':
        extra = ['--train-subset', str(args.train_subset)] if args.train_subset else []
        return run(args.task, args.rows, args.seeds, args.steps, args.jobs, args.snapshot,
                   extra + ['--device', args.device], batch_size=args.batch_size)
    if args.cmd == 'long':
        return run(args.task, args.rows, args.seeds, args.steps, args.jobs, args.snapshot, ['--device', args.device],
                   long=True, batch_size=args.batch_size)
    if args.cmd == 'screen':
        return run(args.task, args.rows, [0], args.steps, args.jobs, False, [], screen_lr=args.lr)
    if args.cmd == 'screen-report':
        screen_report()
        return 0
    if args.cmd == 'restore':
        restore()
        return 0
    report()
    return 0


if __name__ == '__main__':
    sys.exit(main())
