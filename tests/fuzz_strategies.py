"""Mutated checkpoints for fuzzing umtam's loaders: the one copy of the fuzz strategies.

Used by tests/test_fuzz.py (hypothesis, with ``st.randoms()`` so failures shrink)
and bench/fuzz.py (thousands of cases from ``random.Random(seed)``). Every
mutation takes a ``random.Random``-like ``rng`` and returns new bytes or a new
document; nothing here knows which driver calls it.

A case copies a small valid checkpoint (``write_seed_checkpoint``), mutates one
of its files (the sidecar, model.safetensors or stats.safetensors) and usually
re-hashes the sidecar, so that the mutation gets past the sha256 check and
reaches the parsers behind it. ``exercise`` then reads the case the way
inspect, prune, merge and eval do. The property under test: it either succeeds
or raises umtam's own UmtamError; any other exception is a bug.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import math
import shutil
import struct
from pathlib import Path
from typing import Any, Callable

import torch

from umtam.checkpoint import MODEL_FILE, SIDECAR_FILE, STATS_FILE, load_checkpoint, write_checkpoint
from umtam.safetensors_io import TORCH_DTYPES as SAFETENSORS_DTYPES
from umtam.errors import UmtamError

TARGETS = ("sidecar", "model", "stats")

# ----------------------------------------------------------------------------- the seed checkpoint

SEED_SIDECAR = {
    "kind": "train",
    "tasks": {"mrpc": {"label_names": ["not_equivalent", "equivalent"], "is_regression": False,
                       "metrics": {"validation": {"accuracy": 0.75, "f1": 0.8}}, "holdout_metrics": None}},
    "base_model": {"reference": "tiny-base", "location": "/nonexistent/tiny-base", "origin": "directory",
                   "fingerprint": "ab" * 32, "init_seed": 0},
    "optimizer": {"name": "umtam", "hyperparameters": {"lr": 2e-4, "rank": 2}, "state_bytes": 1024},
    "steps": 6, "seed": 7, "peak_rss_bytes": 10_000_000, "peak_gpu_bytes": None, "seconds_per_step": 0.1,
    "lineage": {"inputs": [], "operation": "train"},
}


# What a prune and a merge write instead (kind, lineage, merged task records), so the
# mutations also reach the fields only those kinds have.
PRUNE_FIELDS = {
    "kind": "prune",
    "lineage": {"inputs": [{"path": "/runs/mrpc", "sha256": "cd" * 32}], "threshold": 1.5e-9, "kept_fraction": 0.1,
                "method": {"keep": 0.1, "score": "curvature", "scope": "global"}},
}
MERGE_FIELDS = {
    "kind": "merge",
    "tasks": {task: {"label_names": ["a", "b"], "is_regression": False, "metrics": {},
                     "expert_metrics": {"validation": {"accuracy": 0.7}}} for task in ("mrpc", "sst2")},
    "lineage": {"inputs": [{"path": f"/runs/{task}", "sha256": "ef" * 32, "tasks": [task]} for task in ("mrpc", "sst2")],
                "method": "umtam", "method_url": "https://arxiv.org/abs/2512.17109", "options": {"keep": 0.2},
                "thresholds": {"mrpc": 1e-9, "sst2": 2e-9}},
}


def seed_tensors() -> dict[str, torch.Tensor]:
    """A few tensors of several dtypes and ranks (a head key among them), a few hundred bytes in all."""
    generator = torch.Generator().manual_seed(0)
    return {
        "bert.encoder.layer.0.attention.self.query.weight": torch.randn(4, 3, generator=generator),
        "bert.encoder.layer.0.attention.self.query.bias": torch.randn(4, generator=generator).half(),
        "bert.embeddings.position_ids": torch.arange(5),
        "classifier.weight": torch.randn(2, 3, generator=generator).to(torch.bfloat16),
        "mask": torch.tensor([True, False, True]),
    }


def seed_stats() -> dict[str, torch.Tensor]:
    name = "bert.encoder.layer.0.attention.self.query"
    return {f"exp_avg_sq_row/{name}.weight": torch.full((4,), 1e-4), f"exp_avg_sq_col/{name}.weight": torch.ones(3),
            f"exp_avg_sq/{name}.bias": torch.full((4,), 2e-4)}


def write_seed_checkpoint(directory: Path) -> Path:
    """The valid checkpoint every case starts from."""
    write_checkpoint(directory, tensors=seed_tensors(), stats=seed_stats(), sidecar=copy.deepcopy(SEED_SIDECAR),
                     extra_files={"config.json": b'{"model_type": "bert"}'})
    return directory


# ----------------------------------------------------------------------------- random values

_TEXT_PIECES = ["", "a", "mrpc", "model.safetensors", "../escape", "/etc/passwd", "a/b", "\x00", "\n", "é",
                "\U0001f600", "\ud800", "F32", "NaN", "{", "]", " ", "\\", "heads/", "0" * 64]
_NUMBERS = [0, 1, -1, 2, 7, 255, 2**31, 2**32 + 1, 2**53 + 1, 2**63 - 1, 2**63, 2**64, 10**30, -(2**63),
            0.5, -0.0, 1e308, math.inf, -math.inf, math.nan, True, False]


def random_text(rng) -> str:
    if rng.random() < 0.5:
        return rng.choice(_TEXT_PIECES)
    return "".join(rng.choice(_TEXT_PIECES) for _ in range(rng.randint(1, 4)))


def random_scalar(rng) -> Any:
    kind = rng.randint(0, 4)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice(_NUMBERS)
    if kind == 2:
        return rng.randint(-(2**66), 2**66)
    if kind == 3:
        return rng.uniform(-1e6, 1e6)
    return random_text(rng)


def random_json(rng, depth: int = 0) -> Any:
    """Any JSON value (NaN and infinities included), a few levels deep."""
    kind = rng.randint(0, 5) if depth < 3 else 0
    if kind <= 2:
        return random_scalar(rng)
    if kind == 3:
        return [random_json(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {random_text(rng): random_json(rng, depth + 1) for _ in range(rng.randint(0, 3))}


def deep_nesting(rng) -> Any:
    """Nesting far past Python's recursion limit once serialised and parsed again."""
    value: Any = rng.choice([1, "x", None])
    for _ in range(rng.choice([50, 2_000, 20_000])):
        value = [value] if rng.random() < 0.5 else {"k": value}
    return value


