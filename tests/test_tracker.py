"""CurvatureTracker: hand-computed EMAs, reuse of UMTAM's statistics, resume, memory."""

from __future__ import annotations

import pytest
import torch

from umtam.optim import UMTAM, CurvatureTracker, build_optimizer


def _set_grads(named, grads):
    for (_, p), g in zip(named, grads):
        p.grad = g.clone()


def test_hand_computed_two_steps_with_bias_correction():
    W = torch.nn.Parameter(torch.zeros(2, 3))
    b = torch.nn.Parameter(torch.zeros(2))
    named = [("w", W), ("b", b)]
    tracker = CurvatureTracker(named, beta2=0.5)
    _set_grads(named, [torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]), torch.tensor([1.0, -2.0])])
    tracker.update()
    stats = tracker.stats()
    # step 1: the bias-corrected EMA is the statistic itself
    torch.testing.assert_close(stats["exp_avg_sq_row/w"], torch.tensor([14 / 3, 77 / 3]))
    torch.testing.assert_close(stats["exp_avg_sq_col/w"], torch.tensor([17 / 2, 29 / 2, 45 / 2]))
    torch.testing.assert_close(stats["exp_avg_sq/b"], torch.tensor([1.0, 4.0]))
    _set_grads(named, [torch.tensor([[0.0, 1.0, 0.0], [2.0, 0.0, 2.0]]), torch.tensor([3.0, 0.0])])
    tracker.update()
    stats = tracker.stats()
    # R = 0.5 [7/3, 77/6] + 0.5 [1/3, 8/3] = [4/3, 31/4], divided by 1 - 0.5^2
    torch.testing.assert_close(stats["exp_avg_sq_row/w"], torch.tensor([16 / 9, 31 / 3]))
    # C = 0.5 [17/4, 29/4, 45/4] + 0.5 [2, 1/2, 2] = [25/8, 31/8, 53/8], / 0.75
    torch.testing.assert_close(stats["exp_avg_sq_col/w"], torch.tensor([25 / 6, 31 / 6, 53 / 6]))
    # v = 0.5 [0.5, 2] + 0.5 [9, 0] = [4.75, 1], / 0.75
    torch.testing.assert_close(stats["exp_avg_sq/b"], torch.tensor([19 / 3, 4 / 3]))
    assert set(stats) == {"exp_avg_sq_row/w", "exp_avg_sq_col/w", "exp_avg_sq/b"}
    for value in stats.values():
        assert value.dtype == torch.float32 and value.device.type == "cpu" and value.is_contiguous()


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Embedding(20, 6), torch.nn.Flatten(), torch.nn.Linear(12, 4))


def _train(model, opt, trackers, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randint(0, 20, (8, 2), generator=gen)).square().mean().backward()
        for tracker in trackers:
            tracker.update()
        opt.step()


def test_reusing_umtam_statistics_equals_tracking_separately():
    model = _model()
    opt = UMTAM(model.parameters(), lr=1e-2, rank=2)
    named = list(model.named_parameters())
    reusing = CurvatureTracker(named, optimizer=opt)
    separate = CurvatureTracker(named)
    assert reusing.reused_names == ("0.weight", "2.weight")
    _train(model, opt, [reusing, separate], steps=5)
    a, b = reusing.stats(), separate.stats()
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=0)
    assert reusing.state_bytes() == 4 * 4 + 4  # the bias and its step counter only
    assert separate.state_bytes() == 4 * ((20 + 6) + (4 + 12) + 4) + 3 * 4


def test_no_reuse_when_the_optimizer_has_another_beta2_or_no_factored_moment():
    model = _model()
    named = list(model.named_parameters())
    assert CurvatureTracker(named, optimizer=UMTAM(model.parameters(), betas=(0.9, 0.99))).reused_names == ()
    assert CurvatureTracker(named, optimizer=build_optimizer("adamw", named, lr=1e-3)).reused_names == ()


def test_state_dict_roundtrip_resumes_identically():
    model = _model()
    opt = build_optimizer("adamw", list(model.named_parameters()), lr=1e-2)
    tracker = CurvatureTracker(model.named_parameters())
    _train(model, opt, [tracker], steps=3)
    sd = tracker.state_dict()
    assert all(isinstance(v, torch.Tensor) for st in sd["state"].values() for v in st.values())
    resumed = CurvatureTracker(model.named_parameters())
    resumed.load_state_dict(sd)
    _train(model, opt, [tracker, resumed], steps=2, seed=1)
    a, b = tracker.stats(), resumed.stats()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    other = CurvatureTracker([("x", torch.nn.Parameter(torch.zeros(2, 2)))])
    with pytest.raises(ValueError, match="missing"):
        other.load_state_dict(sd)


