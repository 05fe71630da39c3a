"""``deltatune plan`` on mixture-of-experts models: shapes from configs and presets, trainable
parameters equal to what ``deltatune.add_adapter`` creates, memory terms (all experts stored, top-k
computed), the 48 GB QLoRA fit of Qwen3-30B-A3B, and dense plans unchanged."""

import dataclasses
import warnings

import pytest
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

import deltatune as dt
from deltatune.cli.plan import PlanConfig, plan_for
from deltatune.distributed.plan import (NF4_DOUBLE_QUANT_BITS, Run, base_weight_bytes, choose, experts_of,
                                        make_plan, memory_terms, trainable_parameters)
from deltatune.distributed.plan_moe import ExpertLora
from deltatune.distributed.plan_shapes import (ATTENTION_LINEARS, FORMER_NAME_KINDS, LINEARS, PRESETS, load_shape,
                                               shape_from_config)
from deltatune.distributed.plan_speed import CUDA_CONTEXT_BYTES, DEVICES, step_cost
from deltatune.targeting_experts import _conversion_kind
from deltatune.train.config import LoraOptions
from deltatune.train.moe import apply_expert_presets
from tiny_moe import MOE_ARCHS, _config, tiny_moe

L40S = DEVICES["l40s"]


def _plan(**fields):
    choice, _ = plan_for(PlanConfig(model="qwen3-30b-a3b", gpus=1, gpu_memory="48GB", gpu="l40s", **fields))
    return choice


# ----- shapes ----------------------------------------------------------------------------------
def test_moe_presets_match_the_model_cards():
    qwen = load_shape("qwen3-30b-a3b")
    assert (qwen.experts, qwen.top_k, qwen.expert_intermediate, qwen.moe_layers) == (128, 8, 768, 48)
    assert abs(qwen.parameters() - 30.53e9) < 0.02e9  # "30.5B total"
    embeddings = 2 * qwen.vocab * qwen.hidden
    assert abs(qwen.active_parameters() + embeddings - 3.35e9) < 0.05e9  # "3.3B activated"
    mixtral = load_shape("mixtral-8x7b")
    assert abs(mixtral.parameters() - 46.70e9) < 0.02e9  # 46.7B total
    assert abs(mixtral.active_parameters() + 2 * mixtral.vocab * mixtral.hidden - 12.9e9) < 0.05e9  # 12.9B active


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_shapes_from_config_json_count_every_parameter(arch, tmp_path):
    cls, config = _config(arch)
    config.save_pretrained(tmp_path)
    shape = load_shape(str(tmp_path))
    model = cls(config)
    assert shape.moe and shape.experts == 4 and shape.top_k == 2 and shape.moe_layers == 2
    counted = sum(p.numel() for p in model.parameters())
    # the planner leaves out what it leaves out on dense models too: per-head q/k norms (Qwen3, OLMoE),
    # gpt-oss's attention sinks and output-projection bias
    skipped = sum(p.numel() for n, p in model.named_parameters()
                  if any(k in n for k in ("q_norm", "k_norm", "sinks", "o_proj.bias")))
    assert shape.parameters() == counted - skipped


def test_dense_layers_of_qwen3_moe_are_counted_apart(tmp_path):
    config = Qwen3MoeConfig(vocab_size=64, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=8, intermediate_size=48, moe_intermediate_size=16,
                            num_experts=4, num_experts_per_tok=2, mlp_only_layers=[0], decoder_sparse_step=1)
    config.save_pretrained(tmp_path)
    shape = load_shape(str(tmp_path))
    assert (shape.moe_layers, shape.dense_layers) == (3, 1)
    model = Qwen3MoeForCausalLM(config)
    norms = sum(p.numel() for n, p in model.named_parameters() if "q_norm" in n or "k_norm" in n)
    assert shape.parameters() == sum(p.numel() for p in model.parameters()) - norms


