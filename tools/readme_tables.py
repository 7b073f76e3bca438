"""Refresh (or check) the README's result tables from the report commands that make them.

    python tools/readme_tables.py            # rewrite every marked table in README.md
    python tools/readme_tables.py --check    # exit 1 naming each table that differs from its command's

A table the README shows from committed results sits between two markers that
name the command printing it and the start of the table's header line:

    <!-- table: python bench/lm_grid.py --config recipes/paper/lm-grid.yaml --report | | optimizer | 0. -->
    | optimizer | 0.0003 | ...
    <!-- /table -->

so a reader can rerun the command and find the same rows, and a table can never
drift from the results it claims to show. Each command runs once (in the
repository root, with this interpreter for a leading ``python``); its table is
the run of ``|`` lines that starts at the first line beginning with the header.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARKED = re.compile(r"<!-- table: (?P<command>.+?) \| (?P<header>\|.*?) -->\n(?P<body>.*?)<!-- /table -->\n", re.S)


class TableError(Exception):
    """A marker whose command fails or prints no table with its header."""


def command_output(command: str, cache: dict[str, str]) -> str:
    if command not in cache:
        argv = shlex.split(command)
        if argv[0] == "python":
            argv[0] = sys.executable
        done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise TableError(f"{command!r} exited {done.returncode}: {last}")
        cache[command] = done.stdout
    return cache[command]


def table_in(output: str, header: str) -> str:
    """The consecutive '|' lines of ``output`` from the first line that starts with ``header``."""
    lines = output.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(header)), None)
    if start is None:
        raise TableError(f"no table starting {header!r}")
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return "\n".join(lines[start:end]) + "\n"


def refreshed(readme: str, cache: dict[str, str]) -> tuple[str, list[str]]:
    """The README with every marked table replaced by its command's, and the headers of those that changed."""
    changed = []

    def replace(match: re.Match) -> str:
        table = table_in(command_output(match["command"], cache), match["header"])
        if table != match["body"]:
            changed.append(f"{match['command']} | {match['header']}")
        return f"<!-- table: {match['command']} | {match['header']} -->\n{table}<!-- /table -->\n"

    return MARKED.sub(replace, readme), changed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a table is stale")
    args = parser.parse_args()
    try:
        text, changed = refreshed(args.readme.read_text(), {})
    except TableError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for name in changed:
        print(f"{'stale' if args.check else 'refreshed'}: {name}")
    if args.check:
        return 1 if changed else 0
    if changed:
        args.readme.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
