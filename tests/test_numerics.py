"""No silent wrong results (issue 13): exact top-k under ties, finite inputs and outputs, checked statistics,
tensors of the wrong kind refused, and rank clamping made visible.

Library tests use tiny checkpoints built in code; the command-line cases reuse
the bad-input matrix's harness (tests/test_bad_input.py) and check the same
properties: exit code, one ``umtam: error:`` line naming what is at fault, no
traceback, nothing on stdout, the workspace unchanged.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from cli_runner import run_cli
from test_bad_input import (Env, edit_sidecar, env, family_root, rehash, run_bad_case, snapshot,  # noqa: F401 (fixtures)
                            unchanged_but_for_streaming)
from tiny_checkpoints import VOCAB, build_family, fake_stats, tiny_model
from umtam.base_model import check_base_covers, fingerprint
from umtam.checkpoint import Checkpoint, load_checkpoint, write_checkpoint
from umtam.errors import CheckpointError, MergeError
from umtam.heads import encoder_tensors, is_head_key
from umtam.merge import merge_checkpoints, merge_tensors
from umtam.merge import ops
from umtam.prune import prunable_names, prune_checkpoint
from umtam.saliency import (Cut, Selection, keep_count, read_stat, score, streaming_cuts, tensor_cut,
                            top_k_mask)

QUERY = "bert.encoder.layer.0.attention.self.query.weight"


def reference_top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The slow, obviously-correct rule: a stable descending sort, ties in index order, first k taken."""
    flat = scores.reshape(-1)
    order = torch.sort(flat, descending=True, stable=True).indices
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[order[:k]] = True
    return mask.reshape(scores.shape)


# ----------------------------------------------------------------------------- exact top-k, by hand


def test_tied_entries_are_kept_in_row_major_order_until_k():
    scores = torch.tensor([[5.0, 3.0, 0.0],
                           [3.0, 0.0, 3.0]])
    # keep 0.5 of 6 -> k = 3: the 5, then the first two of the three 3s in row-major order
    assert tensor_cut(scores, 0.5) == Cut(3.0, 2)
    assert top_k_mask(scores, 0.5).tolist() == [[True, True, False], [True, False, False]]


def test_half_the_scores_exactly_zero():
    scores = torch.zeros(8, 4)
    scores[1::2] = torch.arange(1.0, 17.0).reshape(4, 4)  # odd rows 1..16, even rows 0
    # keep 0.75 -> k = 24: all 16 positive entries, then the first 8 zeros: rows 0 and 2.
    # ">= threshold" (threshold 0) would have kept all 32.
    assert tensor_cut(scores, 0.75) == Cut(0.0, 8)
    mask = top_k_mask(scores, 0.75)
    assert int(mask.sum()) == 24 == keep_count(0.75, 32)
    assert mask.all(dim=1).tolist() == [True, True, True, True, False, True, False, True]
    assert not mask[4].any() and not mask[6].any()
    # keep 0.25 -> k = 8: the values 9..16 (threshold 9, nothing tied beyond itself)
    assert tensor_cut(scores, 0.25) == Cut(9.0, 1)
    assert torch.equal(top_k_mask(scores, 0.25), scores >= 9)


def test_an_explicit_threshold_keeps_every_tied_entry():
    scores = torch.tensor([5.0, 3.0, 3.0, 1.0])
    assert Selection.at_least(3.0).mask(scores).tolist() == [True, True, True, False]


def test_the_tie_allowance_carries_over_from_block_to_block():
    selection = Selection(Cut(2.0, 3))
    first = selection.mask(torch.tensor([2.0, 5.0, 2.0]))  # both 2s: 1 left
    second = selection.mask(torch.tensor([[2.0, 2.0], [1.0, 9.0]]))  # the first 2 only
    third = selection.mask(torch.tensor([2.0]))  # nothing left
    assert first.tolist() == [True, True, True]
    assert second.tolist() == [[True, False], [False, True]]
    assert third.tolist() == [False]


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.integers(1, 20), min_size=1, max_size=5), keep=st.floats(0.01, 1.0),
       seed=st.integers(0, 10_000), levels=st.integers(1, 4))
