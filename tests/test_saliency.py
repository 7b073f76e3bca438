"""Saliency scores on hand-computed tensors, the registry, and exact thresholds."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from umtam import saliency
from umtam.scores import SCORES, required_stats
from umtam.errors import CheckpointError, ConfigError

NAME = "layer.weight"
# T (3 x 4) and factors with sqrt(R) = [1, 2, 3], sqrt(C) = [1, 2, 3, 4].
T = torch.tensor([[1.0, -1.0, 2.0, 0.0],
                  [0.5, 1.0, -1.0, 2.0],
                  [-2.0, 0.0, 1.0, 1.0]])
STATS = {
    f"exp_avg_sq_row/{NAME}": torch.tensor([1.0, 4.0, 9.0]),
    f"exp_avg_sq_col/{NAME}": torch.tensor([1.0, 4.0, 9.0, 16.0]),
}


def test_curvature_score_is_t_squared_times_sqrt_r_c():
    # sqrt(R_i C_j) = outer([1, 2, 3], [1, 2, 3, 4]); T^2 = [[1,1,4,0],[.25,1,1,4],[4,0,1,1]]
    expected = torch.tensor([[1.0 * 1, 1 * 2, 4 * 3, 0 * 4],
                             [0.25 * 2, 1 * 4, 1 * 6, 4 * 8],
                             [4.0 * 3, 0 * 6, 1 * 9, 1 * 12]])
    got = saliency.score("curvature", NAME, T, STATS, checkpoint_label="ckpt")
    assert torch.equal(got, expected)


def test_tensor_curvature_divides_the_curvature_by_its_tensor_mean():
    # mean sqrt(R_i C_j) = mean([1, 2, 3]) * mean([1, 2, 3, 4]) = 2 * 2.5 = 5; entry (1, 3): 4 * 8 / 5
    got = saliency.score("curvature-tensor", NAME, T, STATS, checkpoint_label="ckpt")
    assert got[1, 3].item() == pytest.approx(32 / 5) and got[2, 0].item() == pytest.approx(12 / 5)
    assert torch.allclose(got, saliency.score("curvature", NAME, T, STATS, checkpoint_label="ckpt") / 5)
    # the same weight with every statistic 100x larger (a loss of another scale) scores the same
    louder = {key: value * 100 for key, value in STATS.items()}
    assert torch.allclose(saliency.score("curvature-tensor", NAME, T, louder, checkpoint_label="ckpt"), got)


def test_row_curvature_keeps_only_the_column_curvature_over_its_mean():
    # sqrt(C) / mean(sqrt C) = [1, 2, 3, 4] / 2.5; sqrt(R) cancels: T^2 = [[1,1,4,0],[.25,1,1,4],[4,0,1,1]]
    expected = torch.tensor([[1 * 0.4, 1 * 0.8, 4 * 1.2, 0 * 1.6],
                             [0.25 * 0.4, 1 * 0.8, 1 * 1.2, 4 * 1.6],
                             [4 * 0.4, 0 * 0.8, 1 * 1.2, 1 * 1.6]])
    got = saliency.score("curvature-row", NAME, T, STATS, checkpoint_label="ckpt")
    assert torch.allclose(got, expected)
    # a row no gradient reached (R_i = 0) still ranks by its T, where raw curvature scores it 0
    silent = {**STATS, f"exp_avg_sq_row/{NAME}": torch.tensor([1.0, 0.0, 9.0])}
    assert torch.allclose(saliency.score("curvature-row", NAME, T, silent, checkpoint_label="ckpt"), expected)
    assert saliency.score("curvature", NAME, T, silent, checkpoint_label="ckpt")[1].abs().sum() == 0
    # a vector is one row: sqrt(v) / mean(sqrt v) = [2, 3, 4] / 3
    vector, stats = torch.tensor([2.0, -1.0, 0.5]), {"exp_avg_sq/b": torch.tensor([4.0, 9.0, 16.0])}
    got = saliency.score("curvature-row", "b", vector, stats, checkpoint_label="ckpt")
    assert torch.allclose(got, torch.tensor([4 * 2 / 3, 1 * 3 / 3, 0.25 * 4 / 3]))


def test_trajectory_score_is_the_recorded_statistic_itself():
    trajectory = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    stats = {f"trajectory/{NAME}": trajectory}
    got = saliency.score("trajectory", NAME, T, stats, checkpoint_label="ckpt")
    assert torch.equal(got, trajectory)  # it holds T_t^2 already: the final T does not enter again
    got[0, 0] = 99.0
    assert stats[f"trajectory/{NAME}"][0, 0] == 0.0  # a copy: callers may work on it in place
    assert required_stats("trajectory", NAME, 2) == (f"trajectory/{NAME}",)


def test_magnitude_score_is_t_squared_and_needs_no_stats():
    got = saliency.score("magnitude", NAME, T, {}, checkpoint_label="ckpt")
    assert torch.equal(got, T * T)
    assert required_stats("magnitude", NAME, 2) == ()


def test_fisher_score_uses_the_full_diagonal():
    fisher = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    got = saliency.score("fisher", NAME, T, {f"fisher/{NAME}": fisher}, checkpoint_label="ckpt")
    # entry (1, 3): T = 2, F = 7 -> 4 * 7 = 28; entry (2, 0): T = -2, F = 8 -> 32
    assert got[1, 3] == 28 and got[2, 0] == 32
    assert torch.equal(got, T * T * fisher)


def test_second_moment_is_adafactors_rank_one_reconstruction():
    # R C^T / mean(R), mean(R) = 14 / 3: entry (2, 3) = 9 * 16 * 3 / 14
    got = saliency.second_moment(NAME, T.shape, STATS, checkpoint_label="ckpt")
    assert got[2, 3].item() == pytest.approx(9 * 16 * 3 / 14)
    assert got[0, 0].item() == pytest.approx(3 / 14)


def test_one_dimensional_parameters_use_sqrt_v_elementwise():
    vector = torch.tensor([2.0, -1.0, 0.5])
    stats = {"bias/exp": torch.zeros(1), "exp_avg_sq/b": torch.tensor([4.0, 9.0, 16.0])}
    got = saliency.score("curvature", "b", vector, stats, checkpoint_label="ckpt")
    # T^2 * sqrt(v) = [4 * 2, 1 * 3, 0.25 * 4]
    assert torch.equal(got, torch.tensor([8.0, 3.0, 1.0]))


def test_higher_rank_weights_are_read_as_rows_by_the_rest():
    weight = torch.ones(2, 2, 3)
    stats = {"exp_avg_sq_row/w": torch.tensor([1.0, 4.0]), "exp_avg_sq_col/w": torch.ones(6)}
    got = saliency.curvature("w", weight.shape, stats, checkpoint_label="ckpt")
    assert got.shape == (2, 2, 3)
    assert torch.equal(got[1], torch.full((2, 3), 2.0))


def test_missing_statistic_names_checkpoint_key_and_remedy():
    with pytest.raises(CheckpointError) as caught:
        saliency.score("curvature", NAME, T, {}, checkpoint_label="runs/mrpc")
    message = str(caught.value)
    assert "runs/mrpc" in message and f"exp_avg_sq_row/{NAME}" in message
    assert "no stats.safetensors" in message and "umtam train" in message and "magnitude" in message


def test_statistic_of_the_wrong_length_is_refused():
    stats = {f"exp_avg_sq_row/{NAME}": torch.ones(5), f"exp_avg_sq_col/{NAME}": torch.ones(4)}
    with pytest.raises(CheckpointError, match="5 x 4"):
        saliency.score("curvature", NAME, T, stats, checkpoint_label="ckpt")


@pytest.mark.parametrize("score_name", ["curvature", "second-moment"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_statistics_with_nan_or_inf_are_refused_by_name(score_name, bad):
    stats = {**STATS, f"exp_avg_sq_col/{NAME}": torch.tensor([1.0, bad, 9.0, bad])}
    with pytest.raises(CheckpointError, match=rf"runs/x: statistic 'exp_avg_sq_col/{NAME}' holds 2 NaN or inf"):
        saliency.score(score_name, NAME, T, stats, checkpoint_label="runs/x")


def test_unknown_score_suggests_the_close_match():
    with pytest.raises(ConfigError, match="did you mean 'curvature'"):
        saliency.get_score("curvatur")


def test_registering_a_name_twice_is_refused():
    from umtam.scores import SCORES, ScoreSpec, no_stats

    with pytest.raises(ValueError, match="already registered"):
        SCORES.register(ScoreSpec("magnitude", "magnitude_score", no_stats, "again"))


@pytest.mark.parametrize("keep", [0, -0.5, 1.5, True, "0.5", float("nan")])
def test_keep_must_be_a_fraction(keep):
    with pytest.raises(ConfigError, match="keep"):
        saliency.check_keep(keep)


def test_keep_count_rounds_and_keeps_at_least_one():
    assert saliency.keep_count(0.2, 10) == 2  # 0.2 * 10 = 2.0000000000000004 must not become 3
    assert saliency.keep_count(0.25, 10) == 2  # round half to even: 2.5 -> 2
    assert saliency.keep_count(0.001, 10) == 1
    assert saliency.keep_count(1.0, 7) == 7


def test_tensor_threshold_keeps_ties_at_the_threshold():
    scores = torch.tensor([5.0, 3.0, 3.0, 1.0])
    threshold = saliency.tensor_threshold(scores, 0.5)  # k = 2: the 2nd largest is 3
    assert threshold == 3.0
    assert int((scores >= threshold).sum()) == 3  # both tied 3s kept


def _concatenated_threshold(tensors, keep):
    return saliency.tensor_threshold(torch.cat([t.reshape(-1) for t in tensors]), keep)


@settings(max_examples=15, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 30), min_size=1, max_size=5),
    keep=st.floats(0.01, 1.0),
    seed=st.integers(0, 10_000),
    quantise=st.booleans(),
)
def test_streaming_threshold_equals_kthvalue_on_the_concatenation(sizes, keep, seed, quantise):
    generator = torch.Generator().manual_seed(seed)
    tensors = [torch.rand(size, generator=generator) ** 4 for size in sizes]
    if quantise:  # many exact ties and zeros
        tensors = [torch.floor(t * 4) / 4 for t in tensors]
    series = [tensors, [t * 3 for t in reversed(tensors)]]

    def batches():
        return zip(*series)

    got = saliency.streaming_thresholds(batches, keep)
    assert got == [_concatenated_threshold(series[0], keep), _concatenated_threshold(series[1], keep)]


def test_streaming_threshold_spans_many_orders_of_magnitude():
    tensors = [torch.tensor([1e-30, 1e-12, 0.0]), torch.tensor([3e-7, 1e5, 2.5e-20, 7.0])]
    for keep in (0.1, 0.3, 0.5, 0.8, 1.0):
        assert saliency.streaming_thresholds(lambda: ((t,) for t in tensors), keep) == [
            _concatenated_threshold(tensors, keep)
        ]


# ----------------------------------------------------------------------------- row blocks


def _random_stats(rows, cols, seed):
    generator = torch.Generator().manual_seed(seed)
    return {
        f"exp_avg_sq_row/{NAME}": torch.rand(rows, generator=generator) * 1e-4,
        f"exp_avg_sq_col/{NAME}": torch.rand(cols, generator=generator) * 1e-4,
        f"fisher/{NAME}": torch.rand(rows * cols, generator=generator),
        f"trajectory/{NAME}": torch.rand(rows * cols, generator=generator),
    }


@pytest.mark.parametrize("name", SCORES.names())
def test_row_block_scores_are_the_rows_of_the_whole_scores_bit_for_bit(name):
    stats = _random_stats(7, 5, seed=1)
    vector = torch.randn(7, 5, generator=torch.Generator().manual_seed(2))
    whole = saliency.score(name, NAME, vector, stats, checkpoint_label="ckpt")
    for start, stop in ((0, 3), (3, 6), (6, 7)):
        block = saliency.RowBlock(start, stop, 7)
        got = saliency.score(name, NAME, vector[start:stop], stats, checkpoint_label="ckpt", block=block)
        assert torch.equal(got, whole[start:stop])


def test_row_block_statistics_are_checked_against_the_whole_weight():
    stats = _random_stats(7, 5, seed=1)
    with pytest.raises(CheckpointError, match="7 x 5"):
        saliency.score("curvature", NAME, torch.ones(2, 5), stats, checkpoint_label="ckpt",
                       block=saliency.RowBlock(0, 2, 9))


def test_means_from_the_factors_equal_the_dense_means():
    # sqrt(R) = [1, 2, 3], sqrt(C) = [1, 2, 3, 4]: mean of the outer product = 2 * 2.5 = 5
    assert saliency.curvature_mean(NAME, T.shape, STATS, checkpoint_label="ckpt") == 5.0
    stats = _random_stats(30, 20, seed=3)
    shape = torch.Size([30, 20])
    dense = saliency.curvature(NAME, shape, stats, checkpoint_label="ckpt").double().mean()
    assert saliency.curvature_mean(NAME, shape, stats, checkpoint_label="ckpt") == pytest.approx(float(dense), rel=1e-6)
    for power in (1.0, 0.5, 2.0):
        moment = saliency.second_moment(NAME, shape, stats, checkpoint_label="ckpt").double().pow(power).mean()
        got = saliency.second_moment_mean(NAME, shape, stats, checkpoint_label="ckpt", power=power)
        assert got == pytest.approx(float(moment), rel=1e-5)
    zero = {f"exp_avg_sq_row/{NAME}": torch.zeros(30), f"exp_avg_sq_col/{NAME}": torch.ones(20)}
    # An all-zero R means no gradient ever reached the weight: it ranks nothing and is refused (issue 13).
    with pytest.raises(CheckpointError, match=rf"'exp_avg_sq_row/{NAME}' is zero for the whole tensor"):
        saliency.second_moment_mean(NAME, shape, zero, checkpoint_label="ckpt")


def test_streaming_threshold_treats_negative_zero_as_zero():
    tensors = [torch.tensor([-0.0, 0.0, 2.0]), torch.tensor([-0.0, 1.0])]
    for keep in (0.2, 0.6, 1.0):
        assert saliency.streaming_thresholds(lambda: ((t,) for t in tensors), keep) == [
            _concatenated_threshold(tensors, keep)
        ]
