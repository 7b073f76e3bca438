"""Text for causal language modelling and instruction data for supervised fine-tuning.

Language modelling (``--task lm``): documents are read from a ``.txt`` file
(the whole file is one document), a ``.jsonl`` file (one JSON object per line,
the document in its ``text`` field), a parquet file (a ``text`` column) or a
directory of such files; each is tokenized without special tokens, followed by
the tokenizer's end-of-sequence token, and the stream is cut into blocks of
``block`` tokens, as GPT-2 and nanoGPT train. The last, shorter piece is
dropped unless the whole stream is shorter than one block (a tiny file still
gives one example). Every token of a block is a target (``labels`` equal
``input_ids``; the model shifts them).

Instruction data (``--task sft``): one conversation per ``.jsonl`` line, either
``{"messages": [{"role": ..., "content": ...}, ...]}`` ending with an
assistant turn, or ``{"prompt": ..., "response": ...}``. Each is rendered with
the tokenizer's chat template; the loss falls on the assistant turns' tokens
only (every other position's label is -100, which the loss ignores), found by
rendering the conversation up to each assistant turn with and without it.

Text may also come from the Hugging Face hub when it is reachable: a --data
value that is no local path is a dataset id, ``name`` or ``name:split``
(default split ``train``), with a ``text`` column (``lm``) or ``messages`` /
``prompt`` and ``response`` columns (``sft``).

Multiple-choice instruction data (``--task choice``): the same rows with a
``choices`` list that holds the response, e.g. ``{"prompt": "...", "response":
"positive", "choices": ["negative", "positive"]}``. Training is sft's, on the
right answer; scoring also renders every choice in the answer's place and
counts how often the right one is the most likely (``choice_features``).

Every problem is a DataError naming the file and the line or row.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from umtam.errors import ConfigError, DataError, first_line

TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")
IGNORE_INDEX = -100  # what transformers' causal-LM loss skips


# ----------------------------------------------------------------------------- reading


def text_files(path: str | Path) -> list[Path]:
    """The files a --data path names: itself, or the supported files directly inside a directory."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise DataError(f"{path}: no {', '.join(TEXT_SUFFIXES)} files in the directory")
        return files
    if not path.is_file():
        raise DataError(f"{path}: no such file or directory")
    if path.suffix not in TEXT_SUFFIXES:
        raise DataError(f"{path}: not a text file umtam reads (choose one of {', '.join(TEXT_SUFFIXES)})")
    return [path]


# A --data file named for its split is named by its folder: fineweb/train.jsonl is "fineweb".
_SPLIT_STEMS = ("train", "training", "validation", "valid", "val", "dev", "test", "data")


def data_name(reference: str | Path) -> str:
    """A short name for the text at ``reference``: the task key's suffix ("lm:<name>")."""
    text = str(reference)
    if is_hub_reference(text):
        name = text.split(":", 1)[0].rstrip("/").split("/")[-1]
    else:
        path = Path(text).resolve()
        name = path.parent.name if path.is_file() and path.stem.lower() in _SPLIT_STEMS else path.stem
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "text"


def is_hub_reference(reference: str | Path) -> bool:
    """A dataset id rather than a local path: nothing there on disk, and not spelled as a path."""
    text = str(reference)
    return (bool(text) and not Path(text).exists() and not text.startswith((".", "/", "~")) and text.count("/") <= 1
            and Path(text.split(":", 1)[0]).suffix not in TEXT_SUFFIXES)  # "missing.txt" is a missing file


def read_documents(path: str | Path) -> list[str]:
    """Every non-empty document of the file(s) at ``path``, in order; DataError when there are none."""
    if is_hub_reference(path):
        documents = [_field(row, "text", Path(str(path)), index) for index, row in enumerate(hub_rows(str(path)), 1)]
    else:
        documents = [text for file in text_files(path) for text in _read_file(file)]
    documents = [text for text in documents if text.strip()]
    if not documents:
        raise DataError(f"{path}: no documents (every text is empty)")
    return documents


def _read_file(path: Path) -> list[str]:
    if path.suffix == ".txt":
        return [_read_text(path)]
    if path.suffix == ".jsonl":
        return [_field(row, "text", path, line) for line, row in _jsonl_rows(path)]
    return _parquet_texts(path)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not readable as UTF-8 text ({first_line(exc, 200)})") from exc


