"""Benchmark LDN against timm peers in one process (the README's speed tables; pieces in bench_harness.py).

    python eval/speed/benchmark.py                     # all cores, wall clock (what users see) -> eval/results/benchmark_cpu.*
    python eval/speed/benchmark.py --threads 1         # second view: 1 thread, process CPU time -> benchmark_cpu_1thread.*
    python eval/speed/benchmark.py --mode compile      # torch.compile (inductor), both models -> benchmark_cpu_compile.*
    python eval/speed/benchmark.py --mode bf16         # bf16 autocast, both models -> benchmark_cpu_bf16.*
    python eval/speed/benchmark.py --timm-benchmark /path/to/timm/benchmark.py   # timm's own script -> benchmark_timm.*
    python eval/speed/benchmark.py --model-kwargs mlp_ratio=3.5 --name cand    # a candidate block, same tables
    python eval/speed/benchmark.py --quick             # smoke run in seconds
    python eval/speed/benchmark.py --profile           # torch.profiler top ops, LDN-S vs DeiT-S -> benchmark_profile*.md
    python eval/speed/benchmark.py --memory            # batch-1 peak live memory vs DeiT only (load-independent) -> benchmark_memory.*

One model on your own machine, from the installed package: ``ldn benchmark MODEL``.
Why the measurements are taken the way they are: the docstring of eval/speed/bench_harness.py.
"""
import argparse
import json
import os
import sys
from typing import List, Optional

import torch
from timm.utils import ParseKwargs

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_harness as H  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'results')


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--profile', action='store_true',
                        help='only write torch.profiler top-op tables (LDN-S vs DeiT-S) to <out-dir>/benchmark_profile*.md')
    parser.add_argument('--memory', action='store_true',
                        help='only the batch-1 peak live memory of each LDN / DeiT pair -> <out-dir>/benchmark_memory.*; '
                             'allocations do not depend on load, so it can run on a busy machine')
    parser.add_argument('--quick', action='store_true', help='seconds-long smoke run (tiny models, small images)')
    parser.add_argument('--mode', choices=H.MODES, default='eager',
                        help="'eager' fp32, 'compile' (torch.compile, inductor) or 'bf16' (autocast), both models")
    parser.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs, metavar='KEY=VALUE',
                        help='constructor overrides for the LDN models, e.g. mlp_ratio=3.5')
    parser.add_argument('--sizes', default=None, help="comma list of tiny,small,base (default: all three for eager, "
                                                      "small otherwise)")
    parser.add_argument('--resolutions', default='', help='comma list: keep only these resolutions of the plan')
    parser.add_argument('--no-peers', action='store_true', help='skip vit_small / convnext_tiny / mambaout_small')
    parser.add_argument('--rounds', type=int, default=9, help='alternating timing rounds per case')
    parser.add_argument('--threads', type=int, default=0,
                        help='torch CPU threads; 0 (default) = all cores, what users see (see bench_harness.py)')
    parser.add_argument('--clock', choices=sorted(H.CLOCKS), default=None,
                        help="timer: 'wall' (default) or 'cpu' (process CPU time, default with --threads 1)")
    parser.add_argument('--device', default='cpu', help="'cpu' or 'cuda' (GPU tables: eval/speed/gpu_benchmark.py)")
    parser.add_argument('--no-train', action='store_true', help='skip the training-step comparison')
    parser.add_argument('--train-batch', type=int, default=8)
    parser.add_argument('--timm-benchmark', default=None, metavar='PATH',
                        help="only cross-check: run PATH (benchmark.py of a timm checkout) on the LDN/DeiT pairs and "
                             "compare with <out-dir>/benchmark_cpu.json")
    parser.add_argument('--out-dir', default=RESULTS, help='default: eval/results')
    parser.add_argument('--name', default=None, help="file stem (default 'benchmark_<device>[_1thread][_<mode>]')")


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this run (recorded in the result files)."""
    parts = ['python eval/speed/benchmark.py']
    if args.quick:
        parts.append('--quick')
    if args.mode != 'eager':
        parts.append(f'--mode {args.mode}')
    if args.threads:
        parts.append(f'--threads {args.threads}')
    if args.sizes:
        parts.append(f'--sizes {args.sizes}')
    if args.resolutions:
        parts.append(f'--resolutions {args.resolutions}')
    if args.model_kwargs:
        parts.append('--model-kwargs ' + ' '.join(H.kwargs_to_args(args.model_kwargs)))
    return ' '.join(parts)


def run(args: argparse.Namespace) -> int:
    try:
        all_cores = len(os.sched_getaffinity(0))
    except AttributeError:
        all_cores = os.cpu_count() or 1
    threads = args.threads or all_cores
    torch.set_num_threads(threads)
    device = torch.device(args.device)
    clock = args.clock or ('cpu' if device.type == 'cpu' and threads == 1 else 'wall')
    if device.type != 'cpu':
        clock = 'wall'
    suffix = ('_1thread' if args.threads == 1 else (f'_{args.threads}threads' if args.threads else ''))
    suffix += '' if args.mode == 'eager' else f'_{args.mode}'
    if args.timm_benchmark:
        from timm_crosscheck import run_crosscheck
        return run_crosscheck(args.timm_benchmark, args.out_dir, args.name or 'benchmark_timm',
                              quick=args.quick, model_kwargs=args.model_kwargs)
    if args.profile:
        os.makedirs(args.out_dir, exist_ok=True)
        H.run_profiles(device, os.path.join(args.out_dir, f'benchmark_profile{suffix}.md'), args.model_kwargs)
        return 0
    default_sizes = 'tiny,small,base' if args.mode == 'eager' else 'small'
    sizes = [s for s in (args.sizes or default_sizes).split(',') if s]
    cases = H.plan_cases(args.quick, sizes, peers=not args.no_peers, rounds=args.rounds, mode=args.mode)
    if args.resolutions:
        keep = {int(r) for r in args.resolutions.split(',')}
        cases = [c for c in cases if c.resolution in keep]
    if args.memory:
        rows, table = H.memory_table(cases, device, args.model_kwargs)
        stem = args.name or ('benchmark_memory_quick' if args.quick else 'benchmark_memory')
        os.makedirs(args.out_dir, exist_ok=True)
        command = command_line(args) + ' --memory'
        with open(os.path.join(args.out_dir, stem + '.json'), 'w') as f:
            json.dump(dict(rows=rows, command=command, environment=H.environment(device)), f, indent=1)
        with open(os.path.join(args.out_dir, stem + '.md'), 'w') as f:
            f.write(f'# Peak live memory, batch 1, inference (`{command}`)\n\n{table}\n')
        print(table)
        return 0
    train = None
    if not args.no_train:
        train = ('tiny', 64, 2, 2) if args.quick else ('small', 224, args.train_batch, args.rounds)
    result = H.run_benchmark(cases, device, train, mode=args.mode, min_round_s=0.05 if args.quick else 0.3,
                             clock=H.CLOCKS[clock], model_kwargs=args.model_kwargs)
    result['environment'] = H.environment(device)
    result['environment'].update(clock=clock, mode=args.mode, model_kwargs=dict(args.model_kwargs))
    result['command'] = command_line(args)
    stem = args.name or ('benchmark_quick' if args.quick else f'benchmark_{device.type}{suffix}')
    paths = H.write_results(result, args.out_dir, stem)
    table = H.markdown_table(result)
    with open(os.path.join(args.out_dir, stem + '.md'), 'w') as f:
        f.write(table + '\n')
    print(table)
    print('wrote', ', '.join(paths + [os.path.join(args.out_dir, stem + '.md')]))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == '__main__':
    sys.exit(main())
