"""Files that are not what they seem, and runs that overlap (issue 13): one line, an exit code, nothing broken.

The matrix below reuses the bad-input harness of tests/test_bad_input.py and
checks the same properties: exit code 1 or 2, exactly one stderr line
``umtam: error: ...`` naming the file, key or value, no traceback, empty
stdout, and the workspace unchanged. The families:

- a symbolic link that would carry a file from outside an input directory into
  an output (plain Hugging Face inputs, ``--base``, umtam checkpoints), and a
  listed file that is not a regular file (a FIFO would hang the hash);
- outputs refused before any work: a symbolic link, a loop, a name too long
  once the staging suffix is added, an output another live process stages;
- inputs refused: a loop, an interrupted write's staging directory as a plain
  input, a state directory that is a dangling link;
- damaged training states (bad record shapes, tensors that do not fit).

The rest are tests of their own: two real processes writing one output
(exactly one wins, the other's output is never swapped away), the lock on a
state directory, inputs rewritten or truncated while a merge reads them, and
a full disk (injected, and a real small tmpfs where mounting is allowed).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cli_runner import run_cli
from test_bad_input import TINY_RUN, TRAIN, Env, case, env, family_root, snapshot  # noqa: F401 (fixtures)
from umtam import resume
from umtam.checkpoint import load_checkpoint, write_checkpoint
from umtam.errors import CheckpointError, ConfigError, UmtamError

ROOT = Path(__file__).resolve().parents[1]
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def assert_one_line_failure(env: Env, args: list[str], code: int, names: list[str], before=None) -> str:
    """Run the CLI; check the bad-input properties (the snapshot only when ``before`` is given)."""
    got, stdout, stderr = run_cli(*[env.fill(arg) for arg in args])
    lines = stderr.strip().splitlines()
    assert (got, len(lines)) == (code, 1), stderr
    assert lines[0].startswith("umtam: error: ") and "Traceback" not in stderr
    for name in names:
        assert env.fill(name) in lines[0], lines[0]
    assert stdout == ""
    if before is not None:
        assert snapshot(env.ws) == before
    return lines[0]


# ----------------------------------------------------------------------------- builders


def plain_input(env: Env, name: str = "hf-model", task: str = "sst2") -> Path:
    """A plain Hugging Face directory (the tiny base, its config naming ``task``) at {ws}/<name>."""
    target = env.path(name)
    shutil.copytree(env.family_root / "base", target)
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, "finetuning_task": task}))
    return target


def secret(env: Env, name: str = "secret.txt", text: str = "not for the output\n") -> Path:
    path = env.path(name)
    path.write_text(text)
    return path


def plain_tokenizer_links_out(env: Env) -> None:
    plain = plain_input(env)
    (plain / "tokenizer.json").symlink_to(secret(env))


def plain_config_links_out(env: Env) -> None:
    plain = plain_input(env)
    shutil.move(plain / "config.json", env.path("outside-config.json"))
    (plain / "config.json").symlink_to("../outside-config.json")


def base_tokenizer_links_out(env: Env) -> None:
    """Two plain inputs without tokenizer files, so the merge takes them from --base, whose vocab.txt links out."""
    plain_input(env, "hf-sst2", "sst2")
    plain_input(env, "hf-rte", "rte")
    shutil.copytree(env.family_root / "base", env.path("base"))
    (env.path("base") / "vocab.txt").symlink_to(secret(env))


def checkpoint_vocab_links_out(env: Env) -> None:
    """{a}/vocab.txt becomes a link to an identical file outside: its sha256 still matches the sidecar."""
    vocab = env.a / "vocab.txt"
    shutil.move(vocab, env.path("outside-vocab.txt"))
    vocab.symlink_to(env.path("outside-vocab.txt"))


def checkpoint_vocab_is_a_fifo(env: Env) -> None:
    (env.a / "vocab.txt").unlink()
    os.mkfifo(env.a / "vocab.txt")


def checkpoint_config_link_loop(env: Env) -> None:
    (env.a / "config.json").unlink()
    (env.a / "config.json").symlink_to("config.json")


def output_links_to(target: str):
    def build(env: Env) -> None:
        env.path("out").symlink_to(env.fill(target))
    return build


def link_loop(env: Env) -> None:
    env.path("loop").symlink_to(env.path("loop"))


def staged_by_live_process(env: Env) -> None:
    """A staging directory beside {out} whose pid is alive: another umtam writing the same output."""
    (env.ws / f".out.tmp-{os.getppid()}-abcdefgh").mkdir()


def leftover_as_plain_input(env: Env) -> None:
    """A killed write's staging directory: config.json and weights, no sidecar yet (pid 99999999 is dead)."""
    plain_input(env, ".c.tmp-99999999-abcdefgh")


