"""Frozen weights cast to autocast's dtype once a run (``kernels.dtypes.FrozenCasts``): the same
bits as casting at every forward, remade when the weight changes, never kept for what trains."""

from __future__ import annotations

import torch

import deltatune as dt
from deltatune.kernels.dtypes import FrozenCasts, cast_all
from tiny_models import sample_ids, tiny_model


def _frozen(*shape: int) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.randn(*shape), requires_grad=False)


def test_a_frozen_parameter_is_cast_once_while_active_and_again_after_a_change():
    weight, casts = _frozen(64, 128), FrozenCasts()
    with casts.active():
        first = cast_all(torch.bfloat16, weight)[0]
        assert cast_all(torch.bfloat16, weight)[0] is first  # kept
        assert torch.equal(first, weight.to(torch.bfloat16))
        with torch.no_grad():
            weight.mul_(2)  # an in-place change (a merge) bumps the version: the cast is remade
        second = cast_all(torch.bfloat16, weight)[0]
        assert second is not first and torch.equal(second, weight.to(torch.bfloat16))
    assert cast_all(torch.bfloat16, weight)[0] is not second  # outside: a fresh cast every time
    assert casts.count() == 1


def test_what_trains_small_tensors_and_plain_tensors_are_cast_every_time():
    trained = torch.nn.Parameter(torch.randn(64, 128))
    small = _frozen(8, 8)  # below MIN_ELEMENTS: a norm's weight
    activation = torch.randn(64, 128)
    casts = FrozenCasts()
    with casts.active():
        for t in (trained, small, activation):
            assert cast_all(torch.bfloat16, t)[0] is not cast_all(torch.bfloat16, t)[0]
        assert cast_all(torch.float32, small)[0] is small  # already in the dtype: no copy
    assert casts.count() == 0


def test_a_kept_cast_goes_with_its_parameter():
    weight, casts = _frozen(64, 128), FrozenCasts()
    with casts.active():
        cast_all(torch.bfloat16, weight)
    assert casts.count() == 1
    del weight
    assert casts.count() == 0


def test_lora_steps_under_bf16_autocast_give_the_same_bits_with_kept_casts(monkeypatch):
    """Three optimizer steps of a LoRA model (dropout on) with and without kept casts: the same
    losses and adapter weights, bit for bit, and the frozen linears' casts are kept."""
    monkeypatch.setattr(FrozenCasts, "MIN_ELEMENTS", 512)  # the tiny model's 32 x 32 linears count
    ids = sample_ids(seed=1)
    kept = []

    def run(casts):
        torch.manual_seed(0)
        model = dt.add_adapter(tiny_model("llama"), dt.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1,
                                                                  target_modules="all-linear"))
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses = []
        for _ in range(3):
            with torch.autocast("cpu", dtype=torch.bfloat16), (casts.active() if casts is not None else torch.enable_grad()):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        kept.append(casts.count() if casts is not None else 0)
        return losses, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    casts = FrozenCasts()
    kept_losses, kept_weights = run(casts)
    plain_losses, plain_weights = run(None)
    assert kept_losses == plain_losses
    assert kept_weights.keys() == plain_weights.keys()
    assert all(torch.equal(kept_weights[n], plain_weights[n]) for n in kept_weights)
    assert kept[0] == 2 * 7  # every adapted linear: 2 layers x 7 (the model's own loss casts its output layer)
    assert casts.count() == 0  # the run's model is gone, and its casts with it


def test_a_bf16_training_run_writes_the_same_adapter_with_and_without_kept_casts(tmp_path, monkeypatch,
                                                                                   default_tokenizer):
    """``deltatune train`` keeps the casts under bf16 (steps and validation); its adapter and
    losses are the bits of a run that casts at every forward."""
    from safetensors.torch import load_file

    from deltatune.train import load_config, train
    from tiny_models import tiny_chat_model_dir, word_meaning_data

    monkeypatch.setattr(FrozenCasts, "MIN_ELEMENTS", 512)
    model = tiny_chat_model_dir(tmp_path / "model", default_tokenizer)
    data = word_meaning_data(tmp_path / "data.jsonl", 24)
    made = []
    cast = FrozenCasts.cast
    monkeypatch.setattr(FrozenCasts, "cast", lambda self, t, dtype: made.append(1) or cast(self, t, dtype))

    def run(name: str) -> tuple[dict, dict]:
        summary = train(load_config(None, {"model": str(model), "data.path": str(data), "batch_size": 4,
                                           "lr": 1e-2, "lora.r": 4, "lora.lora_dropout": 0.1, "max_steps": 4,
                                           "eval_steps": 2, "seed": 3, "precision": "bf16", "final_eval": "off",
                                           "output_dir": str(tmp_path / name)}), log=lambda *_: None)
        return summary, load_file(tmp_path / name / "adapter" / "adapter_model.safetensors")

    kept_summary, kept = run("kept")
    assert made  # the run went through the kept casts
    monkeypatch.setattr(FrozenCasts, "applies_to", staticmethod(lambda t: False))
    plain_summary, plain = run("plain")
    assert kept.keys() == plain.keys() and all(torch.equal(kept[k], plain[k]) for k in kept)
    for key in ("final_train_loss", "initial_validation_loss", "final_validation_loss"):
        assert kept_summary[key] == plain_summary[key]
