"""PEFT parity for ShadowPEFT: files loaded both ways give the same logits on Llama, Qwen2 and GPT-2;
the files carry PEFT's keys, shapes, dtypes and config fields; one training step (the task loss plus
the shadow loss, as the training loop adds it) gives PEFT's loss and gradients; generation with the
key/value cache gives PEFT's tokens and logits. Merging is refused by both tools (the shadow state
depends on the input); rows can be routed to different shadow adapters (deltatune only)."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

import deltatune as dt
from deltatune.adapter_ops import get_state
from deltatune.adapters.method import method_for
from deltatune.loss import TrainingLoss
from peft_roundtrip import assert_same_files, deltatune_file_to_peft, load_peft_file, peft_file_to_deltatune
from tiny_models import eval_logits, randomize_adapter, sample_ids, tiny_model

peft = pytest.importorskip("peft")

ATOL = 1e-5

# case -> (architecture, fields given to both tools); up starts at zero and is randomised by the tests
CASES = {
    "shadow-llama": ("llama", dict(task_type="CAUSAL_LM")),
    # a narrower backbone: its own embeddings (no sharing) and a projection to the base width
    "shadow-small-qwen2": ("qwen2", dict(task_type="CAUSAL_LM", r=4, shadow_alpha=0.5, shadow_hidden_size=16,
                                         shadow_num_attention_heads=2, shadow_intermediate_size=24,
                                         update_hidden_size=6, auxiliary_loss_weight=0.2)),
    "shadow-gpt2": ("gpt2", dict(task_type="CAUSAL_LM", r=6, shadow_dropout=0.0)),
    # the last block only, a two-layer backbone with its own embedding table, a trained copy of the head
    # (which the shadow loss uses too)
    "shadow-last-block-deep-llama": ("llama", dict(task_type="CAUSAL_LM", target_modules=["model.layers.1"],
                                                   shadow_num_hidden_layers=2, share_embeddings=False,
                                                   modules_to_save=["lm_head"])),
}


def _peft_model(base, case):
    return peft.get_peft_model(copy.deepcopy(base), peft.ShadowConfig(**CASES[case][1]))


def _dt_model(base, case):
    return dt.add_adapter(copy.deepcopy(base), dt.ShadowConfig(**CASES[case][1]))


def _no_dropout(*models):
    for model in models:  # dropout draws differ between tools; compare without it
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_saves_deltatune_loads(case, tmp_path, parity_results):
    base = tiny_model(CASES[case][0])
    theirs = _peft_model(base, case)
    randomize_adapter(theirs)
    diff = parity_results[f"{case}: PEFT file -> deltatune"] = peft_file_to_deltatune(base, theirs, tmp_path,
                                                                                      min_change=1e-3, quiet=True)
    assert diff <= ATOL


@pytest.mark.parametrize("case", sorted(CASES))
def test_deltatune_saves_peft_loads(case, tmp_path, parity_results):
    base = tiny_model(CASES[case][0])
    ours = _dt_model(base, case)
    randomize_adapter(ours, seed=7)
    diff = parity_results[f"{case}: deltatune file -> PEFT"] = deltatune_file_to_peft(base, ours, tmp_path,
                                                                                      min_change=1e-3, quiet=True)
    assert diff <= ATOL


@pytest.mark.parametrize("case", sorted(CASES))
def test_files_have_peft_keys_shapes_dtypes_and_config_fields(case, tmp_path):
    base = tiny_model(CASES[case][0])
    theirs_model, ours_model = _peft_model(base, case), _dt_model(base, case)
    ours, theirs = assert_same_files(theirs_model, ours_model, tmp_path, CASES[case][1])
    assert any(".shadow_backbone.default." in k for k in theirs) and any(".shadow_down.default." in k for k in theirs)
    for key in theirs:  # up starts at zero in both (the injection is a no-op)
        if ".shadow_up." in key:
            assert not ours[key].any() and not theirs[key].any(), key
    written = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    their_written = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    assert sorted(written["target_modules"]) == sorted(their_written["target_modules"])  # the resolved blocks


@pytest.mark.parametrize("case", sorted(CASES))
def test_one_step_with_the_shadow_loss_equals_peft(case, tmp_path):
    """PEFT's loss is the task loss plus ``auxiliary_loss_weight`` × the shadow loss; deltatune's
    training loop adds the same term (``Method.auxiliary_loss``) to its labelled-positions loss."""
    base = tiny_model(CASES[case][0])
    theirs = _peft_model(base, case)
    randomize_adapter(theirs)
    ours = load_peft_file(base, theirs, tmp_path, trainable=True, quiet=True)
    _no_dropout(theirs, ours)
    ids = sample_ids()
    theirs.train()
    their_out = theirs(input_ids=ids, labels=ids)
    their_out.loss.backward()
    ours.train()
    config = get_state(ours).configs["default"]
    method = method_for(config)
    batch = {"input_ids": ids, "labels": ids}
    task = TrainingLoss(ours)(batch)
    extra = method.auxiliary_loss(ours, "default", config, batch)
    assert extra is not None and extra > 0
    torch.testing.assert_close(extra / config.auxiliary_loss_weight, their_out.shadow_loss, atol=1e-5, rtol=1e-5)
    (task + extra).backward()
    torch.testing.assert_close(task + extra, their_out.loss, atol=1e-5, rtol=1e-5)
    # PEFT's parameter names are its file keys, but for the trained copies of modules_to_save
    their_params = {k.replace(".modules_to_save.default.", "."): p for k, p in theirs.named_parameters()}
    mine = method.file_tensors(ours, "default", config)
    assert set(mine) == {k for k, p in their_params.items() if p.requires_grad}
    nonzero = 0
    for key, tensor in mine.items():
        theirs_grad = their_params[key].grad
        if theirs_grad is None:  # the last block's update feeds nothing (the same in PEFT)
            assert tensor.grad is None or not tensor.grad.any(), key
            continue
        torch.testing.assert_close(tensor.grad, theirs_grad, atol=1e-5, rtol=1e-4, msg=key)
        nonzero += bool(theirs_grad.any())
    assert nonzero > len(mine) // 2


def test_the_shadow_loss_alone_trains_the_backbone_and_follows_the_weight():
    base, ids = tiny_model("llama"), sample_ids()
    model = dt.add_adapter(copy.deepcopy(base), dt.ShadowConfig(task_type="CAUSAL_LM", shadow_dropout=0.0))
    config = get_state(model).configs["default"]
    method = method_for(config)
    model.train()
    model(input_ids=ids)
    method.auxiliary_loss(model, "default", config, {"labels": ids}).backward()
    backbone = model.deltatune_shadow.shadow_backbone["default"]
    assert all(p.grad is not None and p.grad.any() for p in backbone.parameters())
    for changed in (dict(auxiliary_loss_weight=0.0), dict(task_type=None)):  # no shadow loss, as in PEFT
        assert method.auxiliary_loss(model, "default", dt.ShadowConfig(**changed), {"labels": ids}) is None
    with dt.disable_adapters(model):
        model(input_ids=ids)
    assert method.auxiliary_loss(model, "default", config, {"labels": ids}) is None  # the shadow path did not run


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generation_with_the_cache_equals_peft_without_it(arch):
    """Our cached generation (a shadow cache beside the base cache) gives PEFT's tokens and logits.
    PEFT's is compared without its cache: PEFT 0.21.2 reads the cache under ``past_key_values``, which
    transformers 5.24's ``generate`` passes as ``cache``, so its own cached steps lose the shadow
    network's past (they differ from its uncached generation)."""
    base = tiny_model(arch)
    fields = dict(task_type="CAUSAL_LM", r=4)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.ShadowConfig(**fields))
    randomize_adapter(theirs)
    ours = dt.add_adapter(copy.deepcopy(base), dt.ShadowConfig(**fields))
    assert not ours.load_state_dict(_as_ours(theirs, ours), strict=False).unexpected_keys
    ids = sample_ids(batch=2, length=5)
    kwargs = dict(max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True,
                  pad_token_id=0)
    theirs.eval()
    ours.eval()
    with torch.no_grad():
        a = theirs.generate(input_ids=ids, use_cache=False, **kwargs)
        b = ours.generate(input_ids=ids, use_cache=True, **kwargs)
        c = ours.generate(input_ids=ids, use_cache=False, **kwargs)
    assert torch.equal(a.sequences, b.sequences) and torch.equal(b.sequences, c.sequences)
    assert not torch.equal(b.sequences[:, ids.shape[1]:], eval_logits(base, ids)[:, -1:].argmax(-1).expand(2, 6))
    for x, y, z in zip(a.logits, b.logits, c.logits):
        torch.testing.assert_close(y, x, atol=ATOL, rtol=0)
        torch.testing.assert_close(y, z, atol=ATOL, rtol=0)


