"""Bad adapter files fail early with messages that name the file, key, line or shapes, and change nothing."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import deltatune as dt
from tiny_models import tiny_model


@pytest.fixture
def saved(tmp_path):
    model = tiny_model("llama")
    dt.add_adapter(model, dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    dt.save_adapter(model, tmp_path / "a")
    return tmp_path / "a"


def _unchanged(model):
    return not hasattr(model, "deltatune_state") and not any("lora" in n for n, _ in model.named_parameters())


def test_missing_folder_and_files(tmp_path, saved):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        dt.load_adapter(tiny_model(), tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="adapter_config.json not found"):
        dt.load_adapter(tiny_model(), tmp_path / "empty")
    (saved / "adapter_model.safetensors").rename(saved / "adapter_model.bin")
    with pytest.raises(FileNotFoundError, match="only safetensors"):
        dt.load_adapter(tiny_model(), saved)


def test_bad_json_names_line(saved):
    (saved / "adapter_config.json").write_text('{\n  "r": 4,\n  "peft_type": LORA\n}')
    with pytest.raises(ValueError, match=r"adapter_config.json, line 3"):
        dt.load_adapter(tiny_model(), saved)


def test_corrupt_weights(saved):
    (saved / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    model = tiny_model()
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        dt.load_adapter(model, saved)
    assert _unchanged(model)


def test_wrong_shape_names_key_and_both_shapes(saved):
    path = saved / "adapter_model.safetensors"
    tensors = load_file(path)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    tensors[key] = torch.zeros(7, 4)
    save_file(tensors, path)
    model = tiny_model()
    with pytest.raises(ValueError, match=r"q_proj.lora_B.weight.*\(7, 4\).*\(32, 4\)"):
        dt.load_adapter(model, saved)
    assert _unchanged(model)


def test_adapter_for_another_base(saved):
    config = json.loads((saved / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "some/other-model"
    (saved / "adapter_config.json").write_text(json.dumps(config))
    model = tiny_model("gpt2")
    with pytest.raises(ValueError, match="matched no module"):
        dt.load_adapter(model, saved)
    assert _unchanged(model)
    tensors = load_file(saved / "adapter_model.safetensors")
    tensors["base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 32)
    save_file(tensors, saved / "adapter_model.safetensors")
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"layers.9.*no matching module.*made for base 'some/other-model'"):
        dt.load_adapter(model, saved)
    assert _unchanged(model)


def test_missing_tensor_is_an_error(saved):
    tensors = load_file(saved / "adapter_model.safetensors")
    del tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"]
    save_file(tensors, saved / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="v_proj.lora_A.weight' is missing"):
        dt.load_adapter(tiny_model(), saved)


def test_saving_is_atomic_and_overwrites(saved):
    model = tiny_model("llama")
    dt.add_adapter(model, dt.LoraConfig(r=2, target_modules=["q_proj"]))
    dt.save_adapter(model, saved)
    assert sorted(p.name for p in saved.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((saved / "adapter_config.json").read_text())["r"] == 2
