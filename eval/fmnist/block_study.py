"""Fashion-MNIST block study (issue 9): every LDN block variant and both baselines under one recipe.

Each row is one ``eval/fmnist/train_fmnist.py`` run (recipe ``eval/fmnist/recipes/fmnist.yaml``, same augmentation, optimiser,
schedule and EMA for every row; only the architecture differs). Model selection uses the validation split only;
the test split is touched once per run, at its end, by ``train_fmnist.final_test``.

    python eval/fmnist/block_study.py run --stage screen            # short proxy schedule, one seed, all rows
    python eval/fmnist/block_study.py run --stage final --rows ldn_v2 vit --seeds 0 1 2
    python eval/fmnist/block_study.py run --stage screen_fp32 --rows ldn_convtok ldn_convtok_implicit  # no bf16 CPU
    python eval/fmnist/block_study.py speed --threads 1             # rows' training img/s vs the ViT in one process
    python eval/fmnist/block_study.py report                        # table (csv/json/md), curves, top-1 vs MACs plot

``run`` skips finished runs and resumes unfinished ones from their last checkpoint (``--resume``), so killing it
loses no finished epoch; ``--jobs`` runs that many trainings at once (1 thread each: on 2 shared cores two
single-threaded runs beat one two-threaded run). ``--snapshot`` copies each unfinished run's last checkpoint and
log to ``eval/checkpoints/`` (small, committed) so another machine can continue with ``run`` after ``restore``.
"""
import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

HERE = Path(__file__).resolve().parent
EVAL_DIR = HERE.parent
ROOT = EVAL_DIR.parent
RUNS_DIR = EVAL_DIR / 'runs'
RESULTS_DIR = EVAL_DIR / 'results'
SNAPSHOT_DIR = EVAL_DIR / 'checkpoints'
STUDY_DIR = RESULTS_DIR / 'block_study'
# run file -> committed snapshot name (not *.pth.tar, which .gitignore keeps out)
SNAPSHOT_FILES = (('last.pth.tar', 'last.ckpt'), ('log.csv', 'log.csv'), ('model_best.pth.tar', 'best.ckpt'))

sys.path[:0] = [str(HERE), str(EVAL_DIR)]
from runner import Snapshots, run_jobs  # noqa: E402
from study_models import ROWS  # noqa: E402  every row: model + layer-type overrides + what it measures

# schedules: the short screening proxy and the convergence run (epochs override the recipe's)
STAGES = {'screen': 5, 'final': 40}
# the screen without bf16 autocast, for machines whose CPU emulates bf16 (no avx512_bf16 / AMX): rows compare
# within a stage only, so a fp32 screen carries its own baseline row
STAGES['screen_fp32'] = STAGES['screen']


def experiment_name(stage: str, row: str, seed: int) -> str:
    return f'{stage}_{row}_s{seed}'


def _result_path(exp: str) -> Path:
    return RESULTS_DIR / f'fmnist_{exp}.json'


def _command(stage: str, row: str, seed: int, epochs: int, threads: int = 1) -> List[str]:
    cmd = [sys.executable, str(HERE / 'train_fmnist.py'), '--model', row, '--experiment',
           experiment_name(stage, row, seed), '--seed', str(seed), '--epochs', str(epochs), '--threads', str(threads),
           '--resume', '--log-interval', '0'] + (['--fp32'] if stage.endswith('_fp32') else [])
    return cmd


def run(stage: str, rows: List[str], seeds: List[int], jobs: int, epochs: Optional[int], snapshot: bool,
        threads: int = 1) -> int:
    """Train every (row, seed) without a result yet, ``jobs`` at a time; resumes unfinished runs."""
    epochs = epochs or STAGES[stage]
    todo = [(r, s) for s in seeds for r in rows if not _result_path(experiment_name(stage, r, s)).is_file()]
    print(f'{stage}: {len(todo)} runs to do ({epochs} epochs each)', flush=True)
    snaps = _snapshots()
    return run_jobs([(experiment_name(stage, r, s), _command(stage, r, s, epochs, threads)) for r, s in todo],
                    RUNS_DIR, jobs, finished=lambda exp: _result_path(exp).is_file(),
                    on_finish=snaps.keep_log if snapshot else None, on_poll=snaps.save if snapshot else None, cwd=ROOT)


