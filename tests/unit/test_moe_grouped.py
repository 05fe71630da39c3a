"""The grouped expert path (tokens sorted by expert, base matmul and LoRA update per group with
grouped matrix multiplications) against two references: the full-weight path (W + ΔW formed, the
module run on it) and a plain Python loop over experts written here with each model's own expert
math; forward and backward (input, A and B gradients), float32, on the four tiny MoE models; and
the automatic choice of path."""

import copy

import pytest
import torch

import deltatune as dt
from deltatune.adapters.low_rank import moe_grouped
from deltatune.adapters.low_rank.moe_experts import expert_layers
from expert_reference import expert_call, loop_reference
from tiny_models import randomize_adapter, sample_ids
from tiny_moe import EXPERT_TARGETS, MOE_ARCHS, tiny_moe

TOL = dict(atol=2e-6, rtol=1e-5)


def _close(got: torch.Tensor, ref: torch.Tensor, rel: float = 2e-6) -> None:
    """float32 agreement to rounding: the worst difference within ``rel`` of the tensor's scale."""
    scale = max(ref.abs().max().item(), 1.0)
    worst = (got - ref).abs().max().item()
    assert worst <= rel * scale, f"worst difference {worst:.2e} at scale {scale:.2e}"


def _adapted(arch, r=3, names=("default",), alpha=5):
    model = tiny_moe(arch)
    for i, name in enumerate(names):
        dt.add_adapter(model, dt.LoraConfig(r=r, lora_alpha=alpha + i, target_modules=[],
                                            target_parameters=EXPERT_TARGETS), name=name)
    randomize_adapter(model)
    return model


def _call(layer, mode, backend, hidden, index, weights):
    layer.compute, layer.grouped_backend = mode, backend
    hidden = hidden.clone().requires_grad_(True)
    out = layer(hidden, index, weights)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    params = [p for n, p in layer.named_parameters() if "lora_" in n]
    grads = torch.autograd.grad(out, [hidden, *params], grad_out)
    return out, grads


def _loop_call(layer, names, hidden, index, weights):
    hidden = hidden.clone().requires_grad_(True)
    out = loop_reference(layer, names, hidden, index, weights)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    params = [p for n, p in layer.named_parameters() if "lora_" in n]
    return out, torch.autograd.grad(out, [hidden, *params], grad_out)


@pytest.mark.parametrize("backend", ["grouped_mm", "padded"])
@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_grouped_equals_full_weight_and_the_loop_forward_and_backward(arch, backend):
    model = _adapted(arch, names=("a", "b"))
    dt.set_adapter(model, ["a", "b"])  # two live adapters: both updates added per group
    layer = model.model.layers[1].mlp.experts
    call = expert_call(layer)
    loop = _loop_call(layer, ["a", "b"], *call)
    full = _call(layer, "full", "auto", *call)
    grouped = _call(layer, "grouped", backend, *call)
    assert layer.last_path[0] == "grouped"
    assert loop[0].abs().max() > 0.1 and all(g.abs().max() > 0 for g in loop[1])  # nothing trivial
    for got, ref in ((grouped, loop), (grouped, full), (full, loop)):
        _close(got[0], ref[0])
        for g, w in zip(got[1], ref[1]):  # input, then every lora_A / lora_B gradient
            _close(g, w)


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_whole_model_logits_and_gradients_match_the_full_weight_path(arch):
    model = _adapted(arch, r=2)  # rank 2: padded to the grouped GEMM's 16-byte alignment
    ids = sample_ids()
    results = {}
    for mode in ("full", "grouped"):
        for _, layer in expert_layers(model):
            layer.compute = mode
        model.zero_grad()
        logits = model(ids).logits
        (logits * torch.linspace(-1, 1, logits.numel()).view_as(logits)).sum().backward()
        results[mode] = logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    torch.testing.assert_close(results["grouped"][0], results["full"][0], atol=1e-5, rtol=0)
    for name, grad in results["full"][1].items():
        torch.testing.assert_close(results["grouped"][1][name], grad, atol=5e-5, rtol=1e-4)


def test_grouped_mm_is_used_on_cpu_float32_and_padded_bmm_elsewhere(monkeypatch):
    calls = []
    real = moe_grouped._GROUPED_MM
    monkeypatch.setattr(moe_grouped, "_GROUPED_MM", lambda *a, **k: calls.append(1) or real(*a, **k))
    layer = _adapted("qwen3_moe").model.layers[0].mlp.experts
    call = expert_call(layer)
    _call(layer, "grouped", "auto", *call)
    assert len(calls) == 6  # per projection (gate_up, down): the base matmul and the two low-rank factors
    calls.clear()
    _call(layer, "grouped", "padded", *call)
    assert not calls
    # float64 has no grouped GEMM: the padded batched matmul, same values as the loop
    model = _adapted("mixtral").double()
    layer = model.model.layers[0].mlp.experts
    hidden, index, weights = expert_call(layer)
    out, _ = _call(layer, "grouped", "auto", hidden.double(), index, weights.double())
    assert not calls
    torch.testing.assert_close(out, loop_reference(layer, ["default"], hidden.double(), index, weights.double()),
                               atol=1e-12, rtol=1e-12)
    with pytest.raises(RuntimeError, match="grouped_mm cannot multiply"):
        _call(layer, "grouped", "grouped_mm", hidden.double(), index, weights.double())


