"""UMTAM and its functional math against dense references and hand-computed values."""

from __future__ import annotations

import io
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from optim_reference import DenseUMTAM, truncated_svd
from umtam.optim import UMTAM
from umtam.optim import functional as F

BETAS = (0.9, 0.99)


def _problem(m, n, seed, dtype=torch.float64):
    """A random least-squares problem: G(W) = A^T (A W - B) / p plus fresh noise each step."""
    gen = torch.Generator().manual_seed(seed)
    p = 2 * m
    A = torch.randn(p, m, generator=gen, dtype=dtype)
    B = torch.randn(p, n, generator=gen, dtype=dtype)
    W0 = 0.1 * torch.randn(m, n, generator=gen, dtype=dtype)
    noise = [0.1 * torch.randn(m, n, generator=gen, dtype=dtype) for _ in range(60)]

    def grad(W, t):
        return A.T @ (A @ W - B) / p + noise[t]

    return W0, grad


def _product(state):
    return state["U"] @ torch.diag(state["s"]) @ state["V"].T


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


# ----------------------------------------------------------------------------
# functional pieces
# ----------------------------------------------------------------------------


def test_factored_second_moment_update_hand_computed():
    R, C = torch.zeros(2), torch.ones(3)
    G = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    F.factored_second_moment_update(R, C, G * G, beta2=0.5)
    # row means of G^2: 14/3, 77/3; column means: 17/2, 29/2, 45/2
    torch.testing.assert_close(R, torch.tensor([7 / 3, 77 / 6]))
    torch.testing.assert_close(C, torch.tensor([0.5 + 17 / 4, 0.5 + 29 / 4, 0.5 + 45 / 4]))


def test_scan_gradient_collects_moments_and_products_in_one_pass(monkeypatch):
    monkeypatch.setattr(F, "_CPU_BLOCK_ELEMENTS", 30)  # 7 rows of 4 per block, the last one short
    gen = torch.Generator().manual_seed(0)
    G = torch.randn(23, 4, generator=gen, dtype=torch.float64)
    U, V = torch.randn(23, 2, generator=gen, dtype=torch.float64), torch.randn(4, 2, generator=gen, dtype=torch.float64)
    scan = F.scan_gradient(G, U, V)
    torch.testing.assert_close(scan.row_mean_sq, (G * G).mean(dim=1))
    torch.testing.assert_close(scan.col_mean_sq, (G * G).mean(dim=0))
    torch.testing.assert_close(scan.GV, G @ V)
    torch.testing.assert_close(scan.UtG, U.T @ G)
    assert F.scan_gradient(G).GV is None


def test_lowrank_step_equals_the_dense_formula(monkeypatch):
    monkeypatch.setattr(F, "_CPU_BLOCK_ELEMENTS", 12)
    gen = torch.Generator().manual_seed(1)
    W = torch.randn(9, 5, generator=gen, dtype=torch.float64)
    left, right = torch.randn(9, 2, generator=gen, dtype=torch.float64), torch.randn(5, 2, generator=gen, dtype=torch.float64)
    R, C = torch.rand(9, generator=gen, dtype=torch.float64), torch.rand(5, generator=gen, dtype=torch.float64)
    want = 0.9 * W - 0.1 * (left @ right.T) / F.factored_rsqrt_denominator(R, C, 1e-3)
    got = W.clone()
    F.lowrank_step_(got, left, right, step_size=0.1, decay=0.9, rms=F.factored_rms_factors(R, C), eps=1e-3)
    torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-14)
    got = W.clone()
    F.lowrank_step_(got, left, right, step_size=0.1)
    torch.testing.assert_close(got, W - 0.1 * left @ right.T, rtol=1e-14, atol=1e-14)


def test_factored_denominator_is_adafactor_rank1_estimate():
    R = torch.tensor([1.0, 4.0, 0.25], dtype=torch.float64)
    C = torch.tensor([2.0, 0.5], dtype=torch.float64)
    want = (torch.outer(R, C) / R.mean()).sqrt() + 1e-3
    torch.testing.assert_close(F.factored_rsqrt_denominator(R, C, 1e-3), want)
    # no gradient yet: 0, not 0/0
    zero = F.factored_rsqrt_denominator(torch.zeros(3), torch.zeros(2), 1e-8)
    assert torch.equal(zero, torch.full((3, 2), 1e-8))


