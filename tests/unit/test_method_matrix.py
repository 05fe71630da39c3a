"""Every method through the same checks (DESIGN.md's invariants): a new adapter changes nothing
where the method promises it, only adapter tensors train, disabling gives the base bit for bit,
merging equals the unmerged model (or is refused clearly), files round-trip bit-exactly,
deleting restores the base, and a few optimizer steps lower the loss on a tiny model."""

import copy

import pytest
import torch

import deltatune as dt
from tiny_models import eval_logits, randomize_adapter, sample_ids, tiny_model

# name -> (architecture, config, a new adapter leaves outputs unchanged)
METHODS = {
    "lora": ("llama", lambda: dt.LoraConfig(r=4, target_modules="all-linear"), True),
    # orthogonal: B @ A cancels only up to rounding (checked in tests/unit/test_lora_inits.py)
    "lora-orthogonal": ("llama", lambda: dt.LoraConfig(r=4, target_modules="all-linear", init_lora_weights="orthogonal"),
                        False),
    "lora-mica": ("llama", lambda: dt.LoraConfig(r=4, target_modules="all-linear", init_lora_weights="mica"), True),
    "dylora": ("llama", lambda: dt.DyLoraConfig(r=4, r_min=1, target_modules="all-linear"), True),
    "dora": ("llama", lambda: dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True), True),
    "loha": ("llama", lambda: dt.LoHaConfig(r=4, alpha=8, target_modules="all-linear"), True),
    "lokr": ("llama", lambda: dt.LoKrConfig(r=4, alpha=8, target_modules="all-linear"), True),
    "adalora": ("llama", lambda: dt.AdaLoraConfig(init_r=6, target_r=2, target_modules=["q_proj", "v_proj"],
                                                  total_step=20), True),
    "ia3": ("llama", lambda: dt.IA3Config(), True),
    "ia3-gpt2": ("gpt2", lambda: dt.IA3Config(fan_in_fan_out=True), True),
    "vera": ("llama", lambda: dt.VeraConfig(r=8, target_modules="all-linear"), True),
    "hira": ("llama", lambda: dt.HiraConfig(r=4, target_modules="all-linear"), True),
    # task-routed (one task here, so no task_ids needed; several tasks: tests/unit/test_task_ids.py)
    "poly": ("llama", lambda: dt.PolyConfig(r=2, n_skills=2, target_modules="all-linear"), True),
    "poly-mhr": ("qwen2", lambda: dt.PolyConfig(r=2, n_skills=3, n_splits=2, target_modules="all-linear"), True),
    "multitask-prompt-tuning": ("llama", lambda: dt.MultitaskPromptTuningConfig(num_virtual_tokens=4), False),
    # a context of real tokens before every row: a new adapter already changes outputs
    "cpt": ("llama", lambda: dt.CPTConfig(cpt_token_ids=[5, 9, 17, 33, 40], cpt_tokens_type_mask=[1, 2, 2, 3, 4]),
            False),
    "hira-gpt2": ("gpt2", lambda: dt.HiraConfig(r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True), True),
    "pvera": ("llama", lambda: dt.PveraConfig(r=8, target_modules="all-linear", generator_seed=0), True),
    "cartridge": ("llama", lambda: dt.CartridgeConfig(num_virtual_tokens=4), False),  # a random KV prefix
    "waveft": ("llama", lambda: dt.WaveFTConfig(n_frequency=64, wavelet_family="db2", target_modules="all-linear"), True),
    "nola": ("llama", lambda: dt.NolaConfig(r=4, num_basis_A=16, num_basis_B=16, target_modules="all-linear"), True),
    "road": ("llama", lambda: dt.RoadConfig(variant="road_2", group_size=8, target_modules="all-linear"), True),
    "delora": ("llama", lambda: dt.DeloraConfig(r=4, target_modules="all-linear"), True),
    "randlora": ("llama", lambda: dt.RandLoraConfig(r=4, randlora_alpha=16, target_modules="all-linear"), True),
    "vblora": ("llama", lambda: dt.VBLoRAConfig(r=4, num_vectors=16, vector_length=8, target_modules="all-linear"),
               False),  # the bank and logits start random: a new adapter already changes outputs a little
    "bottleneck-houlsby": ("llama", lambda: dt.BottleneckConfig(reduction_factor=4), True),
    "bottleneck-pfeiffer-gpt2": ("gpt2", lambda: dt.BottleneckConfig(variant="pfeiffer", reduction_factor=4), True),
    "prompt-tuning": ("llama", lambda: dt.PromptTuningConfig(num_virtual_tokens=4), False),
    "prefix-tuning": ("llama", lambda: dt.PrefixTuningConfig(num_virtual_tokens=4), False),
    "p-tuning": ("gpt2", lambda: dt.PromptEncoderConfig(num_virtual_tokens=4, encoder_hidden_size=16), False),
    "adaption-prompt": ("llama", lambda: dt.AdaptionPromptConfig(adapter_len=4), True),
    "adaption-prompt-gpt2": ("gpt2", lambda: dt.AdaptionPromptConfig(adapter_len=4, adapter_layers=1), True),
    "beft": ("qwen2", lambda: dt.BeftConfig(), True),  # Qwen2's v_proj has a bias to merge into
    "bitfit": ("qwen2", lambda: dt.SelectiveConfig(bitfit=True), True),
    "top-layer": ("llama", lambda: dt.SelectiveConfig(top_k_layers=1), True),
    "ln-tuning": ("llama", lambda: dt.LNTuningConfig(), True),
    "ln-tuning-gpt2": ("gpt2", lambda: dt.LNTuningConfig(), True),
    # ids that occur in every row of sample_ids(), so the trained rows matter on each row
    "trainable-tokens": ("llama", lambda: dt.TrainableTokensConfig(token_indices=[16, 94, 127, 126, 101, 82]), True),
    "trainable-tokens-tied-gpt2": ("gpt2", lambda: dt.TrainableTokensConfig(token_indices=[16, 94, 127, 126, 101, 82]),
                                   True),
    "lora-trainable-tokens": ("llama", lambda: dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                             trainable_token_indices=[16, 94, 127, 126, 101, 82]), True),
    "oft": ("llama", lambda: dt.OFTConfig(oft_block_size=8, target_modules="all-linear"), True),
    "oft-gpt2": ("gpt2", lambda: dt.OFTConfig(oft_block_size=8, target_modules=["c_attn", "c_fc"]), True),
    # HRA's paired reflections cancel only up to rounding (checked in tests/unit/test_orthogonal_methods.py)
    "hra": ("llama", lambda: dt.HRAConfig(r=4, target_modules="all-linear"), False),
    "boft": ("llama", lambda: dt.BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2,
                                            target_modules="all-linear"), True),
    "fourierft": ("llama", lambda: dt.FourierFTConfig(n_frequency=64, target_modules="all-linear", init_weights=True), True),
    "shira": ("llama", lambda: dt.ShiraConfig(r=2, target_modules="all-linear"), True),
    "supertuning": ("llama", lambda: dt.SupertuningConfig(sparsity=0.9, target_modules="all-linear"), True),
    "supertuning-supra-bottom": ("qwen2", lambda: dt.SupertuningConfig(sparsity=0.95, r=2, select_top=False,
                                                                       target_modules="all-linear"), True),
    "miss": ("llama", lambda: dt.MissConfig(r=8, target_modules="all-linear"), True),
    "miss-bat": ("llama", lambda: dt.MissConfig(r=8, init_weights="bat", target_modules="all-linear"), True),
    "c3a": ("llama", lambda: dt.C3AConfig(block_size=8, init_weights=True, target_modules="all-linear"), True),
    "gralora": ("llama", lambda: dt.GraloraConfig(r=4, gralora_k=2, hybrid_r=2, target_modules="all-linear"), True),
    "unilora": ("llama", lambda: dt.UniLoraConfig(r=4, theta_d_length=256, target_modules="all-linear"),
                False),  # the shared vector starts random: a new adapter already changes outputs a little
    "deft": ("llama", lambda: dt.DeftConfig(r=4, target_modules="all-linear"), True),
    "deft-para-qr-gpt2": ("gpt2", lambda: dt.DeftConfig(r=4, para=True, decomposition_method="qr",
                                                       target_modules=["c_attn", "c_fc"]), False),  # removal only
    "peanut": ("llama", lambda: dt.PeanutConfig(r=4, depth=1, target_modules="all-linear"), True),
    "glora": ("qwen2", lambda: dt.GloraConfig(r=4, target_modules="all-linear"), True),  # q/k/v biases: C, D, E
    "glora-vector": ("qwen2", lambda: dt.GloraConfig(target_modules="all-linear", config_A_B="vector",
                                                     config_C="vector", config_D_E="vector"), True),
    "tinylora": ("llama", lambda: dt.TinyLoraConfig(r=2, u=8, weight_tying=0.5, target_modules="all-linear"), True),
    "tinylora-gpt2": ("gpt2", lambda: dt.TinyLoraConfig(r=2, u=4, save_projection=False, fan_in_fan_out=True,
                                                        target_modules=["c_attn", "c_fc"]), True),
    "psoft": ("llama", lambda: dt.PsoftConfig(r=4, target_modules="all-linear"), True),
    # AdaMSS on Qwen2: the q/k/v biases are the decomposed weight's extra column
    "adamss": ("qwen2", lambda: dt.AdamssConfig(r=8, num_subspaces=3, subspace_rank=2, target_modules="all-linear"),
               True),
    # FRoD rebuilds each weight as U diag(λ) Vᵀ: equal to W only up to rounding (tests/parity/test_frod_peft_parity.py)
    "frod": ("llama", lambda: dt.FrodConfig(target_modules="all-linear", sparse_rate=0.05), False),
    "frod-gpt2": ("gpt2", lambda: dt.FrodConfig(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                                                save_projection=False), False),
    # OSF: U_low S_low V_low − U₀ S₀ V₀ is one rank-2m product (PEFT's forward): it cancels only up to rounding
    "osf": ("llama", lambda: dt.OSFConfig(effective_rank=0.75, target_modules="all-linear"), False),
    # Lily: not routed per row, not merged (its router averages over the batch; tests/parity/test_lily_peft_parity.py)
    "lily": ("llama", lambda: dt.LilyConfig(r=4, stride_A=2, num_B=3, target_modules=["q_proj", "v_proj", "down_proj"]),
             True),
    # ShadowPEFT: hooks on the decoder blocks; not routed per row, not merged (tests/parity/test_shadow_peft_parity.py)
    "shadow": ("llama", lambda: dt.ShadowConfig(r=4, task_type="CAUSAL_LM"), True),
    "shadow-small-gpt2": ("gpt2", lambda: dt.ShadowConfig(r=4, shadow_hidden_size=16, shadow_num_attention_heads=2,
                                                          shadow_intermediate_size=24), True),
}


