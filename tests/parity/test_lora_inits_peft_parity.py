"""Parity with the pinned ``peft`` for LoRA's other initialisations: orthogonal and MiCA (the same
factors from the same seed, files both ways, gradients), LoftQ (files; PEFT's own LoftQ needs CUDA
and bitsandbytes, so its factors are compared on a GPU only)."""

import copy
import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

import deltatune as dt
from peft_roundtrip import assert_same_gradients, deltatune_file_to_peft, peft_file_to_deltatune
from tiny_models import eval_logits, randomize_adapter, sample_ids, tiny_llama_64, tiny_model

peft = pytest.importorskip("peft")

TARGETS = {"llama": dict(target_modules="all-linear"), "qwen2": dict(target_modules=["q_proj", "v_proj", "down_proj"]),
           "gpt2": dict(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)}
CASES = [(init, arch) for init in ("orthogonal", "mica") for arch in TARGETS]
ATOL = 1e-5


def _kwargs(init, arch):
    return dict(r=4, lora_alpha=8, init_lora_weights=init, **TARGETS[arch])


def _peft_model(base, kwargs, seed=0):
    torch.manual_seed(seed)
    return peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))


def _dt_model(base, kwargs, seed=0):
    torch.manual_seed(seed)
    model = copy.deepcopy(base)
    dt.add_adapter(model, dt.LoraConfig(**kwargs))
    return model


def _ours(model):
    return {n.replace(".default", ""): p for n, p in model.named_parameters() if "lora_" in n}


def _theirs(model):
    return {n.removeprefix("base_model.model.").replace(".default", ""): p
            for n, p in model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("init,arch", CASES)
def test_same_seed_same_initial_factors_and_trainable_set(init, arch):
    """PEFT's random draws (orthogonal) and SVD (MiCA) are reproduced exactly: one seed, equal factors."""
    base = tiny_model(arch)
    theirs, ours = _theirs(_peft_model(base, _kwargs(init, arch))), _ours(_dt_model(base, _kwargs(init, arch)))
    assert set(theirs) == set(ours)
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], atol=1e-6, rtol=0)
    assert {k for k, p in ours.items() if p.requires_grad} == {k for k, p in theirs.items() if p.requires_grad}


@pytest.mark.parametrize("init,arch", CASES)
def test_peft_saves_deltatune_loads(init, arch, tmp_path, parity_results):
    base = tiny_model(arch)
    theirs = _peft_model(base, _kwargs(init, arch))
    randomize_adapter(theirs)
    diff = parity_results[f"lora-init-{init}-{arch}: PEFT file -> deltatune"] = peft_file_to_deltatune(
        base, theirs, tmp_path, min_change=1e-3)
    assert diff <= ATOL


@pytest.mark.parametrize("init,arch", CASES)
def test_deltatune_saves_peft_loads(init, arch, tmp_path, parity_results):
    base = tiny_model(arch)
    ours = _dt_model(base, _kwargs(init, arch))
    randomize_adapter(ours, seed=7)
    diff = parity_results[f"lora-init-{init}-{arch}: deltatune file -> PEFT"] = deltatune_file_to_peft(
        base, ours, tmp_path, min_change=1e-3)
    assert diff <= ATOL
    ours_file = load_file(tmp_path / "adapter_model.safetensors")
    peft_dir = tmp_path / "theirs"
    _peft_model(base, _kwargs(init, arch)).save_pretrained(peft_dir)
    their_file = load_file(peft_dir / "adapter_model.safetensors")
    assert {k: (v.shape, v.dtype) for k, v in ours_file.items()} == {k: (v.shape, v.dtype) for k, v in their_file.items()}
    our_cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    their_cfg = json.loads((peft_dir / "adapter_config.json").read_text())
    assert set(our_cfg) == set(their_cfg)
    for key in ("init_lora_weights", "loftq_config", "eva_config", "corda_config", "lora_ga_config", "r"):
        assert our_cfg[key] == their_cfg[key], key