def _snapshots() -> Snapshots:
    return Snapshots(RUNS_DIR, SNAPSHOT_DIR, SNAPSHOT_FILES, resume_file='last.pth.tar')


def save_snapshots(experiments: List[str]) -> None:
    """Copy unfinished runs' last checkpoint + log to eval/checkpoints/<exp>/ (committed; see restore)."""
    _snapshots().save(experiments)


def restore() -> None:
    """Put committed snapshots back where ``train_fmnist.py --resume`` looks (skips runs that are further along)."""
    _snapshots().restore()


def _curve(exp: str) -> List[Dict[str, str]]:
    path = RUNS_DIR / exp / 'log.csv'
    if not path.is_file():
        path = SNAPSHOT_DIR / exp / 'log.csv'
    if not path.is_file():
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def row_cost(row: str) -> Dict[str, float]:
    """Params and GMACs of a row's model at 28 px, counted now with the project's one counter (meta device)."""
    sys.path[:0] = [str(HERE), str(EVAL_DIR)]
    import train_fmnist
    recipe = train_fmnist.load_recipe(train_fmnist.DEFAULT_RECIPE)
    net = train_fmnist.build_model(row, **train_fmnist.model_args(recipe))
    return dict(params=sum(p.numel() for p in net.parameters()),
                gmacs=train_fmnist.count_macs(net, tuple(recipe['input_size'])))


def speed_path(threads: int, name: str = 'train_speed') -> Path:
    return STUDY_DIR / f'{name}_{threads}thread.json'


# rows whose controlled training speed splits the LDN/ViT gap into its terms: v2 vs v1 is the depthwise conv, v1 vs
# v1 without K (or A_diff) that term; the softmax row prices the exact kernel
SPEED_ROWS = ['vit', 'resnet', 'ldn_v2', 'ldn_base', 'ldn_no_k', 'ldn_no_adiff', 'ldn_softmax']


def speed(rows: List[str], threads: int, steps: int = 20, rounds: int = 5, name: str = 'train_speed',
          fp32: bool = False) -> Dict[str, Any]:
    """Controlled training throughput of study rows: one process, rows alternating round by round, the real
    training step of the recipe (``train_fmnist.bench``), medians of per-round img/s ratios to the ViT.

    The runs' own img/s (``report``) come from trainings that shared 2 cores with each other and with other work;
    this is the figure to compare rows by. Run it on an otherwise idle machine.
    """
    sys.path[:0] = [str(HERE), str(EVAL_DIR)]
    import train_fmnist
    if 'vit' not in rows:
        rows = ['vit'] + rows
    res = train_fmnist.bench(rows, ['memory'], threads, steps=steps, rounds=rounds, reference='vit',
                             amp=False if fp32 else None)
    out = dict(commit=res['commit'], threads=threads, batch_size=res['batch_size'], steps=steps, rounds=rounds,
               precision='fp32' if fp32 else 'bf16 autocast (recipe)',
               rows={row: dict(img_s=res['img_s'][f'{row}/memory'],
                               ratio_vs_vit=res['ratio_vs_reference'][f'{row}/memory'],
                               img_s_per_round=res['img_s_per_round'][f'{row}/memory']) for row in rows})
    STUDY_DIR.mkdir(parents=True, exist_ok=True)
    path = speed_path(threads, name)
    path.write_text(json.dumps(out, indent=2))
    lines = [f'# Fashion-MNIST training throughput of the study rows ({threads} threads)', '',
             f'Generated by `python eval/fmnist/block_study.py speed --threads {threads} --rows {" ".join(rows[1:])} --name '
             f'{name}{" --fp32" if fp32 else ""}` (commit {out["commit"]}): one '
             f'process, rows alternating, {rounds} rounds of {steps} real training steps each (recipe batch '
             f'{out["batch_size"]}, {out["precision"]}, AdamW, EMA, in-memory input), median img/s and median of the '
             'per-round ratios to the ViT.', '',
             '| row | train img/s | vs ViT | what |', '|---|---|---|---|']
    for row, r in out['rows'].items():
        lines.append(f"| {row} | {r['img_s']:.0f} | {r['ratio_vs_vit']:.2f}x | {ROWS[row].what} |")
    path.with_suffix('.md').write_text('\n'.join(lines) + '\n')
    print('\n'.join(lines))
    return out