# vector-only methods move slowly at LoRA's rate on a random model
STEP_LR = {"ia3": 1e-1, "ia3-gpt2": 1e-1, "vera": 5e-2, "prompt-tuning": 5e-2, "prefix-tuning": 5e-2}
STEP_LR.update({"adaption-prompt": 1e-1, "adaption-prompt-gpt2": 1e-1})  # zero gates: the prompts start unused
STEP_LR.update({"hira-gpt2": 2e-1, "pvera": 5e-2, "cartridge": 5e-2})  # ΔW = W0 ⊙ BA is small where W0 is (GPT-2's std 0.02 weights)
STEP_LR.update({"tinylora": 3e-1, "tinylora-gpt2": 3.0})  # a few numbers steer B R A, small where √Σ is (GPT-2)
STEP_LR.update({"frod-gpt2": 1e-1})  # λ and S scale unit columns of U; GPT-2's std-0.02 weights move little per step
STEP_LR.update({"glora-vector": 5e-3})  # a vector B adds b · Σx to every output: a large step per unit of lr


def _setup(method):
    arch, make, _ = METHODS[method]
    base = tiny_model(arch)
    model = copy.deepcopy(base)
    dt.add_adapter(model, make())
    return base, model


@pytest.mark.parametrize("method", sorted(METHODS))
def test_new_adapter_and_trainable_tensors(method):
    base, model = _setup(method)
    ids = sample_ids()
    if METHODS[method][2]:
        assert torch.equal(eval_logits(model, ids), eval_logits(base, ids))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    base_names = {n for n, _ in base.named_parameters()}
    # every trainable tensor belongs to the adapter, none to the base model
    assert not [n for n in trainable if n in base_names]
    assert 0 < dt.trainable_parameters(model)[0] < dt.trainable_parameters(base)[1]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_disable_merge_save_load_delete(method, tmp_path):
    base, model = _setup(method)
    randomize_adapter(model)
    ids = sample_ids()
    tuned, plain = eval_logits(model, ids), eval_logits(base, ids)
    assert (tuned - plain).abs().max() > 1e-3
    with dt.disable_adapters(model):
        assert torch.equal(eval_logits(model, ids), plain)
    assert torch.equal(eval_logits(model, ids), tuned)

    dt.save_adapter(model, tmp_path)
    reloaded = dt.load_adapter(copy.deepcopy(base), tmp_path)
    assert torch.equal(eval_logits(reloaded, ids), tuned)
    again = tmp_path / "again"
    dt.save_adapter(reloaded, again)
    from safetensors.torch import load_file
    first, second = load_file(tmp_path / "adapter_model.safetensors"), load_file(again / "adapter_model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)

    config = dt.read_adapter_config(tmp_path)
    if config.mergeable:
        dt.merge(model, verbose=False)
        torch.testing.assert_close(eval_logits(model, ids), tuned, atol=1e-5, rtol=1e-5)
        dt.unmerge(model)
        assert torch.equal(eval_logits(model, ids), tuned)
        merged = dt.unload(copy.deepcopy(model), merge=True, verbose=False)
        torch.testing.assert_close(eval_logits(merged, ids), tuned, atol=1e-5, rtol=1e-5)
    else:
        with pytest.raises(ValueError, match="cannot be merged"):
            dt.merge(model, verbose=False)
        with pytest.raises(ValueError, match="cannot be merged"):
            dt.unload(copy.deepcopy(model), merge=True, verbose=False)
    restored = dt.unload(copy.deepcopy(model), merge=False)
    assert torch.equal(eval_logits(restored, ids), plain)
    assert not any(n.startswith("deltatune") for n, _ in restored.named_modules())
    dt.delete_adapter(model, "default")
    assert torch.equal(eval_logits(model, ids), plain)
    assert {n for n, _ in model.named_parameters()} == {n for n, _ in base.named_parameters()}


# PVeRA samples its middle while training, so its training loss is noisy step to step; its
# falling eval loss is checked in tests/parity/test_catalogue_a_peft_parity.py
NOISY_TRAINING_LOSS = {"pvera"}


@pytest.mark.parametrize("method", sorted(set(METHODS) - NOISY_TRAINING_LOSS))
def test_a_few_steps_lower_the_loss(method):
    torch.manual_seed(0)
    _, model = _setup(method)
    ids = sample_ids(batch=4, length=12)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=STEP_LR.get(method, 2e-2))
    model.train()
    losses = []
    for _ in range(12):
        loss = model(input_ids=ids, labels=ids).loss
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    # random tokens on a random model: a small but steady fall (vector-only methods have little capacity)
    assert losses[-1] < losses[0] - 0.02 and losses[-1] < min(losses[:-1]), losses