def test_shared_experts_are_refused_naming_the_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"model_type": "qwen2_moe", "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,'
                    ' "num_attention_heads": 2, "vocab_size": 10, "num_experts": 4, "num_experts_per_tok": 2,'
                    ' "moe_intermediate_size": 8, "shared_expert_intermediate_size": 16}')
    with pytest.raises(ValueError, match=r"config\.json: shared_expert_intermediate_size"):
        load_shape(str(path))


def test_the_former_name_table_is_what_deltatune_does():
    for arch in MOE_ARCHS:
        model = tiny_moe(arch)
        assert FORMER_NAME_KINDS.get(model.config.model_type, "") == (_conversion_kind(model) or "")


# ----- trainable parameters against the adapters deltatune creates --------------------------------
TARGETINGS = {  # name: (target_modules, --lora.target-experts)
    "all-linear": ("all-linear", False),
    "all-linear + experts": ("all-linear", True),
    "attention + experts": (list(ATTENTION_LINEARS), True),
    "attention": (list(ATTENTION_LINEARS), False),
    "q, v, gate, up, down": (["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"], False),
}


def _created(model, target_modules, target_experts: bool) -> int:
    config = apply_expert_presets(dt.LoraConfig(r=2, lora_alpha=4, target_modules=target_modules, lora_dropout=0.0),
                                  LoraOptions(target_experts=target_experts), model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # untargeted experts and former-name rewrites say so
        dt.add_adapter(model, config)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _planned(shape, target_modules, target_experts: bool) -> int:
    all_linear = target_modules == "all-linear"
    targets = frozenset(LINEARS) if all_linear else frozenset(target_modules)
    return trainable_parameters(shape, Run(r=2, targets=targets, all_linear=all_linear, target_experts=target_experts))


@pytest.mark.parametrize("arch", MOE_ARCHS)
@pytest.mark.parametrize("targeting", list(TARGETINGS))
def test_trainable_parameters_equal_what_add_adapter_creates(arch, targeting):
    target_modules, target_experts = TARGETINGS[targeting]
    model = tiny_moe(arch)
    shape = shape_from_config(model.config.to_dict(), arch)
    assert _planned(shape, target_modules, target_experts) == _created(model, target_modules, target_experts)


def test_trainable_parameters_with_dense_layers_equal_what_add_adapter_creates():
    config = Qwen3MoeConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=8, intermediate_size=48, moe_intermediate_size=16,
                            num_experts=4, num_experts_per_tok=2, mlp_only_layers=[1])
    shape = shape_from_config(config.to_dict(), "mixed")
    for target_modules, target_experts in TARGETINGS.values():
        model = Qwen3MoeForCausalLM(config)
        assert _planned(shape, target_modules, target_experts) == _created(model, target_modules, target_experts)


def test_expert_lora_counts_by_hand():
    shape = load_shape("qwen3-30b-a3b")
    E, H, I, r = 128, 2048, 768, 16
    attention_only = Run(targets=frozenset(ATTENTION_LINEARS), all_linear=False)
    with_experts = dataclasses.replace(attention_only, target_experts=True)
    assert experts_of(shape, with_experts) == ExpertLora(r, r, 0)
    assert trainable_parameters(shape, with_experts) - trainable_parameters(shape, attention_only) \
        == 48 * (E * r * (H + 2 * I) + E * r * (I + H))
    assert experts_of(shape, Run()) == ExpertLora(2 * r, r, r)  # all-linear: gate and up named, router too
    gpt_oss = shape_from_config(_config("gpt_oss")[1].to_dict())
    assert experts_of(gpt_oss, Run()) == ExpertLora()  # all-linear adapts its attention only


