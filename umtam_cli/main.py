"""The click group, lazy subcommands and the error boundary.

Subcommands are imported only when invoked, so `umtam --help` stays fast and
never imports torch. Every user mistake leaves as one line on stderr and exit
code 1 (runtime or data) or 2 (usage); anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import importlib
import sys

import click

# name -> (module, one-line help shown by `umtam --help` without importing it)
SUBCOMMANDS = {
    "train": ("umtam_cli.cmd_train", "Fine-tune a model on a GLUE task, recording curvature statistics."),
    "inspect": ("umtam_cli.cmd_inspect", "Describe a checkpoint: tasks, base, stats, metrics, costs."),
    "prune": ("umtam_cli.cmd_prune", "Keep the most salient task-vector entries, reset the rest to the base."),
    "merge": ("umtam_cli.cmd_merge", "Merge checkpoints fine-tuned from the same base."),
    "eval": ("umtam_cli.cmd_eval", "Evaluate a checkpoint on GLUE dev sets."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return list(SUBCOMMANDS)

    def get_command(self, ctx, name):
        if name not in SUBCOMMANDS:
            return None
        module = importlib.import_module(SUBCOMMANDS[name][0])
        return module.command

    def format_commands(self, ctx, formatter):
        rows = [(name, help_text) for name, (_, help_text) in SUBCOMMANDS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="umtam", prog_name="umtam")
def cli():
    """umtam: fine-tune with low-rank momentum, keep the curvature, prune and merge with it.

    \b
    Examples:
      umtam train --task mrpc --optimizer umtam --rank 8 -o mrpc/
      umtam train --task sst2 --optimizer umtam --rank 8 -o sst2/
      umtam inspect mrpc/
      umtam prune mrpc/ --keep 0.05 -o mrpc-5pct/
      umtam merge mrpc/ sst2/ --keep 0.2 -o merged/
      umtam eval merged/ --task glue
    """


def fail(message: str, exit_code: int) -> None:
    click.echo(f"umtam: error: {message}", err=True)
    sys.exit(exit_code)


def main(argv: list[str] | None = None) -> None:
    """Entry point with the error boundary."""
    from umtam.errors import UmtamError

    try:
        returned = cli.main(args=argv, prog_name="umtam", standalone_mode=False)
    except click.exceptions.Exit as done:
        sys.exit(done.exit_code)
    except click.ClickException as exc:
        fail(_one_line(exc.format_message()), exc.exit_code)
    except click.exceptions.Abort:
        fail("aborted", 130)
    except UmtamError as exc:
        fail(_one_line(str(exc)), exc.exit_code)
    except KeyboardInterrupt:
        fail("interrupted", 130)
    except BrokenPipeError:
        sys.exit(1)
    except MemoryError:
        fail("out of memory", 1)
    if isinstance(returned, int) and returned:
        sys.exit(returned)


def _one_line(text: str) -> str:
    return " ".join(text.split())


if __name__ == "__main__":
    main()
