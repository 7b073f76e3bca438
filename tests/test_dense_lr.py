"""--dense-lr: the rate of what a low-rank optimizer steps with AdamW (vectors, and dense embeddings)."""

from __future__ import annotations

import pytest
import torch

from umtam.errors import ConfigError
from umtam.optim import build_optimizer


def tiny_named_parameters():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(10, 6), torch.nn.Linear(6, 6), torch.nn.LayerNorm(6))
    return list(model.named_parameters())


@pytest.mark.parametrize("name", ["umtam", "galore", "mofasgd"])
def test_vectors_get_the_dense_rate_and_matrices_keep_theirs(name):
    named = tiny_named_parameters()
    optimizer = build_optimizer(name, named, lr=1e-3, rank=2, dense_lr=1e-5)
    rates = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    for parameter_name, parameter in named:
        assert rates[id(parameter)] == (1e-5 if parameter.dim() < 2 else 1e-3), parameter_name


def test_dense_embeddings_take_the_dense_rate_too():
    named = tiny_named_parameters()
    optimizer = build_optimizer("umtam", named, lr=1e-3, rank=2, dense_lr=1e-5, dense_embeddings=True,
                                is_embedding=lambda name: name.startswith("0."))
    rates = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    assert rates[id(named[0][1])] == 1e-5  # the embedding: stepped densely
    assert rates[id(named[1][1])] == 1e-3  # the linear weight: low-rank


def test_a_vector_moves_by_the_dense_rate_on_the_first_step():
    # Adam's first bias-corrected step is lr * g / (|g| + eps): the dense rate, in the gradient's sign
    named = tiny_named_parameters()
    optimizer = build_optimizer("umtam", named, lr=1e-3, rank=2, dense_lr=1e-5, weight_decay=0.0)
    bias = dict(named)["1.bias"]
    before = bias.detach().clone()
    gradient = torch.tensor([0.5, -2.0, 1e-3, -0.25, 3.0, -1.0])
    for _, parameter in named:
        parameter.grad = torch.zeros_like(parameter)
    bias.grad = gradient.clone()
    optimizer.step()
    expected = before - 1e-5 * gradient / (gradient.abs() + 1e-8)
    torch.testing.assert_close(bias.detach(), expected, rtol=0, atol=1e-9)


def test_without_it_every_group_takes_lr():
    optimizer = build_optimizer("umtam", tiny_named_parameters(), lr=1e-3, rank=2)
    assert {group["lr"] for group in optimizer.param_groups} == {1e-3}


def test_adamw_has_nothing_apart_to_give_a_rate():
    with pytest.raises(ConfigError, match="dense_lr is an option of the galore, mofasgd, umtam optimizer"):
        build_optimizer("adamw", tiny_named_parameters(), lr=1e-3, dense_lr=1e-5)
