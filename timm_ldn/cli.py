"""``ldn`` command line: one entry point, each subcommand implemented in its own module.

Subcommand modules are imported lazily so ``ldn --help`` stays fast and a missing optional
dependency of one subcommand never breaks the others. Each module exposes
``add_arguments(parser)`` and ``run(args) -> int``.
"""
import argparse
import importlib
import sys
from typing import List, Optional

# name -> (module, one-line help)
SUBCOMMANDS = {
    'info': ('timm_ldn.commands.info', 'parameters, GMACs, pretrained config and available weights of a model'),
    'predict': ('timm_ldn.commands.predict', 'classify images or folders of images'),
    'export': ('timm_ldn.commands.export', 'turn a train.py checkpoint into a Hub-ready folder (+ manifest entry)'),
    'benchmark': ('timm_ldn.commands.benchmark', 'time one model here: ms per call and images/s'),
    'show': ('timm_ldn.commands.show', 'pictures of what the diffusion does: receptive fields, scales, A_diff maps'),
}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog='ldn', description='Linear Diffusion Networks for timm')
    sub = parser.add_subparsers(dest='command', metavar='COMMAND')
    modules = {}
    requested = (argv if argv is not None else sys.argv[1:])[:1]
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if requested == [name]:  # only the chosen subcommand's module is imported
            modules[name] = importlib.import_module(module_name)
            modules[name].add_arguments(p)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return int(modules[args.command].run(args) or 0)


if __name__ == '__main__':
    sys.exit(main())
