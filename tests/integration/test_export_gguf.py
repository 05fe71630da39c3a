"""``deltatune export --format gguf``: merged models and LoRA adapters as GGUF files for llama.cpp
and Ollama, read back by independent code (transformers' GGUF loader, the ``gguf`` reader).

Tiny random models carry the default model's real tokenizer (SmolLM2: byte-level BPE, chat
template). Each GGUF file is read back from a folder of its own, so nothing but the file speaks.

Bounds on the logits of the merged model, tiny random Llama with a random LoRA: f32 bit-exact;
f16 and bf16 bit-exact against the merged model with its matrices rounded to that dtype (the file
holds exactly those values; against the unrounded model max |Δ| / max |logit| <= 0.2% and 2%);
q8_0 and q4_0 every weight within its block's quantization step, and the logits' relative RMS
error measured 1.3% for q8_0 (bound 3%) and 21% for q4_0 (bound 35%: 4-bit random weights with no
structure to spare). On the default model q8_0 measured max |Δ| 2.8% and mean 0.4% of max |logit|
(bounds 5%, 1%), and KL divergence of the next-token distributions at most 0.009 nats, 0.002 on
average (bounds 0.05, 0.01), deltatune's top token always in the file's top 5 (the top token
itself differs at 2 to 7% of positions, where the two best are nearly tied).
"""

import json
import shutil
from pathlib import Path

import gguf
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, MistralConfig, Qwen2Config
from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor, TensorProcessor, get_gguf_hf_weights_map

import deltatune as dt
from deltatune.cli import main
from deltatune.export.gguf import export_gguf
from tiny_models import randomize_adapter

TEXTS = ["The river rose after three days of rain.", "Word 12: meaning 3 — naïve café 🦙", "  two  spaces\n\nand lines"]
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _chat_base(folder: Path, tokenizer, arch: str = "llama", tied: bool = True, seed: int = 0) -> Path:
    """A tiny random model of ``arch`` sized to ``tokenizer``, saved with it (4 heads over 2 key-value
    heads, so the rotary permutation of Q and K differs, and rows of 32 values: whole 4/8-bit blocks)."""
    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[arch]
    config = cls(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=tied,
                 bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                 pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.02)  # Qwen2's q/k/v biases are really written and read
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _adapter(base: Path, folder: Path, config) -> tuple[Path, torch.nn.Module]:
    model, _ = dt.load_model(base)
    dt.add_adapter(model, config)
    randomize_adapter(model)
    dt.save_adapter(model, folder)
    return folder, model


def _ids(tokenizer) -> torch.Tensor:
    return tokenizer(TEXTS, return_tensors="pt", padding=True)["input_ids"]


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _alone(path: Path) -> Path:
    """A folder holding nothing but the GGUF file, so that transformers reads only the file."""
    alone = path.parent / f"{path.stem}-alone"
    alone.mkdir()
    shutil.copy(path, alone / path.name)
    return alone


def _read_back(path: Path):
    """The model in a GGUF file, as transformers loads it from a folder holding nothing else."""
    alone = _alone(path)
    return AutoModelForCausalLM.from_pretrained(alone, gguf_file=path.name, dtype=torch.float32).eval(), alone


@pytest.fixture(scope="module")
def llama(tmp_path_factory, default_tokenizer):
    """(base folder, LoRA adapter folder, the model with that adapter unmerged, merged reference)."""
    root = tmp_path_factory.mktemp("gguf")
    base = _chat_base(root / "base", default_tokenizer)
    adapter, tuned = _adapter(base, root / "adapter", dt.LoraConfig(r=4, lora_alpha=8, target_modules=ALL_LINEAR))
    merged, _ = dt.load_model(base)
    dt.load_adapter(merged, adapter)
    merged = dt.unload(merged, merge=True)
    return base, adapter, tuned, merged