def test_streamed_cuts_applied_in_order_keep_exactly_the_reference_top_k(sizes, keep, seed, levels):
    generator = torch.Generator().manual_seed(seed)
    # Few distinct values (zeros among them): ties at the threshold are the rule, not the exception.
    series = [[torch.floor(torch.rand(size, 3, generator=generator) * levels) / levels for size in sizes]
              for _ in range(2)]
    cuts = streaming_cuts(lambda: zip(*series), keep)
    for cut, pieces in zip(cuts, series):
        whole = torch.cat(pieces)  # the pieces are row blocks of one tensor, or tensors in name order
        k = keep_count(keep, whole.numel())
        assert cut == tensor_cut(whole, keep)
        selection = Selection(cut)
        masks = torch.cat([selection.mask(piece) for piece in pieces])
        assert int(masks.sum()) == k
        assert torch.equal(masks, reference_top_k(whole, k))
        assert torch.equal(top_k_mask(whole, keep), masks)


def test_top_fraction_masks_keep_exactly_k_per_input():
    scores = torch.tensor([[[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]],     # input 1: four tied 1s
                           [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]])    # input 2: all zero
    masks = ops.top_fraction_masks(scores, 0.5)  # 3 of 6 each
    assert masks[0].tolist() == [[True, True, True], [False, False, False]]
    assert masks[1].tolist() == [[True, True, True], [False, False, False]]
    # the same cut spent over two row blocks equals the whole tensor's masks
    selections = [Selection(tensor_cut(own, 0.5)) for own in scores]
    blocked = torch.cat([ops.top_fraction_masks(scores[:, :1], 0.5, selections),
                         ops.top_fraction_masks(scores[:, 1:], 0.5, selections)], dim=1)
    assert torch.equal(blocked, masks)


# ----------------------------------------------------------------------------- prune: exact keep under ties


def variant(source: Checkpoint, output: Path, *, tensors: Callable[[dict], object] | None = None,
            stats: Callable[[dict], object] | None = None) -> Checkpoint:
    """A copy of ``source`` with its weights or statistics changed."""
    weights, statistics = source.load_tensors(), source.load_stats()
    if tensors is not None:
        tensors(weights)
    if stats is not None:
        stats(statistics)
    sidecar = {k: v for k, v in source.sidecar.as_json().items() if k not in ("schema_version", "files")}
    return write_checkpoint(output, tensors=weights, stats=statistics or None, sidecar=sidecar,
                            extra_files={name: source.path / name for name in ("config.json", "vocab.txt")})


def zero_curvature_rows(stats: dict) -> None:
    """R_i = 0 on every even row: rows no gradient reached, as embeddings of unseen tokens have."""
    for key, value in stats.items():
        if key.startswith("exp_avg_sq_row/"):
            value[::2] = 0.0


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    family = build_family(tmp_path_factory.mktemp("numerics-family"), {"mrpc": 2, "sst2": 2})
    family.zero_rows = variant(family.experts["mrpc"], family.root / "zero-rows", stats=zero_curvature_rows)
    return family


def _scores(checkpoint: Checkpoint, family, score_name: str = "curvature") -> dict[str, torch.Tensor]:
    tensors, stats = checkpoint.load_tensors(), checkpoint.load_stats()
    return {name: score(score_name, name, tensors[name] - family.base_encoder[name], stats, checkpoint_label="x")
            for name in prunable_names(tensors)}


@pytest.mark.parametrize("keep", [0.5, 0.7, 0.9])
def test_global_prune_keeps_exactly_k_under_ties_and_which(family, keep):
    checkpoint = family.zero_rows
    scores = _scores(checkpoint, family)
    names = sorted(scores)
    whole = torch.cat([scores[name].reshape(-1) for name in names])
    k = keep_count(keep, whole.numel())
    threshold = float(torch.kthvalue(whole, whole.numel() - k + 1).values)
    assert threshold == 0.0 and int((whole >= threshold).sum()) > k  # the old rule would overshoot

    pruned, report = prune_checkpoint(checkpoint, keep=keep, score="curvature")  # the score with zero rows
    assert report.kept_entries == k and report.total_entries == whole.numel() and report.threshold == 0.0
    expected = reference_top_k(whole, k)  # tensors in name order, entries in row-major order
    original, offset = checkpoint.load_tensors(), 0
    for name in names:
        mask = expected[offset:offset + scores[name].numel()].reshape(scores[name].shape)
        offset += scores[name].numel()
        assert torch.equal(pruned[name], torch.where(mask, original[name], family.base_encoder[name])), name
        assert report.tensors[name] == int(mask.sum()) / mask.numel()