def _jsonl_rows(path: Path) -> list[tuple[int, dict[str, Any]]]:
    rows = []
    for line, text in enumerate(_read_text(path).splitlines(), start=1):
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise DataError(f"{path}:{line}: not a JSON object ({first_line(exc, 200)})") from exc
        if not isinstance(row, dict):
            raise DataError(f"{path}:{line}: not a JSON object")
        rows.append((line, row))
    return rows


def _field(row: dict[str, Any], key: str, path: Path, line: int) -> str:
    value = row.get(key)
    if not isinstance(value, str):
        found = "no" if value is None else f"a {type(value).__name__} as its"
        raise DataError(f"{path}:{line}: the row has {found} {key!r} field; it must be a string")
    return value


def _parquet_texts(path: Path) -> list[str]:
    import pyarrow.parquet as pq  # lazy: only parquet users pay for pyarrow

    try:
        column = pq.read_table(path, columns=["text"]).column("text").to_pylist()
    except Exception as exc:  # pyarrow raises several types for unreadable files or a missing column
        raise DataError(f"{path}: not a parquet file with a 'text' column ({first_line(exc, 200)})") from exc
    for row, value in enumerate(column):
        if not isinstance(value, str):
            raise DataError(f"{path}: row {row} has {'no' if value is None else 'a non-string'} 'text'")
    return column


def hub_rows(reference: str) -> list[dict[str, Any]]:
    """The rows of hub dataset ``name[:split]``; a DataError in one line when it cannot be had (offline...)."""
    name, _, split = reference.partition(":")
    try:
        from datasets import load_dataset

        return [dict(row) for row in load_dataset(name, split=split or "train")]
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - datasets and huggingface_hub raise many types (offline, unknown id)
        raise DataError(f"{reference}: no such local file, and not a hub dataset umtam could load "
                        f"({first_line(exc, 160)})", hint="pass a local .txt, .jsonl or parquet file") from exc


def read_conversations(path: str | Path) -> list[list[dict[str, str]]]:
    """Every conversation of the .jsonl file(s): ``messages``, or ``prompt`` and ``response``."""
    return _instruction_rows(path, _conversation)


def read_choice_items(path: str | Path) -> list[ChoiceItem]:
    """Every conversation of the .jsonl file(s) with its ``choices``, the response being one of them."""
    return _instruction_rows(path, _choice_item)


def _instruction_rows(path: str | Path, parse) -> list:
    if is_hub_reference(path):
        return [parse(row, Path(str(path)), index) for index, row in enumerate(hub_rows(str(path)), 1)]
    rows = []
    for file in text_files(path):
        if file.suffix != ".jsonl":
            raise DataError(f"{file}: instruction data must be .jsonl (one conversation per line)")
        rows += [parse(row, file, line) for line, row in _jsonl_rows(file)]
    if not rows:
        raise DataError(f"{path}: no conversations")
    return rows


@dataclass(frozen=True)
class ChoiceItem:
    """A conversation whose last (assistant) turn is the right one of a closed set of answers."""

    messages: list[dict[str, str]]
    choices: tuple[str, ...]
    answer: int  # the index of the response in choices


def _choice_item(row: dict[str, Any], path: Path, line: int) -> ChoiceItem:
    messages = _conversation(row, path, line)
    choices = row.get("choices")
    if not (isinstance(choices, list) and len(choices) >= 2 and all(isinstance(c, str) and c for c in choices)
            and len(set(choices)) == len(choices)):
        raise DataError(f"{path}:{line}: 'choices' must list two or more distinct, non-empty answers")
    response = messages[-1]["content"]
    if response not in choices:
        raise DataError(f"{path}:{line}: the response {response!r} is not one of its choices {choices}")
    return ChoiceItem(messages, tuple(choices), choices.index(response))


def _conversation(row: dict[str, Any], path: Path, line: int) -> list[dict[str, str]]:
    if "messages" in row:
        messages = row["messages"]
        if not (isinstance(messages, list) and messages and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages)):
            raise DataError(f"{path}:{line}: 'messages' must be a list of {{role, content}} strings")
        if messages[-1]["role"] != "assistant":
            raise DataError(f"{path}:{line}: the conversation has no response (its last message is not "
                            "the assistant's)")
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    prompt, response = _field(row, "prompt", path, line), row.get("response")
    if not isinstance(response, str) or not response:
        raise DataError(f"{path}:{line}: the row has no 'response' (a conversation needs one to train on)")
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