# ----------------------------------------------------------------------------- JSON tree edits


def json_slots(document: Any) -> list[tuple[Any, Any]]:
    """(container, key) for every value inside ``document``, depth first."""
    slots, stack = [], [document]
    while stack:
        node = stack.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, value in items:
            slots.append((node, key))
            stack.append(value)
    return slots


def _pick_slot(rng, document: Any, accept: Callable[[Any], bool] = lambda value: True):
    slots = [(node, key) for node, key in json_slots(document) if accept(node[key])]
    return rng.choice(slots) if slots else None


def drop_key(rng, document: Any) -> Any:
    slot = _pick_slot(rng, document)
    if slot is not None:
        node, key = slot
        del node[key]
    return document


def wrong_type(rng, document: Any) -> Any:
    slot = _pick_slot(rng, document)
    if slot is not None:
        node, key = slot
        node[key] = random_json(rng)
    return document


def mutate_string(rng, document: Any) -> Any:
    slot = _pick_slot(rng, document, lambda value: isinstance(value, str))
    if slot is not None:
        node, key = slot
        text = node[key]
        edit = rng.randint(0, 3)
        if edit == 0:
            node[key] = text[: rng.randint(0, len(text))]
        elif edit == 1:
            cut = rng.randint(0, len(text))
            node[key] = text[:cut] + random_text(rng) + text[cut:]
        elif edit == 2:
            node[key] = random_text(rng)
        else:
            node[key] = text * rng.choice([2, 1000])
    return document


def mutate_number(rng, document: Any) -> Any:
    slot = _pick_slot(rng, document, lambda value: isinstance(value, (int, float)))
    if slot is not None:
        node, key = slot
        node[key] = rng.choice(_NUMBERS) if rng.random() < 0.7 else -node[key]
    return document


def rename_key(rng, document: Any) -> Any:
    slot = _pick_slot(rng, document)
    if slot is not None and isinstance(slot[0], dict):
        node, key = slot
        node[random_text(rng)] = node.pop(key)
    return document


def add_garbage(rng, document: Any) -> Any:
    """A new key (or list item) holding random or absurdly nested garbage."""
    containers = [document] + [node[key] for node, key in json_slots(document)
                               if isinstance(node[key], (dict, list))]
    target = rng.choice(containers) if containers and isinstance(document, (dict, list)) else None
    garbage = deep_nesting(rng) if rng.random() < 0.2 else random_json(rng)
    if isinstance(target, dict):
        target[random_text(rng)] = garbage
    elif isinstance(target, list):
        target.append(garbage)
    return document


def replace_document(rng, document: Any) -> Any:
    return random_json(rng)


