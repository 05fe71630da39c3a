"""``deltatune train --method NAME`` on a tiny chat model: each method trains, lowers the
validation loss, saves a folder that loads back, and AdaLoRA resumes exactly after a kill."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import deltatune as dt
from deltatune.train import ConfigError, load_config, train
from tiny_models import tiny_chat_model_dir, word_meaning_data

TESTS = Path(__file__).resolve().parents[1]
KILLER = (TESTS / "integration" / "test_train.py").read_text().split('KILLER = r"""')[1].split('"""')[0]


@pytest.fixture
def setup(tmp_path, default_tokenizer):
    model = tiny_chat_model_dir(tmp_path / "model", default_tokenizer)
    data = word_meaning_data(tmp_path / "data.jsonl", 48)
    return {"model": str(model), "data.path": str(data), "batch_size": 4, "max_steps": 8, "eval_steps": 4, "seed": 3}


METHOD_OPTIONS = {
    "dylora": {"r": 8, "r_min": 2}, "loha": {"r": 4}, "lokr": {"r": 4}, "adalora": {"init_r": 6, "target_r": 2}, "ia3": {}, "vera": {"r": 16},
    "nola": {"num_basis_A": 16, "num_basis_B": 16}, "bottleneck": {"reduction_factor": 4},
    "prompt_tuning": {"num_virtual_tokens": 4}, "prefix_tuning": {"num_virtual_tokens": 4},
    "p_tuning": {"num_virtual_tokens": 4, "encoder_hidden_size": 16}, "top_layers": {},
    "adaption_prompt": {"adapter_len": 4},
    "ln_tuning": {}, "trainable_tokens": {"token_indices": [2455, 216, 32, 33, 34, 35, 36, 2]},  # " meaning", digits, EOS
    "beft": {"target_modules": ["v_proj", "down_proj"]},
    "fourierft": {"n_frequency": 64}, "shira": {"r": 2}, "miss": {"r": 8}, "c3a": {"block_size": 8},
    "supertuning": {"sparsity": 0.8},
    "glora": {"r": 4},
    "road": {"group_size": 8},
    "delora": {"r": 4},
    "hira": {"r": 4},
    "poly": {"r": 4, "n_skills": 2, "n_splits": 2}, "multitask_prompt_tuning": {"num_virtual_tokens": 4},
    "lily": {"r": 4, "stride_A": 2},
    "pvera": {"r": 8},
    "cartridge": {"num_virtual_tokens": 4},
    "waveft": {"n_frequency": 64, "scaling": 100.0},
    "randlora": {"r": 4, "randlora_alpha": 80},
    "vblora": {"num_vectors": 16, "vector_length": 8},
    "gralora": {"r": 4},
    "unilora": {"theta_d_length": 256},
    "tinylora": {"u": 8},
    "deft": {"r": 4, "alpha": 16},
    "peanut": {"r": 4, "depth": 1},
    "oft": {"r": 0, "oft_block_size": 8}, "boft": {"boft_block_size": 4}, "hra": {"r": 4},
    "psoft": {"r": 4, "psoft_alpha": 4},
    # ASA on: 16 subspaces (q/v of 2 layers, 4 each) pruned from step 1 to step 6 (the training loop's after_step)
    "adamss": {"r": 16, "num_subspaces": 4, "subspace_rank": 2, "use_asa": True, "asa_target_subspaces": 6,
               "init_warmup": 1, "final_warmup": 6, "mask_interval": 2},
    "cpt": {},  # the context: the first training examples (tests/integration/test_train_cpt.py)
    "frod": {"sparse_rate": 0.05},
    # the tiny model's width and heads (the recipe's 32-wide, 3-head backbone suits SmolLM2's 3 key/value heads)
    "shadow": {"r": 4, "shadow_hidden_size": 32, "shadow_intermediate_size": 64, "shadow_num_attention_heads": 4},
    "osf": {"effective_rank": 0.5},
}


@pytest.mark.parametrize("method", sorted(METHOD_OPTIONS))
def test_each_method_trains_and_saves(method, tmp_path, setup):
    out = tmp_path / method
    summary = train(load_config(None, {**setup, "method": method, "adapter": METHOD_OPTIONS[method],
                                       "output_dir": str(out)}), log=lambda *_: None)
    assert summary["final_validation_loss"] < summary["initial_validation_loss"]
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    model, _ = dt.load_model(setup["model"])
    dt.load_adapter(model, out / "adapter")  # the saved folder loads back into a fresh base
    assert dt.read_adapter_config(out / "adapter").peft_type == config["peft_type"]


@pytest.mark.parametrize("method, options", [("poly", {"r": 4, "n_skills": 2, "n_tasks": 3}),
                                             ("multitask_prompt_tuning", {"num_virtual_tokens": 4, "num_tasks": 3})])
def test_task_routed_methods_train_every_row_as_task_zero(method, options, tmp_path, setup):
    # several tasks, records without a task id: every row is task 0 (training, validation, evaluation)
    out = tmp_path / method
    summary = train(load_config(None, {**setup, "method": method, "adapter": options, "output_dir": str(out)}),
                    log=lambda *_: None)
    assert summary["final_validation_loss"] < summary["initial_validation_loss"]
    assert dt.read_adapter_config(out / "adapter").to_dict()["n_tasks" if method == "poly" else "num_tasks"] == 3


def test_adalora_records_final_ranks(tmp_path, setup):
    out = tmp_path / "ada"
    train(load_config(None, {**setup, "method": "adalora", "adapter": {"init_r": 6, "target_r": 2},
                             "output_dir": str(out)}), log=lambda *_: None)
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    kept = [sum(mask) for mask in config["rank_pattern"].values()]
    assert len(kept) > 0 and sum(kept) == 2 * len(kept)  # the budget: target_r per layer on average
    tensors = load_file(out / "adapter" / "adapter_model.safetensors")
    assert sum(v.shape[0] for k, v in tensors.items() if k.endswith("lora_E")) == sum(kept)


def _straight_and_resumed(tmp_path, common: dict) -> None:
    """Train ``common`` straight through, and again killed at step 5 and resumed; the two
    adapters must be the same bits."""
    train(load_config(None, {**common, "output_dir": str(tmp_path / "straight")}), log=lambda *_: None)
    killed = {**common, "output_dir": str(tmp_path / "killed")}
    proc = subprocess.run([sys.executable, "-c", KILLER, str(TESTS), json.dumps(killed), "5"],
                          capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    train(load_config(None, {**killed, "resume": True}), log=lambda *_: None)
    a = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "killed" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_adalora_resume_after_sigkill_is_bit_identical(tmp_path, setup):
    _straight_and_resumed(tmp_path, {**setup, "method": "adalora", "save_steps": 3,
                                     "adapter": {"init_r": 6, "target_r": 2, "deltaT": 1}})
    ranks = [json.loads((tmp_path / run / "adapter" / "adapter_config.json").read_text())["rank_pattern"]
             for run in ("straight", "killed")]
    assert ranks[0] == ranks[1]


def test_dylora_resume_after_sigkill_is_bit_identical(tmp_path, setup):
    # each step's rank comes from the seed and the step, so a resumed run draws the same ranks
    _straight_and_resumed(tmp_path, {**setup, "method": "dylora", "adapter": {"r": 8, "r_min": 1}, "save_steps": 3})
    assert dt.read_adapter_config(tmp_path / "killed" / "adapter").peft_type == "DYLORA"


def test_adalora_training_adds_the_orthogonality_penalty(tmp_path, setup, monkeypatch):
    """The loop minimises loss + orth_reg_weight x AdaLoRA's penalty (PEFT adds it in forward; the
    parity test checks the penalty's value, this checks that training really adds it)."""
    from deltatune.adapters.low_rank.adalora import AdaLoraMethod

    seen = []
    original = AdaLoraMethod.loss_penalty

    def recording(self, model, name, config):
        value = original(self, model, name, config)
        seen.append(None if value is None else value.item())
        return value

    monkeypatch.setattr(AdaLoraMethod, "loss_penalty", recording)
    first_loss, first_penalty = {}, {}
    for weight in (0.0, 0.5):
        seen.clear()
        out = tmp_path / f"orth-{weight}"
        train(load_config(None, {**setup, "method": "adalora", "max_steps": 1, "output_dir": str(out),
                                 "adapter": {"init_r": 6, "target_r": 2, "orth_reg_weight": weight}}),
              log=lambda *_: None)
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        first_loss[weight] = next(r["loss"] for r in rows if r["step"] == 1)
        first_penalty[weight] = seen[0] if seen else "never asked"
    assert first_penalty[0.0] is None and first_penalty[0.5] > 0.1
    # the same seed, data and initial adapter: the step-1 losses differ by exactly the penalty
    assert first_loss[0.5] == pytest.approx(first_loss[0.0] + first_penalty[0.5], abs=1e-5)


