"""tools/readme_tables.py: README tables refreshed from, and checked against, the commands that print them."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
REPORT = "python -c \"print('tables:\\n| a | b |\\n|---|---|\\n| 1 | 2 |\\nplot: x.png')\""


@pytest.fixture
def tool(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "tools"))
    yield importlib.import_module("readme_tables")
    sys.modules.pop("readme_tables", None)


def _readme(body: str) -> str:
    return f"Intro\n\n<!-- table: {REPORT} | | a | -->\n{body}<!-- /table -->\n\nAfter.\n"


def test_a_stale_table_is_replaced_by_its_commands_and_the_rest_is_left_alone(tool):
    text, changed = tool.refreshed(_readme("| a | b |\n|---|---|\n| 1 | 3 |\n"), {})
    assert text == _readme("| a | b |\n|---|---|\n| 1 | 2 |\n")
    assert changed == [f"{REPORT} | | a |"]
    assert tool.refreshed(text, {}) == (text, [])  # now current: nothing to change


def test_check_exits_1_on_a_stale_table_and_changes_nothing(tool, tmp_path, monkeypatch, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(_readme(""))
    monkeypatch.setattr(sys, "argv", ["readme_tables", "--readme", str(readme), "--check"])
    assert tool.main() == 1 and readme.read_text() == _readme("")
    assert capsys.readouterr().out.startswith("stale: ")
    monkeypatch.setattr(sys, "argv", ["readme_tables", "--readme", str(readme)])
    assert tool.main() == 0 and "| 1 | 2 |" in readme.read_text()


def test_a_command_that_fails_or_prints_no_such_table_is_an_error(tool):
    with pytest.raises(tool.TableError, match="no table starting"):
        tool.table_in("| x |\n", "| a |")
    with pytest.raises(tool.TableError, match="exited 3"):
        tool.command_output("python -c 'import sys; sys.exit(3)'", {})