def test_grouped_matmul_handles_empty_experts_and_no_tokens():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 8, 4, generator=g)
    ids = torch.tensor([0, 0, 3, 3, 3, 4])  # experts 1 and 2 get nothing
    groups = moe_grouped.Groups(ids, 5)
    x = torch.randn(6, 8, generator=g)
    expected = torch.stack([x[i] @ w[e] for i, e in enumerate(ids.tolist())])
    for backend in ("auto", "padded"):
        torch.testing.assert_close(moe_grouped.grouped_matmul(x, w, groups, backend), expected, **TOL)
    empty = moe_grouped.Groups(torch.zeros(0, dtype=torch.long), 5)
    assert moe_grouped.grouped_matmul(x[:0], w, empty).shape == (0, 4)


def test_bfloat16_grouped_stays_close_to_the_full_weight_path():
    model = _adapted("olmoe", r=8).to(torch.bfloat16)
    layer = model.model.layers[0].mlp.experts
    hidden, index, weights = expert_call(layer, tokens=40)
    call = (hidden.bfloat16(), index, weights.bfloat16())
    full, _ = _call(layer, "full", "auto", *call)
    grouped, _ = _call(layer, "grouped", "auto", *call)
    torch.testing.assert_close(grouped.float(), full.float(), atol=3e-2, rtol=3e-2)


# ----- choosing the path -----------------------------------------------------------------------
def test_auto_keeps_the_full_weight_path_for_tiny_weights_and_many_tokens():
    model = _adapted("qwen3_moe")
    layer = model.model.layers[0].mlp.experts
    hidden, index, weights = expert_call(layer, tokens=10)  # 20 pairs x (32 + 32) < 4 x 32 x 32
    layer(hidden, index, weights)
    assert layer.last_path[0] == "grouped"
    hidden, index, weights = expert_call(layer, tokens=200)  # 400 pairs: forming W + ΔW is cheaper
    layer(hidden, index, weights)
    assert layer.last_path[0] == "full-weight" and "tiny expert weights" in layer.last_path[1]
    assert moe_grouped.pays(torch.empty(128, 1536, 2048, device="meta"), 131072)  # Qwen3-30B-A3B's gate_up


def test_full_weight_path_for_routers_merged_adapters_and_unknown_modules():
    model = tiny_moe("qwen3_moe")
    dt.add_adapter(model, dt.LoraConfig(r=2, target_modules=[], target_parameters=[*EXPERT_TARGETS, "gate.weight"]))
    randomize_adapter(model)
    ids = sample_ids()
    model(ids)
    paths = {type(layer.base_layer).__name__: layer.last_path for _, layer in expert_layers(model)}
    assert paths["Qwen3MoeExperts"][0] == "grouped"
    assert paths["Qwen3MoeTopKRouter"][0] == "full-weight" and "not a transformers experts module" in \
        paths["Qwen3MoeTopKRouter"][1]
    router = next(layer for _, layer in expert_layers(model) if layer.parameter_names == ["weight"])
    router.compute = "grouped"
    with pytest.raises(ValueError, match="Qwen3MoeTopKRouter: compute='grouped' cannot run"):
        model(ids)
    router.compute = "fast"
    with pytest.raises(ValueError, match="ExpertLoraLayer.compute='fast'"):
        model(ids)
    router.compute = "auto"
    dt.merge(model, verbose=False)  # merged: the module runs on its own weights, neither path taken
    experts = model.model.layers[0].mlp.experts
    experts.last_path = None
    model(ids)
    assert experts.last_path is None


def test_per_row_routing_through_the_grouped_path():
    model = _adapted("gpt_oss", names=("a", "b"))
    ids = sample_ids()
    expected = []
    for name in ("a", "b"):
        dt.set_adapter(model, name)
        with torch.no_grad():
            expected.append(model(ids).logits)
    with torch.no_grad(), dt.adapter_per_row(model, ["b", None, "a"]):
        routed = model(ids).logits
    assert model.model.layers[0].mlp.experts.last_path[0] == "grouped"
    with torch.no_grad(), dt.disable_adapters(model):
        plain = model(ids).logits
    torch.testing.assert_close(routed[0], expected[1][0], atol=1e-6, rtol=0)
    torch.testing.assert_close(routed[2], expected[0][2], atol=1e-6, rtol=0)
    torch.testing.assert_close(routed[1], plain[1], atol=1e-6, rtol=0)


def test_router_load_counts_tokens_on_the_grouped_path():
    from deltatune.train.moe import RouterLoad
    model = _adapted("olmoe")
    load = RouterLoad.attach(model)
    with torch.no_grad():
        model(sample_ids())
    assert model.model.layers[0].mlp.experts.last_path[0] == "grouped"
    assert load.take()["router_tokens"] == sample_ids().numel() * 2 * 2
    twin = copy.deepcopy(model)  # the layer holds no state a copy cannot take
    with torch.no_grad():
        torch.testing.assert_close(twin(sample_ids()).logits, model(sample_ids()).logits, atol=0, rtol=0)