def _as_ours(peft_model, model) -> dict:
    """PEFT's adapter tensors under deltatune's state-dict names (through the file keys)."""
    config = get_state(model).configs["default"]
    live = method_for(config).file_tensors(model, "default", config)
    names = {id(p): n for n, p in model.state_dict(keep_vars=True).items()}
    theirs = dict(peft_model.state_dict())
    return {names[id(t)]: theirs[k] for k, t in live.items()}


def test_a_shared_prefix_loss_pass_equals_the_plain_one():
    from deltatune.data import Example
    from deltatune.evaluate.shared_prefix import prefix_loss_sum

    model = dt.add_adapter(tiny_model("llama"), dt.ShadowConfig(task_type="CAUSAL_LM"))
    randomize_adapter(model)
    model.eval()
    prefix = list(range(3, 13))
    rows = [Example(prefix + [20 + i, 30 + i, 40], [-100] * 10 + [20 + i, 30 + i, 40]) for i in range(3)]
    loss_of = TrainingLoss(model)
    with torch.no_grad():
        shared, _ = prefix_loss_sum(loss_of, rows, 0, torch.device("cpu"))
        ids = torch.tensor([r.input_ids for r in rows])
        plain = loss_of({"input_ids": ids, "labels": torch.tensor([r.labels for r in rows])})
    torch.testing.assert_close(shared, plain, atol=1e-5, rtol=1e-5)


