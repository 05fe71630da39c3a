"""Context-aware prompt tuning (CPT) against PEFT 0.21.2: files loaded both ways give the same
logits, the files carry PEFT's keys, shapes, dtypes and config fields, a new adapter's context is
PEFT's, and training steps (masked gradients, the projection onto each token's ball, the weighted
loss with and without an input type mask) give PEFT's values bit for bit. CPT is a soft prompt:
nothing to merge, never routed per row (rows would differ in length)."""

import copy

import pytest
import torch

import deltatune as dt
from deltatune.adapter_ops import get_state
from deltatune.adapters.method import method_for
from deltatune.adapters.prompt.cpt import weighted_loss
from peft_roundtrip import assert_same_files
from tiny_models import randomize_adapter, sample_ids, tiny_model

peft = pytest.importorskip("peft")
from peft.tuners.cpt.model import CPTEmbedding  # noqa: E402  (after the skip: peft is test-only)

ATOL = 1e-5
# two demonstrations: input template, input, output template, label, separator (PEFT's example layout)
CONTEXT = dict(cpt_token_ids=[5, 9, 17, 33, 40, 41, 7, 8, 60, 61, 62, 70],
               cpt_mask=[1] * 12, cpt_tokens_type_mask=[1, 2, 2, 3, 4, 0, 5, 6, 6, 7, 8, 0])
CASES = {
    "cpt-llama-decay": ("llama", dict(opt_weighted_loss_type="decay", opt_loss_decay_factor=0.7,
                                      opt_projection_epsilon=0.2, opt_projection_format_epsilon=0.1)),
    "cpt-qwen2": ("qwen2", dict(opt_projection_epsilon=0.3, opt_projection_format_epsilon=0.05)),
    "cpt-gpt2-decay": ("gpt2", dict(opt_weighted_loss_type="decay", opt_loss_decay_factor=0.95)),
}
FIELDS = ["cpt_token_ids", "cpt_mask", "cpt_tokens_type_mask", "opt_weighted_loss_type", "opt_loss_decay_factor",
          "opt_projection_epsilon", "opt_projection_format_epsilon", "num_virtual_tokens", "token_dim",
          "num_layers", "num_attention_heads", "num_transformer_submodules", "task_type", "tokenizer_name_or_path"]


def _fields(case):
    return {**CONTEXT, **CASES[case][1]}


def _peft(base, case):
    return peft.get_peft_model(copy.deepcopy(base), peft.CPTConfig(task_type="CAUSAL_LM", **_fields(case)))


def _ours(base, case):
    return dt.add_adapter(copy.deepcopy(base), dt.CPTConfig(**_fields(case)))


def _encoder(model):
    return model.deltatune_prompts.encoders["default"]


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    return logits[:, -ids.shape[1]:]  # PEFT returns the virtual positions too; deltatune drops them


def _labels(ids):
    labels = ids.clone()
    labels[:, :3] = -100  # a prompt that takes no loss
    labels[0, -1] = -100  # and a padded position
    return labels


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_file_to_deltatune(case, tmp_path, parity_results):
    base, ids = tiny_model(CASES[case][0]), sample_ids()
    theirs = _peft(base, case)
    randomize_adapter(theirs)  # PEFT projects the random change before saving the prompt
    theirs.save_pretrained(tmp_path)
    ours = dt.load_adapter(copy.deepcopy(base), tmp_path)
    expected = _logits(theirs, ids)
    assert (expected - base(ids).logits).abs().max() > 1e-2
    diff = (_logits(ours, ids) - expected).abs().max().item()
    parity_results[f"{case}: PEFT file -> deltatune"] = diff
    assert diff <= ATOL


@pytest.mark.parametrize("case", sorted(CASES))
def test_deltatune_file_to_peft(case, tmp_path, parity_results):
    base, ids = tiny_model(CASES[case][0]), sample_ids()
    ours = _ours(base, case)
    randomize_adapter(ours)
    cfg = get_state(ours).configs["default"]
    method_for(cfg).after_step(ours, "default", cfg, 1)  # onto the balls, as training leaves it
    dt.save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    expected = _logits(ours, ids)
    assert (expected - _logits(_ours(base, case), ids)).abs().max() > 1e-4  # the change really changes outputs
    diff = (_logits(theirs, ids) - expected).abs().max().item()
    parity_results[f"{case}: deltatune file -> PEFT"] = diff
    assert diff <= ATOL


