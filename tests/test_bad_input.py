"""The bad-input matrix: every user mistake, on every subcommand, is one line and an exit code.

Each case builds its inputs in a fresh workspace (copies of tiny checkpoints
built in code, a copy of the tiny GLUE directory), snapshots the workspace,
runs the real entry point (``umtam_cli.main.main``, with its error boundary)
and asserts:

- exit code 1 (runtime or data) or 2 (usage), as listed;
- exactly one line on stderr, ``umtam: error: ...``, naming the file, key or
  value at fault (the case's ``names``), and no traceback;
- nothing in the workspace created, removed or changed: not the output
  directory, not a staging directory beside it, not the inputs.

Placeholders in arguments and names: {a} and {b} are the input checkpoints
(copies of the mrpc and sst2 experts), {out} the output path, {ws} the
workspace, {model} the tiny BERT directory, {glue} the workspace's GLUE copy
(MRPC only) and {base} the experts' base model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

from cli_runner import run_cli
from tiny_checkpoints import build_family, make_expert, save_tiny_base
from umtam.checkpoint import load_checkpoint, write_checkpoint

# ----------------------------------------------------------------------------- running and checking


def unchanged_but_for_streaming(args: list[str], before: dict[str, tuple], after: dict[str, tuple]) -> bool:
    """The workspace is as it was; a merge may have moved the root's mtime and nothing else.

    A merge streams its output into a staging directory beside the target, so a
    problem it can only meet in the data (a NaN in a weight, an overflowing
    lambda) comes after that directory existed: it is removed, nothing is left,
    but the parent directory's mtime records that it was there.
    """
    if args[0] == "merge":
        before, after = dict(before), dict(after)
        before.pop("."), after.pop(".")
    return before == after


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under root (root included): kind, mode, mtime and content, to prove nothing changed."""
    entries = {}
    for path in [root, *sorted(root.rglob("*"))]:
        info = path.lstat()
        content = path.read_bytes() if path.is_file() else None
        entries[str(path.relative_to(root))] = (path.is_dir(), info.st_mode, info.st_mtime_ns, content)
    return entries


# ----------------------------------------------------------------------------- inputs


@dataclass
class Env:
    ws: Path
    family_root: Path
    model: Path
    glue_source: Path

    def path(self, name: str) -> Path:
        return self.ws / name

    @property
    def a(self) -> Path:
        return self.ws / "a"

    @property
    def b(self) -> Path:
        return self.ws / "b"

    def fill(self, template: str) -> str:
        return template.format(a=self.a, b=self.b, out=self.ws / "out", ws=self.ws, model=self.model,
                               glue=self.ws / "glue", base=self.family_root / "base")


@pytest.fixture(scope="module")
def family_root(tmp_path_factory) -> Path:
    """The mrpc and sst2 experts of one tiny base, plus experts that cannot be merged with them."""
    root = tmp_path_factory.mktemp("bad-input-family")
    family = build_family(root, {"mrpc": 2, "sst2": 2})
    other_record, other_encoder = save_tiny_base(root / "other-base", seed=5)
    make_expert(root / "other-base-rte", base_record=other_record, base_encoder=other_encoder, task="rte", seed=9)
    query = "bert.encoder.layer.0.attention.self.query.weight"
    variant(family.experts["mrpc"].path, root / "shape-rte", lambda t: t.update({query: t[query][:4].clone()}))
    variant(family.experts["mrpc"].path, root / "keys-rte", lambda t: t.pop(query))
    return root


def variant(source: Path, output: Path, edit: Callable[[dict], object]) -> None:
    """A copy of ``source`` as an "rte" expert of the same base, its weights changed by ``edit``."""
    ckpt = load_checkpoint(source)
    tensors = ckpt.load_tensors()
    edit(tensors)
    sidecar = {k: v for k, v in ckpt.sidecar.as_json().items() if k not in ("schema_version", "files")}
    sidecar["tasks"] = {"rte": sidecar["tasks"]["mrpc"]}
    write_checkpoint(output, tensors=tensors, sidecar=sidecar,
                     extra_files={"config.json": (source / "config.json").read_bytes()})


@pytest.fixture
def env(tmp_path, family_root, tiny_model_dir, glue_dir) -> Env:
    ws = tmp_path / "ws"
    ws.mkdir()
    shutil.copytree(family_root / "mrpc", ws / "a")
    shutil.copytree(family_root / "sst2", ws / "b")
    shutil.copytree(glue_dir / "MRPC", ws / "glue" / "MRPC")
    return Env(ws, family_root, tiny_model_dir, glue_dir)


