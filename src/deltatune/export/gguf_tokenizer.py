"""A Hugging Face tokenizer written into a GGUF file as llama.cpp's converter writes it.

Byte-level BPE tokenizers (GPT-2 style: SmolLM, Llama 3, Qwen2, Mistral Nemo) become
``tokenizer.ggml.model = "gpt2"`` with the token list, token types, merges, special token ids,
whether BOS/EOS are added, and the chat template. llama.cpp picks its pre-tokenizer (how text is
split before BPE) by name, and its converter finds the name by hashing the tokenization of a
fixed check text; the same text and hashes are used here for the families this export supports,
and a vocabulary not in that table is named by its split pattern where that is one llama.cpp knows.
"""

from __future__ import annotations

import json
import tempfile
from hashlib import sha256
from pathlib import Path

import gguf

# llama.cpp's check text (convert_hf_to_gguf.py, get_vocab_base_pre): its token ids identify how a
# tokenizer splits text (digits, spaces, scripts, apostrophes).
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ "
    "🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you "
    "sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)

# sha256 of str(token ids of CHECK_TEXT) -> llama.cpp's pre-tokenizer name (from its converter).
PRE_TOKENIZERS = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM, SmolLM2
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5, Qwen2, Qwen2.5
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral Nemo
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}

# The split patterns of llama.cpp's pre-tokenizers, for a tokenizer whose vocabulary is not in the
# table above but which splits text exactly as one of these (a regex split, then byte-level).
SPLIT_PATTERNS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+": "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+": "qwen2",
}


def add_tokenizer(writer: gguf.GGUFWriter, tokenizer, config) -> None:
    """Write ``tokenizer`` (a fast Hugging Face tokenizer) for a model whose config is ``config``."""
    if tokenizer is None:
        raise ValueError("GGUF export needs the base model's tokenizer (llama.cpp reads it from the file), and this "
                         "base has none: give --base a folder with tokenizer.json")
    with tempfile.TemporaryDirectory(prefix="deltatune-gguf-tokenizer-") as scratch:
        folder = Path(scratch)
        tokenizer.save_pretrained(folder)
        config.to_json_file(folder / "config.json")  # SpecialVocab falls back on its token ids
        spec_file = folder / "tokenizer.json"
        if not spec_file.is_file():
            raise ValueError("GGUF export needs a fast tokenizer (tokenizer.json); this base's tokenizer is "
                             f"{type(tokenizer).__name__}")
        spec = json.loads(spec_file.read_text(encoding="utf-8"))
        _check_byte_level_bpe(spec)
        tokens, types = vocabulary(tokenizer, config.vocab_size)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre_tokenizer_name(tokenizer, spec))
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=config.vocab_size)
        # What the tokenizer really does, rather than what its files may or may not spell out:
        # deltatune trained with these ids, so llama.cpp must add the same specials.
        special.add_special_token.update(added_specials(tokenizer))
        special.add_to_gguf(writer, quiet=True)


def _check_byte_level_bpe(spec: dict) -> None:
    model = spec.get("model") or {}
    kinds = {step.get("type") for step in _steps(spec.get("pre_tokenizer"))} | \
            {step.get("type") for step in _steps(spec.get("decoder"))}
    if model.get("type") != "BPE" or model.get("byte_fallback") or "ByteLevel" not in kinds:
        raise ValueError("GGUF export writes byte-level BPE tokenizers (GPT-2 style: SmolLM, Llama 3, Qwen2); this "
                         f"base's tokenizer is a {model.get('type')} model with pre-tokenizer/decoder {sorted(kinds)}. "
                         "Convert a merged folder with llama.cpp's convert_hf_to_gguf.py instead")


def _steps(part) -> list[dict]:
    if not part:
        return []
    inner = part.get("pretokenizers") or part.get("decoders")
    return [step for p in inner for step in _steps(p)] if inner else [part]


def vocabulary(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Token strings and llama.cpp token types for ids ``0..vocab_size-1``: ids the tokenizer lacks
    (a padded embedding) are ``[PAD<id>]`` and unused; added tokens are control tokens when special
    (or looking special, like ``<|im_end|>``), user-defined otherwise."""
    vocab = tokenizer.get_vocab()
    if vocab and max(vocab.values()) >= vocab_size:
        raise ValueError(f"the tokenizer has token id {max(vocab.values())}, beyond the model's vocabulary of "
                         f"{vocab_size}: they do not belong together")
    reverse = {index: token for token, index in vocab.items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(vocab_size):
        token = reverse.get(index)
        if token is None:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        if token in added and index in decoder:
            if not decoder[index].normalized:
                # llama.cpp matches added tokens in text as it would appear after normalization
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            looks_special = token.startswith("<|") and token.endswith("|>")
            types.append(gguf.TokenType.CONTROL if decoder[index].special or looks_special
                         else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    return tokens, types


def pre_tokenizer_name(tokenizer, spec: dict) -> str:
    """llama.cpp's name for how ``tokenizer`` splits text, found as its converter finds it."""
    digest = sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()
    if digest in PRE_TOKENIZERS:
        return PRE_TOKENIZERS[digest]
    steps = _steps(spec.get("pre_tokenizer"))
    if [step.get("type") for step in steps] == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"  # a lone byte-level step splits with GPT-2's own pattern: llama.cpp's "gpt-2"
    if [step.get("type") for step in steps] == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        pattern = (steps[0].get("pattern") or {}).get("Regex")
        if pattern in SPLIT_PATTERNS and str(steps[0].get("behavior")).lower() == "isolated":
            return SPLIT_PATTERNS[pattern]
    raise ValueError(f"llama.cpp would not know how this tokenizer splits text (check-text hash {digest}); "
                     "convert a merged folder with llama.cpp's convert_hf_to_gguf.py, which knows more tokenizers")


def added_specials(tokenizer) -> dict[str, bool]:
    """Whether encoding adds BOS / EOS, as measured on a short text."""
    text = "Hello"
    with_specials = tokenizer(text, add_special_tokens=True)["input_ids"]
    plain = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return {
        "bos": bos is not None and with_specials[:1] == [bos] and plain[:1] != [bos],
        "eos": eos is not None and with_specials[-1:] == [eos] and plain[-1:] != [eos],
    }