# ----- memory and speed -------------------------------------------------------------------------
def test_all_experts_are_stored_in_four_bit_and_one_stack_is_decoded_at_a_time():
    shape = load_shape("qwen3-30b-a3b")
    run = Run(method="qlora", precision="bf16", base_dtype="bf16")
    stored = 48 * (shape.attention_parameters() + 128 * 3 * 768 * 2048)
    assert shape.quantized_parameters() == stored
    assert base_weight_bytes(shape, run) == int(stored * NF4_DOUBLE_QUANT_BITS / 8) + shape.other_parameters() * 2
    assert shape.other_parameters() - 2 * 151936 * 2048 - 97 * 2048 == 48 * 128 * 2048  # the routers, full precision
    terms, _ = memory_terms(shape, run, 0)
    assert terms["4-bit decoded weight"] == 128 * 2 * 768 * 2048 * 2  # the gate/up expert stack in bf16


def test_4bit_experts_without_lora_keep_their_decoded_weights_for_backward():
    """The model's own experts forward keeps each decoded weight for the input's gradient (LoRA on
    the experts decodes again in backward instead, and so does not)."""
    shape = load_shape("qwen3-30b-a3b")
    term = "decoded 4-bit experts kept for backward (no LoRA on them)"
    attention = frozenset(ATTENTION_LINEARS)
    for checkpointing, layers in ((False, 48), (True, 1)):
        run = Run(method="qlora", precision="bf16", targets=attention, all_linear=False,
                  gradient_checkpointing=checkpointing)
        terms, _ = memory_terms(shape, run, 0)
        assert terms[term] == layers * 128 * 3 * 768 * 2048 * 2
    adapted = Run(method="qlora", precision="bf16", targets=attention, all_linear=False, target_experts=True)
    assert term not in memory_terms(shape, adapted, 0)[0]
    assert term not in memory_terms(shape, Run(method="lora", precision="bf16", targets=attention,
                                               all_linear=False), 0)[0]


def test_activations_and_flops_follow_top_k_not_the_number_of_experts():
    shape = load_shape("qwen3-30b-a3b")
    run = Run(precision="bf16", rows=2, seq_len=1024, targets=frozenset(ATTENTION_LINEARS), all_linear=False)
    kept = lambda s: next(v for k, v in memory_terms(s, run, 0)[0].items() if k.startswith("activations"))  # noqa: E731
    more_experts = dataclasses.replace(shape, experts=256)
    fewer_k = dataclasses.replace(shape, top_k=4)
    router_share = 48 * 2048 * (256 - 128) * 4  # only the router's probabilities grow with the experts
    assert kept(more_experts) - kept(shape) == router_share
    expert_terms = 48 * 2048 * 4 * (2 * 768 * 2 + 768 * 2 + 2048 * 2)  # gate, up, act(gate), outputs per dropped k
    assert kept(shape) - kept(fewer_k) == expert_terms + 48 * 2048 * 4 * 4  # and the top-k weights
    cost = step_cost(shape, 2, 1024, run.targets, 16, False, False, False, False, False, 2, 1.0, experts_of(shape, run))
    assert cost.flops["base forward"] == 2 * shape.active_parameters() * 2048
    assert shape.active_parameters() < shape.quantized_parameters() / 10  # 8 of 128 experts run per token


# ----- the 48 GB claim and the printed plan ---------------------------------------------------
def test_qlora_of_qwen3_30b_a3b_fits_one_48gb_gpu():
    # the defaults of deltatune train (8 x 512 tokens, r=16, all-linear, AdamW), bf16 autocast: planned at
    # 36,327 MiB (38.09e9 bytes) with gradient checkpointing, the first rung that fits 95% of 48 GB
    for target_experts in (False, True):
        choice = _plan(method="qlora", target_experts=target_experts)
        plan = choice.plan
        assert plan is not None and plan.run.method == "qlora" and plan.run.strategy == "single"
        assert plan.peak < 48e9 and plan.peak == pytest.approx(38.09e9, rel=0.01)
        assert plan.trainable == 996_507_648  # experts (gate_up at 2r), router and attention, as add_adapter makes