def test_merged_f32_reads_back_bit_exact(llama, tmp_path, default_tokenizer):
    base, adapter, tuned, merged = llama
    report = export_gguf(adapter, tmp_path / "m.gguf", base=base, outtype="f32")
    assert report.types == {"F32": 20} and report.fallbacks == []  # tied head: no output.weight
    back, _ = _read_back(tmp_path / "m.gguf")
    ids = _ids(default_tokenizer)
    assert torch.equal(_logits(back, ids), _logits(merged, ids))
    assert torch.allclose(_logits(back, ids), _logits(tuned, ids), atol=1e-5)


@pytest.mark.parametrize("outtype, dtype, bound", [("f16", torch.float16, 2e-3), ("bf16", torch.bfloat16, 2e-2)])
def test_merged_f16_bf16_equal_the_merged_model_up_to_dtype_rounding(llama, tmp_path, default_tokenizer,
                                                                      outtype, dtype, bound):
    base, adapter, _, merged = llama
    report = export_gguf(adapter, tmp_path / "m.gguf", base=base, outtype=outtype)
    assert report.types == {outtype.upper(): 15, "F32": 5}  # norms stay float32
    back, _ = _read_back(tmp_path / "m.gguf")
    rounded, _ = dt.load_model(base)
    rounded.load_state_dict(merged.state_dict())
    with torch.no_grad():
        for p in rounded.parameters():
            if p.dim() == 2:
                p.copy_(p.to(dtype).float())
    ids = _ids(default_tokenizer)
    assert torch.equal(_logits(back, ids), _logits(rounded, ids))
    reference = _logits(merged, ids)
    assert (_logits(back, ids) - reference).abs().max() <= bound * reference.abs().max()


def test_q8_0_and_q4_0_stay_within_their_bounds(llama, tmp_path, default_tokenizer):
    """Every weight read back is within its block's quantization error (q8_0: d/2 with d = max|block|/127,
    plus 127 times the f16 rounding of d, 2^-11 d; q4_0: d = max|block|/8 at the clipped end), which
    also proves the layout; the logits stay within the bounds measured on this model."""
    base, adapter, _, merged = llama
    ids = _ids(default_tokenizer)
    reference = _logits(merged, ids)
    steps = {"q8_0": (0.5 + 127 / 2**11) / 127, "q4_0": (1 + 8 / 2**11) / 8}
    errors = {}
    for outtype, logit_bound in (("q8_0", 0.03), ("q4_0", 0.35)):
        report = export_gguf(adapter, tmp_path / f"{outtype}.gguf", base=base, outtype=outtype)
        back, _ = _read_back(tmp_path / f"{outtype}.gguf")
        read = dict(back.named_parameters())
        for name, weight in merged.named_parameters():
            if weight.dim() != 2:
                assert torch.equal(read[name], weight), name  # vectors are float32
                continue
            step = steps["q8_0" if "embed_tokens" in name else outtype]  # q4_0 files keep it 8-bit
            block_max = weight.detach().reshape(weight.shape[0], -1, 32).abs().amax(-1, keepdim=True)
            error = (read[name] - weight).detach().reshape(weight.shape[0], -1, 32).abs()
            assert (error <= step * block_max + 1e-8).all(), name
        errors[outtype] = ((_logits(back, ids) - reference).norm() / reference.norm()).item()
        assert 0 < errors[outtype] <= logit_bound, (outtype, errors[outtype])
    assert report.types == {"Q4_0": 14, "Q8_0": 1, "F32": 5}  # the tied embedding/head stays 8-bit
    assert report.fallbacks == ["token_embd.weight: q8_0 (embedding and output head stay above 4 bits)"]
    assert errors["q4_0"] > 4 * errors["q8_0"]


