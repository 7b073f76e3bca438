"""Every merge method on hand-computed 3x4 tensors, plus the properties they must keep."""

from __future__ import annotations

import importlib
import itertools

import pytest
import torch
from torch.testing import assert_close

from umtam.errors import ConfigError
from umtam.merge import TensorGroup, available_methods, get_method, register
from umtam.merge.dare import drop_mask

NAME = "layer.weight"
# Base values 0, 0.25, ..., 2.75 and task vectors of halves: every W_t - W0 is exact.
W0 = torch.arange(12, dtype=torch.float32).reshape(3, 4) / 4
# |T1| sorted: 8 7 6 5 4 3 2.5 2 1.5 1 0.5 0 (all distinct)
T1 = torch.tensor([[6.0, -1.0, 0.0, 2.0],
                   [-5.0, 3.0, -4.0, 0.5],
                   [1.5, -7.0, 8.0, -2.5]])
# |T2| sorted: 8 7 6 5 4 3 2.5 2 1.5 1 0.5 0 (all distinct)
T2 = torch.tensor([[4.0, 2.5, -3.0, -1.0],
                   [1.5, -6.0, 5.0, 0.0],
                   [-2.0, -8.0, -7.0, 0.5]])


def stats_of(rows, cols):
    return {f"exp_avg_sq_row/{NAME}": torch.tensor(rows), f"exp_avg_sq_col/{NAME}": torch.tensor(cols)}


# Task 1: R = 1, C = 1 -> sqrt(R_i C_j) = 1 and R C^T / mean(R) = 1 everywhere.
FLAT = stats_of([1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0])
# Task 2: column 0 is curved: sqrt(R_i C_j) = [9, 1, 1, 1] per row, R C^T / mean(R) = [81, 1, 1, 1].
CURVED_COL0 = stats_of([1.0, 1.0, 1.0], [81.0, 1.0, 1.0, 1.0])


def two_tasks(**kwargs) -> TensorGroup:
    return TensorGroup(NAME, (W0 + T1, W0 + T2), base=W0, stats=(FLAT, CURVED_COL0), **kwargs)


def merge(method: str, group: TensorGroup, **options) -> torch.Tensor:
    spec = get_method(method)
    return spec.merge(group, spec.resolve_options(options))


def delta(rows) -> torch.Tensor:
    return W0 + torch.tensor(rows)


# ----------------------------------------------------------------------------- hand-computed


def test_average_is_the_mean_of_weights():
    # (W1 + W2) / 2 = W0 + (T1 + T2) / 2; T1 + T2 = [[10, 1.5, -3, 1], [-3.5, -3, 1, .5], [-.5, -15, 1, -2]]
    expected = delta([[5.0, 0.75, -1.5, 0.5], [-1.75, -1.5, 0.5, 0.25], [-0.25, -7.5, 0.5, -1.0]])
    assert torch.equal(merge("average", two_tasks()), expected)


def test_task_arithmetic_scales_the_sum():
    # lambda = 0.5 of the sum above equals the average; lambda = 1 is the plain sum
    assert torch.equal(merge("task-arithmetic", two_tasks(), **{"lambda": 0.5}), merge("average", two_tasks()))
    assert torch.equal(merge("task-arithmetic", two_tasks()), W0 + T1 + T2)


def test_ties_per_tensor_trim_elect_disjoint_mean():
    # keep 0.25 of 12 -> 3 per task. T1 keeps 8 (2,2), -7 (2,1), 6 (0,0); T2 keeps -8 (2,1), -7 (2,2), -6 (1,1).
    # elected signs (sum of trimmed): (0,0) +6 -> +, (1,1) -6 -> -, (2,1) -15 -> -, (2,2) 8 - 7 = 1 -> +.
    # disjoint mean of agreeing entries: (0,0) 6, (1,1) -6, (2,1) (-7 - 8) / 2 = -7.5, (2,2) only T1: 8.
    expected = delta([[6.0, 0, 0, 0], [0, -6.0, 0, 0], [0, -7.5, 8.0, 0]])
    assert torch.equal(merge("ties", two_tasks(), keep=0.25, scope="tensor"), expected)