def dangling_state_dir(env: Env) -> None:
    env.path("states").symlink_to(env.path("nowhere"))


LONG = "o" * 240  # fits NAME_MAX (255) alone, not with ".<name>.tmp-<pid>-XXXXXXXX"
PLAIN_MERGE = ["merge", "{a}", "{ws}/hf-model", "--method", "average", "--base", "{base}", "-o", "{out}"]

CASES = [
    # --- links out of an input directory, and files that are not regular
    case("merge-plain-input-tokenizer-links-outside", PLAIN_MERGE, 1,
         ["{ws}/hf-model/tokenizer.json", "a symbolic link to {ws}/secret.txt", "outside {ws}/hf-model"],
         plain_tokenizer_links_out),
    case("merge-plain-input-config-links-outside", PLAIN_MERGE, 1,
         ["{ws}/hf-model/config.json", "{ws}/outside-config.json"], plain_config_links_out),
    case("merge-base-tokenizer-links-outside",
         ["merge", "{ws}/hf-sst2", "{ws}/hf-rte", "--method", "average", "--base", "{ws}/base", "-o", "{out}"], 1,
         ["{ws}/base/vocab.txt", "a symbolic link to {ws}/secret.txt"], base_tokenizer_links_out),
    case("prune-checkpoint-vocab-links-outside", ["prune", "{a}", "--keep", "0.5", "-o", "{out}"], 1,
         ["{a}/vocab.txt", "a symbolic link to {ws}/outside-vocab.txt", "outside {a}"], checkpoint_vocab_links_out),
    case("merge-checkpoint-vocab-links-outside", ["merge", "{a}", "{b}", "-o", "{out}"], 1,
         ["{a}/vocab.txt", "{ws}/outside-vocab.txt"], checkpoint_vocab_links_out),
    case("inspect-checkpoint-vocab-links-outside", ["inspect", "{a}"], 1,
         ["{a}/vocab.txt", "{ws}/outside-vocab.txt"], checkpoint_vocab_links_out),
    case("inspect-listed-file-is-a-fifo", ["inspect", "{a}"], 1, ["{a}/vocab.txt", "not a regular file"],
         checkpoint_vocab_is_a_fifo),
    case("prune-listed-file-is-a-link-loop", ["prune", "{a}", "--keep", "0.5", "-o", "{out}"], 1,
         ["{a}/config.json", "symbolic link loop"], checkpoint_config_link_loop),
    # --- outputs refused before any work
    case("merge-output-is-a-dangling-link", ["merge", "{a}", "{b}", "-o", "{out}"], 2,
         ["output {out} is a symbolic link", "{ws}/nowhere"], output_links_to("{ws}/nowhere")),
    case("prune-output-is-a-link-with-force", ["prune", "{a}", "--keep", "0.5", "-o", "{out}", "--force"], 2,
         ["output {out} is a symbolic link"], output_links_to("{b}")),
    case("merge-output-is-a-link-loop", ["merge", "{a}", "{b}", "-o", "{ws}/loop"], 2,
         ["output {ws}/loop is a symbolic link"], link_loop),
    case("merge-output-below-a-link-loop", ["merge", "{a}", "{b}", "-o", "{ws}/loop/out"], 2,
         ["output {ws}/loop/out", "symbolic link loop"], link_loop),
    case("merge-output-name-too-long", ["merge", "{a}", "{b}", "-o", "{ws}/" + LONG], 2,
         ["output {ws}/" + LONG, "too long"]),
    case("prune-output-name-too-long", ["prune", "{a}", "--keep", "0.5", "-o", "{ws}/" + LONG], 2, ["too long"]),
    case("train-output-name-too-long", [*TRAIN, "-o", "{ws}/" + LONG], 2, ["too long"]),
    case("merge-output-staged-by-a-live-process", ["merge", "{a}", "{b}", "-o", "{out}"], 1,
         ["output {out} is being written by another process", f"pid {os.getppid()}"], staged_by_live_process),
    # --- inputs refused
    case("merge-input-is-a-link-loop", ["merge", "{a}", "{ws}/loop", "-o", "{out}"], 1,
         ["input {ws}/loop", "symbolic link loop"], link_loop),
    case("prune-input-is-a-link-loop", ["prune", "{ws}/loop", "--keep", "0.5", "-o", "{out}"], 1,
         ["{ws}/loop", "symbolic link loop"], link_loop),
    case("inspect-input-is-a-link-loop", ["inspect", "{ws}/loop"], 1, ["{ws}/loop", "dangling or a loop"], link_loop),
    case("train-data-dir-is-a-link-loop", [*TRAIN[:5], "--data-dir", "{ws}/loop", "-o", "{out}"], 1,
         ["input {ws}/loop", "symbolic link loop"], link_loop),
    case("merge-leftover-staging-dir-as-plain-input",
         ["merge", "{a}", "{ws}/.c.tmp-99999999-abcdefgh", "--method", "average", "--base", "{base}", "-o", "{out}"],
         1, ["{ws}/.c.tmp-99999999-abcdefgh", "temporary directory of an interrupted write"],
         leftover_as_plain_input),
    case("train-state-dir-is-a-dangling-link", [*TRAIN, "--save-every", "1", "--state-dir", "{ws}/states", "-o",
                                                "{out}"], 2,
         ["state directory {ws}/states is a symbolic link to {ws}/nowhere"], dangling_state_dir),
    case("train-state-dir-name-too-long", [*TRAIN, "--save-every", "1", "--state-dir", "{ws}/" + "s" * 256, "-o",
                                           "{out}"], 2, ["state directory {ws}/sss", "name too long"]),
]