def report() -> Dict[str, Any]:
    """Table of every finished run (csv/json/md), learning curves and test top-1 vs MACs."""
    import statistics
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    STUDY_DIR.mkdir(parents=True, exist_ok=True)
    table = []
    # the study's runs train one thread each: rank rows by the 1-thread controlled measurement
    speed_rows = json.loads(speed_path(1).read_text())['rows'] if speed_path(1).is_file() else {}
    for stage in STAGES:
        for row, spec in ROWS.items():
            runs = sorted(RESULTS_DIR.glob(f'fmnist_{stage}_{row}_s*.json'))
            if not runs:
                continue
            res = [json.loads(p.read_text()) for p in runs]
            top1 = [r['test_top1'] for r in res]
            cost = row_cost(row)
            table.append(dict(
                stage=stage, row=row, model=spec.model, overrides={k: repr(v) for k, v in spec.overrides.items()},
                what=spec.what, seeds=[r['seed'] for r in res],
                epochs=res[0]['epochs'], params=cost['params'], gmacs=cost['gmacs'],
                val_top1=statistics.mean(r['val_top1'] for r in res),
                test_top1=statistics.mean(top1), test_top1_runs=top1,
                test_top1_spread=max(top1) - min(top1),
                test_top1_std=statistics.stdev(top1) if len(top1) > 1 else 0.,
                train_vs_vit=speed_rows.get(row, {}).get('ratio_vs_vit'),
                train_img_s=max(r['train_img_s'] for r in res),  # the least disturbed seed (runs shared the cores)
                experiments=[r['experiment'] for r in res]))
    with open(STUDY_DIR / 'block_study.json', 'w') as f:
        json.dump(table, f, indent=2)
    keys = ['stage', 'row', 'model', 'epochs', 'seeds', 'params', 'gmacs', 'train_img_s', 'train_vs_vit', 'val_top1',
            'test_top1', 'test_top1_std', 'test_top1_spread', 'what']
    with open(STUDY_DIR / 'block_study.csv', 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for t in table:
            w.writerow({k: t[k] for k in keys})
    lines = ['| stage | row | params | MMACs | train img/s (run, 1 thread) | train speed vs ViT (controlled, 1 thread) | '
             'val top-1 | test top-1 | what |',
             '|---|---|---|---|---|---|---|---|---|']
    for t in table:
        seeds = (f" (mean of {len(t['seeds'])} seeds: {', '.join(f'{v:.2f}' for v in t['test_top1_runs'])}; "
                 f"std {t['test_top1_std']:.2f}, spread {t['test_top1_spread']:.2f})") if len(t['seeds']) > 1 else ''
        vs_vit = f"{t['train_vs_vit']:.2f}x" if t['train_vs_vit'] is not None else '-'
        lines.append(f"| {t['stage']} {t['epochs']} ep | {t['row']} | {t['params'] / 1e3:.0f} k | "
                     f"{t['gmacs'] * 1e3:.1f} | {t['train_img_s']:.0f} | {vs_vit} | "
                     f"{t['val_top1']:.2f} | {t['test_top1']:.2f}{seeds} | {t['what']} |")
    (STUDY_DIR / 'block_study.md').write_text(
        '# Fashion-MNIST block study\n\nGenerated by `python eval/fmnist/block_study.py report` from '
        '`eval/results/fmnist_<stage>_<row>_s<seed>.json`. Recipe `eval/fmnist/recipes/fmnist.yaml` for every row; '
        '"train img/s (run)" is a run\'s own single-thread throughput while other jobs shared the 2 cores (rough; '
        'the best seed\'s, since runs paused for benchmarks read low); "vs ViT (controlled)" is `python eval/fmnist/block_study.py speed` '
        '--threads 1 (one process, rows alternating, idle machine: `train_speed_1thread.md`).\n\n' + '\n'.join(lines) + '\n')

    fig, axes = plt.subplots(1, len(STAGES), figsize=(6 * len(STAGES), 4.5), squeeze=False)
    for ax, stage in zip(axes[0], STAGES):
        for t in (t for t in table if t['stage'] == stage):
            curve = _curve(t['experiments'][0])
            if curve:
                ax.plot([int(r['epoch']) + 1 for r in curve],
                        [max(float(r['val_top1']), float(r['val_ema_top1'] or 0)) for r in curve], label=t['row'])
        ax.set(title=f'{stage}: validation top-1 (best of raw/EMA), seed {0}', xlabel='epoch', ylabel='top-1 (%)')
        ax.grid(alpha=.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(STUDY_DIR / 'block_study_curves.png', dpi=110)

    fig, ax = plt.subplots(figsize=(7, 5))
    for t in table:
        marker = 'o' if t['model'].startswith('ldn') else 's'
        ax.scatter(t['gmacs'] * 1e3, t['test_top1'], marker=marker, alpha=.8 if t['stage'] == 'final' else .4)
        ax.annotate(f"{t['row']} ({t['stage']})", (t['gmacs'] * 1e3, t['test_top1']), fontsize=6,
                    xytext=(3, 2), textcoords='offset points')
    ax.set(xlabel='MMACs per 28x28 image', ylabel='test top-1 (%)', title='Fashion-MNIST: test top-1 vs MACs')
    ax.grid(alpha=.3)
    fig.tight_layout()
    fig.savefig(STUDY_DIR / 'block_study_top1_vs_macs.png', dpi=110)
    print((STUDY_DIR / 'block_study.md').read_text())
    return dict(rows=table)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest='cmd', required=True)
    r = sub.add_parser('run', help='train the missing runs of a stage')
    r.add_argument('--stage', choices=list(STAGES), default='screen')
    r.add_argument('--rows', nargs='+', default=list(ROWS), choices=list(ROWS))
    r.add_argument('--seeds', nargs='+', type=int, default=[0])
    r.add_argument('--jobs', type=int, default=2)
    r.add_argument('--threads', type=int, default=1, help='torch threads per training run')
    r.add_argument('--epochs', type=int, default=None, help="override the stage's schedule")
    r.add_argument('--snapshot', action='store_true', help='keep eval/checkpoints/ up to date while running')
    sp = sub.add_parser('speed', help='controlled training img/s of rows against the ViT (idle machine)')
    sp.add_argument('--rows', nargs='+', default=SPEED_ROWS, choices=list(ROWS))
    sp.add_argument('--threads', type=int, default=2)
    sp.add_argument('--steps', type=int, default=20)
    sp.add_argument('--rounds', type=int, default=5)
    sp.add_argument('--name', default='train_speed', help='result file stem (train_speed: the block study\'s table)')
    sp.add_argument('--fp32', action='store_true', help='time the fp32 step instead of the recipe\'s bf16 autocast')
    sub.add_parser('report', help='write the study table and plots from the finished runs')
    sub.add_parser('restore', help='copy committed snapshots back into eval/runs/ for --resume')
    args = p.parse_args(argv)
    if args.cmd == 'run':
        return run(args.stage, args.rows, args.seeds, args.jobs, args.epochs, args.snapshot, args.threads)
    if args.cmd == 'speed':
        speed(args.rows, args.threads, args.steps, args.rounds, args.name, args.fp32)
        return 0
    if args.cmd == 'restore':
        restore()
        return 0
    report()
    return 0


if __name__ == '__main__':
    sys.exit(main())