def test_keep_half_no_longer_keeps_everything(family):
    # About 70% of the entries score 0 (zero curvature rows, and the expert's untouched entries):
    # ">= threshold" at a threshold of 0 kept every entry, kept_fraction 1.0.
    _, report = prune_checkpoint(family.zero_rows, keep=0.5, score="curvature")
    assert report.kept_entries == keep_count(0.5, report.total_entries)
    assert report.kept_fraction == 0.5


def test_per_tensor_prune_keeps_exactly_k_in_every_tensor_under_ties(family):
    checkpoint = family.zero_rows
    scores = _scores(checkpoint, family)
    pruned, report = prune_checkpoint(checkpoint, keep=0.8, scope="tensor", score="curvature")
    original = checkpoint.load_tensors()
    for name, own in scores.items():
        k = keep_count(0.8, own.numel())
        mask = reference_top_k(own, k)
        assert report.tensors[name] == k / own.numel()
        assert torch.equal(pruned[name], torch.where(mask, original[name], family.base_encoder[name])), name


# ----------------------------------------------------------------------------- merge: exact keep under ties

C = 0.125  # a power of two: W0 + C - W0 is exactly C for the quantised base below


@pytest.fixture(scope="module")
def tie_family(tmp_path_factory):
    """A base of multiples of 1/64 and two experts: "flat" moves every encoder entry by +-C, "still" none.

    Every entry of "flat" has the same magnitude, so a magnitude trim is all ties:
    it must keep exactly k, the first ones in order. "still" scores 0 everywhere.
    """
    root = tmp_path_factory.mktemp("tie-family")
    model = tiny_model(seed=0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.round(parameter * 64) / 64)
    model.save_pretrained(root / "base")
    base = {key: value.detach().clone() for key, value in encoder_tensors(model.state_dict()).items()}
    record = {"reference": str(root / "base"), "location": str(root / "base"), "origin": "directory",
              "fingerprint": fingerprint(base), "init_seed": 0}
    experts = {}
    for task, seed, moved in (("mrpc", 1, True), ("sst2", 2, False)):
        own = tiny_model(seed=seed).state_dict()
        state = {}
        for key, value in own.items():
            if is_head_key(key):
                state[key] = value.detach().clone()
            elif moved:
                signs = torch.where(torch.arange(value.numel()) % 3 == 0, -1.0, 1.0).reshape(value.shape)
                state[key] = base[key] + C * signs
            else:
                state[key] = base[key].clone()
        sidecar = {"kind": "train", "base_model": record,
                   "tasks": {task: {"label_names": ["a", "b"], "is_regression": False, "metrics": {}}}}
        experts[task] = write_checkpoint(root / task, tensors=state, sidecar=sidecar,
                                         stats=fake_stats(state, seed=seed),
                                         extra_files={"config.json": model.config.to_json_string().encode(),
                                                      "vocab.txt": VOCAB.encode()})
    return base, experts


def _expected_merge(base, flat, masks):
    """W0 + the flat expert's kept task-vector entries, the rest at W0."""
    return {key: base[key] + torch.where(mask, flat[key] - base[key], torch.zeros(())) for key, mask in masks.items()}


@pytest.mark.parametrize("method,options", [
    ("ties", {"scope": "tensor", "keep": 0.3, "agg": "sum"}),
    ("umtam", {"trim": "magnitude", "weights": "uniform", "keep": 0.3}),
])
def test_per_tensor_trim_under_ties_keeps_the_first_k_entries_of_each_tensor(tie_family, method, options):
    base, experts = tie_family
    flat = experts["mrpc"].load_tensors()
    keys = [key for key in sorted(base) if base[key].dim() >= 2]
    masks = {key: reference_top_k(torch.ones(base[key].shape), keep_count(0.3, base[key].numel())) for key in keys}
    expected = _expected_merge(base, flat, masks)
    for block_entries in (1 << 18, 8, 24):  # whole tensors, then every tensor in row blocks
        merged, _ = merge_tensors([experts["mrpc"], experts["sst2"]], method=method, options=options,
                                  block_entries=block_entries)
        for key in keys:
            assert torch.equal(merged[key], expected[key]), (block_entries, key)
            assert int((merged[key] != base[key]).sum()) == keep_count(0.3, base[key].numel())