@pytest.mark.parametrize("args, code, names, build", CASES)
def test_bad_file(env, args, code, names, build):
    if build is not None:
        build(env)
    before = snapshot(env.ws)  # a FIFO is recorded by its stat, never read
    with alarm(60):  # a FIFO read by mistake blocks forever: fail instead
        assert_one_line_failure(env, args, code, names, before)


class alarm:
    """SIGALRM after ``seconds``: a blocked open() or read() raises instead of hanging the suite."""

    def __init__(self, seconds: int):
        self.seconds = seconds

    def __enter__(self):
        def expire(signum, frame):
            raise TimeoutError(f"blocked for {self.seconds} s")
        self.previous = signal.signal(signal.SIGALRM, expire)
        signal.alarm(self.seconds)

    def __exit__(self, *exc_info):
        signal.alarm(0)
        signal.signal(signal.SIGALRM, self.previous)


def test_a_link_to_a_file_beside_it_is_followed_and_copied_as_a_file(env):
    vocab = env.a / "vocab.txt"
    content = vocab.read_bytes()
    shutil.move(vocab, env.a / "vocab-real.txt")
    vocab.symlink_to("vocab-real.txt")
    code, _, stderr = run_cli("prune", str(env.a), "--keep", "0.5", "-o", str(env.path("out")), "--quiet")
    assert code == 0, stderr
    copied = env.path("out") / "vocab.txt"
    assert not copied.is_symlink() and copied.read_bytes() == content
    assert load_checkpoint(env.path("out")).sidecar.files["vocab.txt"].sha256 == hashlib.sha256(content).hexdigest()


def test_write_checkpoint_copies_regular_files_only(env):
    # The last gate, whoever built the Checkpoint: a link out of its directory or a FIFO is never copied.
    source = load_checkpoint(env.a)
    (env.ws / "links").mkdir()
    (env.ws / "links" / "vocab.txt").symlink_to(secret(env))
    os.mkfifo(env.ws / "links" / "pipe")
    for given, message in [(env.ws / "links" / "vocab.txt", f"a symbolic link to {env.ws / 'secret.txt'}"),
                           (env.ws / "links" / "pipe", "not a regular file")]:
        with pytest.raises(CheckpointError, match=re.escape(f"{given}: {message}")):
            write_checkpoint(env.path("out"), tensors=source.load_tensors(), sidecar=source.sidecar.as_json(),
                             extra_files={"vocab.txt": given})
    assert sorted(path.name for path in env.ws.iterdir()) == ["a", "b", "glue", "links", "secret.txt"]


