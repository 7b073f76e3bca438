"""Sharded weights in and out, the streaming writer against safetensors' own save_file, and LLM-style merges."""

from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch
from safetensors.torch import save_file

from cli_runner import run_cli
from lm_fixtures import write_tiny_decoder
from umtam.checkpoint import load_checkpoint
from umtam.errors import CheckpointError, ConfigError
from umtam.shards import (INDEX_FILE, WeightsWriter, entry_of, load_weights, open_weights, parse_size, weight_files,
                          write_weights)


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def mixed_tensors():
    torch.manual_seed(0)
    return {"b.weight": torch.randn(20, 30).to(torch.bfloat16), "a.bias": torch.randn(3), "ids": torch.arange(3),
            "heads/x/w": torch.ones(1, dtype=torch.float16), "d": torch.ones(2, dtype=torch.float64),
            "flag": torch.tensor(True), "empty": torch.zeros(0, 4)}


def test_one_file_is_byte_for_byte_what_save_file_writes(tmp_path):
    tensors = mixed_tensors()
    save_file(tensors, str(tmp_path / "reference.safetensors"), metadata={"format": "pt"})
    assert write_weights(tmp_path, tensors) == ["model.safetensors"]
    assert sha(tmp_path / "model.safetensors") == sha(tmp_path / "reference.safetensors")


def test_tensors_may_come_in_any_order_and_land_in_their_places(tmp_path):
    tensors = mixed_tensors()
    writer = WeightsWriter(tmp_path, [entry_of(name, t) for name, t in tensors.items()])
    for name in reversed(list(tensors)):
        writer.write(name, tensors[name])
    writer.close()
    save_file(tensors, str(tmp_path / "reference.safetensors"), metadata={"format": "pt"})
    assert sha(tmp_path / "model.safetensors") == sha(tmp_path / "reference.safetensors")


def test_shards_hold_at_most_the_size_and_read_back_as_one(tmp_path):
    tensors = {f"layer.{i}.weight": torch.full((10, 10), float(i)) for i in range(6)}  # 400 bytes each
    files = write_weights(tmp_path, tensors, shard_bytes=1000)
    assert files[0] == INDEX_FILE and len(files) == 4  # 2 + 2 + 2 tensors per shard
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert index["metadata"]["total_size"] == 2400 and set(index["weight_map"]) == set(tensors)
    assert weight_files(tmp_path) == files
    loaded = load_weights(tmp_path)
    assert all(torch.equal(loaded[name], tensors[name]) for name in tensors)
    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME

    assert SAFE_WEIGHTS_INDEX_NAME == INDEX_FILE


def test_the_writer_refuses_what_was_not_declared_and_a_tensor_left_out(tmp_path):
    writer = WeightsWriter(tmp_path, [entry_of("w", torch.zeros(2, 2))])
    with pytest.raises(ValueError, match="declared"):
        writer.write("w", torch.zeros(2, 3))
    with pytest.raises(ValueError, match="never written"):
        writer.close()
    writer.abort()


def test_an_index_naming_a_missing_shard_is_refused_in_one_line(tmp_path):
    write_weights(tmp_path, {f"t{i}": torch.zeros(100) for i in range(4)}, shard_bytes=800)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="names shard model-00002-of-00002.safetensors, which is missing"):
        weight_files(tmp_path)


def test_a_shard_holding_other_tensors_than_the_index_says_is_refused(tmp_path):
    write_weights(tmp_path, {f"t{i}": torch.zeros(100) for i in range(4)}, shard_bytes=800)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    index["weight_map"]["t0"], index["weight_map"]["t3"] = index["weight_map"]["t3"], index["weight_map"]["t0"]
    (tmp_path / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="which model.safetensors.index.json"):
        with open_weights(tmp_path):
            pass


@pytest.mark.parametrize("text, size", [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("2GiB", 2 * 2**30), ("1000", 1000)])
def test_shard_sizes_read_as_transformers_writes_them(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "GB", "-5GB", "5XB", "nan"])
def test_a_shard_size_that_is_no_size_is_refused(text):
    with pytest.raises(ConfigError, match="is not a size"):
        parse_size(text)


# ----------------------------------------------------------------------------- LLM-style merges on the CLI