def test_ties_sum_adds_agreeing_entries_and_lambda_scales():
    # as above but (2,1) = -7 + -8 = -15; then lambda 0.5 halves the delta
    expected = delta([[3.0, 0, 0, 0], [0, -3.0, 0, 0], [0, -7.5, 4.0, 0]])
    got = merge("ties", two_tasks(), keep=0.25, scope="tensor", agg="sum", **{"lambda": 0.5})
    assert torch.equal(got, expected)


def test_ties_global_trim_uses_the_prepare_pass_thresholds():
    # thresholds are in score units (T^2): T1 keeps |T| >= 7: (2,1) -7, (2,2) 8; T2 keeps |T| >= 8: (2,1) -8.
    # signs: (2,1) -15 -> -, (2,2) 8 -> +; mean: (2,1) -7.5, (2,2) 8.
    group = two_tasks(thresholds=(49.0, 64.0))
    expected = delta([[0, 0, 0, 0], [0, 0, 0, 0], [0, -7.5, 8.0, 0]])
    assert torch.equal(merge("ties", group, keep=0.25, scope="global"), expected)


def test_dare_ties_without_drops_is_ties_with_everything_kept():
    # signs of T1 + T2: [[+,+,-,+],[-,-,+,+],[-,-,+,-]]; disjoint mean of the agreeing entries:
    # (0,0) (6+4)/2 = 5, (0,1) 2.5, (0,2) -3, (0,3) 2, (1,0) -5, (1,1) -6, (1,2) 5, (1,3) 0.5,
    # (2,0) -2, (2,1) -7.5, (2,2) 8, (2,3) -2.5
    expected = delta([[5.0, 2.5, -3.0, 2.0], [-5.0, -6.0, 5.0, 0.5], [-2.0, -7.5, 8.0, -2.5]])
    assert torch.equal(merge("dare-ties", two_tasks(), drop=0.0), expected)
    assert torch.equal(merge("ties", two_tasks(), keep=1.0, scope="tensor"), expected)


def test_dare_keeps_rescaled_survivors_of_the_seeded_mask():
    group = two_tasks()
    # drop 0.5: each survivor doubles; the masks are the seeded ones of (seed, task id, tensor name)
    masks = [drop_mask(W0.shape, drop=0.5, seed=7, task_id=task, name=NAME) for task in ("0", "1")]
    expected = W0 + (T1 * masks[0] * 2 + T2 * masks[1] * 2)
    assert torch.equal(merge("dare", group, drop=0.5, seed=7), expected)
    assert torch.equal(merge("dare", group, drop=0.0), W0 + T1 + T2)


def test_fisher_weights_each_entry_by_the_rank_one_second_moment():
    # F1 = 1; task 2 with R = [1, 2, 3], C = 2 (mean R = 2): F2 = R_i C_j / 2 = R_i, so row i is
    # (W1 + r W2) / (1 + r): row 0 (T1 + T2) / 2, row 1 (T1 + 2 T2) / 3, row 2 (T1 + 3 T2) / 4
    group = TensorGroup(NAME, (W0 + T1, W0 + T2), stats=(FLAT, stats_of([1.0, 2.0, 3.0], [2.0] * 4)))
    expected = delta([[5.0, 0.75, -1.5, 0.5],
                      [-2 / 3, -3.0, 2.0, 1 / 6],  # [-5 + 3, 3 - 12, -4 + 10, 0.5] / 3
                      [-1.125, -7.75, -3.25, -0.25]])  # [1.5 - 6, -7 - 24, 8 - 21, -2.5 + 1.5] / 4
    assert_close(merge("fisher", group, eps=0.0), expected)


