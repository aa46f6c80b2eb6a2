"""Params / GMACs / activations of the LDN variants next to the DeiTs they must not exceed (the budgets of docs/contract.md).

    python eval/speed/model_budget.py            # prints the table, writes eval/results/model_budget.{json,md}

Counted with ``timm_ldn.profiling.count_cost`` on the meta device at 224 px, the same counter for every model
(attention as explicit matmuls, so SDPA is not silently skipped).
"""
import argparse
import json
from pathlib import Path

import torch

import timm
import timm_ldn  # noqa: F401
from timm_ldn.profiling import count_cost

PAIRS = [('ldn_tiny', 'deit_tiny_patch16_224'), ('ldn_small', 'deit_small_patch16_224'),
         ('ldn_base', 'deit_base_patch16_224')]
# the spec's budget column: params (M), GMACs at 224
SPEC_BUDGET = {'ldn_tiny': (5.7, 1.26), 'ldn_small': (22.1, 4.61), 'ldn_base': (86.6, 17.6)}


def measure(img_size: int = 224) -> list:
    rows = []
    for ldn, deit in PAIRS:
        for name in (ldn, deit):
            with torch.device('meta'):
                model = timm.create_model(name, img_size=img_size)
            row = {'model': name, 'img_size': img_size, **count_cost(model, (3, img_size, img_size))}
            rows.append(row)
        l_row, d_row = rows[-2], rows[-1]
        l_row['within_deit'] = l_row['params_m'] <= d_row['params_m'] and l_row['gmacs'] <= d_row['gmacs']
        if img_size == 224:
            p, g = SPEC_BUDGET[ldn]
            l_row['within_spec'] = l_row['params_m'] <= p and l_row['gmacs'] <= g
    return rows


def to_markdown(rows: list) -> str:
    lines = ['| model | params (M) | GMACs | activations (M) | ≤ DeiT |', '|---|---:|---:|---:|---|']
    for r in rows:
        ok = '' if 'within_deit' not in r else ('yes' if r['within_deit'] else '**NO**')
        lines.append(f"| {r['model']} | {r['params_m']:.2f} | {r['gmacs']:.2f} | {r['activations_m']:.2f} | {ok} |")
    return '\n'.join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--out', default=str(Path(__file__).resolve().parents[1] / 'results' / 'model_budget'))
    args = parser.parse_args()
    rows = measure(args.img_size)
    table = to_markdown(rows)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix('.json').write_text(json.dumps(rows, indent=2) + '\n')
    out.with_suffix('.md').write_text(
        f'Measured at {args.img_size} px by `python eval/speed/model_budget.py` (meta device, timm {timm.__version__}, '
        f'torch {torch.__version__}).\n\n{table}\n')


if __name__ == '__main__':
    main()