def test_a_huge_sparse_file_listed_in_a_sidecar_is_refused_unread(env):
    vocab = env.a / "vocab.txt"
    listed = vocab.stat().st_size
    os.truncate(vocab, 1 << 40)  # a sparse terabyte: hashing it would take many minutes
    with alarm(60):  # hashing it would take many minutes: fail instead
        code, stdout, stderr = run_cli("inspect", str(env.a))
    assert (code, stdout) == (1, "") and stderr == (
        f"umtam: error: {vocab}: sha256 mismatch (the file has {1 << 40} bytes, umtam.json lists {listed}; not read)"
        f" (the file was modified or truncated after the checkpoint was written)\n")


# ----------------------------------------------------------------------------- damaged training states


@pytest.fixture(scope="module")
def saved_state(tmp_path_factory, tiny_model_dir, glue_dir) -> Path:
    """The step-4 state of a tiny 4-step run that saved every 2 steps."""
    out = tmp_path_factory.mktemp("damaged-states") / "run"
    code, _, stderr = run_cli("train", "--task", "mrpc", "--model", str(tiny_model_dir), "--data-dir", str(glue_dir),
                              "--optimizer", "adamw", "--max-steps", "4", "--batch-size", "8", "--max-length", "16",
                              "--max-eval-samples", "2", "--save-every", "2", "--quiet", "-o", str(out))
    assert code == 0, stderr
    return out.with_name("run-state") / "step-00000004"


def edit_record(edit):
    def build(state: Path) -> None:
        record = json.loads((state / "umtam-state.json").read_text())
        edit(record)
        (state / "umtam-state.json").write_text(json.dumps(record))
    return build


