"""The ``covspec`` command line: one subcommand per module in ``serve.commands``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from serve.commands import COMMANDS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="covspec", description="CoVSpec Serve: speculative VLM serving")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_to(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.run(args)
    except (ValueError, FileNotFoundError, PermissionError) as e:
        # Anything a user can cause ends as one line they can act on, never a stack trace.
        print(f"covspec {args.command}: error: {e}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