def test_global_trim_under_ties_spends_the_allowance_in_name_order(tie_family):
    base, experts = tie_family
    flat = experts["mrpc"].load_tensors()
    keys = [key for key in sorted(base) if base[key].dim() >= 2]
    sizes = [base[key].numel() for key in keys]
    k = keep_count(0.4, sum(sizes))
    whole = reference_top_k(torch.ones(sum(sizes)), k)
    masks = dict(zip(keys, (piece.reshape(base[key].shape) for piece, key in zip(whole.split(sizes), keys))))
    assert 0 < int(masks[keys[1]].sum()) and not masks[keys[-1]].any()  # the cut falls inside the tensors
    expected = _expected_merge(base, flat, masks)
    for block_entries in (1 << 18, 8):
        merged, report = merge_tensors([experts["mrpc"], experts["sst2"]], method="ties",
                                       options={"scope": "global", "keep": 0.4, "agg": "sum"},
                                       block_entries=block_entries)
        assert report.thresholds == {"mrpc": C * C, "sst2": 0.0}
        for key in keys:
            assert torch.equal(merged[key], expected[key]), (block_entries, key)
        assert sum(int((merged[key] != base[key]).sum()) for key in keys) == k


# ----------------------------------------------------------------------------- finite inputs


def _set(key: str, index: tuple, value: float):
    def edit(tensors: dict) -> None:
        tensors[key] = tensors[key].clone()
        tensors[key][index] = value
    return edit


@pytest.mark.parametrize("key,index,value", [
    (QUERY, (1, 2), float("nan")),
    ("bert.encoder.layer.0.output.LayerNorm.bias", (3,), float("inf")),
    ("classifier.weight", (0, 0), float("-inf")),
])
def test_prune_refuses_non_finite_input_weights_naming_checkpoint_and_tensor(family, tmp_path, key, index, value):
    broken = variant(family.experts["mrpc"], tmp_path / "broken", tensors=_set(key, index, value))
    with pytest.raises(CheckpointError) as caught:
        prune_checkpoint(broken, keep=0.5)
    assert caught.value.message == f"{broken.path}: tensor {key!r} holds NaN or infinite values (1 entry)"


@pytest.fixture(scope="module")
def nan_base_family(tmp_path_factory):
    """A base whose query weight holds one NaN, and an expert of it that is finite there."""
    root = tmp_path_factory.mktemp("nan-base")
    model = tiny_model(seed=0)
    with torch.no_grad():
        model.bert.encoder.layer[0].attention.self.query.weight[0, 0] = float("nan")
    model.save_pretrained(root / "base")
    base = {key: value.detach().clone() for key, value in encoder_tensors(model.state_dict()).items()}
    record = {"reference": str(root / "base"), "location": str(root / "base"), "origin": "directory",
              "fingerprint": fingerprint(base), "init_seed": 0}
    experts = []
    for task, seed in (("mrpc", 1), ("sst2", 2)):
        state = {key: value.detach().clone() for key, value in tiny_model(seed=seed).state_dict().items()}
        state.update({key: value + 0.01 for key, value in base.items()})
        state[QUERY][0, 0] = 0.5
        sidecar = {"kind": "train", "base_model": record,
                   "tasks": {task: {"label_names": ["a", "b"], "is_regression": False, "metrics": {}}}}
        experts.append(write_checkpoint(root / task, tensors=state, sidecar=sidecar, stats=fake_stats(state, seed=3),
                                        extra_files={"config.json": model.config.to_json_string().encode()}))
    return root / "base", experts


def test_prune_refuses_a_non_finite_base_naming_it(nan_base_family):
    base_dir, experts = nan_base_family
    with pytest.raises(CheckpointError) as caught:
        prune_checkpoint(experts[0], keep=0.5)
    assert caught.value.message == f"the base model {base_dir}: tensor {QUERY!r} holds NaN or infinite values (1 entry)"


@pytest.mark.parametrize("block_entries,where", [(1 << 18, "1 entry"), (8, "1 entry in rows 0 to 0")])
def test_merge_refuses_a_non_finite_base_as_its_rows_are_read(nan_base_family, block_entries, where):
    base_dir, experts = nan_base_family
    with pytest.raises(CheckpointError) as caught:
        merge_tensors(experts, method="task-arithmetic", block_entries=block_entries)
    assert caught.value.message == f"the base model {base_dir}: tensor {QUERY!r} holds NaN or infinite values ({where})"