@pytest.fixture(scope="module")
def decoders(tmp_path_factory):
    """A tiny bf16 Llama base (untied, sharded) and two plain fine-tunes of it, saved by transformers, sharded."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("decoders")
    base_dir = write_tiny_decoder(root / "base", "llama", tie=False, dtype=torch.bfloat16)
    experts = []
    for index in (1, 2):
        model = AutoModelForCausalLM.from_pretrained(base_dir)
        generator = torch.Generator().manual_seed(index)
        with torch.no_grad():
            for parameter in model.parameters():
                if parameter.dim() >= 2:
                    parameter.add_(0.002 * torch.randn(parameter.shape, generator=generator).to(parameter.dtype))
        target = root / f"expert-{index}"
        model.save_pretrained(target, max_shard_size="4KB")
        experts.append(target)
    return base_dir, experts


def merge(*args):
    code, _, stderr = run_cli("merge", *map(str, args), "--quiet")
    assert code == 0, stderr


def test_sharded_plain_decoders_merge_into_shards_equal_to_one_file(tmp_path, decoders):
    base, experts = decoders
    assert (experts[0] / INDEX_FILE).is_file()  # transformers sharded them
    merge(*experts, "--base", base, "--method", "ties", "-o", tmp_path / "one")
    merge(*experts, "--base", base, "--method", "ties", "--out-shard-size", "5KB", "-o", tmp_path / "sharded")
    one, sharded = load_checkpoint(tmp_path / "one"), load_checkpoint(tmp_path / "sharded")
    assert sharded.weight_file_names[0] == INDEX_FILE and len(sharded.weight_file_names) > 2
    assert set(one.tasks) == {"lm:expert-1", "lm:expert-2"}  # plain causal LMs: lm:<directory name>
    a, b = one.load_tensors(), sharded.load_tensors()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert {t.dtype for t in a.values()} == {torch.bfloat16}  # the inputs' dtype
    card = (tmp_path / "sharded" / "README.md").read_text()
    assert "Method: **ties**" in card and "`expert-1`" in card and '"keep": 0.2' in card
    assert (tmp_path / "sharded" / "generation_config.json").is_file()  # the inputs' own
    # save_pretrained of a model writes no tokenizer: the base's comes along, whole
    base_tokenizer = sorted(p.name for p in base.iterdir() if p.name.startswith(("tokenizer", "special_tokens")))
    assert base_tokenizer and all((tmp_path / "sharded" / name).read_bytes() == (base / name).read_bytes()
                                  for name in base_tokenizer)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path / "sharded")("the cat")["input_ids"]

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "sharded")
    assert torch.equal(model.state_dict()["model.layers.0.mlp.up_proj.weight"],
                       a["model.layers.0.mlp.up_proj.weight"])


def test_out_dtype_stores_what_float32_computed(tmp_path, decoders):
    base, experts = decoders
    merge(*experts, "--base", base, "--method", "task-arithmetic", "--out-dtype", "fp32", "-o", tmp_path / "fp32")
    merge(*experts, "--base", base, "--method", "task-arithmetic", "-o", tmp_path / "bf16")
    wide, narrow = load_checkpoint(tmp_path / "fp32"), load_checkpoint(tmp_path / "bf16")
    assert wide.sidecar.lineage.as_json()["out_dtype"] == "fp32"
    w, n = wide.load_tensors(), narrow.load_tensors()
    assert {t.dtype for t in w.values()} == {torch.float32}
    assert all(torch.equal(w[k].to(torch.bfloat16), n[k]) for k in w)  # the same float32 result, rounded once
    # transformers loads in the dtype config.json names: the stored one, not the inputs'
    from transformers import AutoConfig, AutoModelForCausalLM

    assert AutoConfig.from_pretrained(tmp_path / "fp32").dtype == torch.float32
    assert AutoConfig.from_pretrained(tmp_path / "bf16").dtype == torch.bfloat16
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "fp32", dtype="auto")
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}


def test_a_trainer_checkpoints_optimizer_state_is_not_carried_into_a_merge(tmp_path, decoders):
    import shutil

    base, experts = decoders
    trainer_dirs = []
    for expert in experts:  # what Trainer's checkpoint-N folders hold beside the model
        target = tmp_path / f"checkpoint-{expert.name}"
        shutil.copytree(expert, target)
        (target / "optimizer.pt").write_bytes(b"not read: ties needs no statistics")
        trainer_dirs.append(target)
    merge(*trainer_dirs, "--base", base, "--method", "ties", "-o", tmp_path / "merged")
    assert not (tmp_path / "merged" / "optimizer.pt").exists()
    assert (tmp_path / "merged" / "tokenizer_config.json").is_file()  # the base's tokenizer still comes along


def test_prune_writes_shards_and_another_dtype(tmp_path, decoders):
    from lm_fixtures import write_text_corpus
    from umtam.config.train import TrainConfig
    from umtam.train import train

    base, _ = decoders
    corpus = write_text_corpus(tmp_path / "text")
    checkpoint = train(TrainConfig(task="lm", model=str(base), data=str(corpus / "train.txt"),
                                   eval_data=str(corpus / "validation.jsonl"), max_steps=2, batch_size=2,
                                   max_length=16, output=str(tmp_path / "lm")))
    code, _, stderr = run_cli("prune", str(checkpoint.path), "--keep", "0.1", "--out-dtype", "bf16",
                              "--out-shard-size", "5KB", "-o", str(tmp_path / "pruned"), "--quiet")
    assert code == 0, stderr
    pruned = load_checkpoint(tmp_path / "pruned")
    assert pruned.weight_file_names[0] == INDEX_FILE
    assert {t.dtype for t in pruned.load_tensors().values()} == {torch.bfloat16}
    code, out, stderr = run_cli("eval", str(tmp_path / "pruned"), "--task", "lm", "--json")
    assert code == 0, stderr
    scored = json.loads(out)["tasks"]["lm:text"]
    assert math.isfinite(scored["score"]) and scored["score"] > 1  # a perplexity
    assert scored["normalized"] is not None and scored["normalized"] > 0


def test_an_input_index_naming_a_missing_shard_is_one_line(tmp_path, decoders):
    import shutil

    base, experts = decoders
    broken = tmp_path / "broken"
    shutil.copytree(experts[0], broken)
    shard = json.loads((broken / INDEX_FILE).read_text())["weight_map"]["lm_head.weight"]
    (broken / shard).unlink()
    code, _, stderr = run_cli("merge", str(broken), str(experts[1]), "--base", str(base), "-o", str(tmp_path / "m"))
    assert code == 1 and len(stderr.strip().splitlines()) == 1
    assert f"names shard {shard}, which is missing" in stderr and not (tmp_path / "m").exists()


def test_a_tied_base_of_inputs_with_their_own_lm_head_is_refused_before_it_is_built(tmp_path, decoders,
                                                                                     monkeypatch):
    from umtam import base_model

    base, experts = decoders  # untied, like their base
    tied = write_tiny_decoder(tmp_path / "tied", "llama", tie=True, dtype=torch.bfloat16)
    with open_weights(tied) as handle:
        assert "lm_head.weight" not in set(handle.keys())  # transformers stores a tied head once, as the embedding
    built = []
    monkeypatch.setattr(base_model, "_rebuild", lambda *args: built.append(args))  # the slow path, never needed
    merge_with = ("merge", *map(str, experts), "--method", "ties", "--base")
    code, _, stderr = run_cli(*merge_with, str(tied), "-o", str(tmp_path / "m"))
    assert code == 1 and len(stderr.strip().splitlines()) == 1, stderr
    assert "has no tensor 'lm_head.weight'" in stderr and "ties it to its token embedding" in stderr
    assert built == [] and not (tmp_path / "m").exists()
    code, _, stderr = run_cli(*merge_with, str(base), "-o", str(tmp_path / "m"), "--quiet")  # their own base
    assert code == 0 and built == [], stderr


def test_the_writer_hashes_each_file_as_it_writes_it(tmp_path):
    tensors = {f"layer.{i}.weight": torch.randn(64, 64) for i in range(5)}
    writer = WeightsWriter(tmp_path, [entry_of(name, t) for name, t in tensors.items()], shard_bytes=40_000)
    for name in ["layer.3.weight", "layer.0.weight", "layer.4.weight", "layer.1.weight", "layer.2.weight"]:
        writer.write(name, tensors[name])  # out of file order: the hash waits for the gaps to fill
    files = writer.close()
    assert set(writer.digests) == set(files) - {INDEX_FILE}
    assert all(writer.digests[name] == sha(tmp_path / name) for name in writer.digests)


def test_a_plain_input_changed_while_hashed_in_the_background_is_refused(tmp_path, decoders):
    import shutil

    from umtam.hf_interop import open_plain_hf

    base, experts = decoders
    copy = tmp_path / "copy"
    shutil.copytree(experts[0], copy)
    checkpoint = open_plain_hf(copy, hash_later=True)
    checkpoint.pending_hashes.result()  # let the background finish, then change a file behind its back
    shard = next(name for name in checkpoint.sidecar.files if name.endswith(".safetensors"))
    (copy / shard).write_bytes((copy / shard).read_bytes())  # same bytes, a new mtime
    with pytest.raises(CheckpointError, match="changed while umtam was reading it"):
        checkpoint.settle()


def test_the_sampled_distance_is_the_full_one_on_every_block_and_close_on_a_sample():
    from umtam.merge.inputs import Layout
    from umtam.merge.pages import MappedPages
    from umtam.merge.plain_inputs import relative_distances

    torch.manual_seed(0)
    base = {"w": torch.randn(4096, 512), "v": torch.randn(300, 64)}
    moved = {key: value + 0.05 * torch.randn(value.shape) for key, value in base.items()}

    class Plain:
        label = "plain"

        def tensor(self, key):
            return moved[key]

    layout = Layout(("v", "w"), {"v": (300, 64), "w": (4096, 512)}, {"v": "F32", "w": "F32"})
    exact = (sum(float(((moved[k] - base[k]) ** 2).sum()) for k in base)
             / sum(float((base[k] ** 2).sum()) for k in base)) ** 0.5
    every, = relative_distances([Plain()], layout, base, MappedPages(), stride=1)
    sampled, = relative_distances([Plain()], layout, base, MappedPages())
    assert every == pytest.approx(exact, rel=1e-5)
    assert sampled == pytest.approx(exact, rel=0.05)
