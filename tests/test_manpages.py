"""The committed man pages are exactly what the generator writes from the current CLI."""

from __future__ import annotations

from pathlib import Path

import pytest

from umtam_cli.main import SUBCOMMANDS
from umtam_cli.manpages import render_all

MAN = Path(__file__).resolve().parents[1] / "man"


def test_there_is_a_page_per_subcommand():
    assert set(render_all()) == {"umtam.1", *(f"umtam-{name}.1" for name in SUBCOMMANDS)}


def test_committed_pages_match_the_cli():
    stale = [name for name, text in render_all().items()
             if not (MAN / name).is_file() or (MAN / name).read_text(encoding="utf-8") != text]
    assert stale == [], f"regenerate with: python -m umtam_cli.manpages man/ ({', '.join(stale)})"


def test_pages_carry_the_options_and_examples():
    pages = render_all()
    assert "--keep" in pages["umtam-prune.1"] and "Examples:" in pages["umtam-merge.1"]
    assert pages["umtam-train.1"].startswith('.TH "UMTAM-TRAIN" "1"')


@pytest.mark.parametrize("argv,code", [(["--help"], 0), (["-h"], 0), (["--out"], 2), (["a", "b"], 2)])
def test_the_generator_takes_help_for_help_and_writes_nothing(tmp_path, monkeypatch, capsys, argv, code):
    from umtam_cli.manpages import main

    monkeypatch.chdir(tmp_path)
    assert main(argv) == code
    assert "usage: python -m umtam_cli.manpages" in capsys.readouterr()[0 if code == 0 else 1]
    assert list(tmp_path.iterdir()) == []