def rehash(ckpt: Path, name: str) -> None:
    """Record the file's new sha256, so the damage gets past the hash check to the parsers."""
    sidecar = json.loads((ckpt / "umtam.json").read_text())
    sidecar["files"][name]["sha256"] = hashlib.sha256((ckpt / name).read_bytes()).hexdigest()
    (ckpt / "umtam.json").write_text(json.dumps(sidecar))


def edit_sidecar(ckpt: Path, edit: Callable[[dict], object]) -> None:
    sidecar = json.loads((ckpt / "umtam.json").read_text())
    edit(sidecar)
    (ckpt / "umtam.json").write_text(json.dumps(sidecar))


# Builders: env -> None, each preparing one kind of damage.

def garbage_weights(env: Env) -> None:
    (env.a / "model.safetensors").write_bytes(b"this is not a safetensors file")
    rehash(env.a, "model.safetensors")


def truncated_weights(rehashed: bool):
    def build(env: Env) -> None:
        path = env.a / "model.safetensors"
        os.truncate(path, path.stat().st_size // 2)
        if rehashed:
            rehash(env.a, "model.safetensors")
    return build


def sidecar_text(text: str):
    return lambda env: (env.a / "umtam.json").write_text(text)


def sidecar_edit(edit: Callable[[dict], object]):
    return lambda env: edit_sidecar(env.a, edit)


def no_stats(env: Env) -> None:
    """A checkpoint as a writer that records no statistics leaves it: no file, no sidecar entry."""
    (env.a / "stats.safetensors").unlink()
    edit_sidecar(env.a, lambda s: s["files"].pop("stats.safetensors"))


def stats_with_unknown_dtype(env: Env) -> None:
    path = env.a / "stats.safetensors"
    blob = path.read_bytes()
    length = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8:8 + length])
    first = next(key for key in header if key != "__metadata__")
    header[first]["dtype"] = "C64"
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + blob[8 + length:])
    rehash(env.a, "stats.safetensors")


def stats_with_nan(env: Env) -> None:
    """Statistics as a diverged run leaves them: one column factor all NaN."""
    stats = load_file(env.a / "stats.safetensors")
    key = sorted(k for k in stats if k.startswith("exp_avg_sq_col/bert.encoder"))[0]
    stats[key] = torch.full_like(stats[key], float("nan"))
    save_file(stats, env.a / "stats.safetensors")
    rehash(env.a, "stats.safetensors")


def weights_without(key: str):
    def build(env: Env) -> None:
        tensors = load_file(env.a / "model.safetensors")
        del tensors[key]
        save_file(tensors, env.a / "model.safetensors")
        rehash(env.a, "model.safetensors")
    return build


def edited_config(env: Env) -> None:
    (env.a / "config.json").write_text('{"model_type": "bert",')
    rehash(env.a, "config.json")


def no_tokenizer_files(env: Env) -> None:
    """A checkpoint whose writer did not copy the tokenizer: its files gone, and gone from the sidecar."""
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (env.a / name).exists():
            (env.a / name).unlink()
            edit_sidecar(env.a, lambda s, name=name: s["files"].pop(name))


def model_without_vocabulary(env: Env) -> None:
    """A model directory with config.json and weights but no tokenizer files."""
    shutil.copytree(env.model, env.path("no-vocab-model"), ignore=shutil.ignore_patterns("vocab.txt", "tokenizer*"))


def second_input(name: str):
    def build(env: Env) -> None:
        shutil.rmtree(env.b)
        shutil.copytree(env.family_root / name, env.b)
    return build


def same_task_twice(env: Env) -> None:
    shutil.rmtree(env.b)
    shutil.copytree(env.a, env.b)


def existing_output(env: Env) -> None:
    shutil.copytree(env.family_root / "sst2", env.path("out"))


def readonly_parent(env: Env) -> None:
    if os.geteuid() == 0:
        pytest.skip("root ignores directory permissions")
    env.path("ro").mkdir()
    env.path("ro").chmod(0o555)


def file_as_parent(env: Env) -> None:
    env.path("afile").write_text("a file, not a directory\n")


def empty_dir(env: Env) -> None:
    env.path("empty").mkdir()


def plain_model_dir(env: Env) -> None:
    shutil.copytree(env.family_root / "base", env.path("hf-model"))


