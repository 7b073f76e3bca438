"""Generate man pages (umtam.1, umtam-<command>.1) from the click commands.

    python -m umtam_cli.manpages man/

The pages are built from the same help text `--help` prints, so they cannot
say something the CLI does not; tests/test_manpages.py fails when the
committed pages drift from what this generator writes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from umtam import __version__
from umtam_cli.main import SUBCOMMANDS, cli

DATE = "2026-11"


def escape(text: str) -> str:
    """roff: a backslash is an escape and a leading dot or quote starts a request."""
    lines = []
    for line in text.replace("\\", "\\e").splitlines():
        lines.append("\\&" + line if line.startswith((".", "'")) else line)
    return "\n".join(lines)


def help_text(command: click.Command, path: list[str], parent: click.Context | None = None) -> str:
    # Subcommands get the group's context as parent, as when run, so they inherit
    # its settings (-h as well as --help) exactly as `umtam CMD --help` shows them.
    context = click.Context(command, info_name=path[-1], parent=parent, max_content_width=80, terminal_width=80)
    return command.get_help(context)


def page(name: str, summary: str, body: str, see_also: list[str]) -> str:
    refs = ", ".join(f"\\fB{ref}\\fR(1)" for ref in see_also)
    return "\n".join([
        f'.TH "{name.upper()}" "1" "{DATE}" "umtam {__version__}" "umtam manual"',
        ".SH NAME",
        f"{name} \\- {escape(summary)}",
        ".SH DESCRIPTION",
        ".nf",
        escape(body),
        ".fi",
        ".SH SEE ALSO",
        refs,
        "",
    ])


def render_all() -> dict[str, str]:
    settings = {**cli.context_settings, "max_content_width": 80}
    group_context = click.Context(cli, info_name="umtam", terminal_width=80, **settings)
    pages = {"umtam.1": page("umtam", "optimizer statistics as a reusable asset for pruning and merging",
                             group_context.get_help(), [f"umtam-{name}" for name in SUBCOMMANDS])}
    for name, (_, summary) in SUBCOMMANDS.items():
        command = cli.get_command(group_context, name)
        pages[f"umtam-{name}.1"] = page(f"umtam-{name}", summary, help_text(command, ["umtam", name], group_context), ["umtam"])
    return pages


USAGE = "usage: python -m umtam_cli.manpages [DIR]   (writes the man pages into DIR, default man/)"


def main(argv: list[str]) -> int:
    if len(argv) > 1 or (argv and argv[0].startswith("-")):  # "--help" is not a directory to write into
        print(USAGE, file=sys.stderr if argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv[0] in ("-h", "--help") else 2
    out = Path(argv[0] if argv else "man")
    out.mkdir(parents=True, exist_ok=True)
    for file_name, text in render_all().items():
        (out / file_name).write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