@pytest.mark.parametrize("case", sorted(CASES))
def test_files_match_peft(case, tmp_path):
    base = tiny_model(CASES[case][0])
    ours, theirs = assert_same_files(_peft(base, case), _ours(base, case), tmp_path, FIELDS, unordered_lists=False)
    assert ours["prompt_embeddings"].dtype == torch.float32
    assert torch.equal(ours["prompt_embeddings"], theirs["prompt_embeddings"])  # a new adapter: the context itself


def test_new_adapter_is_pefts_context_and_trains_the_same_tensors():
    base = tiny_model("llama")
    theirs, ours = _peft(base, "cpt-llama-decay"), _ours(base, "cpt-llama-decay")
    their_encoder, our_encoder = theirs.prompt_encoder["default"], _encoder(ours)
    assert torch.equal(our_encoder.context, their_encoder.embedding.weight)
    trainable = [p for p in ours.parameters() if p.requires_grad]
    assert trainable == [our_encoder.delta] and our_encoder.delta.numel() == 12 * 32  # tokens x hidden size
    assert dt.trainable_parameters(ours)[0] == sum(p.numel() for p in theirs.parameters() if p.requires_grad)


def _projected_by_peft(encoder, values):
    encoder.delta_embedding.weight.data = values.clone()
    return encoder.get_projection()


def test_projection_equals_pefts():
    base = tiny_model("qwen2")
    theirs, ours = _peft(base, "cpt-qwen2"), _ours(base, "cpt-qwen2")
    cfg = get_state(ours).configs["default"]
    g = torch.Generator().manual_seed(4)
    values = torch.randn(12, 32, generator=g) * torch.tensor([0.001, 0.01, 0.1, 1.0] * 3).unsqueeze(1)
    values[3] = 0  # a zero row stays zero (no division by its norm)
    _encoder(ours).delta.data.copy_(values)
    method_for(cfg).after_step(ours, "default", cfg, 1)
    expected = _projected_by_peft(theirs.prompt_encoder["default"], values)
    assert torch.equal(_encoder(ours).delta, expected)
    norms = expected.norm(dim=1)
    assert (norms < values.norm(dim=1) - 1e-6).any() and torch.equal(expected[0], values[0])  # some cut, some kept


@pytest.mark.parametrize("case", sorted(CASES))
def test_training_steps_equal_pefts(case, parity_results):
    """AdamW steps on both tools, half the batches with PEFT's input_type_mask: the same losses,
    masked gradients and changes (PEFT projects at the start of each forward pass, deltatune after
    each step, through Method.after_step as the training loop calls it)."""
    base, ids = tiny_model(CASES[case][0]), sample_ids()
    theirs, ours = _peft(base, case), _ours(base, case)
    their_delta, our_delta = theirs.prompt_encoder["default"].delta_embedding.weight, _encoder(ours).delta
    cfg = get_state(ours).configs["default"]
    optimizers = torch.optim.AdamW([their_delta], lr=3e-3), torch.optim.AdamW([our_delta], lr=3e-3)
    input_types = torch.tensor([[1, 2, 2, 3, 4, 4, 0]] * 3)
    theirs.train(), ours.train()
    for step in range(5):
        batch = {"input_ids": ids, "labels": _labels(ids)}
        if step % 2:
            batch["input_type_mask"] = input_types
        # PEFT adds to the type mask it is given in place: each tool gets its own copy
        their_loss = theirs(**{k: v.clone() for k, v in batch.items()}).loss
        our_loss = ours(**{k: v.clone() for k, v in batch.items()}).loss
        assert torch.equal(our_loss, their_loss), step
        assert torch.equal(our_delta, their_delta), step  # PEFT has just projected its change
        for optimizer in optimizers:
            optimizer.zero_grad()
        their_loss.backward(), our_loss.backward()
        assert torch.equal(our_delta.grad, their_delta.grad), step
        assert our_delta.grad[[4, 5, 10, 11]].abs().max() == 0 and our_delta.grad.abs().max() > 0  # labels, separators
        for optimizer in optimizers:
            optimizer.step()
        method_for(cfg).after_step(ours, "default", cfg, step + 1)
    # one forward pass of PEFT's now, as between its steps: a second projection could move values by rounding
    worst = (_logits(ours, ids) - _logits(theirs, ids)).abs().max().item()
    parity_results[f"{case}: after 5 training steps"] = worst
    assert worst <= ATOL
    epsilon = _encoder(ours).epsilon
    assert (our_delta.norm(dim=1) <= epsilon * (1 + 1e-5)).all()
    assert (our_delta.norm(dim=1) > 0.99 * epsilon)[[0, 1, 2, 3]].any()  # the balls were reached


