"""Every failure is one line: option bounds, YAML, list options, and the CLI boundary (issue 13).

The matrix below runs like tests/test_bad_input.py (its harness and fixtures):
exit code 1 or 2, exactly one stderr line ``umtam: error: ...`` naming the
option and value, no traceback, empty stdout, workspace unchanged. The rest
covers what the boundary in umtam_cli/main.py maps (stdout on a full device or
a closed pipe, text that is not UTF-8, allocation failures) and the JSON writer,
with real subprocesses where the streams or the interpreter's shutdown matter.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import types
import typing
from pathlib import Path

import pytest
import torch

from cli_runner import run_cli
from test_bad_input import TRAIN, Env, case, env, family_root, run_bad_case, snapshot  # noqa: F401 (fixtures)
from umtam.config import build_config
from umtam.config.evaluate import EvalConfig
from umtam.config.inspect import InspectConfig
from umtam.config.merge import MergeConfig
from umtam.config.prune import PruneConfig
from umtam.config.schema import COUNT_LIMIT, FLOAT32_MAX, SEED_LIMIT, range_text
from umtam.config.train import TrainConfig
from umtam.errors import ConfigError
from umtam.merge.methods import METHODS

HUGE = "100000000000000000000000"  # 10**23: past int64, what a slipped finger or a script's overflow gives
ROOT = Path(__file__).resolve().parents[1]


def recipe(name: str, text: str | bytes):
    """A builder writing a recipe into the workspace (bytes as they are, text as UTF-8)."""
    def build(env: Env) -> None:
        path = env.path(name)
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return build


# Nine levels of nine aliases: 342 bytes that expand to 9**9 (387 million) strings.
LAUGHS = "".join(f"{chr(97 + i)}: &{chr(97 + i)} [" + ",".join([f"*{chr(96 + i)}"] * 9 if i else ['"lol"'] * 9)
                 + "]\n" for i in range(9))

MERGE = ["merge", "{a}", "{b}", "-o", "{out}"]

CASES = [
    # --- 1. numbers past what torch, numpy and tokenizers take: refused by the schema, naming the flag
    *[case(f"train-{flag[2:]}-huge", [*TRAIN, flag, HUGE, "-o", "{out}"], 2,
           [flag, "must be in [1, 2**31 - 1]", f"got {HUGE}"])
      for flag in ("--rank", "--max-steps", "--batch-size", "--max-length", "--max-train-samples",
                   "--max-eval-samples", "--eval-batch-size", "--save-every")],
    case("train-seed-huge", [*TRAIN, "--seed", HUGE, "-o", "{out}"], 2, ["--seed", "must be in [0, 2**63)",
                                                                          f"got {HUGE}"]),
    case("train-seed-negative", [*TRAIN, "--seed", "-1", "-o", "{out}"], 2, ["--seed: must be non-negative, got -1"]),
    case("train-epochs-1e300", [*TRAIN, "--epochs", "1e300", "-o", "{out}"], 2,
         ["--epochs: must be in (0, 10000], got 1e+300"]),
    case("train-epochs-overflows-to-inf", [*TRAIN, "--epochs", "1e400", "-o", "{out}"], 2,
         ["--epochs: must be a finite number, got inf"]),
    case("train-lr-past-float32", [*TRAIN, "--lr", "1e39", "-o", "{out}"], 2,
         ["--lr: must be in (0, 3.40282e+38], got 1e+39"]),
    case("train-lr-nan", [*TRAIN, "--lr", "nan", "-o", "{out}"], 2, ["--lr: must be a finite number, got nan"]),
    case("train-weight-decay-1e300", [*TRAIN, "--weight-decay", "1e300", "-o", "{out}"], 2,
         ["--weight-decay: must be in [0, 3.40282e+38], got 1e+300"]),
    case("train-max-grad-norm-inf", [*TRAIN, "--max-grad-norm", "inf", "-o", "{out}"], 2,
         ["--max-grad-norm: must be a finite number, got inf"]),
    case("train-recipe-seed-huge", ["train", "--config", "{ws}/r.yaml", "-o", "{out}"], 2,
         ["invalid {ws}/r.yaml", "seed: must be in [0, 2**63)", f"got {HUGE}"],
         recipe("r.yaml", f"task: mrpc\nseed: {HUGE}\n")),
    case("train-recipe-epochs-yaml-inf", ["train", "--config", "{ws}/r.yaml", "-o", "{out}"], 2,
         ["epochs: must be a finite number, got inf"], recipe("r.yaml", "task: mrpc\nepochs: .inf\n")),
    *[case(f"eval-{flag[2:]}-huge", ["eval", "{a}", flag, HUGE, "--data-dir", "{glue}"], 2,
           [flag, f"got {HUGE}"]) for flag in ("--seed", "--max-length", "--batch-size", "--max-eval-samples")],
    case("prune-keep-1e300", ["prune", "{a}", "--keep", "1e300", "-o", "{out}"], 2,
         ["--keep: must be in (0, 1], got 1e+300"]),
    case("prune-keep-nan", ["prune", "{a}", "--keep", "nan", "-o", "{out}"], 2, ["--keep", "finite", "got nan"]),
    case("inspect-keep-inf", ["inspect", "{a}", "--saliency", "--keep", "inf"], 2, ["--keep", "finite", "got inf"]),
    case("merge-keep-inf", [*MERGE, "--keep", "inf"], 2, ["umtam option keep=inf", "finite"]),
    case("merge-lambda-nan", [*MERGE, "--lambda", "nan"], 2, ["umtam option lambda=nan", "finite"]),
    case("merge-drop-1e300", [*MERGE, "--method", "dare", "--drop", "1e300"], 2, ["dare option drop=1e+300"]),
    case("merge-fisher-eps-inf", [*MERGE, "--method", "fisher", "--eps", "inf"], 2, ["fisher option eps=inf"]),
    case("merge-ota-power-nan", [*MERGE, "--method", "ota", "--power", "nan"], 2, ["ota option power=nan"]),
    # --- 2. YAML and wrong types, in --option and in recipes
    case("merge-option-yaml-unclosed", [*MERGE, "--option", "keep=[1"], 2,
         ["--option 'keep=[1'", "not valid YAML", "expected ',' or ']'"]),
    case("merge-option-list-for-float", [*MERGE, "--option", "keep=[0.1]"], 2,
         ["umtam option keep=[0.1]: expected float"]),
    case("merge-option-mapping-for-float", [*MERGE, "--option", "keep={{a: 1}}"], 2,  # braces doubled: fill()
         ["umtam option keep={{'a': 1}}: expected float"]),
    case("merge-option-tag", [*MERGE, "--option", "keep=!!python/object:os.system x"], 2,
         ["--option 'keep=!!python/object:os.system x'", "not valid YAML"]),
    case("merge-option-key-twice", [*MERGE, "--option", "keep=0.1", "--option", "keep=0.2"], 2,
         ["--option 'keep=0.2'", "keep is already given"]),
    case("merge-option-no-value", [*MERGE, "--option", "lambda="], 2, ["--option 'lambda='", "no value"]),
    case("merge-option-no-key", [*MERGE, "--option", "=1"], 2, ["--option expects KEY=VALUE, got '=1'"]),
    case("merge-option-alias", [*MERGE, "--option", "keep=&a [*a]"], 2,
         ["--option 'keep=&a [*a]'", "YAML alias *a is not allowed"]),
    case("merge-recipe-mapping-for-float", ["merge", "{a}", "{b}", "--config", "{ws}/m.yaml", "-o", "{out}"], 2,
         ["invalid {ws}/m.yaml", "umtam option keep={{'a': 1}}: expected float"], recipe("m.yaml", "keep: {a: 1}\n")),
    case("merge-recipe-a-list", ["merge", "{a}", "{b}", "--config", "{ws}/m.yaml", "-o", "{out}"], 2,
         ["recipe {ws}/m.yaml: must be a mapping of option names to values, not a list"],
         recipe("m.yaml", "- keep\n- 0.1\n")),
    case("merge-recipe-number-key", ["merge", "{a}", "{b}", "--config", "{ws}/m.yaml", "-o", "{out}"], 2,
         ["recipe {ws}/m.yaml: key 1 is not an option name"], recipe("m.yaml", "1: 0.1\n")),
    case("merge-recipe-null-key", ["merge", "{a}", "{b}", "--config", "{ws}/m.yaml", "-o", "{out}"], 2,
         ["recipe {ws}/m.yaml: key None is not an option name"], recipe("m.yaml", "null: 0.1\n")),
    case("merge-recipe-list-key", ["merge", "{a}", "{b}", "--config", "{ws}/m.yaml", "-o", "{out}"], 2,
         ["recipe {ws}/m.yaml: not valid YAML", "unhashable key"], recipe("m.yaml", "[keep]: 0.1\n")),
    case("merge-recipe-method-a-list", ["merge", "{a}", "{b}", "--config", "{ws}/m.yaml", "-o", "{out}"], 2,
         ["method: expected str, got ['ties']"], recipe("m.yaml", "method: [ties]\n")),
    case("train-recipe-not-utf8", ["train", "--config", "{ws}/r.yaml", "-o", "{out}"], 2,
         ["recipe {ws}/r.yaml: not valid YAML (byte 6 is not UTF-8 text)"], recipe("r.yaml", b"task: \xff\n")),
    case("train-recipe-string-for-int", ["train", "--config", "{ws}/r.yaml", "-o", "{out}"], 2,
         ["rank: expected int, got '8'"], recipe("r.yaml", "task: mrpc\nrank: '8'\n")),
    case("train-recipe-too-large", ["train", "--config", "{ws}/r.yaml", "-o", "{out}"], 2,
         ["recipe {ws}/r.yaml is 1048587 bytes, not a recipe"], recipe("r.yaml", "task: mrpc\n" + "#" * (1 << 20))),
    case("train-recipe-fifo", ["train", "--config", "{ws}/fifo", "-o", "{out}"], 2, ["recipe {ws}/fifo is not a file"],
         lambda env: os.mkfifo(env.path("fifo"))),
    case("train-recipe-impossible-date", ["train", "--config", "{ws}/r.yaml", "-o", "{out}"], 2,
         ["recipe {ws}/r.yaml: not valid YAML (month must be in 1..12)"],
         recipe("r.yaml", "task: mrpc\nseed: 2020-13-45\n")),
    case("train-recipe-int-of-5000-digits", ["train", "--config", "{ws}/r.yaml", "-o", "{out}"], 2,
         ["recipe {ws}/r.yaml: not valid YAML (Exceeds the limit (4300 digits) for integer string conversion: value "
          "has 5000 digits)"], recipe("r.yaml", "task: mrpc\nseed: " + "1" * 5000 + "\n")),
    case("merge-option-int-of-5000-digits", [*MERGE, "--method", "dare", "--option", "seed=" + "1" * 5000], 2,
         ["--option 'seed=111", "...: not valid YAML", "value has 5000 digits"]),
    case("train-recipe-nested-500-deep", ["train", "--config", "{ws}/r.yaml", "-o", "{out}"], 2,
         ["recipe {ws}/r.yaml: nested more than 32 deep (line 2)"],
         recipe("r.yaml", "task: mrpc\nrank: " + "[" * 500 + "]" * 500 + "\n")),
    # --- 3. aliases: the billion laughs never expands
    case("train-recipe-billion-laughs", ["train", "--config", "{ws}/laughs.yaml", "-o", "{out}"], 2,
         ["recipe {ws}/laughs.yaml: YAML alias *a is not allowed"], recipe("laughs.yaml", LAUGHS)),
    case("merge-recipe-billion-laughs", ["merge", "{a}", "{b}", "--config", "{ws}/laughs.yaml", "-o", "{out}"], 2,
         ["recipe {ws}/laughs.yaml: YAML alias *a is not allowed"], recipe("laughs.yaml", LAUGHS)),
    case("merge-recipe-merge-key", ["merge", "{a}", "{b}", "--config", "{ws}/m.yaml", "-o", "{out}"], 2,
         ["YAML alias *base is not allowed"], recipe("m.yaml", "x: &base {keep: 0.1}\n<<: *base\n")),
    # --- 8. list options: empty entries and names given twice
    *[case(f"merge-task-names-{label}", [*MERGE, "--task-names", given], 2, ["--task-names", message])
      for label, given, message in [
          ("empty", "", "empty task name in ''"),
          ("empty-entry", "sst2,,rte", "empty task name in 'sst2,,rte'"),
          ("trailing-comma", "sst2,", "empty task name in 'sst2,'"),
          ("twice", "sst2,sst2", "task 'sst2' given twice in 'sst2,sst2'"),
          ("twice-spelled-differently", "sst2,SST-2", "task 'SST-2' given twice in 'sst2,SST-2'"),
      ]],
    case("merge-recipe-task-names-empty-list", ["merge", "{a}", "{b}", "--config", "{ws}/m.yaml", "-o", "{out}"], 2,
         ["task_names: names no task, got []"], recipe("m.yaml", "task_names: []\n")),
    case("merge-recipe-task-names-nested", ["merge", "{a}", "{b}", "--config", "{ws}/m.yaml", "-o", "{out}"], 2,
         ["task_names: expected task names, got [['sst2']]"], recipe("m.yaml", "task_names: [[sst2]]\n")),
]


@pytest.mark.parametrize("args, code, names, build", CASES)
def test_bad_option_is_one_line(env, args, code, names, build):
    before, after = run_bad_case(env, args, code, names, build)
    assert after == before


def test_an_unreadable_recipe_is_one_line(env, monkeypatch):
    # Root reads any file, so the OS's refusal is stood in for.
    env.path("r.yaml").write_text("task: mrpc\n")

    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_text", refuse)
    code, stdout, stderr = run_cli("train", "--config", str(env.path("r.yaml")), "-o", str(env.path("out")))
    assert (code, stdout, stderr) == (2, "", f"umtam: error: recipe {env.path('r.yaml')}: cannot read it "
                                             "(permission denied)\n")


def test_the_largest_values_in_range_run(env):
    """The bounds refuse only what breaks: every count at its limit and the largest seed train one step."""
    limit = str(COUNT_LIMIT)
    code, stdout, stderr = run_cli(*[env.fill(arg) for arg in TRAIN], "--optimizer", "umtam", "--rank", limit,
                                   "--seed", str(SEED_LIMIT - 1), "--max-steps", "1", "--batch-size", limit,
                                   "--max-length", "16", "--max-train-samples", limit, "--max-eval-samples", limit,
                                   "--eval-batch-size", limit, "-o", str(env.path("out")), "--json")
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert (summary["steps"], summary["optimizer"]) == (1, "umtam")
    sidecar = json.loads((env.path("out") / "umtam.json").read_text())
    assert sidecar["seed"] == SEED_LIMIT - 1


# ----------------------------------------------------------------------------- every numeric field is bounded

def _numeric(annotation) -> type | None:
    members = (typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType)
               else (annotation,))
    return next((member for member in members if member in (int, float)), None)


def _bounds(field) -> dict:
    return {name: getattr(item, name) for item in field.metadata for name in ("gt", "ge", "lt", "le")
            if getattr(item, name, None) is not None}


COMMAND_SCHEMAS = [TrainConfig, EvalConfig, PruneConfig, MergeConfig, InspectConfig]
COMMAND_NUMBERS = [pytest.param(schema, name, id=f"{schema.__name__}.{name}") for schema in COMMAND_SCHEMAS
                   for name, field in schema.model_fields.items() if _numeric(field.annotation)]
METHOD_INTS = [pytest.param(spec.options, name, id=f"{spec.name}.{name}")
               for spec in METHODS for name, field in spec.options.model_fields.items()
               if _numeric(field.annotation) is int]


@pytest.mark.parametrize("schema, name", COMMAND_NUMBERS)
def test_every_number_of_a_command_has_both_bounds(schema, name):
    bounds = _bounds(schema.model_fields[name])
    assert {"gt", "ge"} & set(bounds) and {"lt", "le"} & set(bounds), bounds
    high = bounds.get("lt", bounds.get("le"))
    assert high <= (SEED_LIMIT if _numeric(schema.model_fields[name].annotation) is int else FLOAT32_MAX)


@pytest.mark.parametrize("schema, name", METHOD_INTS)
def test_every_integer_merge_option_has_both_bounds(schema, name):
    # Float options of a merge method only scale tensors: what overflows is refused as non-finite output.
    bounds = _bounds(schema.model_fields[name])
    assert {"gt", "ge"} & set(bounds) and {"lt", "le"} & set(bounds), bounds


FLOAT_FIELDS = [pytest.param(schema, name, id=f"{schema.__name__}.{name}")
                for schema in [*COMMAND_SCHEMAS, *(spec.options for spec in METHODS)]
                for name, field in schema.model_fields.items() if _numeric(field.annotation) is float]


@pytest.mark.parametrize("schema, name", FLOAT_FIELDS)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_every_float_option_refuses_nan_and_infinities(schema, name, value):
    key = schema.options()[name].key
    owner = next((spec for spec in METHODS if spec.options is schema), None)
    with pytest.raises(ConfigError) as refused:
        if owner is not None:
            owner.resolve_options({key: value})
        else:
            build_config(schema, {key: value})
    assert f"{key}" in str(refused.value) and "finite" in str(refused.value)


def test_a_value_under_the_lower_bound_is_told_that_bound_alone():
    # A library limit is no advice: rank 0 hears "at least 1", not the two-billion ceiling.
    field = TrainConfig.model_fields["rank"]
    assert (range_text(field, below=True), range_text(field)) == ("at least 1", "in [1, 2**31 - 1]")
    assert range_text(PruneConfig.model_fields["keep"], below=True) == "in (0, 1]"


# ----------------------------------------------------------------------------- 4. stdout: a full device, a closed pipe

def umtam(*args, **kwargs) -> subprocess.CompletedProcess:
    """The installed command in a real process (its streams, its shutdown flush)."""
    environ = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "default", **kwargs.pop("env", {})}
    kwargs.setdefault("stdout", subprocess.PIPE)
    return subprocess.run([sys.executable, "-m", "umtam_cli", *args], cwd=ROOT, env=environ,
                          stderr=subprocess.PIPE, timeout=300, **kwargs)


FULL = "/dev/full"
needs_dev_full = pytest.mark.skipif(not os.path.exists(FULL), reason="no /dev/full on this system")


@needs_dev_full
@pytest.mark.parametrize("args", [
    pytest.param(["inspect", "{a}", "--json"], id="inspect-json"),
    pytest.param(["inspect", "{a}"], id="inspect-table", marks=pytest.mark.slow),  # rich's writes, not click's
    pytest.param(["--help"], id="help"),
    pytest.param(["merge", "--help"], id="merge-help"),
])
def test_a_full_device_on_stdout_is_one_line(env, args):
    with open(FULL, "wb") as full:
        result = umtam(*[env.fill(arg) for arg in args], stdout=full)
    # one line, and no "Exception ignored" from Python's flush at exit
    assert (result.returncode, result.stderr.decode()) == (
        1, "umtam: error: cannot write the output to stdout (no space left on device)\n")


def test_a_closed_pipe_ends_quietly(env):
    reader, writer = os.pipe()
    os.close(reader)  # the reader is gone before anything is written (`umtam ... | head -0`)
    try:
        result = umtam("merge", str(env.a), str(env.b), "--dry-run", "--json", stdout=writer)
    finally:
        os.close(writer)
    assert (result.returncode, result.stderr.decode()) == (1, "")


def test_an_os_error_of_another_file_is_not_taken_for_stdout(env, monkeypatch):
    # A checkpoint's ENOSPC escaping the library unmapped is a bug: it keeps its traceback.
    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("umtam.summary.summarize", no_space)
    with pytest.raises(OSError, match="No space left"):
        run_cli("inspect", str(env.a))


# ----------------------------------------------------------------------------- 5. text that is not UTF-8

def non_utf8(path: Path, name: bytes) -> bytes:
    return os.fsencode(path) + b"/" + name


@pytest.mark.parametrize("encoding", [pytest.param(None, id="locale", marks=pytest.mark.slow),
                                      pytest.param("utf-8", id="strict-utf8")])
def test_a_path_that_is_not_utf8_is_printed_escaped(env, encoding):
    """In the error line and in a table: PYTHONIOENCODING=utf-8 makes stdout strict, as a UTF-8 desktop locale does."""
    extra = {"PYTHONIOENCODING": encoding} if encoding else {}
    missing = non_utf8(env.ws, b"\xffnothing")
    result = umtam(os.fsencode("inspect"), missing, env=extra)
    assert result.returncode == 1 and result.stdout == b""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and b"Traceback" not in result.stderr
    assert lines[0] in (f"umtam: error: {env.ws}/\\udcffnothing: no such checkpoint directory".encode(),
                        f"umtam: error: {env.ws}/".encode() + b"\xffnothing: no such checkpoint directory")

    out = non_utf8(env.ws, b"\xffpruned")
    result = umtam(b"prune", os.fsencode(env.a), b"--keep", b"0.5", b"-o", out, env=extra)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert result.stderr == b"" and os.path.isdir(out)
    shown = b" ".join(result.stdout.split())  # rich wraps the line at 80 columns
    escaped = f"-> {env.ws}/\\udcffpruned".encode()
    assert escaped in shown if encoding else (escaped in shown or f"-> {env.ws}/".encode() + b"\xffpruned" in shown)


@pytest.mark.slow
def test_json_escapes_a_path_that_is_not_utf8(env):
    out = non_utf8(env.ws, b"\xffpruned")
    result = umtam(b"prune", os.fsencode(env.a), b"--keep", b"0.5", b"-o", out, b"--json",
                   env={"PYTHONIOENCODING": "utf-8"})
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert json.loads(result.stdout.decode("ascii"))["output"] == os.fsdecode(out)


# ----------------------------------------------------------------------------- 6. allocation failures

def cpu_allocation_failure(*args, **kwargs):
    torch.empty(1 << 60, dtype=torch.uint8)  # an exabyte: torch's CPU allocator refuses at once


def cuda_out_of_memory(*args, **kwargs):
    raise torch.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.10 GiB of which 1.20 GiB "
        "is free. Including non-PyTorch memory, this process has 77.88 GiB memory in use. Of the allocated memory "
        "76.00 GiB is allocated by PyTorch. If reserved but unallocated memory is large try setting "
        "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.")


@pytest.mark.parametrize("command, target, fail, expected", [
    (["inspect", "{a}"], "umtam.summary.summarize", cpu_allocation_failure,
     "umtam: error: out of memory (DefaultCPUAllocator: can't allocate memory: you tried to allocate "
     "1152921504606846976 bytes. Error code 12 (Cannot allocate memory))"),
    (["eval", "{a}", "--data-dir", "{glue}"], "umtam.evaluate.evaluate_checkpoint", cuda_out_of_memory,
     "umtam: error: out of memory (CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of "
     "79.10 GiB of which 1.20 GiB is free.) (lower --batch-size or --max-length)"),
    (["merge", "{a}", "{b}", "-o", "{out}"], "umtam.merge.merge_checkpoints", cuda_out_of_memory,
     "umtam: error: out of memory (CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of "
     "79.10 GiB of which 1.20 GiB is free.) (--dry-run shows the estimated peak memory)"),
], ids=["cpu-allocator", "cuda", "cuda-merge"])
def test_an_allocation_failure_is_one_line(env, monkeypatch, command, target, fail, expected):
    monkeypatch.setattr(target, fail)
    before = snapshot(env.ws)
    code, stdout, stderr = run_cli(*[env.fill(arg) for arg in command])
    assert (code, stdout, stderr) == (1, "", expected + "\n")
    assert snapshot(env.ws) == before


def test_another_runtime_error_keeps_its_traceback(env, monkeypatch):
    def bug(*args, **kwargs):
        raise RuntimeError("expected scalar type Float but found Half")

    monkeypatch.setattr("umtam.summary.summarize", bug)
    with pytest.raises(RuntimeError, match="expected scalar type"):
        run_cli("inspect", str(env.a))


# ----------------------------------------------------------------------------- 7. --json is valid JSON

def _refuse_constant(name: str):
    raise ValueError(f"bare {name} is not JSON")


def test_json_never_holds_bare_nan_or_infinity(env, monkeypatch):
    payload = {"metrics": {"f1": math.nan, "loss": math.inf, "low": -math.inf, "ok": 0.5},
               "curve": [1.0, math.nan, (math.inf, 2)], "name": "mrpc"}
    monkeypatch.setattr("umtam.summary.summarize", lambda *args, **kwargs: payload)
    code, stdout, stderr = run_cli("inspect", str(env.a), "--json")
    assert (code, stderr) == (0, "")
    assert json.loads(stdout, parse_constant=_refuse_constant) == {
        "metrics": {"f1": None, "loss": None, "low": None, "ok": 0.5}, "curve": [1.0, None, [None, 2]],
        "name": "mrpc"}
