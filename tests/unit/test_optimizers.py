"""8-bit AdamW against full-precision AdamW on a small regression problem."""

import pytest
import torch

from deltatune.train import AdamW8bit, make_optimizer


def _fit(make, steps=300):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(512, 128, generator=g)
    Y = X @ (torch.randn(128, 64, generator=g) * 0.5) + 0.01 * torch.randn(512, 64, generator=g)
    W = torch.nn.Parameter(torch.zeros(128, 64))
    b = torch.nn.Parameter(torch.zeros(64))
    opt = make([W, b])
    losses = []
    for _ in range(steps):
        loss = ((X @ W + b - Y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, W.detach(), opt


def test_adamw8bit_tracks_adamw():
    ref_losses, ref_W, _ = _fit(lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.01))
    losses, W, opt = _fit(lambda p: AdamW8bit(p, lr=1e-2, weight_decay=0.01))
    assert losses[0] == ref_losses[0]
    assert losses[-1] < 0.01 * losses[0]  # it optimizes
    assert losses[-1] == pytest.approx(ref_losses[-1], rel=0.5, abs=5e-3)
    assert ((W - ref_W).norm() / ref_W.norm()).item() < 0.02
    # W (8,192 values) has 8-bit states: 2 bytes + scales per value; b (64) keeps float32 states.
    state = opt.state[opt.param_groups[0]["params"][0]]
    assert state["q_exp_avg"].dtype == torch.uint8 and state["q_exp_avg_sq"].dtype == torch.uint8
    assert opt.state_bytes() < 0.3 * (8192 + 64) * 8


def test_adamw8bit_state_dict_round_trip():
    _, _, opt = _fit(lambda p: AdamW8bit(p, lr=1e-2), steps=5)
    saved = opt.state_dict()
    W = torch.nn.Parameter(torch.zeros(128, 64))
    b = torch.nn.Parameter(torch.zeros(64))
    fresh = AdamW8bit([W, b], lr=1e-2)
    fresh.load_state_dict(saved)
    for key, value in saved["state"][0].items():
        got = fresh.state_dict()["state"][0][key]
        assert torch.equal(torch.as_tensor(got), torch.as_tensor(value)), key


def test_make_optimizer_names():
    p = [torch.nn.Parameter(torch.zeros(4))]
    assert isinstance(make_optimizer(p, "adamw"), torch.optim.AdamW)
    assert isinstance(make_optimizer(p, "adamw_8bit"), AdamW8bit)
    paged = make_optimizer(p, "paged_adamw_8bit")
    assert isinstance(paged, AdamW8bit) and paged.paged
    with pytest.raises(ValueError, match="optimizer 'sgd' is not supported"):
        make_optimizer(p, "sgd")