def test_fisher_full_diagonal_option():
    full1 = {f"fisher/{NAME}": torch.ones(3, 4)}
    full2 = {f"fisher/{NAME}": torch.full((3, 4), 3.0)}
    group = TensorGroup(NAME, (W0 + T1, W0 + T2), stats=(full1, full2))
    # (1 W1 + 3 W2) / 4 = W0 + (T1 + 3 T2) / 4
    assert_close(merge("fisher", group, fisher="full", eps=0.0), W0 + (T1 + 3 * T2) / 4)


def test_ota_grafts_by_t2_v_and_weights_by_sqrt_v():
    # v1 = 1, v2 = [81, 1, 1, 1] per row; P = sqrt(v): P1 = 1, P2 = [9, 1, 1, 1].
    # graft scores T^2 v: task 1 keeps (2,2) 64, (2,1) 49, (0,0) 36;
    # task 2 column 0 is 16*81, 2.25*81, 4*81 -> keeps (0,0), (2,0), (1,0) (its 64 at (2,1) loses).
    # denominator "all": (0,0) (6 + 9*4) / 10 = 4.2, (1,0) 9*1.5 / 10 = 1.35, (2,0) 9*-2 / 10 = -1.8,
    # (2,1) -7 / 2 = -3.5, (2,2) 8 / 2 = 4
    expected = delta([[4.2, 0, 0, 0], [1.35, 0, 0, 0], [-1.8, -3.5, 4.0, 0]])
    assert_close(merge("ota", two_tasks(), keep=0.25, eps=0.0), expected)


def test_ota_kept_denominator_does_not_pull_grafted_out_entries_to_the_base():
    # denominator "kept": (0,0) 4.2, (1,0) 1.5, (2,0) -2, (2,1) -7, (2,2) 8
    expected = delta([[4.2, 0, 0, 0], [1.5, 0, 0, 0], [-2.0, -7.0, 8.0, 0]])
    assert_close(merge("ota", two_tasks(), keep=0.25, eps=0.0, denominator="kept"), expected)


# umtam on the same tensors. Saliency s = T^2 sqrt(R_i C_j): task 1 s1 = T1^2;
# task 2 s2 = T2^2 * [9, 1, 1, 1]: [[144, 6.25, 9, 1], [20.25, 36, 25, 0], [36, 64, 49, .25]].
# keep 0.25 -> 3 each: m1 = (2,2) 64, (2,1) 49, (0,0) 36; m2 = (0,0) 144, (2,1) 64, (2,2) 49.
# elect sign(sum m s sign T): (0,0) 36 + 144 -> +, (2,1) -49 - 64 -> -, (2,2) 64 - 49 -> +.
# curvature weights divided by their mean: c1 = 1; c2 = [9, 1, 1, 1] / 3 = [3, 1/3, 1/3, 1/3].


def test_umtam_hand_computed():
    # (0,0) (1*6 + 3*4) / 4 = 4.5; (2,1) (-7 - 8/3) / (4/3) = -7.25; (2,2) only task 1: 8
    expected = delta([[4.5, 0, 0, 0], [0, 0, 0, 0], [0, -7.25, 8.0, 0]])
    assert_close(merge("umtam", two_tasks(), keep=0.25), expected)


def test_umtam_uniform_weights_ablation():
    # (0,0) (6 + 4) / 2 = 5; (2,1) -7.5; (2,2) 8
    expected = delta([[5.0, 0, 0, 0], [0, 0, 0, 0], [0, -7.5, 8.0, 0]])
    assert_close(merge("umtam", two_tasks(), keep=0.25, weights="uniform"), expected)


def test_umtam_no_election_ablation():
    # (2,2) now aggregates both: (8 - 7/3) / (4/3) = 4.25
    expected = delta([[4.5, 0, 0, 0], [0, 0, 0, 0], [0, -7.25, 4.25, 0]])
    assert_close(merge("umtam", two_tasks(), keep=0.25, elect=False), expected)