def test_reshape_to_matrix():
    t = torch.arange(48.0).reshape(4, 3, 2, 2)
    assert F.reshape_to_matrix(t).shape == (4, 12)
    assert torch.equal(F.reshape_to_matrix(t)[1], torch.arange(12.0, 24.0))
    with pytest.raises(ValueError):
        F.reshape_to_matrix(torch.zeros(3))


def test_lowrank_momentum_update_is_best_rank_r_of_tangent_momentum():
    gen = torch.Generator().manual_seed(1)
    m, n, r = 20, 13, 3
    U, _, V = truncated_svd(torch.randn(m, n, generator=gen, dtype=torch.float64), r)
    s = torch.tensor([3.0, 2.0, 0.5], dtype=torch.float64)
    G = torch.randn(m, n, generator=gen, dtype=torch.float64)
    PU, PV = U @ U.T, V @ V.T
    P_T = PU @ G + G @ PV - PU @ G @ PV
    M_tilde = 0.9 * U @ torch.diag(s) @ V.T + 0.1 * P_T
    Ur, sr, Vr = truncated_svd(M_tilde, r)
    U2, s2, V2 = F.lowrank_momentum_update(U, s, V, G, 0.9, r)
    torch.testing.assert_close(U2 @ torch.diag(s2) @ V2.T, Ur @ torch.diag(sr) @ Vr.T, rtol=0, atol=1e-12)
    torch.testing.assert_close(s2, sr, rtol=1e-12, atol=0)
    torch.testing.assert_close(U2.T @ U2, torch.eye(r, dtype=torch.float64), rtol=0, atol=1e-12)
    # the residual outside the tangent space is what P_T drops
    torch.testing.assert_close(F.tangent_residual(G, U, V), G - P_T, rtol=0, atol=1e-12)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(m=st.integers(1, 9), n=st.integers(1, 9), r=st.integers(1, 9), beta1=st.floats(0.0, 0.99), seed=st.integers(0, 2**16))
def test_lowrank_momentum_update_property(m, n, r, beta1, seed):
    r = min(r, m, n)
    gen = torch.Generator().manual_seed(seed)
    U, s, V = truncated_svd(torch.randn(m, n, generator=gen, dtype=torch.float64), r)
    G = torch.randn(m, n, generator=gen, dtype=torch.float64)
    M_tilde = beta1 * (U * s) @ V.T + (1 - beta1) * (G - F.tangent_residual(G, U, V))
    U2, s2, V2 = F.lowrank_momentum_update(U, s, V, G, beta1, r)
    best = torch.linalg.svdvals(M_tilde)
    # a best rank-r approximation: the error is the tail of the spectrum, the factors are orthonormal
    err = (M_tilde - (U2 * s2) @ V2.T).norm()
    assert abs(err - best[r:].norm()) <= 1e-10 * (1 + best[0])
    torch.testing.assert_close(s2, best[:r], rtol=0, atol=1e-10 * (1 + best[0].item()))
    torch.testing.assert_close(V2.T @ V2, torch.eye(r, dtype=torch.float64), rtol=0, atol=1e-12)


def test_init_factors_deterministic_and_leaves_global_rng_alone():
    gen = torch.Generator().manual_seed(2)
    m, n, r = 300, 120, 4
    low = torch.randn(m, r, generator=gen) @ torch.randn(r, n, generator=gen)
    G = low + 1e-3 * torch.randn(m, n, generator=gen)
    rng = torch.get_rng_state()
    U1, s1, V1 = F.init_factors_from_gradient(G, r)  # randomized path: 2 (r + 8) < 120
    U2, s2, V2 = F.init_factors_from_gradient(G, r)
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(U1, U2) and torch.equal(s1, s2) and torch.equal(V1, V2)
    Ue, se, Ve = truncated_svd(G.double(), r)
    assert _rel((U1 * s1) @ V1.T, ((Ue * se) @ Ve.T).float()) < 1e-5
    torch.testing.assert_close(s1, se.float(), rtol=1e-5, atol=0)