def test_cache_edits_outside_the_model_are_refused():
    """The server's batching pads, drops and joins rows of a cache in place, and beam search reorders
    its rows; the shadow cache cannot follow, so the next call says so instead of running on a
    mismatched shadow past."""
    from transformers import DynamicCache

    from deltatune.serve.kv import append_rows, pad_front

    model = dt.add_adapter(tiny_model("llama"), dt.ShadowConfig(task_type="CAUSAL_LM"))
    ids = sample_ids(batch=1, length=5)
    for edit in (lambda c, other: pad_front(c, 2), append_rows):
        cache, other = DynamicCache(config=model.config), DynamicCache(config=model.config)
        with torch.no_grad():
            model(ids, cache=cache, use_cache=True)
            model(sample_ids(batch=1, length=5, seed=4), cache=other, use_cache=True)  # another row
            edit(cache, other)
            with pytest.raises(ValueError, match="edited outside the model|changed outside the model"):
                model(ids[:, :1].expand(cache.layers[0].keys.shape[0], 1), cache=cache, use_cache=True)
    with torch.no_grad(), pytest.raises(ValueError, match="changed outside the model"):  # beam search reorders rows
        model.generate(input_ids=sample_ids(batch=2, length=5), max_new_tokens=3, num_beams=2, pad_token_id=0)