def test_umtam_magnitude_trim_ablation_and_lambda():
    # m2 by T^2: (2,1) 64, (2,2) 49, (1,1) 36; election by T^2: (0,0) +36 -> +, (1,1) -36 -> -,
    # (2,1) -113 -> -, (2,2) 64 - 49 -> +; curvature weights as before:
    # (0,0) only task 1: 6; (1,1) only task 2: -6; (2,1) -7.25; (2,2) 8. lambda 2 doubles.
    expected = delta([[12.0, 0, 0, 0], [0, -12.0, 0, 0], [0, -14.5, 16.0, 0]])
    assert_close(merge("umtam", two_tasks(), keep=0.25, trim="magnitude", **{"lambda": 2.0}), expected)


def test_entries_no_task_keeps_stay_at_the_base():
    # opposite task vectors of equal saliency cancel in the election: nothing agrees
    group = TensorGroup(NAME, (W0 + T1, W0 - T1), base=W0, stats=(FLAT, FLAT))
    assert torch.equal(merge("umtam", group, keep=1.0), W0)
    assert torch.equal(merge("ties", group, keep=1.0, scope="tensor"), W0)


# ----------------------------------------------------------------------------- properties

SINGLE_TASK_CASES = [
    ("average", {}),
    ("ties", {"keep": 1.0, "scope": "tensor"}),
    ("umtam", {"keep": 1.0}),
    ("ota", {"keep": 1.0}),
    ("fisher", {}),
    ("dare", {"drop": 0.0}),
    ("task-arithmetic", {}),
]


@pytest.mark.parametrize("method,options", SINGLE_TASK_CASES, ids=[c[0] for c in SINGLE_TASK_CASES])
def test_merging_one_task_returns_it(method, options):
    group = TensorGroup(NAME, (W0 + T2,), base=W0, stats=(CURVED_COL0,))
    assert_close(merge(method, group, **options), W0 + T2)


def _random_group(count: int, *, seed: int, same_sign: bool = False) -> TensorGroup:
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(5, 6, generator=generator)
    vectors = [torch.randn(5, 6, generator=generator) for _ in range(count)]
    if same_sign:
        vectors = [v.abs() + 0.1 for v in vectors]
    stats = tuple(
        {f"exp_avg_sq_row/{NAME}": torch.rand(5, generator=generator) + 0.1,
         f"exp_avg_sq_col/{NAME}": torch.rand(6, generator=generator) + 0.1}
        for _ in range(count)
    )
    return TensorGroup(NAME, tuple(base + v for v in vectors), base=base, stats=stats,
                       task_ids=tuple(f"task{i}" for i in range(count)))


def test_ties_at_keep_one_without_sign_conflict_is_task_arithmetic():
    group = _random_group(3, seed=1, same_sign=True)
    arithmetic = merge("task-arithmetic", group)
    assert_close(merge("ties", group, keep=1.0, scope="tensor", agg="sum"), arithmetic)
    # the paper's disjoint mean divides by the agreeing count (all 3 here): task arithmetic with 1/K
    assert_close(merge("ties", group, keep=1.0, scope="tensor", agg="mean"),
                 merge("task-arithmetic", group, **{"lambda": 1 / 3}))


ALL_CASES = [(name, {}) for name in available_methods()] + [
    ("ties", {"scope": "tensor", "agg": "sum"}),
    ("umtam", {"elect": False, "weights": "uniform"}),
    ("ota", {"denominator": "kept", "normalise": "mean"}),
    ("dare-ties", {"seed": 5}),
]


@pytest.mark.parametrize("method,options", ALL_CASES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(ALL_CASES)])
def test_input_order_does_not_change_the_result(method, options):
    group = _random_group(3, seed=2)
    results = []
    for order in itertools.permutations(range(3)):
        permuted = TensorGroup(
            NAME, tuple(group.weights[i] for i in order), base=group.base,
            stats=tuple(group.stats[i] for i in order), task_ids=tuple(group.task_ids[i] for i in order),
        )
        results.append(merge(method, permuted, **options))
    for result in results[1:]:
        assert_close(result, results[0], rtol=1e-6, atol=1e-6)


