"""Memory the process holds besides the graph: optimizers found among live objects, and the state
they will allocate at their first step (counted against an absolute budget before it exists)."""

from __future__ import annotations

import logging

import pytest
import torch

from sac_compiler.backend import future_optimizer_state_bytes, optimizers_of

CPU = torch.device("cpu")


def _params(n: int = 2, numel: int = 1000) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.randn(numel)) for _ in range(n)]


def _step(optimizer: torch.optim.Optimizer) -> None:
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = torch.ones_like(p)
    optimizer.step()


def test_optimizers_of_finds_the_optimizers_stepping_the_parameters() -> None:
    mine, other = _params(), _params()
    adam = torch.optim.AdamW(mine, lr=1e-3)
    sgd = torch.optim.SGD([other[0], mine[1]], lr=0.1)
    unrelated = torch.optim.SGD(other[1:], lr=0.1)
    found = optimizers_of(mine)
    assert adam in found and sgd in found and unrelated not in found
    assert optimizers_of([]) == []


@pytest.mark.parametrize(("make", "per_param"), [
    (lambda ps: torch.optim.AdamW(ps, lr=1e-3), 2),
    (lambda ps: torch.optim.Adam(ps, lr=1e-3), 2),
    (lambda ps: torch.optim.RMSprop(ps, lr=1e-3), 1),
    (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), 1),
    (lambda ps: torch.optim.SGD(ps, lr=0.1), 0),
])
def test_unstepped_state_is_expected_and_stepped_state_is_not_counted_again(make, per_param) -> None:
    params = _params(n=3, numel=1000)
    optimizer = make(params)
    assert future_optimizer_state_bytes([optimizer], CPU) == per_param * 3 * 4000
    _step(optimizer)
    assert future_optimizer_state_bytes([optimizer], CPU) == 0


def test_state_on_another_device_is_not_counted() -> None:
    optimizer = torch.optim.AdamW(_params(), lr=1e-3)
    assert future_optimizer_state_bytes([optimizer], torch.device("meta")) == 0


def test_an_optimizer_whose_state_is_unknown_counts_nothing_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    optimizer = torch.optim.LBFGS(_params(), lr=0.1)
    with caplog.at_level(logging.INFO, logger="sac_compiler"):
        assert future_optimizer_state_bytes([optimizer], CPU) == 0
    assert "LBFGS" in caplog.text