@pytest.mark.parametrize("kind, decay", [("decay", 0.8), ("none", 1.0), ("decay", 0.0)])
def test_weighted_loss_equals_pefts(kind, decay):
    """The loss on its own, on logits and type masks where rows hold different label sets."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 12, 20, generator=g)
    labels = torch.randint(0, 20, (3, 12), generator=g)
    types = torch.tensor([[1, 2, 4, 4, 0, 5, 6, 8, 8, 9, 12, 12],
                          [1, 2, 4, 0, 6, 6, 8, 0, 0, 0, 16, 16],
                          [0, 2, 2, 3, 4, 4, 4, 0, 7, 8, 0, 0]])
    labels[~((types > 0) & (types % 4 == 0))] = -100
    config = peft.CPTConfig(task_type="CAUSAL_LM", opt_weighted_loss_type=kind, opt_loss_decay_factor=decay)
    expected = CPTEmbedding.calculate_loss(type("Out", (), {"logits": logits})(), labels, types, config).loss
    assert torch.equal(weighted_loss(logits, labels, types, decay if kind == "decay" else 1.0), expected)


def test_weighted_loss_with_every_position_a_label_and_large_types():
    g = torch.Generator().manual_seed(5)
    logits, labels = torch.randn(2, 6, 20, generator=g), torch.randint(0, 20, (2, 6), generator=g)
    types = torch.tensor([[4, 8, 8, 4_000_000_000, 12, 4_000_000_000], [8, 8, 8, 8, 8, 8]])
    config = peft.CPTConfig(task_type="CAUSAL_LM", opt_weighted_loss_type="decay", opt_loss_decay_factor=0.5)
    expected = CPTEmbedding.calculate_loss(type("Out", (), {"logits": logits})(), labels, types, config).loss
    assert torch.equal(weighted_loss(logits, labels, types, 0.5), expected)


def test_the_training_loops_loss_is_pefts_cpt_loss():
    """deltatune.train's loss module (what each micro-batch's backward starts from) gives PEFT's CPT loss in
    training mode."""
    from deltatune.loss import TrainingLoss

    base, ids = tiny_model("llama"), sample_ids()
    theirs, ours = _peft(base, "cpt-llama-decay"), _ours(base, "cpt-llama-decay")
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": _labels(ids)}
    theirs.train(), ours.train()
    expected = theirs(**batch).loss
    plain = torch.nn.functional.cross_entropy(_logits(ours, ids)[:, :-1].reshape(-1, 128), batch["labels"][:, 1:]
                                              .reshape(-1), ignore_index=-100)
    assert not torch.allclose(expected, plain)  # the context's labels and the decay really count
    ours.train()
    assert torch.equal(TrainingLoss(ours)(batch), expected)
    # eval mode (validation, perplexity): the input's own loss, comparable with other methods' (PEFT: CPT's)
    ours.eval()
    torch.testing.assert_close(TrainingLoss(ours)(batch), plain, atol=1e-6, rtol=1e-6)


def test_generate_agrees_with_full_passes():
    base, ids = tiny_model("llama"), sample_ids()
    ours = _ours(base, "cpt-llama-decay")
    randomize_adapter(ours)
    ours.eval()
    with torch.no_grad():
        out = ours.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                            pad_token_id=0)
        full = ours(out).logits.argmax(-1)[:, ids.shape[1] - 1:-1]
    assert torch.equal(out[:, ids.shape[1]:], full)


def test_cpt_is_never_merged_nor_routed_per_row():
    base, ids = tiny_model("llama"), sample_ids()
    ours = _ours(base, "cpt-llama-decay")
    assert not dt.CPTConfig.mergeable
    with pytest.raises(NotImplementedError, match="per row"):
        with dt.adapter_per_row(ours, ["default", None, "default"]):
            ours(ids)


def test_nf4_base_reads_pefts_file_as_peft_on_the_dequantized_base(tmp_path, parity_results):
    from deltatune.quant import QuantizeConfig, dequantize_model, quantize_model

    quantized = quantize_model(tiny_model("llama"), QuantizeConfig(quant_type="nf4"))
    reference = dequantize_model(copy.deepcopy(quantized))
    theirs = _peft(reference, "cpt-llama-decay")
    randomize_adapter(theirs)
    theirs.save_pretrained(tmp_path)
    ours = dt.load_adapter(quantized, tmp_path)
    ids = sample_ids()
    diff = (_logits(ours, ids) - _logits(theirs, ids)).abs().max().item()
    parity_results["cpt-llama-nf4-base: PEFT file (dequantized base) -> deltatune"] = diff
    assert diff <= 1e-4
