"""The ``dfbench`` command. Parsing only: every subcommand calls one library function.

Subcommands by module: ``train`` (train, diffusion, diti), ``data`` (list, download, datasets), ``sweep``
(sweep, demo), ``results`` (collect, bench).
"""

from __future__ import annotations

import argparse
import sys

from domainfusion_bench.cli.data import _datasets_parser, _download_parser, _list_parser
from domainfusion_bench.cli.results import _bench_parser, _collect_parser
from domainfusion_bench.cli.sweep import _demo_parser, _sweep_parser
from domainfusion_bench.cli.train import _diffusion_parser, _diti_parser, _train_parser
from domainfusion_bench.errors import DfbenchError


PARSERS = [_list_parser, _train_parser, _collect_parser, _download_parser, _diffusion_parser, _diti_parser,
           _sweep_parser, _demo_parser, _bench_parser, _datasets_parser]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dfbench", description="DomainBed-compatible DG benchmark harness")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in PARSERS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    ns = build_parser().parse_args(argv)
    try:
        ns.func(ns)
    except DfbenchError as err:
        print(f"dfbench {ns.command}: error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"dfbench {ns.command}: interrupted", file=sys.stderr)
        sys.exit(130)
