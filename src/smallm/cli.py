"""The `smallm` command: parses arguments and calls the library. One function pair per verb.

Every verb's problems that a person can fix arrive as SmallmError and leave as one line on stderr with
exit code 1; Ctrl-C outside training exits with 130 and no traceback.
"""

from __future__ import annotations

import argparse
import sys

from smallm.errors import SmallmError


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smallm",
        description="Train a small GPT on TinyStories, then sample, evaluate, export and serve it.",
        formatter_class=_Formatter,
    )
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for add_verb in VERBS:
        add_verb(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args) or 0
    except SmallmError as e:
        print(f"smallm {args.verb}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"smallm {args.verb}: interrupted", file=sys.stderr)
        return 130


# ---- verbs: each adds its subparser and sets `run` to the function that does the work -----------------

VERBS = []