def test_bad_method_options_name_the_field(setup):
    with pytest.raises(ConfigError, match="method: 'lorax' is not known"):
        train(load_config(None, {**setup, "method": "lorax"}), log=lambda *_: None)
    with pytest.raises(ConfigError, match=r"adapter: LoHaConfig has no field\(s\) \['rank'\]"):
        train(load_config(None, {**setup, "method": "loha", "adapter": {"rank": 4}}), log=lambda *_: None)
    with pytest.raises(ConfigError, match="lora.*do not apply"):
        train(load_config(None, {**setup, "method": "ia3", "lora.r": 4}), log=lambda *_: None)


def test_xlora_trains_a_mixture_of_lora_experts(tmp_path, setup):
    with pytest.raises(ConfigError, match="XLoraConfig.adapters must name the LoRA adapters"):
        train(load_config(None, {**setup, "method": "xlora"}), log=lambda *_: None)
    experts = {}
    for i, target in enumerate((["q_proj", "v_proj"], ["up_proj", "down_proj"])):
        model, _ = dt.load_model(setup["model"])
        torch.manual_seed(i)
        dt.add_adapter(model, dt.LoraConfig(r=4, target_modules=target, init_lora_weights=False))
        experts[str(i)] = str(dt.save_adapter(model, tmp_path / f"expert{i}"))
    out = tmp_path / "xlora"
    summary = train(load_config(None, {**setup, "method": "xlora", "adapter": {"adapters": experts},
                                       "output_dir": str(out)}), log=lambda *_: None)
    assert summary["final_validation_loss"] < summary["initial_validation_loss"]
    model, _ = dt.load_model(setup["model"])
    dt.load_adapter(model, out / "adapter")  # the classifier and the experts' sub-folders load back
    assert sorted(p.name for p in (out / "adapter").iterdir() if p.is_dir()) == ["0", "1"]
