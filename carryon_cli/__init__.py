"""The `carryon` command. An application entry point: it composes the core (`core`: train,
generate, eval, probe, config), the cluster commands (`cluster`: up, down, status, customize) and
serving (`serving`: serve), packages that never import each other."""

from __future__ import annotations

import argparse
import logging
import sys

USAGE = """carryon: customize a frozen LLM with carry-ons.

  carryon up / down / status                        a local Ray head (both node classes) + MLflow
  carryon customize FILE [--local]                  the customization job on Ray
  carryon train --config FILE                       the same recipe in this process, no cluster
  carryon generate / eval / probe / config          use and inspect bases and adapters
  carryon serve [FILE]                              the OpenAI-compatible API over base + adapters
"""


def build_parser() -> argparse.ArgumentParser:
    from . import cluster, core, serving

    p = argparse.ArgumentParser(prog="carryon", description=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="cmd", required=True)
    core.add_commands(sub)
    cluster.add_commands(sub)
    serving.add_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