@pytest.mark.parametrize("key,index,options,where", [
    (QUERY, (5, 1), {"method": "ties"}, "1 entry in rows 5 to 5"),  # row blocks of one row (8 entries)
    # checked through its merged rows (MergeMethod.output_checks_inputs), still named as the input's
    (QUERY, (5, 1), {"method": "task-arithmetic"}, "1 entry in rows 5 to 5"),
    (QUERY, (5, 1), {"method": "task-arithmetic", "options": {"lambda": 0.0}}, "1 entry in rows 5 to 5"),
    (QUERY, (5, 1), {"method": "average", "options": {"norms": "average"}}, "1 entry in rows 5 to 5"),
    ("bert.encoder.layer.0.output.LayerNorm.bias", (2,), {"method": "average", "options": {"norms": "average"}},
     "1 entry"),
    ("classifier.bias", (1,), {"method": "average"}, "1 entry"),
])
def test_merge_refuses_non_finite_input_weights_naming_checkpoint_and_tensor(family, tmp_path, key, index, options,
                                                                             where):
    broken = variant(family.experts["sst2"], tmp_path / "broken", tensors=_set(key, index, float("nan")))
    with pytest.raises(CheckpointError) as caught:
        merge_tensors([family.experts["mrpc"], broken], block_entries=8, **options)
    assert caught.value.message == f"{broken.path}: tensor {key!r} holds NaN or infinite values ({where})"


# ----------------------------------------------------------------------------- finite outputs


def test_a_merge_that_overflows_is_refused_before_anything_is_written(family, tmp_path):
    experts = [family.experts["mrpc"], family.experts["sst2"]]
    with pytest.raises(MergeError) as caught:
        merge_checkpoints(experts, tmp_path / "out", method="task-arithmetic", options={"lambda": 1e308})
    message = caught.value.message
    assert message.startswith("merge method task-arithmetic with lambda=1e+308 gives NaN or infinite values in "
                              "tensor 'bert.embeddings.position_embeddings.weight' (")
    assert "overflowed float32" in caught.value.hint
    assert list(tmp_path.iterdir()) == []


def test_the_overflow_check_names_the_row_block(family):
    with pytest.raises(MergeError, match=r"ties with keep=1\.0, scope=tensor, lambda=1e\+39 .* \(8 entries in "
                                         r"rows 0 to 0\)"):
        merge_tensors([family.experts["mrpc"], family.experts["sst2"]], method="ties", block_entries=8,
                      options={"keep": 1.0, "scope": "tensor", "lambda": 1e39})


def test_a_mean_of_one_dimensional_parameters_that_overflows_is_refused(family, tmp_path):
    key = "bert.encoder.layer.0.output.LayerNorm.bias"
    big = [variant(family.experts[task], tmp_path / task, tensors=_set(key, (0,), 3e38)) for task in ("mrpc", "sst2")]
    with pytest.raises(MergeError, match=rf"norms=average gives NaN or infinite values in tensor '{key}' \(1 entry\)"):
        merge_tensors(big, method="average", options={"norms": "average"})


# ----------------------------------------------------------------------------- statistics


@pytest.mark.parametrize("value,message", [
    (torch.tensor([1.0, -2e-9, 0.5]), "statistic 'exp_avg_sq_row/w' holds 1 negative value(s) (as low as -2e-09)"),
    (torch.zeros(3), "statistic 'exp_avg_sq_row/w' is zero for the whole tensor: no gradient ever reached it, "
                     "so it cannot rank the entries"),
])
def test_negative_or_all_zero_statistics_are_refused_by_key(value, message):
    with pytest.raises(CheckpointError) as caught:
        read_stat({"exp_avg_sq_row/w": value}, "exp_avg_sq_row/w", checkpoint_label="runs/x")
    assert caught.value.message == f"runs/x: {message}"
    # zero rows are fine (rows no gradient reached); only a whole tensor of zeros ranks nothing
    assert torch.equal(read_stat({"k": torch.tensor([0.0, 1.0])}, "k", checkpoint_label="x"), torch.tensor([0.0, 1.0]))


@pytest.mark.parametrize("score_name,key", [("curvature", f"exp_avg_sq_col/{QUERY}"),
                                            ("fisher", f"fisher/{QUERY}")])
def test_the_factor_readers_refuse_all_zero_statistics(score_name, key):
    stats = {f"exp_avg_sq_row/{QUERY}": torch.ones(8), f"exp_avg_sq_col/{QUERY}": torch.ones(8),
             f"fisher/{QUERY}": torch.ones(8, 8), key: torch.zeros_like(torch.ones(8) if "col" in key else
                                                                       torch.ones(8, 8))}
    with pytest.raises(CheckpointError, match=f"'{key}' is zero for the whole tensor"):
        score(score_name, QUERY, torch.ones(8, 8), stats, checkpoint_label="x")


