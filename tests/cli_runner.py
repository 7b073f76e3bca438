"""Run the real `umtam` entry point in-process, error boundary included."""

from __future__ import annotations

from click.testing import CliRunner

from umtam_cli.main import main


def run_cli(*args: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr); an exception the boundary lets through fails the test with its traceback."""
    with CliRunner().isolation() as (out, err, _):
        try:
            main(list(args))
            code = 0
        except SystemExit as done:
            code = done.code if isinstance(done.code, int) else 1
    return code, out.getvalue().decode(), err.getvalue().decode()
