"""Benchmark LDN against timm peers (thin wrapper around ``ldn benchmark``).

    python eval/benchmark.py                     # all cores, wall clock (what users see) -> eval/results/benchmark_cpu.*
    python eval/benchmark.py --threads 1         # second view: 1 thread, process CPU time -> benchmark_cpu_1thread.*
    python eval/benchmark.py --mode compile      # torch.compile (inductor), both models -> benchmark_cpu_compile.*
    python eval/benchmark.py --mode bf16         # bf16 autocast, both models -> benchmark_cpu_bf16.*
    python eval/benchmark.py --timm-benchmark /path/to/timm/benchmark.py   # timm's own script -> benchmark_timm.*
    python eval/benchmark.py --model-kwargs mlp_dwconv=True --name cand    # a candidate block, same tables
    python eval/benchmark.py --quick             # smoke run in seconds
    python eval/benchmark.py --profile           # torch.profiler top ops, LDN-S vs DeiT-S -> benchmark_profile*.md
"""
import argparse
import sys

from timm_ldn.commands import benchmark


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    benchmark.add_arguments(parser)
    return benchmark.run(parser.parse_args(argv))


if __name__ == '__main__':
    sys.exit(main())