def test_two_methods_on_different_modules_and_switching():
    base, ids = tiny_model("llama"), sample_ids()
    model = copy.deepcopy(base)
    dt.add_adapter(model, dt.LoraConfig(r=4, target_modules=["q_proj"]), "lora")
    dt.add_adapter(model, dt.IA3Config(target_modules=["v_proj", "down_proj"], feedforward_modules=["down_proj"]),
                   "ia3")
    dt.add_adapter(model, dt.PromptTuningConfig(num_virtual_tokens=2), "soft")
    randomize_adapter(model)
    outputs = {}
    for name in ("lora", "ia3", "soft"):
        dt.set_adapter(model, name)
        outputs[name] = eval_logits(model, ids)
    assert all((outputs[a] - outputs[b]).abs().max() > 1e-4 for a, b in [("lora", "ia3"), ("ia3", "soft")])
    dt.set_adapter(model, ["lora", "ia3"])  # two weight methods at once
    both = eval_logits(model, ids)
    assert (both - outputs["lora"]).abs().max() > 1e-4
    with pytest.raises(TypeError, match="one method per module"):
        dt.add_adapter(model, dt.LoHaConfig(target_modules=["q_proj"]), "loha")


def test_bitfit_on_a_model_without_biases_says_so():
    with pytest.raises(ValueError, match="no biases"):
        dt.add_adapter(tiny_model("llama"), dt.SelectiveConfig(bitfit=True))