# One value of each JSON type: a field holding any of them but its own type is a type error.
TYPE_SWAPS = (None, True, 0, -1, 1.5, "x", [], {}, ["x"], {"x": 1})


def other_types(value: Any) -> list[Any]:
    return [copy.deepcopy(swap) for swap in TYPE_SWAPS if type(swap) is not type(value)]


def type_swap(rng, document: Any) -> Any:
    slot = _pick_slot(rng, document)
    if slot is not None:
        node, key = slot
        node[key] = rng.choice(other_types(node[key]))
    return document


JSON_EDITS = (drop_key, wrong_type, type_swap, mutate_string, mutate_number, rename_key, add_garbage,
              replace_document)


def mutate_json(rng, document: Any, edits=JSON_EDITS) -> Any:
    """One to three edits; one alone half the time, so a single bad field is not hidden behind another."""
    document = copy.deepcopy(document)
    for _ in range(1 if rng.random() < 0.5 else rng.randint(2, 3)):
        document = rng.choice(edits)(rng, document)
    return document


_DELETED = object()


def single_point_mutations(document: Any):
    """Every value in ``document`` deleted, or replaced by each value of another JSON type, one at a time.

    Yields (where, mutated document): the exhaustive, deterministic companion of
    the random edits, which rarely hit one particular field of a large sidecar.
    """
    for index, (node, key) in enumerate(json_slots(document)):
        for replacement in (_DELETED, *other_types(node[key])):
            mutated = copy.deepcopy(document)
            target, target_key = json_slots(mutated)[index]  # the same walk over an equal copy
            if replacement is _DELETED:
                del target[target_key]
            else:
                target[target_key] = replacement
            yield f"{key!r} -> {'deleted' if replacement is _DELETED else repr(replacement)}", mutated


def sidecar_variants(seed_dir: Path) -> dict[str, dict]:
    """The seed checkpoint's sidecar as train, prune and merge write it."""
    written = json.loads((seed_dir / SIDECAR_FILE).read_text())
    return {"train": written, "prune": {**written, **PRUNE_FIELDS}, "merge": {**written, **MERGE_FIELDS}}


def inspect_sidecar(seed_dir: Path, sidecar: Any) -> None:
    """What inspect does with a sidecar (validate, summarise, draw), without writing it to disk."""
    from umtam.checkpoint import Checkpoint
    from umtam.sidecar import validate_sidecar
    from umtam.summary import summarize
    from umtam_cli.cmd_inspect import render_summary

    summary = summarize(Checkpoint(seed_dir, validate_sidecar(sidecar, seed_dir / SIDECAR_FILE)))
    with contextlib.redirect_stdout(io.StringIO()):
        render_summary(summary)


def dump_json(rng, document: Any) -> bytes:
    """Serialise, sometimes spelled in ways a strict reader refuses (NaN, surrogates, no ASCII escaping)."""
    try:
        text = json.dumps(document, ensure_ascii=rng.random() < 0.7)
    except RecursionError:
        text = "[" * 100_000 + "]" * 100_000
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate with ensure_ascii off
        return text.encode("utf-8", "surrogatepass")


# ----------------------------------------------------------------------------- byte edits


def random_bytes(rng, blob: bytes) -> bytes:
    return rng.randbytes(rng.choice([0, 1, 7, 8, 9, 64, 300]))


def truncate(rng, blob: bytes) -> bytes:
    return blob[: rng.randint(0, max(len(blob) - 1, 0))]


def flip_bytes(rng, blob: bytes, start: int = 0, stop: int | None = None) -> bytes:
    stop = len(blob) if stop is None else stop
    if stop <= start:
        return blob
    data = bytearray(blob)
    for _ in range(rng.randint(1, 4)):
        data[rng.randrange(start, stop)] ^= 1 << rng.randint(0, 7)
    return bytes(data)


def append_bytes(rng, blob: bytes) -> bytes:
    return blob + rng.randbytes(rng.randint(1, 16))


BYTE_EDITS = (random_bytes, truncate, flip_bytes, append_bytes)


def mutate_sidecar(rng, sidecar: dict) -> bytes:
    """A sidecar file (as train, prune or merge write it): usually mutated structurally, sometimes as text."""
    sidecar = {**sidecar, **rng.choice([{}, PRUNE_FIELDS, MERGE_FIELDS])}
    if rng.random() < 0.8:
        return dump_json(rng, mutate_json(rng, sidecar))
    return rng.choice(BYTE_EDITS)(rng, json.dumps(sidecar).encode())


# ----------------------------------------------------------------------------- safetensors