def edit_tensors(edit):
    """Change state.safetensors and record its new sha256 and size, so only the content is wrong."""
    def build(state: Path) -> None:
        tensors = load_file(state / "state.safetensors")
        edit(tensors)
        save_file(tensors, state / "state.safetensors")
        data = (state / "state.safetensors").read_bytes()
        edit_record(lambda r: r["files"].update({"state.safetensors": {
            "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}}))(state)
    return build


QUERY = "model/bert.encoder.layer.0.attention.self.query.weight"


@pytest.mark.parametrize("build, names", [
    pytest.param(edit_record(lambda r: r.update(step="4")), ["umtam-state.json", "step must be an integer, got '4'"],
                 id="step-is-a-string"),
    pytest.param(edit_record(lambda r: r["rng"].pop("numpy")), ["umtam-state.json", "rng.numpy is missing"],
                 id="rng-entry-missing"),
    pytest.param(edit_record(lambda r: r["optimizer"]["param_groups"][0].update(params="all")),
                 ["umtam-state.json", "optimizer.param_groups[0].params must be a list"], id="param-group-not-a-list"),
    pytest.param(edit_record(lambda r: r.update(loss_curve=r["loss_curve"][:3])),
                 ["umtam-state.json", "loss_curve has 3 entries for step 4"], id="loss-curve-short"),
    pytest.param(edit_record(lambda r: r.update(files={})), ["umtam-state.json", "files must list state.safetensors"],
                 id="no-tensor-file-listed"),
    pytest.param(edit_record(lambda r: r.update(rng=[1, 2])), ["umtam-state.json", "rng must be an object"],
                 id="rng-not-an-object"),
    pytest.param(edit_tensors(lambda t: t.update({QUERY: t[QUERY][:4].clone()})),
                 ["state.safetensors: tensor " + QUERY, "has shape [4, 16]"], id="model-tensor-of-another-shape"),
    pytest.param(edit_tensors(lambda t: t.pop(QUERY)), ["state.safetensors: no tensor " + QUERY],
                 id="model-tensor-missing"),
    pytest.param(edit_tensors(lambda t: t.pop("rng/torch")), ["state.safetensors: no tensor rng/torch"],
                 id="rng-tensor-missing"),
    pytest.param(edit_tensors(lambda t: t.update({"rng/torch": t["rng/torch"][:10].clone()})),
                 ["{ws}/state: cannot be restored into this run"], id="rng-tensor-truncated"),
    pytest.param(edit_record(lambda r: r["rng"]["python"].__setitem__(1, [1, 2, 3])),
                 ["{ws}/state: cannot be restored into this run"], id="python-rng-state-wrong-size"),
    pytest.param(edit_record(lambda r: r["optimizer"]["param_groups"].append(r["optimizer"]["param_groups"][0])),
                 ["{ws}/state: cannot be restored into this run", "parameter groups"], id="extra-param-group"),
])
def test_a_damaged_training_state_is_one_line(env, saved_state, build, names):
    state = env.path("state")
    shutil.copytree(saved_state, state)
    build(state)
    before = snapshot(env.ws)
    line = assert_one_line_failure(env, ["train", "--resume", "{ws}/state", "-o", "{out}", "--quiet"], 1,
                                   [f"{{ws}}/state/{name}" if name.startswith(("umtam-state", "state.")) else name
                                    for name in names])
    assert "Traceback" not in line
    assert snapshot(env.ws) == before  # the run's new state directory was never made


# ----------------------------------------------------------------------------- the state lock


def test_a_second_run_on_a_locked_state_directory_is_refused(env):
    states = env.path("states")
    states.mkdir()  # an existing directory is locked at once, before any work
    writer = resume.StateWriter(states, output=env.path("first"))
    try:
        assert (states / resume.LOCK_FILE).read_text() == f"{os.getpid()}\n"
        before = snapshot(env.ws)
        assert_one_line_failure(env, [*TRAIN, *TINY_RUN, "--save-every", "1", "--state-dir", "{ws}/states", "-o",
                                      "{out}"], 1,
                                [f"state directory {states} is in use by another umtam train run "
                                 f"(pid {os.getpid()})"], before)
    finally:
        writer.close()
    assert list(states.iterdir()) == []  # the lock file goes with the lock


def test_a_new_state_directory_is_made_and_locked_by_the_first_state(env):
    states = env.path("states")
    writer = resume.StateWriter(states, output=env.path("first"))
    assert not states.exists()  # nothing made until there is a state to write
    writer.save({"step": 1}, {"x": torch.zeros(2)})
    try:
        with pytest.raises(UmtamError, match=re.escape(f"state directory {states} is in use by another umtam "
                                                       f"train run (pid {os.getpid()})")):
            resume.StateWriter(states, output=env.path("second"), force=True)
    finally:
        writer.close()
    assert sorted(path.name for path in states.iterdir()) == ["step-00000001"]
    resume.StateWriter(states, output=env.path("third"), force=True).close()  # free again


def test_a_lock_file_left_by_a_killed_run_does_not_block(env):
    states = env.path("states")
    states.mkdir()
    (states / resume.LOCK_FILE).write_text("99999999\n")  # nobody holds the flock
    with resume.StateWriter(states, output=env.path("out")) as writer:
        assert writer.directory == states and (states / resume.LOCK_FILE).read_text() == f"{os.getpid()}\n"
    assert sorted(states.iterdir()) == []  # the directory was there before: kept, without the lock file


def test_a_state_directory_inside_the_data_or_model_directory_is_refused(env):
    for source in (env.ws / "glue", env.model):
        with pytest.raises(ConfigError, match=re.escape(f"state directory {source / 'states'} is inside {source}")):
            resume.StateWriter(source / "states", output=env.path("out"), inputs=[env.ws / "glue", env.model])
        assert not (source / "states").exists()


@pytest.mark.parametrize("state_dir", ["{glue}/states", "{glue}"])
def test_train_refuses_a_state_directory_inside_its_data_directory(env, state_dir):
    before = snapshot(env.ws)
    assert_one_line_failure(env, [*TRAIN, *TINY_RUN, "--save-every", "1", "--state-dir", state_dir, "-o", "{out}"], 2,
                            [f"state directory {state_dir} is inside {{glue}}"], before)


# ----------------------------------------------------------------------------- two processes, one output


BARRIER_HOOK = r"""
import os, sys, time
from pathlib import Path

# Both processes pass every check and stop just before their write starts; then both write at once.
barrier = Path(os.environ["UMTAM_TEST_BARRIER"])
import umtam.checkpoint as checkpoint
write_directory = checkpoint.write_directory

def waiting(*args, **kwargs):
    (barrier / f"arrived-{os.getpid()}").touch()
    deadline = time.monotonic() + 120
    while not (barrier / "go").exists() and time.monotonic() < deadline:
        time.sleep(0.005)
    return write_directory(*args, **kwargs)

checkpoint.write_directory = waiting
from umtam_cli.main import main
main(sys.argv[1:])
"""


def start_merge(family_root: Path, out: Path, method: str, *prefix: str, env=None) -> subprocess.Popen:
    args = [sys.executable, *prefix, "merge", str(family_root / "mrpc"), str(family_root / "sst2"), "--method",
            method, "-o", str(out), "--quiet"]
    return subprocess.Popen(args, cwd=ROOT, env={**SUBPROCESS_ENV, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def one_winner(out: Path, runs: dict[str, subprocess.Popen]) -> tuple[str, str]:
    """Exactly one run exits 0 and ``out`` is its merge; the other failed in one line. (winner, loser's line)"""
    results = {}
    for method, run in runs.items():
        stdout, stderr = run.communicate(timeout=300)
        results[method] = (run.returncode, stdout, stderr)
    winners = [method for method, (code, _, _) in results.items() if code == 0]
    assert len(winners) == 1, results
    loser, = [results[method] for method in results if method != winners[0]]
    code, stdout, stderr = loser
    assert code in (1, 2) and stdout == "" and len(stderr.splitlines()) == 1, loser
    assert stderr.startswith("umtam: error: ") and str(out) in stderr
    merged = load_checkpoint(out)
    assert merged.sidecar.lineage.method == winners[0]  # the winner's output, whole, not the loser's
    assert [path.name for path in out.parent.iterdir() if path.name.startswith(".")] == []
    return winners[0], stderr


def test_two_merges_released_together_at_the_write_leave_one_output(tmp_path, family_root):
    barrier, out = tmp_path / "barrier", tmp_path / "out"
    barrier.mkdir()
    hook = ("-c", BARRIER_HOOK)
    runs = {method: start_merge(family_root, out, method, *hook, env={"UMTAM_TEST_BARRIER": str(barrier)})
            for method in ("average", "task-arithmetic")}
    deadline = time.monotonic() + 240
    while len(list(barrier.glob("arrived-*"))) < 2 and time.monotonic() < deadline:
        assert all(run.poll() is None for run in runs.values()), {m: r.communicate() for m, r in runs.items()}
        time.sleep(0.01)
    (barrier / "go").touch()
    _, line = one_winner(out, runs)
    # both had passed every check: the no-replace rename is what refused the second
    assert "was created by another process while this one was written; it was left as it is" in line


@pytest.mark.slow  # the same race as above, as it happens: which check refuses the second run varies
def test_two_merges_started_together_leave_one_output(tmp_path, family_root):
    out = tmp_path / "out"
    runs = {method: start_merge(family_root, out, method, "-m", "umtam_cli")
            for method in ("average", "task-arithmetic")}
    one_winner(out, runs)


def test_a_write_never_replaces_an_output_that_appeared_meanwhile(tmp_path):
    from umtam.atomic import write_directory

    out = tmp_path / "out"

    def fill(staging: Path) -> None:
        (staging / "mine").write_text("late")
        out.mkdir()  # another run finishes first
        (out / "theirs").write_text("first")

    with pytest.raises(UmtamError, match=re.escape(f"output {out} was created by another process")):
        write_directory(out, fill)
    assert [path.name for path in out.iterdir()] == ["theirs"] and sorted(tmp_path.iterdir()) == [out]


def test_a_jsonl_directory_replaces_the_earlier_one_whole(tmp_path):
    from umtam.atomic import write_jsonl_directory

    out = tmp_path / "data"
    write_jsonl_directory(out, {"old.jsonl": [{"text": "gone"}]}, what="passages")
    write_jsonl_directory(out, {"a.jsonl": [{"text": "x"}, {"n": 1}], "b.jsonl": []}, what="passages")
    assert sorted(p.name for p in out.iterdir()) == ["a.jsonl", "b.jsonl"]
    assert (out / "a.jsonl").read_text() == '{"text": "x"}\n{"n": 1}\n' and (out / "b.jsonl").read_text() == ""
    assert sorted(tmp_path.iterdir()) == [out]  # no staging directory left


# ----------------------------------------------------------------------------- inputs changed while read


def rewrite_in_place(path: Path) -> None:
    """Same size, other bytes near the end (tensor data), and a later mtime: a checkpoint rewritten under us."""
    data = bytearray(path.read_bytes())
    data[-8:] = bytes(255 - value for value in data[-8:])
    with open(path, "r+b") as handle:
        handle.write(data)
    later = path.stat().st_mtime_ns + 2_000_000_000
    os.utime(path, ns=(later, later))


def test_an_input_rewritten_while_merged_is_refused(env, monkeypatch):
    from umtam.merge import engine

    make_plan = engine.make_plan

    def rewriting(*args, **kwargs):  # after the inputs were hashed and mapped, before any tensor is read
        plan = make_plan(*args, **kwargs)
        rewrite_in_place(env.a / "model.safetensors")
        return plan

    monkeypatch.setattr(engine, "make_plan", rewriting)
    line = assert_one_line_failure(env, ["merge", "{a}", "{b}", "-o", "{out}"], 1,
                                   ["{a}/model.safetensors: changed while umtam was reading it (it was modified)"])
    assert sorted(path.name for path in env.ws.iterdir()) == ["a", "b", "glue"]  # no output, no staging
    assert "sha256" not in line


TRUNCATE_HOOK = r"""
import os, sys
import umtam.merge.engine as engine

target = os.environ["UMTAM_TEST_TRUNCATE"]
make_plan = engine.make_plan

def truncating(*args, **kwargs):
    plan = make_plan(*args, **kwargs)
    os.truncate(target, os.path.getsize(target) // 2)
    return plan

engine.make_plan = truncating
from umtam_cli.main import main
main(sys.argv[1:])
"""


def test_an_input_truncated_while_merged_is_refused_not_a_sigbus(env):
    # In a subprocess: reading a truncated memory map is SIGBUS, which would take the test session down.
    weights = env.a / "model.safetensors"
    size = weights.stat().st_size
    done = subprocess.run([sys.executable, "-c", TRUNCATE_HOOK, "merge", str(env.a), str(env.b), "-o",
                           str(env.path("out")), "--quiet"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**SUBPROCESS_ENV, "UMTAM_TEST_TRUNCATE": str(weights)})
    assert (done.returncode, done.stdout) == (1, ""), done.stderr
    assert done.stderr.splitlines() == [
        f"umtam: error: {weights}: changed while umtam was reading it (its size went from {size} to {size // 2} "
        f"bytes) (something rewrote or truncated it; run again once nothing writes to it)"]
    assert sorted(path.name for path in env.ws.iterdir()) == ["a", "b", "glue"]


def test_write_checkpoint_refuses_inputs_changed_before_it_seals(env):
    source = load_checkpoint(env.a)
    tensors = source.load_tensors()
    rewrite_in_place(env.a / "config.json")
    with pytest.raises(CheckpointError, match=re.escape(f"{env.a / 'config.json'}: changed while umtam was reading")):
        write_checkpoint(env.path("out"), tensors=tensors, sidecar=source.sidecar.as_json(),
                         extra_files={"vocab.txt": env.a / "vocab.txt"}, inputs=[source])
    assert sorted(path.name for path in env.ws.iterdir()) == ["a", "b", "glue"]


def test_an_input_rewritten_while_pruned_is_refused(env, monkeypatch):
    from umtam import prune

    prune_checkpoint = prune.prune_checkpoint

    def rewriting(*args, **kwargs):
        result = prune_checkpoint(*args, **kwargs)
        rewrite_in_place(env.a / "model.safetensors")
        return result

    monkeypatch.setattr(prune, "prune_checkpoint", rewriting)
    assert_one_line_failure(env, ["prune", "{a}", "--keep", "0.5", "-o", "{out}"], 1,
                            ["{a}/model.safetensors: changed while umtam was reading it"])
    assert sorted(path.name for path in env.ws.iterdir()) == ["a", "b", "glue"]


# ----------------------------------------------------------------------------- a full disk


def no_space_in_save_file(monkeypatch, where: str = "") -> None:
    """safetensors' save_file fails as the binding does on a full disk (for files under a name containing ``where``)."""
    import safetensors.torch
    from safetensors import SafetensorError

    save = safetensors.torch.save_file

    def full(tensors, filename, *args, **kwargs):
        if where in str(filename):
            raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                                  "message: \"No space left on device\" })")
        return save(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", full)


def no_space_for_weights(monkeypatch, where: str = "") -> None:
    """Both weight writers fail on a full disk: save_file as the binding does, a streaming merge's os.pwrite."""
    no_space_in_save_file(monkeypatch, where)
    pwrite = os.pwrite

    def full(fd, data, offset):
        if where in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", full)


def no_space_in_fsync(monkeypatch, where: str = "") -> None:
    """os.fsync fails with ENOSPC (a delayed allocation meeting a full disk) for files whose path holds ``where``."""
    fsync = os.fsync

    def full(fd):
        if where in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return fsync(fd)

    monkeypatch.setattr(os, "fsync", full)


@pytest.mark.parametrize("command", [["merge", "{a}", "{b}", "-o", "{out}"],
                                     ["prune", "{a}", "--keep", "0.5", "-o", "{out}"]])
@pytest.mark.parametrize("inject, reason", [
    (no_space_for_weights, ""),  # save_file's words (prune) or errno's (a streaming merge)
    (no_space_in_fsync, "[Errno 28] No space left on device"),
], ids=["weights", "fsync"])
def test_a_full_disk_while_writing_a_checkpoint(env, monkeypatch, command, inject, reason):
    before = entries(env.ws)
    inject(monkeypatch)
    assert_one_line_failure(env, command, 1, [f"umtam: error: cannot write output {{out}} ({reason}",
                                              "No space left on device"])
    assert entries(env.ws) == before  # no output, no staging directory


def entries(root: Path) -> dict:
    """The snapshot but for the root's own mtime, which a write that was started and undone moves."""
    found = snapshot(root)
    found.pop(".")
    return found


@pytest.mark.parametrize("inject, reason", [
    (no_space_in_save_file, "Error while serializing"), (no_space_in_fsync, "[Errno 28] No space left on device"),
], ids=["save_file", "fsync"])
def test_a_full_disk_while_writing_a_training_state(env, monkeypatch, inject, reason):
    before = entries(env.ws)
    inject(monkeypatch, where="/.step-")
    assert_one_line_failure(env, [*TRAIN, *TINY_RUN, "--save-every", "1", "-o", "{out}"], 1,
                            ["cannot write training state {ws}/out-state/step-00000001", reason])
    assert entries(env.ws) == before  # no output, no staging directory, no state directory


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 16 KiB tmpfs (root only; skipped where mounting is not permitted)."""
    mountpoint = tmp_path / "small"
    mountpoint.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(mountpoint)],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot mount a tmpfs here ({exc})")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()})")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True, timeout=30)


def test_a_really_full_disk_while_merging(env, small_tmpfs):
    out = small_tmpfs / "merged"
    code, stdout, stderr = run_cli("merge", str(env.a), str(env.b), "-o", str(out), "--quiet")
    assert (code, stdout, len(stderr.splitlines())) == (1, "", 1), stderr
    assert stderr.startswith(f"umtam: error: cannot write output {out} (") and "No space left on device" in stderr
    assert list(small_tmpfs.iterdir()) == []  # nothing left behind, staging directory included


def test_a_hub_cache_snapshot_may_link_into_its_blobs_and_nowhere_else(tmp_path):
    from umtam.atomic import check_regular_file

    repo = tmp_path / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / "abc123").write_text("{}")
    snapshot = repo / "snapshots" / "rev1"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").symlink_to("../../blobs/abc123")
    assert check_regular_file(snapshot / "config.json").st_size == 2
    (tmp_path / "secret").write_text("key")
    (snapshot / "tokenizer.json").symlink_to(tmp_path / "secret")
    with pytest.raises(CheckpointError, match="a symbolic link to .*secret, outside"):
        check_regular_file(snapshot / "tokenizer.json")