@pytest.mark.parametrize("init,arch", CASES)
def test_gradients_of_one_step_equal_peft(init, arch, tmp_path):
    base = tiny_model(arch)
    theirs = _peft_model(base, _kwargs(init, arch))
    randomize_adapter(theirs)
    theirs.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True)
    ours = dt.load_adapter(copy.deepcopy(base), tmp_path, trainable=True)
    assert_same_gradients(theirs, ours, sample_ids(), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("bits", [4, 8])
def test_loftq_file_loads_in_peft_on_the_quantized_base(bits, tmp_path, parity_results):
    """deltatune's LoftQ adapter and its quantized base: PEFT, given the base's weights (as PEFT's own
    LoftQ leaves them, dequantized in full precision) and told not to initialise again (its LoftQ
    example sets init_lora_weights=True for loading), computes the same logits."""
    base = tiny_llama_64()
    kwargs = dict(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights="loftq",
                  loftq_config={"loftq_bits": bits, "loftq_iter": 2})
    ours = copy.deepcopy(base)
    dt.add_adapter(ours, dt.LoraConfig(**kwargs))
    randomize_adapter(ours, seed=3)
    dt.save_adapter(ours, tmp_path)
    residual_base = copy.deepcopy(base)
    with torch.no_grad():
        for key, module in ours.named_modules():
            if hasattr(module, "base_layer") and hasattr(module.base_layer, "dequantize"):
                residual_base.get_submodule(key).weight.copy_(module.base_layer.dequantize())
    # PEFT's LoftQ example rewrites the file so that loading does not run LoftQ again (PEFT's LoraConfig
    # with init_lora_weights='loftq' also wants scipy, which this environment lacks)
    view = tmp_path / "peft_view"
    view.mkdir()
    (view / "adapter_model.safetensors").write_bytes((tmp_path / "adapter_model.safetensors").read_bytes())
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["init_lora_weights"] == "loftq" and data["loftq_config"] == kwargs["loftq_config"]
    (view / "adapter_config.json").write_text(json.dumps({**data, "init_lora_weights": True, "loftq_config": {}}))
    theirs = peft.PeftModel.from_pretrained(residual_base, view)
    ids = sample_ids()
    diff = (eval_logits(theirs, ids) - eval_logits(ours, ids)).abs().max().item()
    parity_results[f"lora-init-loftq-{bits}bit-llama: deltatune file -> PEFT"] = diff
    assert diff <= ATOL
    their_cfg = tmp_path / "peft_cfg"
    peft.LoraConfig(**{**kwargs, "init_lora_weights": True, "loftq_config": {}}).save_pretrained(their_cfg)
    theirs_json = json.loads((their_cfg / "adapter_config.json").read_text())
    assert set(data) == set(theirs_json)
    assert data["loftq_config"] == dataclasses.asdict(peft.LoftQConfig(**kwargs["loftq_config"]))


def test_peft_loftq_file_loads_in_deltatune(tmp_path, parity_results):
    """A LoftQ adapter as PEFT writes it (init_lora_weights='loftq', loftq_config) loads without
    initialising again, onto the base PEFT's LoftQ left."""
    base = tiny_llama_64()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj"],
                                                                       init_lora_weights=False))
    randomize_adapter(theirs)
    theirs.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    data.update(init_lora_weights="loftq", loftq_config={"loftq_bits": 4, "loftq_iter": 1})
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    ours = dt.load_adapter(copy.deepcopy(base), tmp_path)
    ids = sample_ids()
    diff = (eval_logits(ours, ids) - eval_logits(theirs, ids)).abs().max().item()
    parity_results["lora-init-loftq-llama: PEFT file -> deltatune"] = diff
    assert diff <= ATOL
    assert isinstance(ours.model.layers[0].self_attn.q_proj.base_layer, torch.nn.Linear)  # not quantized again