def test_the_tokenizer_and_chat_template_read_back(llama, tmp_path, default_tokenizer):
    base, _, _, _ = llama
    export_gguf(None, tmp_path / "m.gguf", kind="base", base=base, outtype="f16")
    back = AutoTokenizer.from_pretrained(_alone(tmp_path / "m.gguf"), gguf_file="m.gguf")
    for text in [*TEXTS, "<|im_start|>user\nhi<|im_end|>"]:
        assert back(text)["input_ids"] == default_tokenizer(text)["input_ids"], text
    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    assert back.chat_template == default_tokenizer.chat_template
    assert back.apply_chat_template(messages, tokenize=False) == default_tokenizer.apply_chat_template(
        messages, tokenize=False)
    fields = gguf.GGUFReader(tmp_path / "m.gguf").fields
    assert fields[gguf.Keys.Tokenizer.MODEL].contents() == "gpt2"
    assert fields[gguf.Keys.Tokenizer.PRE].contents() == "smollm"
    assert fields[gguf.Keys.Tokenizer.EOS_ID].contents() == default_tokenizer.eos_token_id
    assert fields[gguf.Keys.Tokenizer.ADD_BOS].contents() is False  # SmolLM2 adds no BOS


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_other_architectures_round_trip(tmp_path, default_tokenizer, arch):
    """Qwen2 (q/k/v biases, no rotary permutation) with an untied output head that the adapter also
    changes; Mistral (llama.cpp's Llama layout)."""
    base = _chat_base(tmp_path / "base", default_tokenizer, arch, tied=False)
    targets = [*ALL_LINEAR, "lm_head"] if arch == "qwen2" else ALL_LINEAR
    adapter, tuned = _adapter(base, tmp_path / "adapter", dt.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    report = export_gguf(adapter, tmp_path / "m.gguf", base=base, outtype="f32")
    assert report.types == {"F32": 27 if arch == "qwen2" else 21}  # output.weight is written; Qwen2: + 6 biases
    back, _ = _read_back(tmp_path / "m.gguf")
    ids = _ids(default_tokenizer)
    assert torch.allclose(_logits(back, ids), _logits(tuned, ids), atol=1e-5)


# ----- the LoRA adapter as a GGUF LoRA adapter ---------------------------------------------------

def _gguf_tensors(path: Path) -> dict[str, torch.Tensor]:
    return {t.name: torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
            for t in gguf.GGUFReader(path).tensors}


def test_adapter_file_has_llama_cpp_names_keys_and_the_adapters_tensors(llama, tmp_path):
    base, adapter, _, _ = llama
    report = export_gguf(adapter, tmp_path / "a.gguf", kind="adapter", base=base, outtype="f32")
    fields = gguf.GGUFReader(tmp_path / "a.gguf").fields
    assert fields[gguf.Keys.General.TYPE].contents() == gguf.GGUFType.ADAPTER
    assert fields[gguf.Keys.General.ARCHITECTURE].contents() == "llama"
    assert fields[gguf.Keys.Adapter.TYPE].contents() == "lora"
    assert fields[gguf.Keys.Adapter.LORA_ALPHA].contents() == 8.0
    tensors = _gguf_tensors(tmp_path / "a.gguf")
    blocks = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]
    assert set(tensors) == {f"blk.{i}.{b}.weight.lora_{ab}" for i in range(2) for b in blocks for ab in "ab"}
    assert report.tensors == 28
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    unpermute = LlamaTensorProcessor(config={"num_attention_heads": 4, "num_key_value_heads": 2})
    for i in range(2):
        for hf, name in (("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("mlp.down_proj", "ffn_down")):
            key = f"base_model.model.model.layers.{i}.{hf}"
            A, B = saved[f"{key}.lora_A.weight"], saved[f"{key}.lora_B.weight"]
            assert torch.equal(tensors[f"blk.{i}.{name}.weight.lora_a"], A)
            b = tensors[f"blk.{i}.{name}.weight.lora_b"]
            # Q and K rows are in llama.cpp's rotary order, as the base file's weights are
            restored = unpermute.process(weights=b.numpy(), name=f"blk.{i}.{name}.weight").weights
            assert torch.equal(torch.from_numpy(restored), B)
            assert torch.equal(b, B) == (name == "ffn_down")


def _apply_like_llama_cpp(base_model, adapter_file: Path) -> torch.nn.Module:
    """``W + (alpha / rank) · B A`` for every pair in the file, rank read from B as llama.cpp does,
    undoing the rotary order with transformers' reader; the embedding's A is looked up by row."""
    fields = gguf.GGUFReader(adapter_file).fields
    alpha = fields[gguf.Keys.Adapter.LORA_ALPHA].contents()
    tensors = _gguf_tensors(adapter_file)
    hf_names = get_gguf_hf_weights_map(base_model, TensorProcessor())
    unpermute = LlamaTensorProcessor(config={"num_attention_heads": 4, "num_key_value_heads": 2})
    params = dict(base_model.named_parameters())
    with torch.no_grad():
        for name in [n[:-len(".lora_a")] for n in tensors if n.endswith(".lora_a")]:
            a, b = tensors[name + ".lora_a"], tensors[name + ".lora_b"]
            scale = alpha / b.shape[1]
            if name.startswith("token_embd"):
                delta = scale * a @ b.T  # (vocab, dim): row t is B · a[t]
            else:
                delta = torch.from_numpy(unpermute.process(weights=(scale * b @ a).numpy(), name=name).weights)
            params[hf_names[name]].add_(delta)
    return base_model


def test_adapter_file_computes_what_deltatune_computes(tmp_path, default_tokenizer):
    """rsLoRA, per-module rank and alpha, and a LoRA on the token embedding (of a base with its own output
    head): a single alpha in the file still gives every module its own scale, and the embedding's
    layout is llama.cpp's."""
    base = _chat_base(tmp_path / "base", default_tokenizer, tied=False)
    config = dt.LoraConfig(r=4, lora_alpha=8, target_modules=[*ALL_LINEAR, "embed_tokens"], use_rslora=True,
                           rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 3.0})
    adapter, tuned = _adapter(base, tmp_path / "adapter", config)
    export_gguf(adapter, tmp_path / "a.gguf", kind="adapter", base=base, outtype="f32")
    tensors = _gguf_tensors(tmp_path / "a.gguf")
    assert tensors["token_embd.weight.lora_a"].shape == (len(default_tokenizer), 4)  # vocab x rank
    assert tensors["blk.0.attn_v.weight.lora_b"].shape == (16, 2)
    plain, _ = dt.load_model(base)
    ids = _ids(default_tokenizer)
    expected = _logits(tuned, ids)
    assert not torch.allclose(_logits(plain, ids), expected, atol=1e-3)
    assert torch.allclose(_logits(_apply_like_llama_cpp(plain, tmp_path / "a.gguf"), ids), expected, atol=1e-5)


def test_adapters_gguf_cannot_express_are_refused(llama, tmp_path):
    base, _, _, _ = llama
    dora, _ = _adapter(base, tmp_path / "dora", dt.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ValueError, match="use_dora.*merged"):
        export_gguf(dora, tmp_path / "x.gguf", kind="adapter", base=base)
    head, _ = _adapter(base, tmp_path / "head", dt.LoraConfig(r=4, target_modules=["lm_head"]))
    with pytest.raises(ValueError, match="ties to the token embedding"):
        export_gguf(head, tmp_path / "x.gguf", kind="adapter", base=base)
    embedding, _ = _adapter(base, tmp_path / "embedding", dt.LoraConfig(r=4, target_modules=["embed_tokens"]))
    with pytest.raises(ValueError, match="ties to the output head"):
        export_gguf(embedding, tmp_path / "x.gguf", kind="adapter", base=base)
    ia3, _ = _adapter(base, tmp_path / "ia3", dt.IA3Config(target_modules=["k_proj", "down_proj"],
                                                           feedforward_modules=["down_proj"]))
    with pytest.raises(ValueError, match="plain LoRA only.*IA3"):
        export_gguf(ia3, tmp_path / "x.gguf", kind="adapter", base=base)
    assert not (tmp_path / "x.gguf").exists()
    # ... while the merged model takes any mergeable method
    export_gguf(dora, tmp_path / "dora.gguf", base=base)
    assert (tmp_path / "dora.gguf").is_file()


# ----- the command --------------------------------------------------------------------------------

def _summary(printed: str) -> dict:
    return json.loads(printed[printed.index("{"):])  # a merge prints its error on a line before


def test_cli_writes_merged_adapter_and_base_files(llama, tmp_path, capsys):
    base, adapter, _, _ = llama
    out = tmp_path / "out"
    out.mkdir()
    for kind in ("merged", "adapter", "base"):
        flags = ["--adapter", str(adapter)] if kind != "base" else []
        assert main(["export", *flags, "--format", "gguf", "--gguf-kind", kind, "--base", str(base),
                     "--out", str(out)]) == 0
        summary = _summary(capsys.readouterr().out)
        assert summary["format"] == "gguf" and summary["report"]["outtype"] == "f16"
        assert Path(summary["out"]).parent == out.resolve()
    names = sorted(p.name for p in out.iterdir())
    assert names == ["adapter-lora-f16.gguf", "adapter-merged-f16.gguf", "base-f16.gguf"]
    types = {n: gguf.GGUFReader(out / n).fields[gguf.Keys.General.TYPE].contents() for n in names}
    assert types == {"adapter-lora-f16.gguf": "adapter", "adapter-merged-f16.gguf": "model", "base-f16.gguf": "model"}
    # a file name is used as given, and the file is replaced as a whole
    target = tmp_path / "named.gguf"
    target.write_text("old")
    assert main(["export", "--adapter", str(adapter), "--format", "gguf", "--base", str(base), "--outtype", "q8_0",
                 "--out", str(target)]) == 0
    assert _summary(capsys.readouterr().out)["report"]["types"] == {"Q8_0": 15, "F32": 5}
    assert gguf.GGUFReader(target).fields[gguf.Keys.General.FILE_TYPE].contents() == gguf.LlamaFileType.MOSTLY_Q8_0
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary file left


@pytest.mark.parametrize("flags, message", [
    (["--format", "gguf"], "--adapter FOLDER is required"),
    (["--adapter", "{missing}", "--format", "gguf"], "--adapter {missing} is not a folder"),
    (["--adapter", "{adapter}", "--format", "gguf", "--outtype", "q5_1"], "--outtype 'q5_1' is not supported"),
    (["--adapter", "{adapter}", "--format", "gguf", "--gguf-kind", "adapter", "--outtype", "q4_0"],
     "--outtype 'q4_0' is not supported for a GGUF adapter"),
    (["--adapter", "{adapter}", "--format", "gguf", "--gguf-kind", "lora"], "--gguf-kind 'lora' is not one of"),
    (["--adapter", "{adapter}", "--format", "gguf", "--rank", "2"], "--rank is for --format peft"),
    (["--adapter", "{adapter}", "--format", "onnx"], "--format 'onnx' is not one of peft, gguf"),
    (["--adapter", "{adapter}"], "--format peft writes a DyLoRA adapter cut to one rank: give --rank N"),
    (["--adapter", "{adapter}", "--format", "gguf", "--base", "{missing}"], "not found"),
])
def test_cli_bad_input_is_one_line_naming_the_flag(llama, tmp_path, capsys, flags, message):
    _, adapter, _, _ = llama
    values = {"adapter": str(adapter), "missing": str(tmp_path / "nowhere")}
    assert main(["export", *[f.format(**values) for f in flags], "--out", str(tmp_path / "x.gguf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("deltatune export: error: ") and message.format(**values) in err and err.count("\n") == 1
    assert not (tmp_path / "x.gguf").exists()


def test_default_model_export_matches_llama_cpps_own_file(tmp_path, capsys):
    """The embedded default (SmolLM2-135M-Instruct) merged and written as q8_0 through the command:
    its tokenizer metadata equals what llama.cpp's converter wrote into the shipped GGUF file, and its
    logits stay within the q8_0 bound."""
    from deltatune.loading import default_gguf_path

    model, tokenizer = dt.load_model()
    dt.add_adapter(model, dt.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"]))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator) * 0.02)
    dt.save_adapter(model, tmp_path / "adapter")
    ids = _ids(tokenizer)
    reference = _logits(model, ids)
    assert main(["export", "--adapter", str(tmp_path / "adapter"), "--format", "gguf", "--outtype", "q8_0",
                 "--out", str(tmp_path / "m.gguf")]) == 0
    assert _summary(capsys.readouterr().out)["report"]["types"] == {"Q8_0": 211, "F32": 61}
    ours, shipped = gguf.GGUFReader(tmp_path / "m.gguf").fields, gguf.GGUFReader(default_gguf_path()).fields
    for key in [k for k in shipped if k.startswith("tokenizer.") and k != gguf.Keys.Tokenizer.ADD_PREFIX]:
        assert ours[key].contents() == shipped[key].contents(), key
    for key in ("block_count", "embedding_length", "feed_forward_length", "attention.head_count",
                "attention.head_count_kv", "rope.freq_base", "rope.dimension_count", "vocab_size"):
        assert ours[f"llama.{key}"].contents() == shipped[f"llama.{key}"].contents(), key
    back, _ = _read_back(tmp_path / "m.gguf")
    logits = _logits(back, ids)
    diff, scale = (logits - reference).abs(), reference.abs().max()
    assert diff.max() <= 0.05 * scale and diff.mean() <= 0.01 * scale
    # next-token distributions: KL(deltatune || GGUF) in nats, and deltatune's top token in the file's top 5
    log_p, log_q = reference.log_softmax(-1), logits.log_softmax(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    assert kl.max() <= 0.05 and kl.mean() <= 0.01
    assert (logits.topk(5, -1).indices == reference.argmax(-1, keepdim=True)).any(-1).all()


def test_llama_cpp_runs_the_files_as_deltatune_does(llama, tmp_path, default_tokenizer):
    """Where llama-cpp-python is installed, llama.cpp itself loads the merged file, and the base file
    with the adapter file, and continues a prompt greedily as deltatune does."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (it has no wheel on "
                                    "the package index here and compiles llama.cpp from source)")
    base, adapter, tuned, _ = llama
    export_gguf(adapter, tmp_path / "merged.gguf", base=base, outtype="f32")
    export_gguf(None, tmp_path / "base.gguf", kind="base", base=base, outtype="f32")
    export_gguf(adapter, tmp_path / "adapter.gguf", kind="adapter", base=base, outtype="f32")
    prompt = default_tokenizer("The river rose after three days")["input_ids"]
    with torch.no_grad():
        expected = tuned.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)[0, len(prompt):].tolist()
    for files in ({"model_path": str(tmp_path / "merged.gguf")},
                  {"model_path": str(tmp_path / "base.gguf"), "lora_path": str(tmp_path / "adapter.gguf")}):
        runner = llama_cpp.Llama(**files, n_ctx=64, verbose=False, seed=0)
        produced = []
        for token in runner.generate(prompt, temp=0.0, top_k=1):
            produced.append(token)
            if len(produced) == len(expected):
                break
        assert produced == expected, files


def test_cli_cuts_a_dylora_adapter_and_the_cut_exports_as_gguf(llama, tmp_path, capsys):
    """--format peft (the default) hands a DyLoRA adapter to the rank export; the cut adapter is plain
    LoRA, so it can then be written as a GGUF adapter, where the uncut one is refused with that hint."""
    pytest.importorskip("deltatune.export.rank", reason="the DyLoRA rank export is not in this tree")
    base, _, _, _ = llama
    config = dt.config_from_dict({"peft_type": "DYLORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]})
    dylora, _ = _adapter(base, tmp_path / "dylora", config)
    assert main(["export", "--adapter", str(dylora), "--rank", "4"]) == 0
    cut = Path(_summary(capsys.readouterr().out)["out"])
    assert cut == (tmp_path / "dylora-r4").resolve()
    assert json.loads((cut / "adapter_config.json").read_text())["r"] == 4
    assert main(["export", "--adapter", str(dylora), "--format", "gguf", "--gguf-kind", "adapter",
                 "--base", str(base)]) == 2
    assert "cut it to one rank first" in capsys.readouterr().err
    assert main(["export", "--adapter", str(cut), "--format", "gguf", "--gguf-kind", "adapter", "--base", str(base),
                 "--outtype", "f32"]) == 0
    tensors = _gguf_tensors(Path(_summary(capsys.readouterr().out)["out"]))
    assert tensors["blk.0.attn_q.weight.lora_a"].shape == (4, 32)
