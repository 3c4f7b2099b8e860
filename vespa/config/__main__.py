"""``python -m vespa.config --readme``: rewrite the README's settings table from the
declarations (``--check``: only say whether it is current, exit 1 when it is not)."""

from __future__ import annotations

import argparse
import sys

from .readme import README, rewrite, with_table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vespa.config", description=__doc__)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--readme", action="store_true", help="rewrite README.md's settings table")
    what.add_argument("--check", action="store_true", help="exit 1 if the table is out of date")
    args = parser.parse_args(argv)
    if args.check:
        text = README.read_text(encoding="utf-8")
        current = with_table(text) == text
        print(f"{README.name}: settings table {'current' if current else 'out of date'}")
        return 0 if current else 1
    changed = rewrite()
    print(f"{README.name}: settings table {'rewritten' if changed else 'already current'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