# ----- LoRA-GA -----------------------------------------------------------------------------------------
GA_TARGETS = {"llama": ["q_proj", "down_proj"], "qwen2": ["v_proj", "up_proj"], "gpt2": ["c_attn", "c_fc"]}


def _batches():
    return [dict(input_ids=sample_ids(seed=s), labels=sample_ids(seed=s)) for s in (1, 2)]


def _ga_kwargs(arch):
    return dict(r=4, lora_alpha=8, target_modules=GA_TARGETS[arch], init_lora_weights="lora_ga",
                fan_in_fan_out=arch == "gpt2")


def _peft_lora_ga(base, arch, ga=None):
    from peft.tuners.lora.loraga import preprocess_loraga

    model = copy.deepcopy(base)
    config = peft.LoraConfig(**_ga_kwargs(arch), lora_ga_config=peft.LoraGAConfig(**(ga or {})))

    def train_step():
        for batch in _batches():
            model(**batch).loss.backward()

    preprocess_loraga(model, config, train_step)
    grads = {n: m._peft_loraga_grad.clone() for n, m in model.named_modules() if hasattr(m, "_peft_loraga_grad")}
    return peft.get_peft_model(model, config), grads


@pytest.mark.parametrize("arch", sorted(GA_TARGETS))
def test_lora_ga_gradients_equal_peft(arch):
    from deltatune.lora_from_data import mean_weight_gradients

    base = tiny_model(arch)
    _, theirs = _peft_lora_ga(base, arch)
    model = copy.deepcopy(base)
    dt.add_adapter(model, dt.LoraConfig(**{**_ga_kwargs(arch), "init_lora_weights": True}))
    layers = {k: m for k, m in model.named_modules() if hasattr(m, "lora_A")}
    ours = mean_weight_gradients(model, list(layers.values()), _batches())
    assert set(layers) == set(theirs)
    for key, layer in layers.items():
        torch.testing.assert_close(ours[id(layer)], theirs[key], atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("ga", [{}, {"direction": "ArBr", "scale": "weight_svd"}, {"direction": "A2rBr", "scale": "gd_scale"},
                                {"direction": "random", "scale": "unit"}])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lora_ga_factors_equal_peft_from_the_same_gradient_and_seed(arch, ga):
    """PEFT's randomised SVD draws from the global generator; one seed before each layer's
    initialisation gives both the same draws, and then the same factors, bit for bit."""
    from deltatune.adapters.low_rank.lora_inits.lora_ga import lora_ga_factors
    from deltatune.config.lora_init import complete_sub_config

    base = tiny_model(arch)
    theirs, grads = _peft_lora_ga(base, arch, ga)
    full = complete_sub_config("LoraConfig", "lora_ga_config", ga)
    for key, grad in grads.items():
        layer = theirs.base_model.model.get_submodule(key)
        stored = base.get_submodule(key).weight
        layer.base_layer._peft_loraga_grad = grad.clone()
        layer.base_layer.weight.data = stored.clone()
        torch.manual_seed(5)
        layer.lora_ga_init("default", peft.LoraGAConfig(**ga))
        canon = (lambda t: t.T) if arch == "gpt2" else (lambda t: t)
        torch.manual_seed(5)
        A, B = lora_ga_factors(canon(grad), canon(stored), 4, 2.0, full, stored.shape[0])
        assert torch.equal(A, layer.lora_A["default"].weight) and torch.equal(B, layer.lora_B["default"].weight)


@pytest.mark.parametrize("arch", sorted(GA_TARGETS))
def test_lora_ga_files_both_ways(arch, tmp_path, parity_results):
    """Adapter and changed base: deltatune's LoRA-GA file loads in PEFT (which, without gradients,
    does not initialise again) onto deltatune's residual base; PEFT's file loads in deltatune onto PEFT's."""
    from deltatune.lora_from_data import add_lora_from_data

    base = tiny_model(arch)
    ours = copy.deepcopy(base)
    add_lora_from_data(ours, dt.LoraConfig(**_ga_kwargs(arch)), _batches())
    randomize_adapter(ours, seed=4)
    dt.save_adapter(ours, tmp_path / "ours")
    residual = dt.unload(copy.deepcopy(ours), merge=False)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(residual), tmp_path / "ours")
    ids = sample_ids()
    diff = (eval_logits(theirs, ids) - eval_logits(ours, ids)).abs().max().item()
    parity_results[f"lora-init-lora_ga-{arch}: deltatune file -> PEFT"] = diff
    assert diff <= ATOL

    peft_model, _ = _peft_lora_ga(base, arch)
    randomize_adapter(peft_model, seed=6)
    peft_model.save_pretrained(tmp_path / "theirs")
    their_residual = copy.deepcopy(peft_model).unload()
    loaded = dt.load_adapter(copy.deepcopy(their_residual), tmp_path / "theirs")
    diff = (eval_logits(loaded, ids) - eval_logits(peft_model, ids)).abs().max().item()
    parity_results[f"lora-init-lora_ga-{arch}: PEFT file -> deltatune"] = diff
    assert diff <= ATOL
    our_cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    their_cfg = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    assert set(our_cfg) == set(their_cfg)
    assert our_cfg["lora_ga_config"] == their_cfg["lora_ga_config"] and our_cfg["init_lora_weights"] == "lora_ga"


