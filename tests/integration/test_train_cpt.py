"""``deltatune train --method cpt``: the recipe builds the context from the first training examples,
and the loop keeps every context token inside its ball (the projection runs after each optimizer
step through ``Method.after_step``) while label and separator tokens never move."""

import json

import pytest
import torch
from safetensors.torch import load_file

import deltatune as dt
from deltatune.adapters.prompt.cpt import radii
from deltatune.train import ConfigError, load_config, train
from deltatune.train.methods import CPT_CONTEXT_EXAMPLES
from tiny_models import tiny_chat_model_dir, word_meaning_data


@pytest.fixture
def setup(tmp_path, default_tokenizer):
    model = tiny_chat_model_dir(tmp_path / "model", default_tokenizer)
    data = word_meaning_data(tmp_path / "data.jsonl", 48)
    return {"model": str(model), "data.path": str(data), "batch_size": 4, "max_steps": 6, "eval_steps": 3, "seed": 3,
            "method": "cpt"}


def test_cpt_run_keeps_the_context_inside_its_balls(tmp_path, setup):
    out = tmp_path / "run"
    # a rate far above the recipe's, so that unprojected steps would leave the balls at once
    summary = train(load_config(None, {**setup, "lr": 3e-2, "output_dir": str(out)}), log=lambda *_: None)
    assert summary["final_validation_loss"] < summary["initial_validation_loss"]
    config = dt.read_adapter_config(out / "adapter")
    types = torch.tensor(config.cpt_tokens_type_mask)
    # the first examples: prompt tokens are inputs (4i+2), trained tokens labels (4i+4)
    assert set(types.tolist()) == {4 * i + k for i in range(CPT_CONTEXT_EXAMPLES) for k in (2, 4)}
    assert config.opt_weighted_loss_type == "decay" and config.num_virtual_tokens == len(config.cpt_token_ids)
    model, _ = dt.load_model(setup["model"])
    words = model.get_input_embeddings().weight.detach()[torch.tensor(config.cpt_token_ids)].float()
    change = load_file(out / "adapter" / "adapter_model.safetensors")["prompt_embeddings"] - words
    norms = change.norm(dim=1)
    epsilon = radii(config, words.shape[1])
    assert (norms <= epsilon * (1 + 1e-5)).all()  # projected after every step
    assert (norms[types % 4 == 2] > 0.9 * epsilon[types % 4 == 2]).any()  # the input tokens did move
    assert torch.equal(change[types % 4 == 0], torch.zeros_like(change[types % 4 == 0]))  # labels never move
    dt.load_adapter(model, out / "adapter")  # the saved folder loads back


def test_cpt_context_given_on_the_command_line_wins(tmp_path, setup):
    out = tmp_path / "given"
    adapter = {"cpt_token_ids": [5, 6, 7, 8], "cpt_tokens_type_mask": [1, 2, 3, 4]}
    train(load_config(None, {**setup, "max_steps": 1, "adapter": adapter, "output_dir": str(out)}),
          log=lambda *_: None)
    saved = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert saved["cpt_token_ids"] == [5, 6, 7, 8] and saved["cpt_tokens_type_mask"] == [1, 2, 3, 4]


def test_cpt_refuses_packing_and_bad_masks(tmp_path, setup):
    with pytest.raises(ConfigError, match="packing"):
        train(load_config(None, {**setup, "data.packing": True, "output_dir": str(tmp_path / "p")}),
              log=lambda *_: None)
    with pytest.raises(ConfigError, match="cpt_tokens_type_mask"):
        train(load_config(None, {**setup, "adapter": {"cpt_token_ids": [5, 6], "cpt_tokens_type_mask": [1]},
                                 "output_dir": str(tmp_path / "m")}), log=lambda *_: None)


def test_cpt_refuses_a_context_with_nothing_to_train_or_too_long(tmp_path, setup):
    with pytest.raises(ConfigError, match="have none .text records, or data.train_on_prompt"):
        train(load_config(None, {**setup, "data.train_on_prompt": True, "output_dir": str(tmp_path / "t")}),
              log=lambda *_: None)
    with pytest.raises(ConfigError, match="more than data.max_seq_len=6"):
        train(load_config(None, {**setup, "data.max_seq_len": 6, "output_dir": str(tmp_path / "l")}),
              log=lambda *_: None)