def data_file(name: str, edit: Callable[[list[str]], list[str]]):
    """Rewrite one MRPC file of the workspace GLUE copy, line by line."""
    def build(env: Env) -> None:
        path = env.ws / "glue" / "MRPC" / name
        lines = path.read_text(encoding="utf-8-sig").splitlines()
        path.write_text("".join(line + "\n" for line in edit(lines)), encoding="utf-8")
    return build


def _cut_columns(lines: list[str]) -> list[str]:
    lines[3] = "\t".join(lines[3].split("\t")[:3])  # data row 3 (file line 4) loses two columns
    return lines


def _label_seven(lines: list[str]) -> list[str]:
    lines[2] = "7" + lines[2][1:]  # file line 3: Quality 7 in a binary task
    return lines


def _header_without_text(lines: list[str]) -> list[str]:
    lines[0] = "Quality\t#1 ID\t#2 ID"
    return [lines[0]] + ["\t".join(line.split("\t")[:3]) for line in lines[1:]]


def plain_model_with_garbage_weights(env: Env) -> None:
    """A plain Hugging Face directory (a merge input since hf_interop) whose weights are not safetensors."""
    plain_model_dir(env)
    config = json.loads((env.path("hf-model") / "config.json").read_text())
    (env.path("hf-model") / "config.json").write_text(json.dumps({**config, "finetuning_task": "sst2"}))
    (env.path("hf-model") / "model.safetensors").write_bytes(b"this is not a safetensors file")


def expert_metrics_without_f1(env: Env) -> None:
    edit_sidecar(env.a, lambda s: s["tasks"]["mrpc"].update(expert_metrics={"validation": {"accuracy": 0.5}}))


# ----------------------------------------------------------------------------- the matrix

TRAIN = ["train", "--task", "mrpc", "--model", "{model}", "--data-dir", "{glue}", "--quiet"]
TINY_RUN = ["--max-steps", "1", "--batch-size", "4", "--max-length", "16", "--max-eval-samples", "2"]


def case(case_id: str, args: list[str], code: int, names: list[str], build=None, marks=()):
    return pytest.param(args, code, names, build, id=case_id, marks=marks)


