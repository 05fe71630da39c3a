"""The planner's terms for mixture-of-experts layers (Qwen3-MoE, Mixtral, OLMoE, gpt-oss).

An MoE layer stores every expert (E fused gate/up weights of 2I x H and down weights of H x I) and
a full-precision router (E x H), but each token runs only its top-k experts: FLOPs and activations
are those of a dense gated MLP of width k*I, plus the router's probabilities (tokens x E) and the
k per-expert outputs each token keeps until their weighted sum.

Which expert weights take LoRA follows what ``deltatune.add_adapter`` does (and PEFT 0.21.2 on
transformers 5): on the model types of ``plan_shapes.FORMER_NAME_KINDS`` "all-linear" reaches the
fused experts (gate and up named together, so gate_up_proj at rank 2r) and the router's weight;
elsewhere (gpt-oss) it adapts the attention only. ``--target-experts`` (``deltatune train
--lora.target-experts``) adds LoRA at rank r on gate_up_proj and down_proj where none is yet.
Adapting any parameter turns the adapter's dropout off (deltatune train does so: dropout cannot act
on a weight). Nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from .plan_shapes import ATTENTION_LINEARS, ModelShape

MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")
ROUTER_BYTES = 4  # router logits and probabilities are float32 (the softmax runs in float32)


@dataclass(frozen=True)
class ExpertLora:
    """LoRA ranks on one MoE layer's parameters; 0 where a parameter is not adapted."""

    gate_up: int = 0
    down: int = 0
    router: int = 0

    @property
    def adapted(self) -> bool:
        """Whether any parameter (rather than a module) takes LoRA."""
        return bool(self.gate_up or self.down or self.router)

    def describe(self) -> str:
        """e.g. ``gate_up_proj r=32, down_proj r=16, router r=16``."""
        parts = [f"{name} r={rank}" for name, rank in (("gate_up_proj", self.gate_up), ("down_proj", self.down),
                                                         ("router", self.router)) if rank]
        return ", ".join(parts) if parts else "none"


def expert_lora(shape: ModelShape, r: int, targets: frozenset, all_linear: bool, target_experts: bool) -> ExpertLora:
    """The LoRA ranks an MoE layer of ``shape`` gets from ``targets`` (``all_linear``: they were given
    as "all-linear") and ``target_experts``; an ``ExpertLora()`` of zeros on a dense model."""
    if not shape.moe:
        return ExpertLora()
    gate_up = down = router = 0
    if shape.former_names and all_linear:
        gate_up, down, router = 2 * r, r, r
    elif shape.former_names == "qwen2_moe":  # gate_proj/up_proj/down_proj name the experts' weights
        halves = sorted(set(MLP_LINEARS[:2]) & targets)
        if len(halves) == 1:
            raise ValueError(f"--target-modules: {halves[0]} cannot be adapted without its other half on "
                             f"{shape.name}: gate and up are fused into the experts' gate_up_proj (PEFT refuses "
                             "this too)")
        gate_up = 2 * r if halves else 0
        down = r if "down_proj" in targets else 0
    if target_experts:
        gate_up, down = gate_up or r, down or r
    return ExpertLora(gate_up, down, router)


def dense_mlp_targets(shape: ModelShape, targets: frozenset) -> frozenset:
    """The targets that adapt a dense layer's MLP: on the former-name kinds the MLP names stand for
    the experts' weights, so a dense layer's gate/up/down projections take none (as in deltatune)."""
    if shape.moe and shape.former_names:
        return frozenset(n for n in targets if n not in MLP_LINEARS)
    return targets


def effective_dropout(dropout: float, lora: ExpertLora) -> float:
    """``dropout``, or 0 where parameters are adapted (deltatune train sets lora_dropout to 0 there)."""
    return 0.0 if lora.adapted else dropout


def expert_lora_parameters(shape: ModelShape, lora: ExpertLora) -> int:
    """LoRA parameters of one MoE layer: per expert r*(in + out) for gate_up_proj (H -> 2I) and
    down_proj (I -> H), and r*(H + E) on the router."""
    E, H, I = shape.experts, shape.hidden, shape.expert_intermediate
    return E * lora.gate_up * (H + 2 * I) + E * lora.down * (I + H) + lora.router * (H + E)


def expert_lora_flops_per_token(shape: ModelShape, lora: ExpertLora) -> int:
    """Multiply-adds of one MoE layer's LoRA factors for one token: its k experts and the router."""
    H, I = shape.hidden, shape.expert_intermediate
    return shape.top_k * (lora.gate_up * (H + 2 * I) + lora.down * (I + H)) + lora.router * (H + shape.experts)


def moe_mlp_saved_bytes(shape: ModelShape, tokens: int, residual_bytes: int, matmul_bytes: int,
                        lora: ExpertLora, lean: bool) -> dict[str, int]:
    """Bytes an MoE layer's MLP keeps for backward, by kind. The experts' gate, up, act(gate) and
    product are those of a dense MLP of width k*I (computed per expert group, so cheap_recompute,
    which rebuilds module outputs, does not reach them); the tokens gathered per expert are kept
    where gate_up_proj's LoRA reads them; the k outputs per token are kept for the weighted sum's
    backward (the routing weights need gradients)."""
    T, H, k, I, E = tokens, shape.hidden, shape.top_k, shape.expert_intermediate, shape.experts
    mm = matmul_bytes
    return {
        "norm output (router LoRA)": 0 if lean or not lora.router else T * H * residual_bytes,
        "router probabilities": T * E * ROUTER_BYTES + T * k * ROUTER_BYTES,
        "expert inputs, gathered per expert": T * k * H * mm if lora.gate_up else 0,
        "gate and up": 2 * T * k * I * mm,
        "act(gate), product": T * k * I * mm * (1 + bool(lora.down)),
        "expert outputs before their weighted sum": T * k * H * mm,
        "expert LoRA rank-r products": T * (k * (lora.gate_up + lora.down) + lora.router) * mm,
    }


def moe_backward_transient(shape: ModelShape, tokens: int, matmul_bytes: int) -> int:
    """Gradients alive at once in an MoE MLP's backward: the dense MLP's three of width k*I, beside
    the gradient of the k expert outputs."""
    k = shape.top_k
    return (3 * tokens * k * shape.expert_intermediate + tokens * k * shape.hidden) * matmul_bytes


def moe_elementwise_per_token(shape: ModelShape) -> int:
    """Element-wise passes of an MoE MLP per token, in elements: SiLU and the gated product over k*I,
    the gather and scatter of k copies of the token, the router's softmax and top-k."""
    return 5 * shape.top_k * shape.expert_intermediate + 4 * shape.top_k * shape.hidden + 3 * shape.experts


def largest_decoded_weight(shape: ModelShape) -> int:
    """Elements of the largest weight decoded from 4 bits at once: a dense linear, or one MoE
    layer's whole gate/up expert stack (E x 2I x H), which the grouped expert compute decodes whole."""
    ins, outs = shape.linear_inputs(), shape.linear_outputs()
    names = ATTENTION_LINEARS + (MLP_LINEARS if shape.dense_layers else ())
    dense = max(ins[n] * outs[n] for n in names)
    return max(dense, shape.experts * 2 * shape.expert_intermediate * shape.hidden)