def test_no_full_svd_after_the_first_step(monkeypatch):
    m, n, r = 40, 30, 3
    p = torch.nn.Parameter(torch.zeros(m, n, dtype=torch.float64))
    opt = UMTAM([p], rank=r)
    gen = torch.Generator().manual_seed(3)
    p.grad = torch.randn(m, n, generator=gen, dtype=torch.float64)
    opt.step()
    shapes = []
    real_svd = torch.linalg.svd

    def spy(A, *args, **kwargs):
        shapes.append(tuple(A.shape))
        return real_svd(A, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", spy)
    for _ in range(3):
        p.grad = torch.randn(m, n, generator=gen, dtype=torch.float64)
        opt.step()
    assert shapes and all(max(s) <= 2 * r for s in shapes)


# ----------------------------------------------------------------------------
# the optimizer against the dense reference
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("m", "n", "rank", "block_elements"),
    [(12, 7, 3, None), (7, 12, 3, None), (6, 10, 8, None), (24, 18, 4, None), (24, 18, 4, 50)],
    ids=["m>n", "m<n", "rank-clamp", "larger", "cpu-row-blocks"],
)
def test_matches_dense_reference_for_50_steps(m, n, rank, block_elements, monkeypatch):
    if block_elements is not None:  # several row blocks, as a 30522 x 384 embedding gets
        monkeypatch.setattr(F, "_CPU_BLOCK_ELEMENTS", block_elements)
    W0, grad = _problem(m, n, seed=m * 100 + n)
    hp = dict(lr=1e-2, betas=BETAS, eps=1e-8, weight_decay=0.1, rank=rank)
    ref = DenseUMTAM(W0, **hp)
    p = torch.nn.Parameter(W0.clone())
    opt = UMTAM([p], **hp)
    for t in range(50):
        p.grad = grad(p.detach(), t)
        opt.step()
        ref.step(grad(ref.W, t))
        assert _rel(_product(opt.state[p]), ref.M) < 1e-9, f"momentum differs at step {t + 1}"
        assert _rel(p.detach(), ref.W) < 1e-9, f"weights differ at step {t + 1}"
    assert opt.state[p]["U"].shape == (m, min(rank, m, n))


def test_full_rank_momentum_is_the_dense_ema():
    m, n = 9, 5
    W0, grad = _problem(m, n, seed=5)
    p = torch.nn.Parameter(W0.clone())
    opt = UMTAM([p], lr=1e-2, betas=BETAS, rank=n)
    M = torch.zeros(m, n, dtype=torch.float64)
    for t in range(20):
        G = grad(p.detach(), t)
        p.grad = G.clone()
        opt.step()
        M = BETAS[0] * M + (1 - BETAS[0]) * G
        torch.testing.assert_close(_product(opt.state[p]), M, rtol=0, atol=1e-12)


@pytest.mark.parametrize(("m", "n", "rank"), [(10, 6, 3), (5, 9, 3)])
def test_error_feedback_matches_dense_reference(m, n, rank):
    # 2r >= min(m, n): the warm-started subspace iteration is exact here
    W0, grad = _problem(m, n, seed=7 + m)
    hp = dict(lr=1e-2, betas=BETAS, eps=1e-8, weight_decay=0.0, rank=rank, error_feedback_scale=0.5)
    ref = DenseUMTAM(W0, error_feedback=True, **hp)
    p = torch.nn.Parameter(W0.clone())
    opt = UMTAM([p], error_feedback=True, **hp)
    for t in range(30):
        p.grad = grad(p.detach(), t)
        opt.step()
        M_tilde = ref.step(grad(ref.W, t))
        st = opt.state[p]
        assert _rel(_product(st), ref.M) < 1e-9
        torch.testing.assert_close(st["E"], M_tilde - _product(st), rtol=0, atol=1e-12)
        assert _rel(p.detach(), ref.W) < 1e-9


def test_error_feedback_keeps_the_residual_and_a_near_best_rank_r():
    m, n, r = 80, 60, 4
    gen = torch.Generator().manual_seed(11)
    signal = torch.randn(m, 6, generator=gen, dtype=torch.float64) @ torch.randn(6, n, generator=gen, dtype=torch.float64)
    p = torch.nn.Parameter(torch.zeros(m, n, dtype=torch.float64))
    opt = UMTAM([p], rank=r, betas=BETAS, error_feedback=True)
    for _ in range(10):
        G = signal + 0.3 * torch.randn(m, n, generator=gen, dtype=torch.float64)
        st = opt.state[p]
        prev = (_product(st), st["E"].clone()) if st else (torch.zeros(m, n, dtype=torch.float64),) * 2
        p.grad = G
        opt.step()
        M_tilde = BETAS[0] * prev[0] + (1 - BETAS[0]) * G + prev[1]
        new = _product(opt.state[p])
        torch.testing.assert_close(opt.state[p]["E"], M_tilde - new, rtol=0, atol=1e-12)
        best = torch.linalg.svdvals(M_tilde)[r:].norm()
        assert (M_tilde - new).norm() <= 1.01 * best