def test_dare_is_reproducible_per_seed_and_drops_about_p():
    group = _random_group(2, seed=3)
    first = merge("dare", group, drop=0.5, seed=11)
    assert torch.equal(first, merge("dare", group, drop=0.5, seed=11))
    assert not torch.equal(first, merge("dare", group, drop=0.5, seed=12))
    big = drop_mask(torch.Size([64, 64]), drop=0.3, seed=0, task_id="mrpc", name=NAME)
    assert abs(big.float().mean().item() - 0.7) < 0.03


def test_dare_masks_do_not_depend_on_processing_order():
    # a private generator per (seed, task, tensor): drawing another tensor first changes nothing
    alone = drop_mask(torch.Size([4, 4]), drop=0.5, seed=1, task_id="a", name="x")
    drop_mask(torch.Size([9, 9]), drop=0.5, seed=1, task_id="a", name="y")
    torch.rand(100)
    assert torch.equal(alone, drop_mask(torch.Size([4, 4]), drop=0.5, seed=1, task_id="a", name="x"))
    assert not torch.equal(alone, drop_mask(torch.Size([4, 4]), drop=0.5, seed=1, task_id="b", name="x"))


# ----------------------------------------------------------------------------- registry and options


def test_unknown_method_lists_choices_with_a_suggestion():
    with pytest.raises(ConfigError) as caught:
        get_method("tie")
    assert "did you mean 'ties'" in str(caught.value) and "umtam" in str(caught.value)


def test_duplicate_method_name_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        register(get_method("ties"))


def test_options_report_every_problem_with_suggestions():
    with pytest.raises(ConfigError) as caught:
        get_method("ties").resolve_options({"kep": 0.3, "agg": "max", "keep": 0})
    message = str(caught.value)
    assert "did you mean 'keep'" in message
    assert "agg='max'" in message and "keep=0" in message


def test_defaults_are_documented_values():
    assert get_method("umtam").resolve_options() == {
        "keep": 0.2, "scope": "tensor", "trim": "curvature", "elect": True, "weights": "curvature",
        "lambda": 1.0, "norms": "base",  # chosen on holdout scores, see merge/base.py
    }
    assert get_method("ties").resolve_options()["keep"] == 0.2
    assert get_method("task-arithmetic").resolve_options()["lambda"] == 1.0


def test_every_method_names_its_paper_in_its_docstring():
    for name in available_methods():
        spec = get_method(name)
        module = importlib.import_module(spec.merge.__module__)
        assert spec.url.startswith("https://arxiv.org/abs/") and spec.url in module.__doc__


def test_dare_masks_drawn_block_after_block_equal_the_whole_tensor_mask():
    # a tensor merged in row blocks draws each block from one stream per task, in order
    whole = drop_mask(torch.Size([7, 5]), drop=0.4, seed=2, task_id="mrpc", name=NAME)
    (stream,) = get_method("dare").random_streams(NAME, ("mrpc",), {"seed": 2})
    rows = [drop_mask(torch.Size([n, 5]), drop=0.4, seed=2, task_id="mrpc", name=NAME, generator=stream)
            for n in (3, 1, 3)]
    assert torch.equal(torch.cat(rows), whole)


def test_a_row_block_merges_to_the_rows_of_the_whole_tensor():
    from umtam.saliency import RowBlock

    group = _random_group(3, seed=4)
    for method, options in [("umtam", {"keep": 1.0}), ("fisher", {}), ("ota", {"keep": 1.0, "normalise": "mean"})]:
        whole = merge(method, group, **options)
        block = TensorGroup(NAME, tuple(w[1:4] for w in group.weights), base=group.base[1:4], stats=group.stats,
                            task_ids=group.task_ids, block=RowBlock(1, 4, 5))
        assert torch.equal(merge(method, block, **options), whole[1:4]), method
