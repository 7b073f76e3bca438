"""Shell completion (README "Shell completion") works for subcommands and their options."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

UMTAM = Path(sys.executable).parent / "umtam"
pytestmark = pytest.mark.skipif(not UMTAM.exists(), reason="the umtam console script is not installed")


def complete(words: str, env_value: str = "bash_complete") -> list[str]:
    # the word being completed is the last one, or a new empty one after a trailing space
    cword = len(words.split()) - (0 if words.endswith(" ") else 1)
    env = {**os.environ, "_UMTAM_COMPLETE": env_value, "COMP_WORDS": words, "COMP_CWORD": str(cword)}
    out = subprocess.run([str(UMTAM)], env=env, capture_output=True, text=True, timeout=60, check=True).stdout
    return [line.split(",", 1)[1] for line in out.splitlines()]


@pytest.mark.parametrize("shell, marker", [("bash", "complete -o nosort -F _umtam_completion umtam"),
                                           ("zsh", "#compdef umtam"), ("fish", "complete --no-files --command umtam")])
def test_each_shell_gets_a_completion_script(shell, marker):
    script = subprocess.run([str(UMTAM)], env={**os.environ, "_UMTAM_COMPLETE": f"{shell}_source"},
                            capture_output=True, text=True, timeout=60, check=True).stdout
    assert marker in script


def test_subcommands_and_their_options_complete():
    assert complete("umtam me") == ["merge"]
    assert set(complete("umtam ")) >= {"train", "inspect", "prune", "merge", "eval"}
    assert complete("umtam merge --me") == ["--method"]
    assert "--keep" in complete("umtam prune --ke")
