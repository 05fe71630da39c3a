"""References for the grouped expert path's tests (CPU and CUDA): a random call of an experts
module and the plain per-expert loop with each tiny MoE model's expert math written out."""

import torch
import torch.nn.functional as F


def expert_call(layer, tokens=23, seed=0):
    """A random call of the experts: hidden (T, H) and top-2 routing with every expert hit and an
    uneven load (one expert gets most pairs, which the padded layout must handle)."""
    g = torch.Generator().manual_seed(seed)
    experts = layer.base_layer.num_experts
    hidden = torch.randn(tokens, layer.base_layer.gate_up_proj.shape[1 if layer.base_layer.is_transposed else 2],
                         generator=g)
    first = torch.where(torch.rand(tokens, generator=g) < 0.6, 0, torch.randint(0, experts, (tokens,), generator=g))
    second = (first + 1 + torch.randint(0, experts - 1, (tokens,), generator=g)) % experts
    index = torch.stack([first, second], 1)
    weights = torch.softmax(torch.randn(tokens, 2, generator=g), -1)
    return hidden, index, weights


def loop_reference(layer, names, hidden, index, weights):
    """A plain loop over experts and adapters, each model's expert math written out here."""
    m = layer.base_layer
    out = torch.zeros_like(hidden)
    for e in range(m.num_experts):
        token, slot = torch.where(index == e)
        if token.numel() == 0:
            continue
        x = hidden[token]

        def proj(x, p):
            w = getattr(m, p)[e]
            y = x @ w if m.is_transposed else x @ w.T  # stored (in, out) for gpt-oss, (out, in) otherwise
            if m.has_bias:
                y = y + getattr(m, f"{p}_bias")[e]
            for n in names:
                E, r = m.num_experts, layer.r[n][p]
                A = layer.lora_A[n][p].weight.view(E, r, -1)[e]  # (r, in): rows expert-major
                B = layer.lora_B[n][p].weight[:, e::E]  # (out, r): columns rank-major
                y = y + (x @ A.T) @ B.T * layer.scaling[n][p]
            return y

        h = proj(x, "gate_up_proj")
        if m.is_transposed:  # gpt-oss: interleaved gate/up, clamped, sigmoid-GLU with (up + 1)
            gate, up = h[:, ::2].clamp(max=m.limit), h[:, 1::2].clamp(-m.limit, m.limit)
            h = (up + 1) * gate * torch.sigmoid(gate * m.alpha)
        else:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        out = out.index_add(0, token, proj(h, "down_proj") * weights[token, slot, None])
    return out