ROUTED = ["dylora", "loha", "lokr", "adalora", "ia3", "vera", "nola", "road", "delora", "randlora", "vblora", "bottleneck-houlsby", "top-layer"]
ROUTED += ["fourierft", "shira", "miss", "miss-bat", "c3a"]  # the structured family
ROUTED += ["supertuning", "supertuning-supra-bottom"]
ROUTED += ["oft", "oft-gpt2", "hra", "boft"]  # the orthogonal family: each row group's input is mapped before one base call
ROUTED += ["adaption-prompt", "adaption-prompt-gpt2"]  # each row's gated prompt attention depends on that row only
ROUTED += ["beft"]
ROUTED += ["gralora", "unilora", "deft", "deft-para-qr-gpt2", "peanut"]  # catalogue B
ROUTED += ["hira", "hira-gpt2", "pvera", "waveft"]  # catalogue A (PVeRA: eval mode uses the mean, no sampling)
ROUTED += ["glora", "glora-vector"]
ROUTED += ["tinylora", "tinylora-gpt2"]
ROUTED += ["psoft"]
ROUTED += ["shadow", "shadow-small-gpt2"]  # each row group runs its own shadow backbone
ROUTED += ["adamss"]
ROUTED += ["frod", "frod-gpt2"]  # each routed row group gets its own rebuilt weight
ROUTED += ["osf"]
ROUTED += ["ln-tuning", "ln-tuning-gpt2", "trainable-tokens", "trainable-tokens-tied-gpt2", "lora-trainable-tokens"]
ROUTED += ["lora-orthogonal", "lora-mica"]  # LoRA's initialisations (tests/unit/test_lora_inits.py)
ROUTED += ["poly", "poly-mhr"]  # each routed group keeps its rows' task ids