def test_prune_and_merge_refuse_bad_statistics_naming_checkpoint_and_key(family, tmp_path):
    key = f"exp_avg_sq_row/{QUERY}"
    negative = variant(family.experts["mrpc"], tmp_path / "negative", stats=_set(key, (3,), -1.0))
    with pytest.raises(CheckpointError, match=rf"^{negative.path}: statistic '{key}' holds 1 negative"):
        prune_checkpoint(negative, keep=0.5)
    zero = variant(family.experts["sst2"], tmp_path / "zero",
                   stats=lambda s: s.update({key: torch.zeros_like(s[key])}))
    with pytest.raises(CheckpointError, match=rf"^{zero.path}: statistic '{key}' is zero for the whole tensor"):
        merge_tensors([family.experts["mrpc"], zero], method="umtam", block_entries=8)


# ----------------------------------------------------------------------------- tensors of the wrong kind


def test_the_base_coverage_check_compares_kinds_of_dtype():
    base = {"w": torch.zeros(2, 3), "ids": torch.arange(3)}
    check_base_covers(base, {"w": (2, 3), "ids": (3,)}, "ckpt", dtypes={"w": torch.bfloat16, "ids": "I64"})
    with pytest.raises(CheckpointError) as caught:
        check_base_covers(base, {"w": (2, 3)}, "ckpt", dtypes={"w": "I64"})
    assert caught.value.message == "tensor 'w' is integer (I64) in ckpt but floating (float32) in the base model"
    with pytest.raises(CheckpointError, match="tensor 'ids' is bool"):
        check_base_covers(base, {"ids": (3,)}, "ckpt", dtypes={"ids": torch.bool})
    with pytest.raises(CheckpointError, match=r"tensor 'w' has shape \[2, 3\] in the base model but \[6\] in ckpt"):
        check_base_covers(base, {"w": (6,)}, "ckpt")


def as_integers(tensors: dict) -> None:
    tensors[QUERY] = torch.round(tensors[QUERY] * 100).to(torch.int64)


def as_vector(tensors: dict) -> None:
    tensors[QUERY] = tensors[QUERY].reshape(-1).clone()


def test_prune_refuses_integer_or_vector_weights_where_the_base_has_a_float_matrix(family, tmp_path):
    integer = variant(family.experts["mrpc"], tmp_path / "integer", tensors=as_integers)
    with pytest.raises(CheckpointError) as caught:
        prune_checkpoint(integer, keep=0.5)
    assert caught.value.message == (f"tensor {QUERY!r} is integer (int64) in {integer.path} "
                                    "but floating (float32) in the base model")
    vector = variant(family.experts["mrpc"], tmp_path / "vector", tensors=as_vector)
    with pytest.raises(CheckpointError) as caught:
        prune_checkpoint(vector, keep=0.5)
    assert caught.value.message == f"tensor {QUERY!r} has shape [8, 8] in the base model but [64] in {vector.path}"


def test_merge_refuses_integer_or_vector_weights(family, tmp_path):
    inputs = {task: family.experts[task] for task in ("mrpc", "sst2")}
    integer = {task: variant(c, tmp_path / f"int-{task}", tensors=as_integers) for task, c in inputs.items()}
    # one input integer: the inputs disagree, refused without reading the base
    with pytest.raises(MergeError) as caught:
        merge_tensors([inputs["mrpc"], integer["sst2"]], method="average", options={"norms": "average"})
    assert caught.value.message == (f"tensor {QUERY!r} is floating (F32) in {inputs['mrpc'].path} "
                                    f"but integer (I64) in {integer['sst2'].path}")
    # both integer: the base says it is a float matrix
    with pytest.raises(CheckpointError, match=rf"tensor '{QUERY}' is integer \(I64\) in .* but floating \(float32\) "
                                              "in the base model"):
        merge_tensors(list(integer.values()), method="average")
    vectors = [variant(c, tmp_path / f"vec-{task}", tensors=as_vector) for task, c in inputs.items()]
    with pytest.raises(CheckpointError, match=rf"tensor '{QUERY}' has shape \[8, 8\] in the base model but \[64\]"):
        merge_tensors(vectors, method="ties")