CASES = [
    # --- train
    case("train-unknown-task", ["train", "--task", "mrpx", "--model", "{model}", "-o", "{out}"], 2, ["'mrpx'"]),
    case("train-unknown-optimizer", [*TRAIN, "--optimizer", "adamx", "-o", "{out}"], 2, ["'adamx'", "adamw"]),
    case("train-rank-0", [*TRAIN, "--rank", "0", "-o", "{out}"], 2, ["rank", "got 0"]),
    case("train-negative-lr", [*TRAIN, "--lr", "-0.1", "-o", "{out}"], 2, ["lr", "-0.1"]),
    # torch turns lr / bias correction into a float32 scalar: 1e38 / 0.1 overflows inside AdamW's step
    case("train-lr-overflows-float32", [*TRAIN, *TINY_RUN, "--lr", "1e38", "-o", "{out}"], 1,
         ["diverged at step 1", "the update overflowed float32", "no checkpoint was written"]),
    # Adafactor's clipped update times 1e38 leaves inf weights after the last step, which no loss has seen yet
    case("train-last-step-leaves-inf-weights",
         [*TRAIN, *TINY_RUN, "--optimizer", "adafactor", "--lr", "1e38", "-o", "{out}"], 1,
         ["diverged at step 1", "weights hold NaN or inf", "no checkpoint was written"]),
    case("train-model-does-not-exist", [*TRAIN[:3], "--model", "{ws}/no-model", "-o", "{out}"], 2, ["{ws}/no-model"]),
    case("train-model-without-tokenizer-files", [*TRAIN[:3], "--model", "{ws}/no-vocab-model", "-o", "{out}"], 2,
         ["'{ws}/no-vocab-model'", "no vocabulary beyond its", "config.json, safetensors weights, tokenizer files"],
         model_without_vocabulary),
    case("train-data-dir-does-not-exist", [*TRAIN[:5], "--data-dir", "{ws}/no-data", "-o", "{out}"], 1,
         ["{ws}/no-data"]),
    case("train-empty-data-file", [*TRAIN, "-o", "{out}"], 1, ["{glue}/MRPC/train.tsv is empty"],
         data_file("train.tsv", lambda lines: [])),
    case("train-data-row-missing-columns", [*TRAIN, "-o", "{out}"], 1,
         ["{glue}/MRPC/train.tsv:4", "expected 5 tab-separated columns, found 3"],
         data_file("train.tsv", _cut_columns)),
    case("train-label-out-of-range", [*TRAIN, "-o", "{out}"], 1, ["{glue}/MRPC/train.tsv:3", "label '7'"],
         data_file("train.tsv", _label_seven)),
    case("train-output-exists", [*TRAIN, "-o", "{out}"], 2, ["{out} already exists", "--force"], existing_output),
    case("train-output-inside-data-dir", [*TRAIN, *TINY_RUN, "-o", "{glue}/run"], 2, ["inside input"]),
    case("train-read-only-output-location", [*TRAIN, "-o", "{ws}/ro/out"], 1, ["{ws}/ro", "permission denied"],
         readonly_parent),
    case("train-output-under-a-file", [*TRAIN, "-o", "{ws}/afile/out"], 2, ["{ws}/afile is not a directory"],
         file_as_parent),
    # --- inspect
    case("inspect-path-does-not-exist", ["inspect", "{ws}/nothing"], 1, ["{ws}/nothing", "no such checkpoint"]),
    case("inspect-empty-directory", ["inspect", "{ws}/empty"], 1, ["{ws}/empty", "no umtam.json"], empty_dir),
    case("inspect-plain-model-directory", ["inspect", "{ws}/hf-model"], 1, ["{ws}/hf-model", "not a umtam checkpoint"],
         plain_model_dir),
    case("inspect-truncated-weights", ["inspect", "{a}"], 1, ["{a}/model.safetensors", "sha256 mismatch"],
         truncated_weights(rehashed=False)),
    case("inspect-truncated-weights-rehashed", ["inspect", "{a}"], 1,
         ["{a}/model.safetensors", "not a readable safetensors file"], truncated_weights(rehashed=True)),
    case("inspect-garbage-weights", ["inspect", "{a}"], 1,
         ["{a}/model.safetensors", "not a readable safetensors file"], garbage_weights),
    case("inspect-sidecar-not-json", ["inspect", "{a}"], 1, ["{a}/umtam.json", "not valid JSON"],
         sidecar_text("{not json")),
    case("inspect-sidecar-missing-fields", ["inspect", "{a}"], 1, ["{a}/umtam.json", "missing field(s) base_model"],
         sidecar_edit(lambda s: s.pop("base_model"))),
    case("inspect-sidecar-newer-schema", ["inspect", "{a}"], 1, ["{a}/umtam.json", "schema_version 2 is newer"],
         sidecar_edit(lambda s: s.update(schema_version=2))),
    case("inspect-sha256-mismatch", ["inspect", "{a}"], 1, ["{a}/config.json", "sha256 mismatch"],
         lambda env: (env.a / "config.json").write_text("{}")),
    case("inspect-sidecar-file-outside-directory", ["inspect", "{a}"], 1, ["{a}/umtam.json", "'../b/config.json'",
                                                                           "outside the checkpoint"],
         sidecar_edit(lambda s: s["files"].update({"../b/config.json": s["files"]["config.json"]}))),
    case("inspect-stats-unknown-dtype", ["inspect", "{a}"], 1, ["{a}/stats.safetensors", "unknown dtype 'C64'"],
         stats_with_unknown_dtype),
    case("inspect-saliency-keep-1.5", ["inspect", "{a}", "--saliency", "--keep", "1.5"], 2, ["--keep", "1.5"]),
    # --- prune
    *[case(f"prune-keep-{keep}", ["prune", "{a}", "--keep", keep, "-o", "{out}"], 2, ["keep", f"got {keep}"])
      for keep in ("0", "-0.1", "1.5")],
    case("prune-unknown-score", ["prune", "{a}", "--keep", "0.5", "--score", "curvy", "-o", "{out}"], 2,
         ["'curvy'", "curvature"]),
    case("prune-curvature-without-stats", ["prune", "{a}", "--keep", "0.5", "-o", "{out}"], 1,
         ["{a}", "no stats.safetensors", "exp_avg_sq_row/"], no_stats),
    case("prune-stats-with-nan", ["prune", "{a}", "--keep", "0.5", "-o", "{out}"], 1,
         ["{a}", "statistic 'exp_avg_sq_col/bert.encoder.", "NaN or infinite"], stats_with_nan),
    case("prune-path-does-not-exist", ["prune", "{ws}/nothing", "--keep", "0.5", "-o", "{out}"], 1,
         ["{ws}/nothing"]),
    case("prune-garbage-weights", ["prune", "{a}", "--keep", "0.5", "-o", "{out}"], 1,
         ["{a}/model.safetensors", "not a readable safetensors file"], garbage_weights),
    case("prune-output-exists", ["prune", "{a}", "--keep", "0.5", "-o", "{out}"], 2, ["{out} already exists"],
         existing_output),
    case("prune-output-inside-input", ["prune", "{a}", "--keep", "0.5", "-o", "{a}/pruned"], 2,
         ["{a}/pruned", "inside input {a}"]),
    case("prune-output-contains-input-with-force", ["prune", "{a}", "--keep", "0.5", "-o", "{ws}", "--force"], 2,
         ["output {ws} contains input {a}"]),
    case("prune-read-only-output-location", ["prune", "{a}", "--keep", "0.5", "-o", "{ws}/ro/out"], 1,
         ["{ws}/ro", "permission denied"], readonly_parent),
    # --- merge
    case("merge-single-checkpoint", ["merge", "{a}", "-o", "{out}"], 2, ["at least two checkpoints, got 1"]),
    case("merge-path-does-not-exist", ["merge", "{a}", "{ws}/nothing", "-o", "{out}"], 1, ["{ws}/nothing"]),
    case("merge-different-base-models", ["merge", "{a}", "{b}", "-o", "{out}"], 1,
         ["{a}", "{b}", "different base models"], second_input("other-base-rte")),
    case("merge-mismatched-shapes", ["merge", "{a}", "{b}", "-o", "{out}"], 1,
         ["'bert.encoder.layer.0.attention.self.query.weight'", "shape [8, 8] in {a}", "[4, 8] in {b}"],
         second_input("shape-rte")),
    case("merge-mismatched-key-sets", ["merge", "{a}", "{b}", "-o", "{out}"], 1,
         ["'bert.encoder.layer.0.attention.self.query.weight' is in {a} but not in {b}"], second_input("keys-rte")),
    case("merge-same-task-twice", ["merge", "{a}", "{b}", "-o", "{out}"], 1, ["task 'mrpc'", "{a}", "{b}"],
         same_task_twice),
    *[case(f"merge-keep-{keep}", ["merge", "{a}", "{b}", "--keep", keep, "-o", "{out}"], 2, [f"keep={float(keep)}"])
      for keep in ("0", "-0.1", "1.5")],
    case("merge-unknown-method", ["merge", "{a}", "{b}", "--method", "avrage", "-o", "{out}"], 2,
         ["'avrage'", "did you mean 'average'"]),
    case("merge-curvature-without-stats", ["merge", "{a}", "{b}", "-o", "{out}"], 1,
         ["{a}", "no stats.safetensors", "exp_avg_sq_row/", "merge method umtam"], no_stats),
    case("merge-stats-with-nan", ["merge", "{a}", "{b}", "-o", "{out}"], 1,
         ["{a}", "statistic 'exp_avg_sq_col/bert.encoder.", "NaN or infinite"], stats_with_nan),
    case("merge-garbage-weights", ["merge", "{a}", "{b}", "-o", "{out}"], 1,
         ["{a}/model.safetensors", "not a readable safetensors file"], garbage_weights),
    case("merge-plain-hf-input-garbage-weights",
         ["merge", "{a}", "{ws}/hf-model", "--method", "average", "--base", "{base}", "-o", "{out}"], 1,
         ["{ws}/hf-model/model.safetensors", "not a readable safetensors file"], plain_model_with_garbage_weights),
    case("merge-output-exists", ["merge", "{a}", "{b}", "-o", "{out}"], 2, ["{out} already exists"], existing_output),
    case("merge-output-inside-input", ["merge", "{a}", "{b}", "-o", "{b}/merged"], 2, ["inside input {b}"]),
    # --- eval
    case("eval-path-does-not-exist", ["eval", "{ws}/nothing"], 1, ["{ws}/nothing", "no such checkpoint"]),
    case("eval-unknown-task", ["eval", "{a}", "--task", "mrpx", "--data-dir", "{glue}"], 2,
         ["{a}", "no head for task(s) mrpx"]),
    case("eval-batch-size-0", ["eval", "{a}", "--batch-size", "0", "--data-dir", "{glue}"], 2,
         ["--batch-size", "got 0"]),
    case("eval-empty-data-file", ["eval", "{a}", "--data-dir", "{glue}"], 1, ["{glue}/MRPC/dev.tsv is empty"],
         data_file("dev.tsv", lambda lines: [])),
    case("eval-data-file-missing-columns", ["eval", "{a}", "--data-dir", "{glue}"], 1,
         ["{glue}/MRPC/dev.tsv", "no column '#1 String'"], data_file("dev.tsv", _header_without_text)),
    case("eval-label-out-of-range", ["eval", "{a}", "--data-dir", "{glue}"], 1,
         ["{glue}/MRPC/dev.tsv:3", "label '7'"], data_file("dev.tsv", _label_seven)),
    case("eval-weights-missing-a-tensor", ["eval", "{a}", "--data-dir", "{glue}"], 1,
         ["{a}/model.safetensors", "'classifier.bias'"], weights_without("classifier.bias")),
    case("eval-config-not-json", ["eval", "{a}", "--data-dir", "{glue}"], 1, ["{a}/config.json", "not valid JSON"],
         edited_config),
    case("eval-tokenizer-files-missing", ["eval", "{a}", "--data-dir", "{glue}"], 1,
         ["cannot load model '{a}'", "no vocabulary beyond its", "tokenizer files missing from {a}",
          "copies config.json and the tokenizer files into every checkpoint"],
         no_tokenizer_files),
    case("eval-expert-metrics-lack-f1", ["eval", "{a}", "--data-dir", "{glue}"], 1,
         ["{a}/umtam.json", "tasks.mrpc.expert_metrics", "lack f1"], expert_metrics_without_f1),
]


