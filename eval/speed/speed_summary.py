"""The README's speed table: ldn_* vs DeiT from the committed benchmark result files, with issue 11's targets.

    python eval/speed/speed_summary.py        # reads eval/results/benchmark_cpu*.json, benchmark_timm.json
                                        # -> eval/results/speed_summary.md

It measures nothing: rerun the benchmarks (commands in each row) on an idle machine first.
"""
import json
import os
from typing import Dict, Optional, Tuple

RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'results')
VIEWS = (  # file stem, label, command
    ('benchmark_cpu', 'eager fp32, all cores', 'python eval/speed/benchmark.py'),
    ('benchmark_cpu_compile', 'torch.compile (inductor), all cores', 'python eval/speed/benchmark.py --mode compile'),
    ('benchmark_cpu_bf16', 'bf16 autocast, all cores', 'python eval/speed/benchmark.py --mode bf16'),
    ('benchmark_cpu_1thread', 'eager fp32, 1 thread (CPU time)', 'python eval/speed/benchmark.py --threads 1 --sizes small'),
)
CASES = ((224, 8), (512, 2), (1024, 1))
TARGETS = {'benchmark_cpu': (1.05, 1.6, 3.2, 1.05), 'benchmark_cpu_compile': (1.0, 1.5, 3.0, None)}


def _load(stem: str) -> Optional[dict]:
    path = os.path.join(RESULTS, stem + '.json')
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _ratio(result: dict, model: str, res: int) -> Optional[Tuple[float, float, float, float]]:
    for r in result['rows']:
        if r['model'] == model and r['resolution'] == res:
            return r['speedup_vs_ref'], r['speedup_min'], r['speedup_max'], r['mem_ratio_vs_ref']
    return None


def _cell(value: Optional[Tuple[float, float, float, float]], target: Optional[float]) -> str:
    if value is None:
        return '–'
    med, lo, hi, _ = value
    mark = '' if target is None else (' ✓' if med >= target else f' ✗ (≥{target:g})')
    return f'{med:.2f}× ({lo:.2f}–{hi:.2f}){mark}'


def summary() -> str:
    lines = ['| ldn_small / deit_small, same process, alternating | 224 px b8 | 512 px b2 | 1024 px b1 | '
             'training step 224 px b8 | peak memory (max over sizes) |', '|---|---|---|---|---|---|']
    for stem, label, cmd in VIEWS:
        result = _load(stem)
        if result is None:
            continue
        targets = TARGETS.get(stem, (None,) * 4)
        cells = [_cell(_ratio(result, 'ldn_small', res), t) for (res, _), t in zip(CASES, targets)]
        train = result.get('train')
        if train:
            s = sorted(train['speedup'])
            t = targets[3]
            mark = '' if t is None else (' ✓' if s[len(s) // 2] >= t else f' ✗ (≥{t:g})')
            cells.append(f'{s[len(s) // 2]:.2f}× ({s[0]:.2f}–{s[-1]:.2f}){mark}')
        else:
            cells.append('–')
        mems = [r['mem_ratio_vs_ref'] for r in result['rows'] if r['model'].startswith('ldn_')]
        cells.append(f'{max(mems):.2f}× DeiT' if mems else '–')
        threads = result['environment'].get('threads')
        lines.append(f'| {label} ({threads} thr; `{cmd}`) | ' + ' | '.join(cells) + ' |')
    eager = _load('benchmark_cpu')
    if eager is not None:
        lines += ['', '| all cores, eager fp32 | 224 px | 512 px | 1024 px |', '|---|---|---|---|']
        for size in ('tiny', 'small', 'base'):
            row = [f'ldn_{size}']
            for res in (224, 512, 1024):
                v = _ratio(eager, f'ldn_{size}', res)
                row.append('–' if v is None else f'{v[0]:.2f}× ({v[1]:.2f}–{v[2]:.2f})')
            lines.append('| ' + ' | '.join(row) + ' |')
    timm = _load('benchmark_timm')
    if timm is not None:
        lines += ['', "| timm's own `benchmark.py`, one process per model | LDN/DeiT | ours (same case) |",
                  '|---|---|---|']
        for r in timm['rows']:
            if 'ratio' not in r:
                continue
            ours = f"{r['ours_ratio']:.2f}×" if 'ours_ratio' in r else '–'
            lines.append(f"| {r['ldn']} {r['resolution']} px b{r['batch']} {r['bench']} | {r['ratio']:.2f}× "
                         f"({r['ratio_min']:.2f}–{r['ratio_max']:.2f}) | {ours} |")
    return '\n'.join(lines) + '\n'


def main() -> None:
    text = summary()
    with open(os.path.join(RESULTS, 'speed_summary.md'), 'w') as f:
        f.write(text)
    print(text)


if __name__ == '__main__':
    main()