def test_merge_refuses_floating_weights_it_cannot_merge(family, tmp_path):
    def as_float8(tensors: dict) -> None:
        tensors[QUERY] = tensors[QUERY].to(torch.float8_e4m3fn)

    float8 = [variant(family.experts[task], tmp_path / task, tensors=as_float8) for task in ("mrpc", "sst2")]
    with pytest.raises(MergeError, match=rf"tensor '{QUERY}' is F8_E4M3 in .*; merge reads F64, F32, F16, BF16"):
        merge_tensors(float8, method="average")


# ----------------------------------------------------------------------------- visible rank clamping


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.head = torch.nn.Parameter(torch.randn(2, 16))  # min(m, n) = 2
        self.square = torch.nn.Parameter(torch.randn(16, 16))  # rank 8 fits
        self.conv = torch.nn.Parameter(torch.randn(3, 4, 5))  # read as 3 x 20
        self.bias = torch.nn.Parameter(torch.randn(16))


@pytest.mark.parametrize("name", ["umtam", "galore", "mofasgd"])
def test_effective_ranks_name_the_clamped_matrices_and_match_the_state(name):
    from umtam.optim import build_optimizer, effective_ranks

    torch.manual_seed(0)
    net = _Net()
    optimizer = build_optimizer(name, net.named_parameters(), lr=1e-3, rank=8)
    assert effective_ranks(optimizer, net.named_parameters()) == {"head": 2, "conv": 3}
    assert effective_ranks(optimizer) == {"group0.param0": 2, "group0.param2": 3}  # without names
    for parameter in net.parameters():
        parameter.grad = torch.randn_like(parameter)
    optimizer.step()
    factor = {"umtam": "U", "mofasgd": "U", "galore": "P"}[name]
    used = {key: min(optimizer.state[p][factor].shape) for key, p in net.named_parameters() if p.dim() >= 2}
    assert used == {"head": 2, "square": 8, "conv": 3}


def test_effective_ranks_without_a_rank_or_in_a_dense_group():
    from umtam.optim import UMTAM, build_optimizer, effective_ranks

    net = _Net()
    assert effective_ranks(build_optimizer("adamw", net.named_parameters(), lr=1e-3)) == {}
    dense = UMTAM([{"params": [net.head], "lowrank": False}, {"params": [net.conv, net.square]}], rank=4)
    assert effective_ranks(dense, net.named_parameters()) == {"conv": 3}


# ----------------------------------------------------------------------------- the command line


def _set_weight(ckpt: str, key: str, index: tuple, value: float):
    def build(env: Env) -> None:
        path = getattr(env, ckpt) / "model.safetensors"
        tensors = load_file(path)
        tensors[key][index] = value
        save_file(tensors, path)
        rehash(getattr(env, ckpt), "model.safetensors")
    return build


def _edit_weights(edit: Callable[[dict], object]):
    def build(env: Env) -> None:
        path = env.a / "model.safetensors"
        tensors = load_file(path)
        edit(tensors)
        save_file(tensors, path)
        rehash(env.a, "model.safetensors")
    return build


def _edit_stats(prefix: str, edit: Callable[[torch.Tensor], torch.Tensor]):
    def build(env: Env) -> None:
        path = env.a / "stats.safetensors"
        stats = load_file(path)
        key = sorted(k for k in stats if k.startswith(prefix))[0]
        stats[key] = edit(stats[key])
        save_file(stats, path)
        rehash(env.a, "stats.safetensors")
    return build


def _negative_first(value: torch.Tensor) -> torch.Tensor:
    value = value.clone()
    value[0] = -1e-6
    return value


def _base_with_nan(*ckpts: str):
    """A copy of the base with one NaN in the query weight, recorded (fingerprint and place) by ``ckpts``."""
    def build(env: Env) -> None:
        import shutil

        shutil.copytree(env.family_root / "base", env.path("nan-base"))
        path = env.path("nan-base") / "model.safetensors"
        tensors = load_file(path)
        tensors[QUERY][0, 0] = float("nan")
        save_file(tensors, path, metadata={"format": "pt"})
        encoder = encoder_tensors(tensors)
        for ckpt in ckpts:
            edit_sidecar(getattr(env, ckpt), lambda s: s["base_model"].update(
                fingerprint=fingerprint(encoder), reference=str(env.path("nan-base")),
                location=str(env.path("nan-base"))))
    return build


def case(case_id: str, args: list[str], code: int, names: list[str], build=None):
    return pytest.param(args, code, names, build, id=case_id)