def test_gradient_checkpointing_gives_the_same_gradients():
    base, ids = tiny_model("llama"), sample_ids()
    models = []
    for checkpointing in (False, True):
        torch.manual_seed(3)  # the same initial adapter in both
        model = dt.add_adapter(copy.deepcopy(base), dt.ShadowConfig(task_type="CAUSAL_LM", shadow_dropout=0.0))
        randomize_adapter(model)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        models.append(model)
    plain, checkpointed = ({n: p.grad for n, p in m.named_parameters() if p.requires_grad} for m in models)
    assert plain.keys() == checkpointed.keys()
    for name, grad in plain.items():
        if grad is None:
            assert checkpointed[name] is None, name
        else:
            torch.testing.assert_close(checkpointed[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_a_bfloat16_base_gives_peft_s_dtypes_and_logits(tmp_path):
    base = tiny_model("llama").to(torch.bfloat16)
    fields = dict(task_type="CAUSAL_LM", r=4)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.ShadowConfig(**fields))
    ours, _ = assert_same_files(theirs, dt.add_adapter(copy.deepcopy(base), dt.ShadowConfig(**fields)),
                                tmp_path, fields)
    assert {v.dtype for k, v in ours.items() if "shadow_backbone" in k} == {torch.bfloat16}
    assert {v.dtype for k, v in ours.items() if "shadow_backbone" not in k} == {torch.float32}
    randomize_adapter(theirs)
    loaded = load_peft_file(base, theirs, tmp_path / "random", quiet=True)
    ids = sample_ids()
    assert (eval_logits(loaded, ids).float() - eval_logits(theirs, ids).float()).abs().max() <= 1e-2


def test_merging_is_refused_by_both_tools(tmp_path):
    base = tiny_model("llama")
    theirs = _peft_model(base, "shadow-llama")
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        theirs.merge_and_unload()
    ours = load_peft_file(base, theirs, tmp_path, quiet=True)
    with pytest.raises(ValueError, match="cannot be merged"):
        dt.merge(ours, verbose=False)


def test_per_row_routing_equals_separate_runs_with_and_without_the_cache():
    """PEFT keeps one shadow adapter active; deltatune also routes rows: each group of rows runs its
    adapter's backbone, and generation keeps one shadow cache per group."""
    base, ids = tiny_model("llama"), sample_ids()
    model = copy.deepcopy(base)
    dt.add_adapter(model, dt.ShadowConfig(task_type="CAUSAL_LM"), "a")
    dt.add_adapter(model, dt.ShadowConfig(task_type="CAUSAL_LM", r=2, shadow_num_hidden_layers=2), "b")
    randomize_adapter(model)
    expected, generated = [], []
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    for name in ("a", "b"):
        dt.set_adapter(model, name)
        expected.append(eval_logits(model, ids))
        with torch.no_grad():
            generated.append(model.generate(input_ids=ids, **kwargs))
    plain = eval_logits(base, ids)
    for x, y in ((expected[0], expected[1]), (expected[0], plain), (expected[1], plain)):
        assert ((x - y).abs().amax(dim=(1, 2)) > 1e-4).all()
    with dt.adapter_per_row(model, ["b", None, "a"]):
        routed = eval_logits(model, ids)
        with torch.no_grad():
            routed_tokens = model.generate(input_ids=ids, **kwargs)
    torch.testing.assert_close(routed[0], expected[1][0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(routed[1], plain[1], atol=0, rtol=0)
    torch.testing.assert_close(routed[2], expected[0][2], atol=1e-6, rtol=1e-5)
    assert torch.equal(routed_tokens[0], generated[1][0]) and torch.equal(routed_tokens[2], generated[0][2])
    dt.set_adapter(model, ["a", "b"])
    with pytest.raises(ValueError, match="only one ShadowPEFT adapter"):
        model(ids)


def test_init_weights_false_is_not_a_no_op_and_loads_in_peft(tmp_path):
    base, ids = tiny_model("qwen2"), sample_ids()
    ours = dt.add_adapter(copy.deepcopy(base), dt.ShadowConfig(task_type="CAUSAL_LM", init_weights=False))
    assert not torch.equal(eval_logits(ours, ids), eval_logits(base, ids))
    dt.save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert (eval_logits(theirs, ids) - eval_logits(ours, ids)).abs().max() <= ATOL


def test_trainable_parameters_equal_peft_s():
    base = tiny_model("llama")
    ours = dt.add_adapter(copy.deepcopy(base), dt.ShadowConfig(task_type="CAUSAL_LM"))
    theirs = _peft_model(base, "shadow-llama")
    count = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    assert dt.trainable_parameters(ours)[0] == count == 12_544  # 2 blocks x 1,616 + a one-layer backbone


@pytest.mark.parametrize("make, message", [
    (lambda: dt.ShadowConfig(r=0), "ShadowConfig.r"),
    (lambda: dt.ShadowConfig(shadow_alpha=float("nan")), "ShadowConfig.shadow_alpha"),
    (lambda: dt.ShadowConfig(shadow_dropout=1.0), "ShadowConfig.shadow_dropout"),
    (lambda: dt.ShadowConfig(auxiliary_loss_weight=-0.1), "ShadowConfig.auxiliary_loss_weight"),
    (lambda: dt.ShadowConfig(shadow_num_hidden_layers=0), "ShadowConfig.shadow_num_hidden_layers"),
    (lambda: dt.ShadowConfig(update_hidden_size=2.5), "ShadowConfig.update_hidden_size"),
    (lambda: dt.ShadowConfig(share_embeddings="yes"), "ShadowConfig.share_embeddings"),
    (lambda: dt.ShadowConfig(shadow_model="some/model", shadow_hidden_size=8), "ShadowConfig.shadow_model"),
    (lambda: dt.ShadowConfig(target_modules=r".*layers\.\d+", layers_to_transform=[0]),
     "ShadowConfig.layers_to_transform"),
    (lambda: dt.ShadowConfig(layers_pattern="layers"), "ShadowConfig.layers_pattern"),
])
def test_bad_settings_name_the_field(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize("config, error, message", [
    (dict(target_modules=["q_proj"]), ValueError, "matched no decoder block"),
    (dict(target_modules=r"model\.layers\.[02]"), ValueError, "contiguous"),
    (dict(shadow_model="some/checkpoint"), NotImplementedError, "ShadowConfig.shadow_model"),
    (dict(task_type="SEQ_CLS"), NotImplementedError, "ShadowConfig.task_type"),
])
def test_unsupported_models_and_targets_are_refused_by_name(config, error, message):
    model = tiny_model("llama")
    model.model.layers.append(copy.deepcopy(model.model.layers[1]))  # three blocks: 0 and 2 leave a gap
    model.config.num_hidden_layers = 3
    with pytest.raises(error, match=message):
        dt.add_adapter(model, dt.ShadowConfig(**config))
    assert not hasattr(model, "deltatune_state") and not hasattr(model, "deltatune_shadow")


def test_layers_to_transform_picks_the_blocks_and_peft_loads_them(tmp_path):
    base, ids = tiny_model("llama"), sample_ids()
    ours = dt.add_adapter(copy.deepcopy(base), dt.ShadowConfig(task_type="CAUSAL_LM", layers_to_transform=[1]))
    randomize_adapter(ours)
    dt.save_adapter(ours, tmp_path)
    assert dt.read_adapter_config(tmp_path).target_modules == ["model.layers.1"]
    keys = load_file(tmp_path / "adapter_model.safetensors")
    assert any(k.startswith("base_model.model.model.layers.1.") for k in keys)
    assert not any(k.startswith("base_model.model.model.layers.0.") for k in keys)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert (eval_logits(theirs, ids) - eval_logits(ours, ids)).abs().max() <= ATOL


def test_the_training_loop_adds_the_shadow_loss(tmp_path, default_tokenizer, monkeypatch):
    """``deltatune train --method shadow`` adds ``Method.auxiliary_loss`` after each micro-batch's forward."""
    from deltatune.adapters.parallel.shadow import ShadowMethod
    from deltatune.train import load_config, train
    from tiny_models import tiny_chat_model_dir, word_meaning_data

    terms = []
    original = ShadowMethod.auxiliary_loss

    def spy(self, model, name, config, batch):
        term = original(self, model, name, config, batch)
        terms.append(None if term is None else term.item())
        return term

    monkeypatch.setattr(ShadowMethod, "auxiliary_loss", spy)
    model = tiny_chat_model_dir(tmp_path / "model", default_tokenizer)
    data = word_meaning_data(tmp_path / "data.jsonl", 16)
    options = {"r": 4, "shadow_hidden_size": 32, "shadow_intermediate_size": 64, "shadow_num_attention_heads": 4}
    train(load_config(None, {"model": str(model), "data.path": str(data), "batch_size": 4, "grad_accum": 2,
                             "max_steps": 2, "eval_steps": 2, "seed": 3, "method": "shadow", "adapter": options,
                             "output_dir": str(tmp_path / "out")}), log=lambda *_: None)
    assert len(terms) == 4 and all(t is not None and t > 0 for t in terms)  # 2 steps x 2 micro-batches