def run_bad_case(env, args, code, names, build) -> tuple[dict, dict]:
    """Build the case, run the CLI, check its one-line error; the workspace before and after, to compare."""
    if build is not None:
        build(env)
    before = snapshot(env.ws)
    got, stdout, stderr = run_cli(*[env.fill(arg) for arg in args])
    lines = stderr.strip().splitlines()
    assert (got, len(lines)) == (code, 1), stderr
    assert lines[0].startswith("umtam: error: ") and "Traceback" not in stderr
    for name in names:
        assert env.fill(name) in lines[0]
    assert stdout == ""
    return before, snapshot(env.ws)


@pytest.mark.parametrize("args, code, names, build", CASES)
def test_bad_input(env, args, code, names, build):
    before, after = run_bad_case(env, args, code, names, build)
    assert unchanged_but_for_streaming(args, before, after)


# ----------------------------------------------------------------------------- --force, and the real process


@pytest.mark.parametrize("command", [
    ["prune", "{a}", "--keep", "0.5", "-o", "{out}", "--force", "--json"],
    ["merge", "{a}", "{b}", "--method", "average", "-o", "{out}", "--force", "--json"],
])
def test_force_replaces_an_existing_output(env, command):
    existing_output(env)
    replaced = json.loads((env.path("out") / "umtam.json").read_text())
    code, stdout, stderr = run_cli(*[env.fill(arg) for arg in command])
    assert code == 0, stderr
    written = load_checkpoint(env.path("out"))
    assert written.kind == command[0] and replaced["kind"] == "train"
    assert json.loads(stdout)["output"] == str(env.path("out"))
    assert sorted(p.name for p in env.ws.iterdir()) == ["a", "b", "glue", "out"]  # no staging or retired copy


def test_an_unwritable_location_is_refused_even_where_permissions_are_ignored(env, monkeypatch):
    # The read-only cases skip as root; this one stands in for them anywhere: the OS refuses writes.
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: not mode & os.W_OK and real_access(path, mode))
    before = snapshot(env.ws)
    code, _, stderr = run_cli("prune", str(env.a), "--keep", "0.5", "-o", str(env.ws / "out"))
    assert (code, stderr) == (1, f"umtam: error: output {env.ws / 'out'}: cannot write to {env.ws} "
                                 "(permission denied)\n")
    assert snapshot(env.ws) == before


def test_the_installed_command_prints_one_line_too(env):
    # In a real process nothing the harness swaps out can hide a warning or a log line.
    garbage_weights(env)
    result = subprocess.run([sys.executable, "-m", "umtam_cli", "inspect", str(env.a)], capture_output=True,
                            text=True, env={**os.environ, "PYTHONWARNINGS": "default"})
    assert result.returncode == 1 and result.stdout == ""
    # "this is " read as the header length is far above the binding's 100 MB cap
    assert result.stderr.splitlines() == [
        f"umtam: error: {env.a}/model.safetensors: not a readable safetensors file "
        f"(Error while deserializing header: header too large)"]
