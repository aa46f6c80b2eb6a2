"""Cross-check of ``eval/speed/benchmark.py`` against timm's own ``benchmark.py`` (``python eval/speed/benchmark.py
--timm-benchmark PATH``).

``benchmark.py`` lives in a timm checkout, not in the installed package (nor in the PyPI sdist); pass its path.
It is run unmodified, one process per model and case, with the LDN and DeiT processes alternating over rounds
(the machine is shared); a ratio is taken per round and the median reported, as in ``eval/speed/benchmark.py``. Each
process uses all cores (timm's default). DeiT at a resolution other than 224 needs ``--model-kwargs
img_size=R`` (its position embedding is fixed); the first run of each such case records what happens without it.
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from bench_harness import PAIRS, kwargs_to_args

# (size, resolution, batch, bench): the cases; base at batch 4 as in the main plan
CASES = [
    ('tiny', 224, 8, 'inference'), ('small', 224, 8, 'inference'), ('base', 224, 4, 'inference'),
    ('small', 512, 2, 'inference'), ('small', 1024, 1, 'inference'), ('small', 224, 8, 'train'),
]
QUICK_CASES = [('tiny', 64, 2, 'inference')]


def _run_timm(script: str, model: str, resolution: int, batch: int, bench: str, iters: Tuple[int, int],
              extra: Sequence[str] = ()) -> Dict[str, object]:
    """One ``benchmark.py`` process; returns its result dict (with 'error' when it failed)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, 'r.json')
        cmd = [sys.executable, script, '--model', model, '--device', 'cpu', '-b', str(batch),
               '--img-size', str(resolution), '--bench', bench, '--num-warm-iter', str(iters[0]),
               '--num-bench-iter', str(iters[1]), '--no-retry', '--results-file', out, '--results-format', 'json',
               *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(script)))
        if proc.returncode != 0 or not os.path.exists(out):
            lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if 'Error' in ln]
            return dict(model=model, error=lines[-1] if lines else f'exit code {proc.returncode}')
        with open(out) as f:
            result = json.load(f)
        return result[0] if isinstance(result, list) else result


def _ours(out_dir: str, model: str, resolution: int, batch: int) -> Optional[dict]:
    path = os.path.join(out_dir, 'benchmark_cpu.json')
    if not os.path.exists(path):
        return None
    with open(path) as f:
        result = json.load(f)
    for r in result['rows']:
        if r['model'] == model and r['resolution'] == resolution and r['batch'] == batch:
            return r
    return None


def run_crosscheck(script: str, out_dir: str, stem: str, quick: bool = False, rounds: int = 2,
                   model_kwargs: Optional[Mapping[str, Any]] = None) -> int:
    """Run ``script`` on the LDN/DeiT pairs (``model_kwargs``: the LDN models' overrides) and write
    ``<out_dir>/<stem>.{json,md}``, comparing with ``<out_dir>/benchmark_cpu.json`` where it has the case."""
    if not os.path.exists(script):
        raise FileNotFoundError(f'{script}: pass the benchmark.py of a timm checkout')
    iters = (1, 5) if quick else (2, 5)  # benchmark.py logs every num_bench_iter // 5 steps: ≥ 5
    rows: List[dict] = []
    for size, res, batch, bench in (QUICK_CASES if quick else CASES):
        ldn, deit = PAIRS[size]
        key = 'infer' if bench == 'inference' else 'train'
        ldn_extra = ['--model-kwargs', *kwargs_to_args(model_kwargs)] if model_kwargs else []
        deit_extra = [] if res == 224 else ['--model-kwargs', f'img_size={res}']
        note = ''
        if res != 224:  # what a user gets without re-creating DeiT
            plain = _run_timm(script, deit, res, batch, bench, (0, 5))
            note = f"{deit} as is at {res} px: {plain.get('error', 'ran')}"
            print(note)
        per = {ldn: [], deit: []}
        errors = {}
        for r in range(rounds):
            order = [(ldn, ldn_extra), (deit, deit_extra)]
            for name, extra in (order if r % 2 == 0 else order[::-1]):
                out = _run_timm(script, name, res, batch, bench, iters, extra)
                if 'error' in out:
                    errors[name] = out['error']
                else:
                    per[name].append(float(out[f'{key}_samples_per_sec']))
        row = dict(size=size, resolution=res, batch=batch, bench=bench, ldn=ldn, deit=deit, rounds=rounds,
                   note=note, errors=errors)
        if per[ldn] and per[deit]:
            ratios = [a / b for a, b in zip(per[ldn], per[deit])]
            row.update(ldn_img_s=statistics.median(per[ldn]), deit_img_s=statistics.median(per[deit]),
                       ratio=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios))
            ours = _ours(out_dir, ldn, res, batch) if bench == 'inference' else None
            if ours is not None and 'speedup_vs_ref' in ours:
                row.update(ours_ratio=ours['speedup_vs_ref'], ours_ldn_img_s=ours['img_s'],
                           disagreement=row['ratio'] / ours['speedup_vs_ref'] - 1.)
        rows.append(row)
        print(json.dumps(row))
    result = dict(rows=rows, script=os.path.abspath(script), rounds=rounds, iters=dict(warm=iters[0], bench=iters[1]),
                  command='python eval/speed/benchmark.py --timm-benchmark PATH/TO/timm/benchmark.py',
                  time_utc=time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()))
    try:
        result['load_avg'] = os.getloadavg()
    except OSError:
        pass
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, stem + '.json'), 'w') as f:
        json.dump(result, f, indent=1)
    lines = [f"timm's `benchmark.py` (`--device cpu`, all cores, {iters[0]} warm-up + {iters[1]} timed steps per "
             f'process), LDN and DeiT processes alternating over {rounds} rounds; ratio = median of per-round '
             "LDN/DeiT img/s. 'ours' = the same case in `benchmark_cpu.json` (`python eval/speed/benchmark.py`).", '',
             '| case | LDN img/s | DeiT img/s | timm benchmark.py LDN/DeiT (min–max) | ours | disagreement |',
             '|---|---|---|---|---|---|']
    for r in rows:
        case = f"{r['ldn']} {r['resolution']} px b{r['batch']} {r['bench']}"
        if 'ratio' not in r:
            lines.append(f"| {case} | – | – | failed: {r['errors']} | | |")
            continue
        ours = f"{r['ours_ratio']:.2f}×" if 'ours_ratio' in r else '–'
        dis = f"{100 * r['disagreement']:+.0f} %" if 'disagreement' in r else '–'
        lines.append(f"| {case} | {r['ldn_img_s']:.2f} | {r['deit_img_s']:.2f} | {r['ratio']:.2f}× "
                     f"({r['ratio_min']:.2f}–{r['ratio_max']:.2f}) | {ours} | {dis} |")
    notes = [r['note'] for r in rows if r['note']]
    if notes:
        lines += [''] + [f'- {n}' for n in notes]
    with open(os.path.join(out_dir, stem + '.md'), 'w') as f:
        f.write('\n'.join(lines) + '\n')
    print('\n'.join(lines))
    return 0
