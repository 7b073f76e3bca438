"""Hugging Face interop: plain transformers directories in, per-task configs out.

In: a plain Hugging Face directory (config.json + model.safetensors or sharded
weights, no umtam.json), such as a model fine-tuned with the Trainer, can be a
merge input.
``open_input`` wraps it as a Checkpoint whose sidecar is made up in memory and
marked ``"format": "huggingface"``: one task, no statistics, no metrics, and no
base fingerprint, because nothing in the directory records which weights it
was fine-tuned from. The merge engine therefore asks for ``--base`` and checks
the input against that base itself (engine._check_plain_against_base). Weights
are read from safetensors only: a directory holding pytorch_model.bin or
another pickle is refused, never unpickled. Every file taken from such a
directory (and the tokenizer files taken from a local ``--base``) must be a
regular file, a symbolic link only to a file beside it (umtam.atomic
``check_regular_file``): a Hugging Face cache snapshot, whose files link into
``../../blobs``, is refused; copy it first (``cp -rL``).

Out: a merged checkpoint holds one encoder and one head per task under
``heads/<task>/``. Beside config.json (the first input's) it carries
``config.<task>.json``, the sequence-classification config of each task, so
that transformers alone (4.50 or newer, for ``key_mapping``) loads the encoder
with one task's head:

    config = AutoConfig.from_pretrained("merged/config.mnli.json")
    model = AutoModelForSequenceClassification.from_pretrained(
        "merged/", config=config, key_mapping={"^heads/mnli/": ""})
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from umtam.atomic import FileIdentity, check_regular_file, hash_identified, in_background, is_write_leftover
from umtam.checkpoint import INDEX_FILE, MODEL_FILE, SIDECAR_FILE, Checkpoint, load_checkpoint
from umtam.errors import CheckpointError, ConfigError, first_line
from umtam.shards import open_weights, weight_files
from umtam.sidecar import PLAIN_FORMAT, SCHEMA_VERSION, make_sidecar
from umtam.tasks import get_task, is_language_key

CONFIG_FILE = "config.json"
# What save_pretrained writes for the tokenizers of encoder models; only these are
# carried from a plain directory (not training_args.bin, optimizer.pt and the like).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.txt", "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model", "tokenizer.model",
    "chat_template.jinja", "chat_template.json", "generation_config.json",
)
# Weight files that are pickles: named in the refusal instead of being read.
_PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5", "model.ckpt.index",
                    "flax_model.msgpack")
# Config fields that describe one task's head; a per-task config sets them anew.
_TASK_FIELDS = ("id2label", "label2id", "num_labels", "_num_labels", "problem_type", "finetuning_task")


# ----------------------------------------------------------------------------- in


def is_plain_hf_dir(path: str | Path) -> bool:
    """A directory with a config.json and no umtam sidecar, and not the staging directory of a write.

    An interrupted write's ``.<name>.tmp-*`` holds config.json before its
    sidecar; it goes to load_checkpoint, which refuses it by name.
    """
    directory = Path(path)
    return (not is_write_leftover(directory) and directory.is_dir() and (directory / CONFIG_FILE).is_file()
            and not (directory / SIDECAR_FILE).exists())


def open_inputs(inputs: Sequence[str | Path | Checkpoint], task_names: Sequence[str] | None = None,
                *, hash_later: bool = False) -> list[Checkpoint]:
    """Checkpoints for merge inputs; plain Hugging Face directories take ``task_names`` in order.

    ``task_names`` holds one name per plain input, in the order the inputs are
    given; without it each plain input's config.json ``finetuning_task`` (which
    transformers' run_glue.py sets) names its task. ``hash_later`` as open_plain_hf's.
    """
    plain = [item for item in inputs if not isinstance(item, Checkpoint) and is_plain_hf_dir(item)]
    names = list(task_names or [])
    if names and len(names) != len(plain):
        listed = ", ".join(str(item) for item in plain) or "none"
        raise ConfigError(
            f"{len(names)} task name(s) given for {len(plain)} plain Hugging Face input(s) ({listed})",
            hint="give one task name per plain input, in input order",
        )
    remaining = iter(names)
    short = dict(zip(map(str, plain), distinct_names([Path(item) for item in plain])))
    return [_open_one(item, remaining, short, hash_later) for item in inputs]


def _open_one(item: str | Path | Checkpoint, task_names, short_names: Mapping[str, str],
              hash_later: bool) -> Checkpoint:
    if isinstance(item, Checkpoint):
        return item
    if is_plain_hf_dir(item):
        return open_plain_hf(item, next(task_names, None), default_name=short_names.get(str(item)),
                             hash_later=hash_later)
    return load_checkpoint(item)


def distinct_names(paths: Sequence[Path]) -> list[str]:
    """Each path's last components, as few as keep the names apart: run1/out/checkpoint-5 -> run1-out-checkpoint-5.

    Trainer checkpoints are all called checkpoint-N; their runs tell them apart.
    """
    parts = [path.resolve().parts for path in paths]
    for width in range(1, max((len(p) for p in parts), default=1) + 1):
        names = ["-".join(p[-width:]).lstrip("/-") or "model" for p in parts]
        if len(set(names)) == len(names):
            return names
    return [f"{name}-{index}" for index, name in enumerate(names, 1)]


def open_plain_hf(path: str | Path, task: str | None = None, *, default_name: str | None = None,
                  hash_later: bool = False) -> Checkpoint:
    """A plain Hugging Face directory as a one-task Checkpoint (sidecar made up, not written).

    Its weights are model.safetensors or sharded (umtam.shards). Its task is
    ``task``, else config.json's ``finetuning_task``, else, for a causal LM,
    ``lm:<default_name>`` (the directory name when not given). A Trainer checkpoint directory's optimizer.pt
    (Adam-like) supplies its statistics (umtam.adam_import), read only if the
    merge method asks for them. With ``hash_later`` the files are hashed on a
    background thread while the caller works (a merge reads them meanwhile,
    each read guarded by the identity recorded here); ``Checkpoint.settle``
    waits for the digests and refuses a file that changed.
    """
    from umtam.adam_import import OPTIMIZER_FILE, ImportedStats

    directory = Path(path)
    _check_weights_file(directory)
    weights = weight_files(directory)  # an index naming a missing shard is refused here
    optimizer = [OPTIMIZER_FILE] if (directory / OPTIMIZER_FILE).is_file() else []
    files = [CONFIG_FILE, *weights, *optimizer, *(name for name in TOKENIZER_FILES if (directory / name).is_file())]
    # Checked and hashed (or, hash_later, identified now and hashed beside the work) before anything reads
    # them, so what is read is what the lineage records.
    pending = None
    if hash_later:
        identified = {name: FileIdentity.of(check_regular_file(directory / name)) for name in files}
        hashed = {name: (_PENDING, identity) for name, identity in identified.items()}
        pending = in_background(lambda: {name: hash_identified(directory / name) for name in files})
    else:
        hashed = {name: hash_identified(directory / name) for name in files}
    with open_weights(directory):  # garbage is a CheckpointError, not a traceback
        pass
    config = read_config(directory / CONFIG_FILE)
    key, record = _plain_task(directory, config, task or config.get("finetuning_task"), default_name)
    sidecar = {
        "schema_version": SCHEMA_VERSION,
        "kind": "train",  # a one-task fine-tuned model, as far as a merge is concerned
        "format": PLAIN_FORMAT,
        "tasks": {key: record},
        # Nothing records the base of a plain directory; the merge checks it against --base.
        "base_model": {"fingerprint": None},
        "files": {name: {"sha256": digest, "bytes": identity.size} for name, (digest, identity) in hashed.items()},
    }
    if optimizer:
        sidecar["optimizer"] = {"name": f"{OPTIMIZER_FILE} (Adam-like, imported)"}
    identities = {name: identity for name, (_, identity) in hashed.items()}
    imported = ImportedStats(directory, config) if optimizer else None
    return Checkpoint(directory, make_sidecar(sidecar, directory), identities, imported_stats=imported,
                      pending_hashes=pending)


_PENDING = "0" * 64  # the sha256 a plain input's sidecar lists until Checkpoint.settle() puts the real one


def _plain_task(directory: Path, config: Mapping[str, Any], task: str | None,
                default_name: str | None = None) -> tuple[str, dict[str, Any]]:
    """(task key, task record) of a plain input: a GLUE task's labels, or a language task's none."""
    from umtam.tasks import TASKS, is_language_key, language_task_key

    architectures = config.get("architectures") or []
    if task is None and any(str(name).endswith("ForCausalLM") for name in architectures):
        task = "lm"  # a plain causal LM: language modelling on text it does not record
    if task is not None and (is_language_key(task) or task in TASKS and TASKS.get(task).kind == "language"):
        name = re.sub(r"[^A-Za-z0-9_.-]+", "-", default_name or directory.name)
        key = task if is_language_key(task) else language_task_key(TASKS.get(task).name, name)
        return key, {"label_names": [], "is_regression": False, "metrics": {}}
    spec = _task_spec(directory, task)
    return spec.name, {"label_names": _label_names(directory, config, spec), "is_regression": spec.is_regression,
                       "metrics": {}}


def _check_weights_file(directory: Path) -> None:
    if (directory / MODEL_FILE).is_file() or (directory / INDEX_FILE).is_file():
        return
    pickled = [name for name in _PICKLED_WEIGHTS if (directory / name).is_file()]
    found = f"it holds {', '.join(pickled)}, which umtam does not read" if pickled else "no weights found"
    raise CheckpointError(
        f"{directory}: a plain Hugging Face directory needs {MODEL_FILE} or {INDEX_FILE} ({found})",
        hint="umtam reads safetensors only; re-save it with save_pretrained(dir), "
             "which writes safetensors by default since transformers 4.35",
    )


def read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not a readable JSON config ({first_line(exc)})") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: the config must be a JSON object")
    return config


def _task_spec(directory: Path, task: str | None):
    if not task:
        raise ConfigError(
            f"{directory}: a plain Hugging Face input needs a task name (its config.json has no finetuning_task)",
            hint="pass --task-names with one GLUE task per plain input, in input order",
        )
    try:
        return get_task(task)
    except ConfigError as exc:
        raise ConfigError(f"{directory}: {exc.message}", hint=exc.hint) from exc


def _label_names(directory: Path, config: Mapping[str, Any], spec) -> list[str]:
    """The head's label names, after checking its size against the task's.

    A 2-label config saved by transformers often has no id2label (2 is the
    default), and generic LABEL_i names say nothing: both get the GLUE names,
    whose order the GLUE datasets and umtam's metrics share.
    """
    id2label = config.get("id2label") or {}
    count = len(id2label) if id2label else int(config.get("num_labels", config.get("_num_labels", 2)))
    if count != spec.num_labels:
        raise ConfigError(
            f"{directory}: its head has {count} label(s) but task {spec.name} has {spec.num_labels}",
            hint="name the task the model was fine-tuned on (--task-names)",
        )
    if spec.is_regression:
        return []
    names = [str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(count)]
    generic = all(name == f"LABEL_{i}" for i, name in enumerate(names))
    return list(spec.label_names) if generic else names


# ----------------------------------------------------------------------------- out


def merged_companion_files(checkpoints: Sequence[Checkpoint], tasks: Mapping[str, Any],
                           base: str | None = None, out_dtype: str | None = None) -> dict[str, Path | bytes]:
    """A merge's config.json, tokenizer files and one config.<task>.json per task.

    config.json, the tokenizer and generation_config.json each come from the
    first input that has them, otherwise from a local ``base`` directory,
    because a plain Hugging Face input is often saved without its tokenizer
    (save_pretrained of a model writes generation_config.json alone) and
    ``umtam eval`` needs one. With ``out_dtype`` config.json names the dtype
    the weights are stored in. Per-task configs are written anew from the
    merged task records, never copied from a merged input.
    """
    files: dict[str, Path | bytes] = {}
    config = next((c.path / CONFIG_FILE for c in checkpoints if CONFIG_FILE in c.sidecar.files), None)
    if config is not None:
        files[CONFIG_FILE] = config_stored_as(config, out_dtype)
    files.update(_tokenizer_files(checkpoints, base))
    if config is not None:  # a language task has no head of its own: the model's config is its config
        files.update(task_configs(config, {task: record for task, record in tasks.items()
                                           if not is_language_key(task)}, out_dtype))
    return files


GENERATION_CONFIG = "generation_config.json"


def _tokenizer_files(checkpoints: Sequence[Checkpoint], base: str | None) -> dict[str, Path]:
    """The tokenizer's files, all from one place (the first input with any, else ``base``), and
    generation_config.json likewise, on its own: the one without the other is common."""
    sources = [{name: path for name, path in c.companion_files().items() if not is_config_file(name)}
               for c in checkpoints]
    if base is not None and Path(base).is_dir():
        sources.append({name: Path(base) / name for name in TOKENIZER_FILES if (Path(base) / name).is_file()})
    tokenizer = next(({name: path for name, path in found.items() if name != GENERATION_CONFIG}
                      for found in sources if set(found) - {GENERATION_CONFIG}), {})
    generation = next(({GENERATION_CONFIG: found[GENERATION_CONFIG]} for found in sources
                       if GENERATION_CONFIG in found), {})
    for path in [*tokenizer.values(), *generation.values()]:
        check_regular_file(path)  # a link out of --base is refused, not copied
    return {**tokenizer, **generation}


def config_stored_as(config: Path, out_dtype: str | None) -> Path | bytes:
    """config.json as it is, or (``out_dtype``) naming the dtype the weights are stored in."""
    if out_dtype is None:
        return config
    return (json.dumps(with_dtype(read_config(config), out_dtype), indent=2, sort_keys=True) + "\n").encode()


def with_dtype(fields: Mapping[str, Any], out_dtype: str | None) -> dict[str, Any]:
    """A config's fields naming ``out_dtype`` (None: as they are): transformers loads a model in the
    dtype its config names (version 5's default, dtype="auto"), whatever its weights are stored in."""
    fields = dict(fields)
    if out_dtype is not None:
        from umtam.precision import torch_dtype

        name = str(torch_dtype(out_dtype)).removeprefix("torch.")
        present = [key for key in ("torch_dtype", "dtype") if key in fields]
        for key in present or ("torch_dtype", "dtype"):  # transformers 4 reads the first, 5 the second
            fields[key] = name
    return fields


def task_config_name(task: str) -> str:
    return f"config.{task}.json"


def is_config_file(name: str) -> bool:
    """config.json or a per-task config.<task>.json."""
    return name == CONFIG_FILE or (name.startswith("config.") and name.endswith(".json"))


def task_configs(config_path: Path, tasks: Mapping[str, Mapping[str, Any]],
                 out_dtype: str | None = None) -> dict[str, bytes]:
    """config.<task>.json for each task: the encoder's config with that task's labels and problem type.

    Written as JSON rather than through transformers so that a merge does not
    import it; the fields are the ones transformers reads (num_labels follows
    from id2label). An ``architectures`` entry that is not a sequence-classification
    class is dropped, so the auto classes go by ``model_type``.
    """
    encoder = {key: value for key, value in with_dtype(read_config(config_path), out_dtype).items()
               if key not in _TASK_FIELDS}
    architectures = [name for name in encoder.pop("architectures", None) or []
                     if name.endswith("ForSequenceClassification")]
    if architectures:
        encoder["architectures"] = architectures
    return {task_config_name(task): _task_config(encoder, task, record) for task, record in tasks.items()}


def _task_config(encoder: Mapping[str, Any], task: str, record: Mapping[str, Any]) -> bytes:
    regression = bool(record.get("is_regression"))
    names = ["LABEL_0"] if regression else list(record["label_names"])
    config = {
        **encoder,
        "id2label": {str(index): name for index, name in enumerate(names)},
        "label2id": {name: index for index, name in enumerate(names)},
        "problem_type": "regression" if regression else "single_label_classification",
        "finetuning_task": task,
    }
    return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()


def hf_files(model, tokenizer=None) -> dict[str, bytes]:
    """config.json, generation_config.json (a causal LM's) and tokenizer files, for transformers' from_pretrained."""
    import tempfile

    # from_pretrained(dir) picks the class from "architectures"; the base's says BertModel
    model.config.architectures = [type(model).__name__]
    with tempfile.TemporaryDirectory() as scratch:
        model.config.save_pretrained(scratch)
        generation = getattr(model, "generation_config", None)
        if generation is not None and model.can_generate():
            generation.save_pretrained(scratch)
        if tokenizer is not None:  # a Trainer run without a processing class has none to carry
            tokenizer.save_pretrained(scratch)
        return {path.name: path.read_bytes() for path in sorted(Path(scratch).iterdir()) if path.is_file()}