@pytest.mark.parametrize("method", ROUTED)
def test_per_row_routing_equals_separate_runs(method):
    arch, make, _ = METHODS[method]
    base, ids = tiny_model(arch), sample_ids()
    model = copy.deepcopy(base)
    dt.add_adapter(model, make(), "a")
    dt.add_adapter(model, make(), "b")
    randomize_adapter(model)
    expected = []
    for name in ("a", "b"):
        dt.set_adapter(model, name)
        expected.append(eval_logits(model, ids))
    plain = eval_logits(base, ids)
    # "a", "b" and the base differ on every row, so routing a row to the wrong one cannot pass below
    for x, y in ((expected[0], expected[1]), (expected[0], plain), (expected[1], plain)):
        assert ((x - y).abs().amax(dim=(1, 2)) > 1e-4).all()
    with dt.adapter_per_row(model, ["b", None, "a"]):
        routed = eval_logits(model, ids)
    torch.testing.assert_close(routed[0], expected[1][0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(routed[1], plain[1], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(routed[2], expected[0][2], atol=1e-6, rtol=1e-5)


def test_soft_prompts_refuse_per_row_routing():
    model = tiny_model("llama")
    dt.add_adapter(model, dt.PromptTuningConfig(num_virtual_tokens=2))
    with pytest.raises(NotImplementedError, match="per row"), dt.adapter_per_row(model, ["default", None, None]):
        model(sample_ids())


@pytest.mark.parametrize("method", ["dylora", "loha", "lokr", "adalora", "ia3", "vera", "nola", "road", "delora", "randlora", "vblora", "bottleneck-houlsby",
                                    "fourierft", "shira", "miss", "miss-bat", "c3a", "adaption-prompt", "beft", "hira", "pvera", "waveft",
                                    "oft", "hra", "boft"] + ["lora-orthogonal", "lora-mica"]
                         + ["ln-tuning", "trainable-tokens", "lora-trainable-tokens"]
                         + ["gralora", "unilora", "deft", "peanut"]  # catalogue B
                         + ["glora", "glora-vector"]  # W0 is the dequantized weight
                         + ["tinylora"]  # the SVD is of the dequantized weight
                         + ["psoft"]  # the SVD is of the dequantized weight
                         + ["adamss"]  # the SVD and clusters are of the dequantized weight
                         + ["frod"]  # bases and U from the dequantized weight
                         + ["osf"]  # the SVD is of the dequantized weight
                         + ["lily"]  # reads the base's input only
                         + ["supertuning", "supertuning-supra-bottom"]  # support picked on the dequantized weight
                         + ["poly"]  # the update never reads the base weight
                         + ["shadow"])  # hooks around the blocks, whatever their linears store
def test_weight_methods_on_an_nf4_base(method):
    from deltatune.quant import QuantizeConfig, dequantize_model, quantize_model

    arch, make, _ = METHODS[method]
    quantized = quantize_model(tiny_model(arch), QuantizeConfig(quant_type="nf4"))
    reference = dequantize_model(copy.deepcopy(quantized))  # the same weights, in float32
    for m in (quantized, reference):
        torch.manual_seed(0)  # the same initial adapter values on both
        dt.add_adapter(m, make())
        randomize_adapter(m)
    ids = sample_ids()
    torch.testing.assert_close(eval_logits(quantized, ids), eval_logits(reference, ids), atol=1e-4, rtol=1e-4)
    if METHODS[method][1]().mergeable:
        before = eval_logits(quantized, ids)
        dt.merge(quantized, verbose=False)
        torch.testing.assert_close(eval_logits(quantized, ids), before, atol=1e-4, rtol=1e-4)
        dt.unmerge(quantized)
        assert torch.equal(eval_logits(quantized, ids), before)


def test_prompt_tuning_initialisation_from_text_and_vocabulary(tmp_path, default_tokenizer):
    from tiny_models import tiny_chat_model_dir

    folder = tiny_chat_model_dir(tmp_path / "model", default_tokenizer)
    model, tokenizer = dt.load_model(str(folder))
    text = "Which order does the animal belong to?"
    dt.add_adapter(model, dt.PromptTuningConfig(num_virtual_tokens=12, prompt_tuning_init="TEXT",
                                                prompt_tuning_init_text=text, tokenizer_name_or_path=str(folder)))
    ids = tokenizer(text)["input_ids"]
    ids = (ids * (12 // len(ids) + 1))[:12]  # repeated to the prompt's length, as PEFT does
    prompts = model.deltatune_prompts.encoders["default"].embedding.weight
    words = model.get_input_embeddings().weight
    assert torch.equal(prompts, words[torch.tensor(ids)])
    dt.add_adapter(model, dt.PromptTuningConfig(num_virtual_tokens=6, prompt_tuning_init="SAMPLE_VOCAB"), "vocab")
    sampled = model.deltatune_prompts.encoders["vocab"].embedding.weight
    assert all(any(torch.equal(row, w) for w in words) for row in sampled)  # each row is some word's embedding


def test_top_layers_on_a_quantized_base_says_so():
    """Quantized linears keep packed buffers: training the top layers there would silently train norms only."""
    from deltatune.quant import QuantizeConfig, quantize_model

    quantized = quantize_model(tiny_model("llama"), QuantizeConfig(quant_type="nf4"))
    with pytest.raises(TypeError, match="top_k_layers: the top layers' linear weights are quantized"):
        dt.add_adapter(quantized, dt.SelectiveConfig(top_k_layers=1))