def test_bf16_lora_of_qwen3_30b_a3b_does_not_fit_one_48gb_gpu():
    choice = _plan(method="lora", base_dtype="bf16")
    lora = [p for p in choice.tried if p.run.method == "lora"]
    assert lora and all(p.peak > 48e9 for p in lora)  # 61 GB of bf16 weights alone
    assert min(p.memory["base weights"] for p in lora) > 60e9
    assert choice.plan.run.method == "qlora"  # the planner falls back to a 4-bit base


def test_the_plan_says_it_is_a_mixture_of_experts(capsys):
    from deltatune.cli import main

    base = ["plan", "--model", "qwen3-30b-a3b", "--gpus", "1", "--gpu-memory", "48GB", "--method", "qlora",
            "--target-modules", "q_proj,k_proj,v_proj,o_proj"]
    assert main(base) == 0
    plain = capsys.readouterr().out
    assert "mixture of experts: 48 MoE layers of 128 experts (intermediate 768), top-8 per token" in plain
    assert "experts: LoRA on none (add --target-experts to adapt them)" in plain
    assert main(base + ["--target-experts"]) == 0
    targeted = capsys.readouterr().out
    assert "experts: LoRA on gate_up_proj r=16, down_proj r=16 (--target-experts)" in targeted
    assert "--lora.target-experts" in targeted.split("command:")[1]
    trainable = [int(t.split(" trainable")[0].split(", ")[-1].replace(",", "")) for t in (plain, targeted)]
    assert trainable[1] - trainable[0] == 48 * 128 * 16 * ((2048 + 2 * 768) + (768 + 2048))


@pytest.mark.parametrize("args,flag", [(["--method", "dora"], "--method dora"),
                                       (["--target-modules", "gate_proj"], "--target-modules"),
                                       (["--model", "llama-2-7b", "--target-experts"], "--target-experts")])
def test_what_train_would_refuse_names_the_flag(args, flag, capsys):
    from deltatune.cli import main

    assert main(["plan", "--model", "qwen3-30b-a3b", "--gpus", "1", *args]) == 2
    assert flag in capsys.readouterr().err


# ----- dense models plan exactly as before ---------------------------------------------------------
# peaks (bytes) computed by this planner before it covered MoE models, H100 rates, bf16 autocast
DENSE_BEFORE = {
    ("llama-2-7b", "lora"): 46105890304, ("llama-2-7b", "qlora"): 23632817664,
    ("llama-2-13b", "qlora"): 37026894784, ("llama-2-70b", "qlora_fsdp4"): 106843747712,
    ("llama-3-8b", "lora"): 53241041920, ("llama-3-70b", "qlora_fsdp4"): 108420806016,
    ("llama-3.2-1b", "qdora_ckpt"): 4005674984,
}
DENSE_RUNS = {"lora": Run(precision="bf16", rows=2, seq_len=2048),
              "qlora": Run(method="qlora", precision="bf16", rows=2, seq_len=2048),
              "qdora_ckpt": Run(method="qdora", precision="bf16", rows=1, seq_len=4096, gradient_checkpointing=True),
              "qlora_fsdp4": Run(method="qlora", precision="bf16", rows=2, seq_len=2048, strategy="fsdp", world=4)}


@pytest.mark.parametrize("model,run", list(DENSE_BEFORE))
def test_dense_presets_plan_as_before(model, run):
    shape = load_shape(model)
    assert not shape.moe and shape.moe_layers == 0
    assert make_plan(shape, DENSE_RUNS[run], DEVICES["h100"], CUDA_CONTEXT_BYTES).peak == DENSE_BEFORE[(model, run)]
    assert set(PRESETS) >= {"qwen3-30b-a3b", "mixtral-8x7b"}


def test_choose_still_falls_back_for_a_dense_model():
    shape = load_shape("llama-2-70b")
    choice = choose(shape, Run(precision="bf16", rows=1, seq_len=2048), 1, 48 * 10 ** 9, L40S, CUDA_CONTEXT_BYTES)
    assert choice.plan is not None and choice.plan.run.method == "qlora"