# ----------------------------------------------------------------------------- features


def pack_documents(token_lists: Iterable[Sequence[int]], block: int, eos_id: int) -> list[list[int]]:
    """Documents joined with eos after each, cut into ``block``-token blocks (see the module docstring)."""
    stream: list[int] = []
    for tokens in token_lists:
        stream.extend(tokens)
        stream.append(eos_id)
    if len(stream) <= block:
        return [stream]
    return [stream[start:start + block] for start in range(0, len(stream) - block + 1, block)]


def lm_features(documents: Sequence[str], tokenizer, block: int) -> list[dict[str, list[int]]]:
    """Packed blocks as features: input_ids, attention_mask (all ones) and labels (= input_ids)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError("the tokenizer has no end-of-sequence token to separate documents",
                          hint="use a tokenizer that defines eos_token")
    # whole documents, packed into blocks next: longer than the model's maximum is expected, not worth a warning
    encoded = tokenizer(list(documents), add_special_tokens=False, verbose=False)["input_ids"]
    return [{"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids)}
            for ids in pack_documents(encoded, block, eos)]


def sft_features(conversations: Sequence[list[dict[str, str]]], tokenizer,
                 max_length: int) -> list[dict[str, list[int]]]:
    """Chat-template renderings with labels on the assistant turns only, truncated to ``max_length``.

    A conversation whose every assistant token falls beyond ``max_length`` would
    train on nothing: it is refused, naming its position, rather than dropped.
    """
    _check_chat_template(tokenizer)
    features = []
    for index, messages in enumerate(conversations):
        ids, labels = _rendered_with_labels(messages, tokenizer)
        ids, labels = ids[:max_length], labels[:max_length]
        if all(label == IGNORE_INDEX for label in labels):
            raise DataError(f"conversation {index + 1}: no response token within --max-length {max_length}",
                            hint="raise --max-length or shorten the prompt")
        features.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    return features


def choice_features(items: Sequence[ChoiceItem], tokenizer, max_length: int) -> list[dict[str, Any]]:
    """sft features of each item's right answer, each carrying every choice rendered in the answer's place.

    Choices are compared by the likelihood of their whole rendering, so none may
    be cut short: an item whose longest choice renders beyond ``max_length`` is
    refused, naming its position.
    """
    _check_chat_template(tokenizer)
    features = []
    for index, item in enumerate(items):
        rendered = [_rendered_with_labels([*item.messages[:-1], {"role": "assistant", "content": choice}], tokenizer)
                    for choice in item.choices]
        longest = max(len(ids) for ids, _ in rendered)
        if longest > max_length:
            raise DataError(f"item {index + 1}: {longest} tokens with its longest choice, over --max-length "
                            f"{max_length}", hint="raise --max-length or shorten the prompt")
        options = [{"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels} for ids, labels in rendered]
        features.append({**options[item.answer], "choices": options, "answer": item.answer})
    return features


def _check_chat_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("the model's tokenizer has no chat template, which --task sft and --task choice "
                          "render conversations with", hint="use an instruction-tuned model (its tokenizer "
                                                     "carries a template) or --task lm")


def _rendered_with_labels(messages: list[dict[str, str]], tokenizer) -> tuple[list[int], list[int]]:
    ids = _template(tokenizer, messages, generation_prompt=False)
    labels = [IGNORE_INDEX] * len(ids)
    for turn, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _template(tokenizer, messages[:turn], generation_prompt=True)
        through = _template(tokenizer, messages[:turn + 1], generation_prompt=False)
        # The turn's tokens are where the two renderings differ; that holds only if every rendering
        # of a prefix is a prefix of the whole one, which some templates (e.g. ones that drop old
        # reasoning) break: then the labels cannot be placed.
        if ids[:len(through)] != through or through[:len(before)] != before:
            raise ConfigError("the tokenizer's chat template does not render a conversation's beginning "
                              "as the beginning of the whole, so the response tokens cannot be located")
        labels[len(before):len(through)] = ids[len(before):len(through)]
    return ids, labels


def _template(tokenizer, messages, *, generation_prompt: bool) -> list[int]:
    rendered = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
    if isinstance(rendered, dict) or hasattr(rendered, "keys"):  # transformers 5 may return a BatchEncoding
        rendered = rendered["input_ids"]
    return list(rendered)