def test_state_is_linear_in_m_plus_n_and_conv_weights_are_reshaped():
    W = torch.nn.Parameter(torch.zeros(300, 200))
    conv = torch.nn.Parameter(torch.zeros(4, 3, 2, 2))
    frozen = torch.nn.Parameter(torch.zeros(7), requires_grad=False)
    tracker = CurvatureTracker([("w", W), ("conv", conv), ("frozen", frozen)])
    assert tracker.state_bytes() == 4 * (300 + 200) + 4 * (4 + 12) + 2 * 4
    W.grad, conv.grad = torch.ones(300, 200), torch.ones(4, 3, 2, 2)
    tracker.update()
    stats = tracker.stats()
    assert stats["exp_avg_sq_row/conv"].shape == (4,) and stats["exp_avg_sq_col/conv"].shape == (12,)
    assert "exp_avg_sq/frozen" not in stats
    torch.testing.assert_close(stats["exp_avg_sq_row/w"], torch.ones(300))


def test_never_updated_parameters_report_zeros():
    W = torch.nn.Parameter(torch.zeros(3, 2))
    tracker = CurvatureTracker([("w", W)])
    tracker.update()  # no gradient yet: skipped
    assert torch.equal(tracker.stats()["exp_avg_sq_row/w"], torch.zeros(3))
    with pytest.raises(ValueError):
        CurvatureTracker([("w", W)], beta2=1.0)


def test_dense_fisher_and_trajectory_by_hand():
    # W0 = [[1, 2]]; step 1: G = [[2, -1]] at W0 (T = 0); the weight then moves to [[1.5, 2]];
    # step 2: G = [[1, 4]] at T = [[0.5, 0]]. beta2 = 0.5, bias-corrected by 1 - 0.5^t.
    W = torch.nn.Parameter(torch.tensor([[1.0, 2.0]]))
    tracker = CurvatureTracker([("w", W)], beta2=0.5, dense=("trajectory", "fisher"))
    assert tracker.dense == ("fisher", "trajectory")  # the registry's order, whatever was asked
    W.grad = torch.tensor([[2.0, -1.0]])
    tracker.update()
    stats = tracker.stats()
    torch.testing.assert_close(stats["fisher/w"], torch.tensor([[4.0, 1.0]]))
    torch.testing.assert_close(stats["trajectory/w"], torch.tensor([[0.0, 0.0]]))  # T = 0 at the first step
    with torch.no_grad():
        W.copy_(torch.tensor([[1.5, 2.0]]))
    W.grad = torch.tensor([[1.0, 4.0]])
    tracker.update()
    stats = tracker.stats()
    # F = (0.5 [2, 0.5] + 0.5 [1, 16]) / 0.75 = [1.5, 8.25] / 0.75; (T G)^2 = [0.25, 0] -> 0.5 * 0.25 / 0.75
    torch.testing.assert_close(stats["fisher/w"], torch.tensor([[2.0, 11.0]]))
    torch.testing.assert_close(stats["trajectory/w"], torch.tensor([[1 / 6, 0.0]]))
    assert set(stats) == {"exp_avg_sq_row/w", "exp_avg_sq_col/w", "fisher/w", "trajectory/w"}  # W0 is not exported
    # 2 floats each for fisher, trajectory and W0, 1 + 2 for R and C, and the step
    assert tracker.state_bytes() == 4 * (2 + 2 + 2 + 1 + 2 + 1)


def test_dense_statistics_of_umtam_matrices_sit_beside_the_reused_factors():
    model = _model()
    opt = UMTAM(model.parameters(), lr=1e-2, rank=2)
    named = list(model.named_parameters())
    dense = CurvatureTracker(named, optimizer=opt, dense=("fisher",))
    plain = CurvatureTracker(named, optimizer=opt)
    assert dense.reused_names == plain.reused_names == ("0.weight", "2.weight")
    _train(model, opt, [dense, plain], steps=3)
    a, b = dense.stats(), plain.stats()
    assert {key for key in a if key.startswith("fisher/")} == {f"fisher/{name}" for name, _ in named}
    for key in b:  # the factored statistics are the same with or without the dense ones
        assert torch.equal(a[key], b[key]), key
    # a 1-D parameter's own EMA is its dense Fisher already: the two agree
    torch.testing.assert_close(a["fisher/2.bias"], a["exp_avg_sq/2.bias"], rtol=0, atol=0)


def test_dense_state_round_trips_and_unknown_kinds_are_refused():
    model = _model()
    opt = build_optimizer("adamw", list(model.named_parameters()), lr=1e-2)
    tracker = CurvatureTracker(model.named_parameters(), dense=("fisher", "trajectory"))
    _train(model, opt, [tracker], steps=3)
    resumed = CurvatureTracker(model.named_parameters(), dense=("fisher", "trajectory"))
    resumed.load_state_dict(tracker.state_dict())
    _train(model, opt, [tracker, resumed], steps=2, seed=1)
    a, b = tracker.stats(), resumed.stats()
    assert set(a) == set(b) and all(torch.equal(a[key], b[key]) for key in a)
    with pytest.raises(ValueError, match="keys"):  # a state without the dense statistics does not fit
        CurvatureTracker(model.named_parameters()).load_state_dict(tracker.state_dict())
    with pytest.raises(ValueError, match="unknown dense statistics"):
        CurvatureTracker(model.named_parameters(), dense=("hessian",))
