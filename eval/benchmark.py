"""Benchmark LDN against timm peers (thin wrapper around ``ldn benchmark``).

    python eval/benchmark.py            # full CPU table, ~15 min single-threaded -> eval/results/benchmark_cpu.*
    python eval/benchmark.py --quick    # smoke run in seconds
    python eval/benchmark.py --profile  # torch.profiler top ops, LDN-S vs DeiT-S -> eval/results/benchmark_profile.md
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
