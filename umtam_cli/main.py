"""The click group, lazy subcommands and the error boundary.

Subcommands are imported only when invoked, so `umtam --help` stays fast and
never imports torch. Every user mistake leaves as one line on stderr and exit
code 1 (runtime or data) or 2 (usage); anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import codecs
import importlib
import os
import sys

import click

# name -> (module, one-line help shown by `umtam --help` without importing it)
SUBCOMMANDS = {
    "train": ("umtam_cli.cmd_train", "Fine-tune on a GLUE task or on text, recording curvature statistics."),
    "inspect": ("umtam_cli.cmd_inspect", "Describe a checkpoint: tasks, base, stats, metrics, costs."),
    "prune": ("umtam_cli.cmd_prune", "Keep the most salient task-vector entries, reset the rest to the base."),
    "merge": ("umtam_cli.cmd_merge", "Merge checkpoints fine-tuned from the same base."),
    "eval": ("umtam_cli.cmd_eval", "Evaluate a checkpoint on GLUE dev sets or on text."),
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
    """Print ``umtam: error: MESSAGE`` on stderr and exit with ``exit_code``."""
    sys.exit(report(message, exit_code))


def report(message: str, exit_code: int) -> int:
    """Print the one error line on stderr; return the exit code to leave with."""
    try:
        click.echo(f"umtam: error: {message}", err=True)
    except OSError:
        pass  # stderr itself is gone: the exit code is all that can still tell
    return exit_code


def main(argv: list[str] | None = None) -> None:
    """Entry point with the error boundary."""
    for stream in (sys.stdout, sys.stderr):
        write_any_text(stream)
    real_stdout, sys.stdout = sys.stdout, GuardedStdout(sys.stdout)
    try:
        code = flush_stdout(run(argv))
    finally:
        sys.stdout = real_stdout
    sys.exit(code)


def run(argv: list[str] | None) -> int:
    """Run the command; every failure a user can act on becomes one line on stderr and an exit code."""
    from umtam.errors import UmtamError

    try:
        returned = cli.main(args=argv, prog_name="umtam", standalone_mode=False)
    except click.exceptions.Exit as done:
        return done.exit_code
    except click.ClickException as exc:
        return report(_one_line(exc.format_message()), exc.exit_code)
    except click.exceptions.Abort:
        return report("aborted", 130)
    except UmtamError as exc:
        return report(_one_line(str(exc)), exc.exit_code)
    except KeyboardInterrupt:
        return report("interrupted", 130)
    except BrokenPipeError:
        return stdout_closed()
    except MemoryError:
        return report("out of memory", 1)
    except RuntimeError as exc:
        if not is_out_of_memory(exc):
            raise  # any other RuntimeError is a bug: keep its traceback
        return report(f"out of memory ({allocation_detail(exc)}){_memory_hint(argv)}", 1)
    except StdoutError as exc:
        return stdout_unwritable(exc)
    return returned if isinstance(returned, int) else 0


# ----------------------------------------------------------------------------- stdout and stderr


def write_any_text(stream) -> None:
    """Let ``stream`` print any str: a path that is not UTF-8 reaches Python as lone surrogates.

    A strict stream raises UnicodeEncodeError on them, in the middle of a table or
    of the error line itself; backslashreplace prints them as \\udcff instead.
    surrogateescape on a UTF-8 stream (Python's choice under the C locale) is
    kept: it writes the path's own bytes back.
    """
    errors, encoding = getattr(stream, "errors", None), getattr(stream, "encoding", None) or "ascii"
    keeps_bytes = errors == "surrogateescape" and codecs.lookup(encoding).name == "utf-8"
    if errors in ("strict", "surrogateescape") and not keeps_bytes and hasattr(stream, "reconfigure"):
        stream.reconfigure(errors="backslashreplace")


class StdoutError(OSError):
    """Writing stdout failed (a full disk, an I/O error): the report is lost, not the work."""


class GuardedStdout:
    """sys.stdout as click and rich see it, raising StdoutError when a write or flush fails.

    An OSError from a checkpoint's file and one from stdout look alike (ENOSPC,
    no file name); only the second is the boundary's to report. A closed pipe
    stays BrokenPipeError: it ends the command quietly.
    """

    def __init__(self, stream):
        self._stream = stream

    def write(self, text):
        return self._guarded(self._stream.write, text)

    def flush(self):
        return self._guarded(self._stream.flush)

    def __getattr__(self, name):  # encoding, isatty, fileno ... of the real stream
        return getattr(self._stream, name)

    @staticmethod
    def _guarded(operation, *args):
        try:
            return operation(*args)
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise StdoutError(exc.errno, exc.strerror) from exc


def flush_stdout(code: int) -> int:
    """Flush stdout inside the boundary, where a full disk or a closed pipe behind it can still be reported.

    Left to Python's shutdown, the same failure prints "Exception ignored ..." and
    loses the exit code.
    """
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        return stdout_closed()
    except OSError as exc:
        return stdout_unwritable(exc)
    return code


def stdout_closed() -> int:
    """The reader went away (``umtam inspect X --json | head``): nothing to say, and no one to say it to."""
    _discard_stdout()
    return 1


def stdout_unwritable(exc: OSError) -> int:
    _discard_stdout()
    reason = (exc.strerror or type(exc).__name__).lower()
    return report(f"cannot write the output to stdout ({reason})", 1)


def _discard_stdout() -> None:
    """Point stdout's descriptor at /dev/null, so the text still buffered is flushed there at exit.

    Otherwise Python's final flush fails once more and prints "Exception ignored".
    """
    try:
        descriptor = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # an in-memory stream (tests): nothing is flushed at exit
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, descriptor)
    finally:
        os.close(devnull)


# ----------------------------------------------------------------------------- allocation failures

# torch reports a failed allocation as a RuntimeError, not MemoryError: "DefaultCPUAllocator:
# can't allocate memory" (or "not enough memory"), "CUDA out of memory", "MPS backend out of memory",
# and cuBLAS's workspace as "CUBLAS_STATUS_ALLOC_FAILED".
_ALLOCATOR_MARKERS = ("DefaultCPUAllocator", "out of memory", "CUBLAS_STATUS_ALLOC_FAILED")


def is_out_of_memory(exc: RuntimeError) -> bool:
    # torch.OutOfMemoryError (torch.cuda.OutOfMemoryError) by name: the boundary never imports torch
    if any(cls.__name__ == "OutOfMemoryError" for cls in type(exc).__mro__):
        return True
    return any(marker in str(exc) for marker in _ALLOCATOR_MARKERS)


def allocation_detail(exc: RuntimeError) -> str:
    """torch's own account, without the C++ location and the advice paragraph.

    '[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried
    to allocate 1152921504606846976 bytes. Error code 12 (...)' keeps what follows the location; 'CUDA
    out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of ...' its first three sentences.
    """
    text = " ".join(str(exc).split())
    if "DefaultCPUAllocator" in text:
        return text[text.index("DefaultCPUAllocator"):]
    sentences = text.split(". ")
    return ". ".join(sentences[:3]).rstrip(".") + "." if len(sentences) > 1 else text


# What to try next, for the subcommands whose memory a flag controls.
_MEMORY_HINTS = {
    "train": "lower --batch-size or --max-length",
    "eval": "lower --batch-size or --max-length",
    "merge": "--dry-run shows the estimated peak memory",
}


def _memory_hint(argv: list[str] | None) -> str:
    arguments = sys.argv[1:] if argv is None else argv
    command = next((arg for arg in arguments if arg in SUBCOMMANDS), None)
    return f" ({_MEMORY_HINTS[command]})" if command in _MEMORY_HINTS else ""


def _one_line(text: str) -> str:
    return " ".join(text.split())


if __name__ == "__main__":
    main()