CASES = [
    case("prune-weights-with-nan", ["prune", "{a}", "--keep", "0.5", "-o", "{out}"], 1,
         ["{a}: tensor '" + QUERY + "' holds NaN or infinite values (1 entry)"],
         _set_weight("a", QUERY, (1, 2), math.nan)),
    case("prune-head-with-inf", ["prune", "{a}", "--keep", "0.5", "-o", "{out}"], 1,
         ["{a}: tensor 'classifier.bias' holds NaN or infinite values"],
         _set_weight("a", "classifier.bias", (0,), math.inf)),
    case("prune-base-with-nan", ["prune", "{a}", "--keep", "0.5", "-o", "{out}"], 1,
         ["the base model {ws}/nan-base: tensor '" + QUERY + "' holds NaN or infinite values (1 entry)"],
         _base_with_nan("a")),
    case("merge-weights-with-inf", ["merge", "{a}", "{b}", "-o", "{out}"], 1,
         ["{b}: tensor '" + QUERY + "' holds NaN or infinite values (1 entry)"],
         _set_weight("b", QUERY, (7, 7), -math.inf)),
    case("merge-head-with-nan", ["merge", "{a}", "{b}", "--method", "average", "-o", "{out}"], 1,
         ["{a}: tensor 'classifier.weight' holds NaN or infinite values (1 entry)"],
         _set_weight("a", "classifier.weight", (1, 3), math.nan)),
    case("merge-base-with-nan", ["merge", "{a}", "{b}", "--method", "ties", "-o", "{out}"], 1,
         ["the base model {ws}/nan-base: tensor '" + QUERY + "' holds NaN or infinite values (1 entry)"],
         _base_with_nan("a", "b")),
    case("merge-task-arithmetic-lambda-overflows", ["merge", "{a}", "{b}", "--method", "task-arithmetic",
                                                    "--lambda", "1e308", "-o", "{out}"], 1,
         ["merge method task-arithmetic with lambda=1e+308 gives NaN or infinite values in tensor "
          "'bert.embeddings.position_embeddings.weight'", "nothing was written"]),
    case("prune-stats-negative", ["prune", "{a}", "--keep", "0.5", "-o", "{out}"], 1,
         ["{a}: statistic 'exp_avg_sq_col/bert.encoder.", "holds 1 negative value(s)"],
         _edit_stats("exp_avg_sq_col/bert.encoder", _negative_first)),
    case("merge-stats-all-zero", ["merge", "{a}", "{b}", "-o", "{out}"], 1,
         ["{a}: statistic 'exp_avg_sq_row/bert.encoder.", "is zero for the whole tensor", "--score magnitude"],
         _edit_stats("exp_avg_sq_row/bert.encoder", torch.zeros_like)),
    case("prune-integer-weight", ["prune", "{a}", "--keep", "0.5", "-o", "{out}"], 1,
         ["tensor '" + QUERY + "' is integer (int64) in {a} but floating (float32) in the base model"],
         _edit_weights(as_integers)),
    case("prune-vector-where-the-base-has-a-matrix", ["prune", "{a}", "--keep", "0.5", "-o", "{out}"], 1,
         ["tensor '" + QUERY + "' has shape [8, 8] in the base model but [64] in {a}"], _edit_weights(as_vector)),
    case("merge-integer-weight-in-one-input", ["merge", "{a}", "{b}", "-o", "{out}"], 1,
         ["tensor '" + QUERY + "' is integer (I64) in {a} but floating (F32) in {b}"], _edit_weights(as_integers)),
]


@pytest.mark.parametrize("args, code, names, build", CASES)
def test_bad_numbers_on_the_command_line(env, args, code, names, build):
    before, after = run_bad_case(env, args, code, names, build)
    assert unchanged_but_for_streaming(args, before, after)


def test_prune_keeps_exactly_the_fraction_asked_on_the_command_line(env):
    # The experts leave 40% of their entries untouched (score 0): at --keep 0.7 the threshold is 0,
    # and ">= threshold" kept every entry (kept_fraction 1.0).
    code, stdout, stderr = run_cli("prune", str(env.a), "--keep", "0.7", "--json", "-o", str(env.path("out")))
    assert code == 0, stderr
    report = json.loads(stdout)
    assert report["threshold"] == 0.0
    assert report["kept_entries"] == keep_count(0.7, report["total_entries"])
    assert load_checkpoint(env.path("out")).sidecar.as_json()["lineage"]["kept_fraction"] == report["kept_fraction"]