def split_safetensors(blob: bytes) -> tuple[dict, bytes]:
    """(header, data section) of a well-formed file."""
    length = struct.unpack("<Q", blob[:8])[0]
    return json.loads(blob[8 : 8 + length]), blob[8 + length :]


def join_safetensors(rng, header: Any, data: bytes) -> bytes:
    raw = dump_json(rng, header)
    if rng.random() < 0.5:  # the writer pads with spaces to 8 bytes; so may a forger
        raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


def _tensor_infos(header: dict) -> list[dict]:
    return [info for name, info in header.items() if name != "__metadata__" and isinstance(info, dict)]


def _one_info(rng, header: dict) -> list[dict]:
    infos = _tensor_infos(header)
    return [rng.choice(infos)] if infos else []


def wrong_dtype(rng, header: dict) -> dict:
    for info in _one_info(rng, header):
        info["dtype"] = rng.choice([*SAFETENSORS_DTYPES, "F4", "C64", "f32", "", "F8_E8M0", 4, None])
    return header


def wrong_shape(rng, header: dict) -> dict:
    for info in _one_info(rng, header):
        shape = list(info["shape"])
        edit = rng.randint(0, 4)
        if edit == 0 and shape:
            shape[rng.randrange(len(shape))] += rng.choice([-1, 1, 2**40])
        elif edit == 1:
            shape.append(rng.choice([0, 1, 2, 2**63, 2**64]))
        elif edit == 2:
            shape = [0, 2**62] if rng.random() < 0.5 else [2**40, 2**40, 0]
        elif edit == 3 and shape:
            shape[rng.randrange(len(shape))] = rng.choice([-1, 1.0, True, "2", None, 2**63])
        else:
            shape = random_json(rng)
        info["shape"] = shape
    return header