def test_rows_and_columns_without_gradient_do_not_move():
    # an embedding whose first rows (tokens never seen) get no gradient
    m, n = 30, 8
    gen = torch.Generator().manual_seed(4)
    W0 = torch.randn(m, n, generator=gen)
    p = torch.nn.Parameter(W0.clone())
    opt = UMTAM([p], lr=1e-2, rank=3)
    for _ in range(10):
        G = torch.randn(m, n, generator=gen)
        G[:5] = 0.0
        G[:, -1] = 0.0
        p.grad = G
        opt.step()
    assert torch.equal(p.detach()[:5], W0[:5])
    assert torch.equal(p.detach()[:, -1], W0[:, -1])
    assert not torch.equal(p.detach()[5:, :-1], W0[5:, :-1])
    R, C = opt.factored_second_moment(p)
    assert torch.equal(R[:5], torch.zeros(5)) and C[-1] == 0


# ----------------------------------------------------------------------------
# bookkeeping: hyperparameters, state, dtypes, resume
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(lr=-1e-3),
        dict(betas=(1.0, 0.999)),
        dict(betas=(0.9, -0.1)),
        dict(betas=(0.9,)),
        dict(rank=0),
        dict(rank=2.5),
        dict(eps=-1e-8),
        dict(weight_decay=-0.1),
        dict(error_feedback_scale=-1.0),
    ],
)
def test_bad_hyperparameters_raise_value_error(kwargs):
    with pytest.raises(ValueError):
        UMTAM([torch.nn.Parameter(torch.zeros(3, 3))], **kwargs)


def test_hyperparameters_live_in_param_groups():
    opt = UMTAM([torch.nn.Parameter(torch.zeros(3, 3))], lr=1e-3, rank=2, error_feedback=True)
    group = opt.state_dict()["param_groups"][0]
    assert group["lr"] == 1e-3 and group["rank"] == 2 and group["error_feedback"] is True
    assert group["lowrank"] is True and group["betas"] == (0.9, 0.999)


@pytest.mark.parametrize(("shape", "rank"), [((50, 20), 4), ((3, 10), 8), ((4, 3, 2, 2), 2)])
def test_state_size_is_the_memory_contract(shape, rank):
    p = torch.nn.Parameter(torch.zeros(shape))
    opt = UMTAM([p], rank=rank)
    p.grad = torch.randn(shape)
    opt.step()
    m = shape[0]
    n = p.numel() // m
    r = min(rank, m, n)
    state = opt.state[p]
    assert state["U"].shape == (m, r) and state["V"].shape == (n, r) and state["s"].shape == (r,)
    floats = sum(t.numel() for k, t in state.items() if k != "step")
    assert floats == (m + n) * (r + 1) + r
    assert state["step"].numel() == 1 and all(isinstance(v, torch.Tensor) for v in state.values())


def test_vectors_and_dense_groups_get_torch_adamw():
    gen = torch.Generator().manual_seed(6)
    W0, b0 = torch.randn(6, 4, generator=gen), torch.randn(4, generator=gen)
    ours = [torch.nn.Parameter(W0.clone()), torch.nn.Parameter(b0.clone())]
    theirs = [torch.nn.Parameter(W0.clone()), torch.nn.Parameter(b0.clone())]
    opt = UMTAM([{"params": ours, "lowrank": False}], lr=1e-2, weight_decay=0.1)
    ref = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.1, foreach=False)
    for _ in range(5):
        grads = [torch.randn(6, 4, generator=gen), torch.randn(4, generator=gen)]
        for p, q, g in zip(ours, theirs, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert opt.factored_second_moment(ours[0]) is None and opt.factored_second_moment(ours[1]) is None


def test_factored_second_moment_is_bias_corrected_and_zero_before_the_first_step():
    p = torch.nn.Parameter(torch.zeros(2, 3))
    opt = UMTAM([p], betas=(0.9, 0.5))
    R, C = opt.factored_second_moment(p)
    assert torch.equal(R, torch.zeros(2)) and torch.equal(C, torch.zeros(3))
    p.grad = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    opt.step()
    R, C = opt.factored_second_moment(p)
    torch.testing.assert_close(R, torch.tensor([14 / 3, 77 / 3]))
    torch.testing.assert_close(C, torch.tensor([17 / 2, 29 / 2, 45 / 2]))
    assert opt.factored_second_moment(torch.nn.Parameter(torch.zeros(2, 3))) is None


def _roundtrip_through_safetensors(state_dict):
    """Optimizer state -> safetensors bytes + JSON groups -> state dict, as a checkpoint would."""
    tensors = {}
    for pid, entries in state_dict["state"].items():
        for key, value in entries.items():
            assert isinstance(value, torch.Tensor), f"state {pid}/{key} is a {type(value).__name__}"
            tensors[f"{pid}/{key}"] = value
    blob = st_save(tensors)
    groups = json.load(io.StringIO(json.dumps(state_dict["param_groups"])))
    state = {}
    for name, value in st_load(blob).items():
        pid, key = name.split("/")
        state.setdefault(int(pid), {})[key] = value
    return {"state": state, "param_groups": groups}


def _tiny_model(dtype):
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Embedding(40, 8), torch.nn.Flatten(), torch.nn.Linear(24, 6), torch.nn.LayerNorm(6)
    ).to(dtype)