# ----- EVA ---------------------------------------------------------------------------------------------
EVA_TARGETS = {"llama": ["q_proj", "o_proj", "down_proj"], "qwen2": ["k_proj", "up_proj"], "gpt2": ["c_attn", "c_proj"]}


def _eva_batches():
    return [dict(input_ids=sample_ids(seed=s, batch=8, length=16), labels=sample_ids(seed=s, batch=8, length=16))
            for s in (1, 2, 3, 4)]


@pytest.mark.parametrize("arch", sorted(EVA_TARGETS))
def test_eva_files_both_ways(arch, tmp_path, parity_results):
    """EVA files (ranks redistributed: rank_pattern, alpha_pattern, target_modules) load both ways.

    PEFT's EVA runs an incremental, randomised PCA until the components stop moving; deltatune
    computes the exact PCA of the same tokens, so their A rows agree only as far as PEFT's PCA has
    converged (tests/unit/test_lora_inits.py checks deltatune's against an exact SVD)."""
    from peft.tuners.lora.eva import initialize_lora_eva_weights

    from deltatune.lora_from_data import add_lora_from_data

    base = tiny_model(arch)
    kwargs = dict(r=4, lora_alpha=8, target_modules=EVA_TARGETS[arch], init_lora_weights="eva",
                  fan_in_fan_out=arch == "gpt2")
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
    initialize_lora_eva_weights(theirs, dataloader=_eva_batches(), show_progress_bar=False)
    randomize_adapter(theirs)
    theirs.save_pretrained(tmp_path / "theirs")
    loaded = dt.load_adapter(copy.deepcopy(base), tmp_path / "theirs")
    ids = sample_ids()
    diff = (eval_logits(loaded, ids) - eval_logits(theirs, ids)).abs().max().item()
    parity_results[f"lora-init-eva-{arch}: PEFT file -> deltatune"] = diff
    assert diff <= ATOL

    ours = copy.deepcopy(base)
    add_lora_from_data(ours, dt.LoraConfig(**kwargs), _eva_batches())
    randomize_adapter(ours, seed=8)
    dt.save_adapter(ours, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    diff = (eval_logits(back, ids) - eval_logits(ours, ids)).abs().max().item()
    parity_results[f"lora-init-eva-{arch}: deltatune file -> PEFT"] = diff
    assert diff <= ATOL
    our_cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    their_cfg = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    assert set(our_cfg) == set(their_cfg)
    assert our_cfg["eva_config"] == their_cfg["eva_config"] and our_cfg["init_lora_weights"] == "eva"
    our_file = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    for key, value in our_file.items():  # each layer's rank is the one its rank_pattern records
        if key.endswith("lora_A.weight"):
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            assert value.shape[0] == our_cfg["rank_pattern"].get(module, 4)


# ----- CorDA -------------------------------------------------------------------------------------------
CORDA_TARGETS = {"llama": ["q_proj", "down_proj"], "qwen2": ["k_proj", "o_proj"], "gpt2": ["c_attn", "c_fc"]}


@pytest.mark.parametrize("method", ["ipm", "kpm"])
@pytest.mark.parametrize("arch", sorted(CORDA_TARGETS))
def test_corda_equals_peft_and_files_load_both_ways(arch, method, tmp_path, parity_results):
    """CorDA is deterministic given the batches: the same factors and residual base as PEFT's
    ``preprocess_corda`` + ``get_peft_model`` (one sequence per batch, as PEFT's hook expects)."""
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    from deltatune.lora_from_data import add_lora_from_data

    base = tiny_model(arch)
    batches = [dict(input_ids=sample_ids(seed=s, batch=1, length=16)) for s in range(1, 6)]
    kwargs = dict(r=4, lora_alpha=8, target_modules=CORDA_TARGETS[arch], init_lora_weights="corda",
                  fan_in_fan_out=arch == "gpt2")
    hooked = copy.deepcopy(base)
    config = peft.LoraConfig(**kwargs, corda_config=CordaConfig(corda_method=method))

    def run_model():
        for batch in batches:
            hooked(**batch)

    preprocess_corda(hooked, config, run_model=run_model)
    theirs = peft.get_peft_model(hooked, config)
    ours = add_lora_from_data(copy.deepcopy(base), dt.LoraConfig(**kwargs, corda_config={"corda_method": method}),
                              batches)
    their_tensors = {n.removeprefix("base_model.model.").replace(".default", ""): p
                     for n, p in theirs.named_parameters() if "lora_" in n or "base_layer.weight" in n}
    our_tensors = {n.replace(".default", ""): p for n, p in ours.named_parameters()
                   if "lora_" in n or "base_layer.weight" in n}
    assert set(our_tensors) == set(their_tensors)
    for key, value in their_tensors.items():
        torch.testing.assert_close(our_tensors[key], value, atol=1e-6, rtol=1e-6)

    randomize_adapter(ours, seed=9)
    dt.save_adapter(ours, tmp_path / "ours")
    residual = dt.unload(copy.deepcopy(ours), merge=False)
    # PEFT would run CorDA again on a file that names it (it looks for the preprocessing results and
    # stops without them); loading its own CorDA adapter, it is told init_lora_weights=True
    data = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert data["init_lora_weights"] == "corda" and data["corda_config"]["corda_method"] == method
    view = tmp_path / "peft_view"
    view.mkdir()
    (view / "adapter_model.safetensors").write_bytes((tmp_path / "ours" / "adapter_model.safetensors").read_bytes())
    (view / "adapter_config.json").write_text(json.dumps({**data, "init_lora_weights": True, "corda_config": None}))
    back = peft.PeftModel.from_pretrained(copy.deepcopy(residual), view)
    ids = sample_ids()
    diff = (eval_logits(back, ids) - eval_logits(ours, ids)).abs().max().item()
    parity_results[f"lora-init-corda-{method}-{arch}: deltatune file -> PEFT"] = diff
    assert diff <= ATOL

    randomize_adapter(theirs, seed=10)
    theirs.save_pretrained(tmp_path / "theirs")
    loaded = dt.load_adapter(copy.deepcopy(theirs).unload(), tmp_path / "theirs")
    diff = (eval_logits(loaded, ids) - eval_logits(theirs, ids)).abs().max().item()
    parity_results[f"lora-init-corda-{method}-{arch}: PEFT file -> deltatune"] = diff
    assert diff <= ATOL
    assert set(json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())) == set(data)
