"""MoFaSGD, GaLore-AdamW, the optimizer registry and its helpers."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from optim_reference import DenseGaLoreAdamW
from umtam.errors import ConfigError
from umtam.optim import (
    OPTIMIZERS,
    GaLoreAdamW,
    MoFaSGD,
    UMTAM,
    build_optimizer,
    optimizer_hparams,
    optimizer_state_bytes,
)


def _named_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 12), torch.nn.LayerNorm(12), torch.nn.Linear(12, 3))
    return model, list(model.named_parameters())


def _loss(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 10, generator=gen)
    y = torch.randn(16, 3, generator=gen)
    return (model(x) - y).square().mean()


# ----------------------------------------------------------------------------
# MoFaSGD
# ----------------------------------------------------------------------------


def test_mofasgd_step_is_lr_times_a_partial_isometry():
    m, n, r, lr = 20, 12, 3, 0.05
    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(m, n, generator=gen, dtype=torch.float64))
    opt = MoFaSGD([p], lr=lr, rank=r)
    for _ in range(4):
        before = p.detach().clone()
        p.grad = torch.randn(m, n, generator=gen, dtype=torch.float64)
        opt.step()
        sv = torch.linalg.svdvals(before - p.detach())
        torch.testing.assert_close(sv[:r], torch.full((r,), lr, dtype=torch.float64), rtol=1e-10, atol=0)
        assert sv[r:].max() < 1e-12
    st = opt.state[p]
    assert set(st) == {"step", "U", "s", "V"} and opt.factored_second_moment(p) is None


def test_mofasgd_ignores_directions_without_momentum():
    # a rank-1 gradient at rank 3: the two empty directions must not become steps
    p = torch.nn.Parameter(torch.zeros(8, 6, dtype=torch.float64))
    opt = MoFaSGD([p], lr=0.1, rank=3)
    p.grad = torch.outer(torch.arange(1.0, 9.0), torch.ones(6)).double()
    opt.step()
    sv = torch.linalg.svdvals(p.detach())
    assert abs(sv[0].item() - 0.1) < 1e-12 and sv[1:].max() < 1e-12


def test_mofasgd_vectors_use_adamw_and_bad_hparams_raise():
    b0 = torch.randn(5)
    ours, theirs = torch.nn.Parameter(b0.clone()), torch.nn.Parameter(b0.clone())
    opt = MoFaSGD([ours], lr=1e-2, betas=(0.9, 0.999), weight_decay=0.1)
    ref = torch.optim.AdamW([theirs], lr=1e-2, weight_decay=0.1, foreach=False)
    for i in range(3):
        g = torch.randn(5, generator=torch.Generator().manual_seed(i))
        ours.grad, theirs.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    for kwargs in (dict(lr=-1.0), dict(rank=0), dict(betas=(0.9, 1.0)), dict(eps=-1.0), dict(weight_decay=-1.0)):
        with pytest.raises(ValueError):
            MoFaSGD([torch.nn.Parameter(torch.zeros(2, 2))], **kwargs)


# ----------------------------------------------------------------------------
# GaLore
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(("m", "n"), [(14, 9), (9, 14)], ids=["right-projection", "left-projection"])
def test_galore_matches_reference_across_projector_refreshes(m, n):
    gen = torch.Generator().manual_seed(m)
    W0 = torch.randn(m, n, generator=gen, dtype=torch.float64)
    hp = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, rank=3, update_proj_gap=3, scale=0.25)
    ref = DenseGaLoreAdamW(W0, **hp)
    p = torch.nn.Parameter(W0.clone())
    opt = GaLoreAdamW([p], **hp)
    projectors = []
    for _ in range(8):  # refreshes at steps 1, 4 and 7
        G = torch.randn(m, n, generator=gen, dtype=torch.float64)
        p.grad = G.clone()
        opt.step()
        ref.step(G)
        torch.testing.assert_close(p.detach(), ref.W, rtol=1e-12, atol=1e-12)
        projectors.append(opt.state[p]["P"].clone())
    changed = [not torch.equal(a, b) for a, b in zip(projectors, projectors[1:])]
    assert changed == [False, False, True, False, False, True, False]
    assert opt.state[p]["exp_avg"].shape == ((m, 3) if m >= n else (3, n))


def test_galore_state_is_tensors_and_resumes_bitwise():
    model, named = _named_model()
    opt = GaLoreAdamW(model.parameters(), lr=1e-2, rank=2, update_proj_gap=2)
    for seed in range(3):
        opt.zero_grad()
        _loss(model, seed).backward()
        opt.step()
    sd = opt.state_dict()
    flat = {f"{pid}/{k}": v for pid, st in sd["state"].items() for k, v in st.items()}
    assert all(isinstance(v, torch.Tensor) for v in flat.values())
    state = {}
    for key, value in st_load(st_save(flat)).items():
        pid, name = key.split("/")
        state.setdefault(int(pid), {})[name] = value
    clone, _ = _named_model()
    clone.load_state_dict(model.state_dict())
    opt2 = GaLoreAdamW(clone.parameters())
    opt2.load_state_dict({"state": state, "param_groups": json.loads(json.dumps(sd["param_groups"]))})
    for m_, o in ((model, opt), (clone, opt2)):
        for seed in (3, 4):  # step 5 refreshes the projector
            o.zero_grad()
            _loss(m_, seed).backward()
            o.step()
    for a, b in zip(model.parameters(), clone.parameters()):
        assert torch.equal(a, b)


def test_galore_bad_hparams_raise():
    p = [torch.nn.Parameter(torch.zeros(2, 2))]
    for kwargs in (dict(update_proj_gap=0), dict(scale=0.0), dict(rank=0), dict(lr=-1.0)):
        with pytest.raises(ValueError):
            GaLoreAdamW(p, **kwargs)


# ----------------------------------------------------------------------------
# registry
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", OPTIMIZERS.names())
def test_every_optimizer_builds_and_lowers_the_loss(name):
    model, named = _named_model()
    lr = {"mofasgd": 0.05, "adafactor": 1e-2}.get(name, 1e-2)
    opt = build_optimizer(name, named, lr=lr, rank=2, weight_decay=0.01)
    first = None
    for _ in range(30):
        opt.zero_grad()
        loss = _loss(model)
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < 0.8 * first
    json.dumps(optimizer_hparams(opt))
    assert optimizer_hparams(opt)["lr"] == lr and "params" not in optimizer_hparams(opt)


def test_weight_decay_grouping_follows_the_hf_trainer():
    model, named = _named_model()
    opt = build_optimizer("adamw", named, lr=1e-3, weight_decay=0.05)
    assert isinstance(opt, torch.optim.AdamW)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[2].weight)}
    assert len(no_decay["params"]) == 4  # two biases, LayerNorm weight and bias
    assert optimizer_hparams(opt)["weight_decay"] == 0.05


def test_adafactor_is_the_hf_trainer_configuration():
    from transformers.optimization import Adafactor

    _, named = _named_model()
    opt = build_optimizer("adafactor", named, lr=3e-4)
    assert isinstance(opt, Adafactor)
    hp = optimizer_hparams(opt)
    assert hp["lr"] == 3e-4 and hp["scale_parameter"] is False
    assert hp["relative_step"] is False and hp["warmup_init"] is False


def test_builds_the_umtam_classes_with_options():
    _, named = _named_model()
    opt = build_optimizer("UMTAM", named, lr=1e-3, rank=4, error_feedback=True, eps=1e-6)
    assert isinstance(opt, UMTAM)
    # every hyperparameter the sidecar records: the ones passed, and the defaults filled in for the rest
    assert optimizer_hparams(opt) == {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-6, "weight_decay": 0.0,
                                      "rank": 4, "error_feedback": True, "error_feedback_scale": 1.0,
                                      "lowrank": True}
    assert isinstance(build_optimizer("galore", named, lr=1e-3), GaLoreAdamW)
    assert isinstance(build_optimizer("mofasgd", named, lr=1e-3), MoFaSGD)


def test_dense_embeddings_gives_the_embedding_matrices_dense_adamw_state():
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"embeddings": torch.nn.ModuleDict({"word": torch.nn.Embedding(20, 6)}),
                                 "dense": torch.nn.Linear(6, 3)})
    embedding, dense = model["embeddings"]["word"].weight, model["dense"].weight
    opt = build_optimizer("umtam", list(model.named_parameters()), lr=1e-3, rank=2, weight_decay=0.1,
                          dense_embeddings=True)
    assert [(len(g["params"]), g["weight_decay"], g["lowrank"]) for g in opt.param_groups] == [
        (1, 0.1, True), (1, 0.0, True), (1, 0.1, False)]
    assert opt.param_groups[0]["params"] == [dense] and opt.param_groups[2]["params"] == [embedding]
    model["dense"](model["embeddings"]["word"](torch.tensor([1, 2, 3]))).square().mean().backward()
    opt.step()
    assert "U" in opt.state[dense] and "U" not in opt.state[embedding]
    assert any(value.shape == embedding.shape for value in opt.state[embedding].values())  # a dense moment
    lowrank = build_optimizer("umtam", list(model.named_parameters()), lr=1e-3, rank=2)
    assert all(group["lowrank"] for group in lowrank.param_groups)


def test_unknown_optimizer_lists_choices_and_suggests():
    with pytest.raises(ConfigError) as info:
        build_optimizer("adamv", [], lr=1e-3)
    assert "adamv" in str(info.value) and "did you mean 'adamw'" in str(info.value)
    assert all(name in str(info.value) for name in OPTIMIZERS.names())
    assert info.value.exit_code == 2


def test_options_an_optimizer_lacks_and_bad_values_are_config_errors():
    _, named = _named_model()
    with pytest.raises(ConfigError, match="error_feedback"):
        build_optimizer("adamw", named, lr=1e-3, error_feedback=True)
    with pytest.raises(ConfigError, match="dense_embeddings is an option of the umtam optimizer, not 'galore'"):
        build_optimizer("galore", named, lr=1e-3, dense_embeddings=True)
    with pytest.raises(ConfigError, match="learning rate"):
        build_optimizer("umtam", named, lr=-1.0)


def test_state_bytes_count_every_state_tensor():
    p = torch.nn.Parameter(torch.zeros(30, 20))
    b = torch.nn.Parameter(torch.zeros(20))
    named = [("w", p), ("b", b)]
    for name, floats in (("adamw", 2 * 600 + 2 * 20), ("umtam", (30 + 20) * 5 + 4 + 2 * 20)):
        opt = build_optimizer(name, named, lr=1e-3, rank=4)
        p.grad, b.grad = torch.randn(30, 20), torch.randn(20)
        opt.step()
        assert optimizer_state_bytes(opt) == 4 * floats + 2 * 4  # plus two fp32 step counters