def _train(model, opt, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randint(0, 40, (5, 3), generator=gen)
        opt.zero_grad()
        model(x).float().square().mean().backward()
        opt.step()


@pytest.mark.parametrize(
    ("dtype", "kwargs"),
    [(torch.float32, {}), (torch.float32, {"error_feedback": True}), (torch.bfloat16, {})],
    ids=["fp32", "error-feedback", "bf16"],
)
def test_state_dict_roundtrip_gives_identical_next_steps(dtype, kwargs):
    model = _tiny_model(dtype)
    opt = UMTAM(model.parameters(), lr=1e-2, rank=3, weight_decay=0.01, **kwargs)
    _train(model, opt, 4, seed=1)
    saved = _roundtrip_through_safetensors(opt.state_dict())

    clone = _tiny_model(dtype)
    clone.load_state_dict(model.state_dict())
    opt2 = UMTAM(clone.parameters(), lr=1.0)  # hyperparameters come from the state dict
    opt2.load_state_dict(saved)
    for p in clone.parameters():
        assert all(v.dtype in (torch.float32,) for v in opt2.state[p].values())
    _train(model, opt, 2, seed=2)
    _train(clone, opt2, 2, seed=2)
    for a, b in zip(model.parameters(), clone.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(model.parameters(), clone.parameters()):
        for key in opt.state[a]:
            assert torch.equal(opt.state[a][key], opt2.state[b][key]), key


@pytest.mark.parametrize("block_elements", [None, 40], ids=["one-block", "row-blocks"])
def test_bf16_parameters_follow_the_fp32_run(block_elements, monkeypatch):
    if block_elements is not None:
        monkeypatch.setattr(F, "_CPU_BLOCK_ELEMENTS", block_elements)
    W0, grad = _problem(16, 12, seed=8, dtype=torch.float32)
    runs = {}
    for dtype in (torch.float32, torch.bfloat16):
        start = W0.to(dtype).float()
        p = torch.nn.Parameter(W0.clone().to(dtype))
        opt = UMTAM([p], lr=1e-2, rank=4)
        for t in range(20):
            p.grad = grad(p.detach().float(), t).to(dtype)
            opt.step()
        assert p.dtype == dtype and all(v.dtype == torch.float32 for v in opt.state[p].values())
        runs[dtype] = p.detach().float() - start
    assert _rel(runs[torch.bfloat16], runs[torch.float32]) < 0.02


def test_closure_runs_with_grad_enabled_and_returns_the_loss():
    p = torch.nn.Parameter(torch.ones(3, 2))
    opt = UMTAM([p], lr=0.1, rank=1)

    def closure():
        opt.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        return loss

    with torch.no_grad():
        loss = opt.step(closure)
    assert loss.item() == 6.0 and p.grad is not None and (p.detach() < 1).all()


def test_reduces_a_least_squares_loss_by_a_large_factor():
    torch.manual_seed(0)
    A = torch.randn(256, 32)
    W_true = torch.randn(32, 4) @ torch.randn(4, 24) / 2  # a rank-4 target
    Y = A @ W_true
    layer = torch.nn.Linear(32, 24)
    opt = UMTAM(layer.parameters(), lr=5e-2, rank=4)
    losses = []
    for _ in range(100):
        opt.zero_grad()
        loss = (layer(A) - Y).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert math.isfinite(losses[-1]) and losses[-1] < losses[0] / 100