def wrong_offsets(rng, header: dict) -> dict:
    infos = _tensor_infos(header)
    if not infos:
        return header
    info = rng.choice(infos)
    begin, end = info["data_offsets"]
    edit = rng.randint(0, 5)
    if edit == 0:
        info["data_offsets"] = [begin + rng.choice([-1, 1, 4]), end]
    elif edit == 1:
        info["data_offsets"] = [begin, end + rng.choice([-1, 1, 2**63, 2**64 + 3])]
    elif edit == 2:
        info["data_offsets"] = [end, begin]
    elif edit == 3 and len(infos) > 1:  # overlap: start where another tensor starts
        other = rng.choice([i for i in infos if i is not info])
        size = end - begin
        info["data_offsets"] = [other["data_offsets"][0], other["data_offsets"][0] + size]
    elif edit == 4:
        info["data_offsets"] = rng.choice([[0], [0, 1, 2], [-8, 0], [0.0, 4.0], "0,4", None, [2**63, 2**63 + 4]])
    else:
        info["data_offsets"] = [begin, begin + 2**40]  # a huge length, with a matching huge shape
        info["shape"] = [2**40 // SAFETENSORS_DTYPES.get(info.get("dtype"), 1)]
    return header


def swap_tensors(rng, header: dict) -> dict:
    infos = _tensor_infos(header)
    if len(infos) > 1:
        first, second = rng.sample(infos, 2)
        first["data_offsets"], second["data_offsets"] = second["data_offsets"], first["data_offsets"]
    return header


def wrong_metadata(rng, header: dict) -> dict:
    header["__metadata__"] = rng.choice([None, {}, {"format": "pt"}, {"format": 1}, [], "pt", random_json(rng)])
    return header


def json_garbage(rng, header: dict) -> Any:
    return mutate_json(rng, header)


HEADER_EDITS = (wrong_dtype, wrong_shape, wrong_offsets, swap_tensors, wrong_metadata, json_garbage)


def wrong_header_length(rng, blob: bytes) -> bytes:
    length = rng.choice([0, 1, 2, len(blob) - 8, len(blob) - 7, len(blob) + 100, 2**31, 2**63, 2**64 - 1,
                         rng.getrandbits(64)])
    return struct.pack("<Q", length % 2**64) + blob[8:]


def duplicate_key(rng, blob: bytes) -> bytes:
    """The first tensor listed twice: JSON parsers disagree on which copy wins."""
    header, data = split_safetensors(blob)
    raw = json.dumps(header)
    name = rng.choice([key for key in header if key != "__metadata__"])
    entry = f"{json.dumps(name)}: {json.dumps(header[name])}"
    raw = "{" + entry + ", " + raw[1:]
    return struct.pack("<Q", len(raw)) + raw.encode() + data


def leading_space(rng, blob: bytes) -> bytes:
    header, data = split_safetensors(blob)
    raw = b" " + json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def mutate_header(rng, blob: bytes) -> bytes:
    header, data = split_safetensors(blob)
    edited = rng.choice(HEADER_EDITS)(rng, header)
    if rng.random() < 0.2:
        data = rng.choice(BYTE_EDITS)(rng, data)
    return join_safetensors(rng, edited, data)


def flip_header_bytes(rng, blob: bytes) -> bytes:
    length = struct.unpack("<Q", blob[:8])[0]
    return flip_bytes(rng, blob, 8, 8 + length)


def flip_data_bytes(rng, blob: bytes) -> bytes:
    """Damage inside the data section: still a well-formed file (the hash is what catches it)."""
    length = struct.unpack("<Q", blob[:8])[0]
    return flip_bytes(rng, blob, 8 + length, len(blob))


SAFETENSORS_EDITS = (random_bytes, truncate, append_bytes, wrong_header_length, mutate_header, mutate_header,
                     mutate_header, duplicate_key, leading_space, flip_header_bytes, flip_data_bytes)


def mutate_safetensors(rng, blob: bytes) -> bytes:
    return rng.choice(SAFETENSORS_EDITS)(rng, blob)


# ----------------------------------------------------------------------------- cases


def rehash(case_dir: Path, name: str) -> None:
    """Record ``name``'s current sha256 in the sidecar, so the mutation passes the hash check."""
    sidecar_path = case_dir / SIDECAR_FILE
    sidecar = json.loads(sidecar_path.read_text())
    sidecar["files"][name]["sha256"] = hashlib.sha256((case_dir / name).read_bytes()).hexdigest()
    sidecar_path.write_text(json.dumps(sidecar))


def make_case(rng, seed_dir: Path, case_dir: Path, target: str | None = None) -> str:
    """Copy the seed checkpoint to ``case_dir`` and mutate one file; return which ("sidecar", ...)."""
    shutil.copytree(seed_dir, case_dir)
    target = target or rng.choice(TARGETS)
    if target == "sidecar":
        sidecar = json.loads((case_dir / SIDECAR_FILE).read_text())
        (case_dir / SIDECAR_FILE).write_bytes(mutate_sidecar(rng, sidecar))
        return target
    name = MODEL_FILE if target == "model" else STATS_FILE
    (case_dir / name).write_bytes(mutate_safetensors(rng, (case_dir / name).read_bytes()))
    if rng.random() < 0.9:
        rehash(case_dir, name)
    return target


def read_as_inspect(case_dir: Path) -> None:
    """inspect: the sidecar, the headers' shapes, and the table drawn from them."""
    from umtam.summary import summarize
    from umtam_cli.cmd_inspect import render_summary

    summary = summarize(load_checkpoint(case_dir))
    with contextlib.redirect_stdout(io.StringIO()):
        render_summary(summary)


def read_as_merge(case_dir: Path) -> None:
    """merge: the engine hands the files load_checkpoint accepted to safe_open, unwrapped,
    so a header the validator let through must be readable by it."""
    from safetensors import safe_open

    checkpoint = load_checkpoint(case_dir)
    for path in filter(None, (checkpoint.model_file, checkpoint.stats_file)):
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                handle.get_slice(key).get_shape()
                handle.get_tensor(key)


def read_as_prune_or_eval(case_dir: Path) -> None:
    """prune and eval: every tensor of the weights and statistics, loaded whole."""
    checkpoint = load_checkpoint(case_dir)
    checkpoint.load_tensors()
    checkpoint.load_stats()


READERS = {"inspect": read_as_inspect, "merge": read_as_merge, "prune/eval": read_as_prune_or_eval}


def exercise(case_dir: Path) -> dict[str, str]:
    """Each reader's outcome: "ok" or the UmtamError class it raised; any other exception propagates."""
    outcomes = {}
    for name, reader in READERS.items():
        try:
            reader(case_dir)
            outcomes[name] = "ok"
        except UmtamError as error:
            outcomes[name] = type(error).__name__
    return outcomes


def case_outcome(outcomes: dict[str, str]) -> str:
    """"ok" when every reader succeeded, else the UmtamError classes raised ("CheckpointError")."""
    return "+".join(sorted({outcome for outcome in outcomes.values() if outcome != "ok"})) or "ok"


def run_case(rng, seed_dir: Path, case_dir: Path, target: str | None = None) -> tuple[str, str]:
    """(target, outcome) of one mutated checkpoint; any exception but UmtamError propagates."""
    target = make_case(rng, seed_dir, case_dir, target)
    return target, case_outcome(exercise(case_dir))
