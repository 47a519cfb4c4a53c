"""The `carryon` command: core commands (train, generate, config) plus the cluster commands from
`jobs` (up, down, status, customize) and `serve` (serve). An application entry point, so it may compose packages that
never import each other."""

from __future__ import annotations

import logging
import sys


def main(argv: list[str] | None = None) -> int:
    from carryon_ray.cli import build_parser
    from jobs.cli import add_commands
    from serve.cli import add_commands as add_serve_commands

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "cmd")
    add_commands(sub)
    add_serve_commands(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
