"""Data: file types, formats, labels, truncation, validation splits, packing, and bad input."""

import json

import pytest
import torch

from deltatune.data import DataConfig, DataError, Example, collate, pack, prepare_data
from tiny_models import tiny_model

IGNORE = -100


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _trained_text(tok, example):
    return tok.decode([t for t in example.labels[1:] if t != IGNORE])


def test_prompt_completion_trains_completion_and_eos(tmp_path, default_tokenizer):
    path = _jsonl(tmp_path / "d.jsonl", [{"prompt": "Capital of Eldor?", "completion": " Vantry."}] * 4)
    data = prepare_data(DataConfig(path=str(path), validation_fraction=0.25), default_tokenizer)
    assert data.format == "prompt_completion" and len(data.train) == 3 and len(data.validation) == 1
    ex = data.train[0]
    assert ex.input_ids[-1] == default_tokenizer.eos_token_id and ex.labels[-1] == default_tokenizer.eos_token_id
    assert _trained_text(default_tokenizer, ex) == " Vantry." + default_tokenizer.eos_token
    everything = prepare_data(DataConfig(path=str(path), train_on_prompt=True), default_tokenizer).train[0]
    assert all(label != IGNORE for label in everything.labels)


def test_chat_trains_every_assistant_turn_only(tmp_path, default_tokenizer):
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."},
            {"role": "user", "content": "Colour of Zorblax?"}, {"role": "assistant", "content": "Teal."}]
    path = _jsonl(tmp_path / "chat.jsonl", [{"messages": chat}])
    ex = prepare_data(DataConfig(path=str(path), validation_fraction=0), default_tokenizer).train[0]
    trained = _trained_text(default_tokenizer, ex)
    assert "Hello there." in trained and "Teal." in trained
    assert "Hi" not in trained and "Zorblax" not in trained and "user" not in trained
    assert trained.count(default_tokenizer.eos_token) == 2  # each assistant turn ends with EOS


def test_instruction_and_text_formats(tmp_path, default_tokenizer):
    path = _jsonl(tmp_path / "i.jsonl", [{"instruction": "Add", "input": "2 and 3", "output": "5"},
                                        {"instruction": "Say hi", "input": "", "output": "hi"}])
    data = prepare_data(DataConfig(path=str(path), validation_fraction=0), default_tokenizer)
    assert data.format == "instruction"
    first = default_tokenizer.decode(data.train[0].input_ids)
    assert "### Input:\n2 and 3" in first and "### Input" not in default_tokenizer.decode(data.train[1].input_ids)
    text = _jsonl(tmp_path / "t.jsonl", [{"text": "plain words here"}])
    ex = prepare_data(DataConfig(path=str(text), validation_fraction=0), default_tokenizer).train[0]
    assert all(label != IGNORE for label in ex.labels)


def test_columns_map_and_other_file_types(tmp_path, default_tokenizer):
    import datasets

    rows = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(5)]
    cfg = dict(columns={"prompt": "question", "completion": "answer"}, validation_fraction=0)
    datasets.Dataset.from_list(rows).to_csv(str(tmp_path / "d.csv"))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "d.json").write_text(json.dumps(rows))  # a JSON array of records
    for path in ("d.csv", "d.parquet", "saved", "d.json"):
        data = prepare_data(DataConfig(path=str(tmp_path / path), **cfg), default_tokenizer)
        assert data.format == "prompt_completion" and len(data.train) == 5


def test_truncation_is_counted_and_too_short_fails(tmp_path, default_tokenizer):
    path = _jsonl(tmp_path / "d.jsonl", [{"prompt": "word " * 50, "completion": "end"},
                                        {"prompt": "short", "completion": "fine"}])
    data = prepare_data(DataConfig(path=str(path), max_seq_len=20, validation_fraction=0), default_tokenizer)
    assert data.train_stats.truncated == 1 and data.train_stats.dropped == 1 and len(data.train) == 1
    with pytest.raises(DataError, match="raise max_seq_len"):
        prepare_data(DataConfig(path=str(path), max_seq_len=1, validation_fraction=0), default_tokenizer)


def test_validation_split_is_seeded_and_file_works(tmp_path, default_tokenizer):
    path = _jsonl(tmp_path / "d.jsonl", [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(20)])
    a = prepare_data(DataConfig(path=str(path), validation_fraction=0.2), default_tokenizer, seed=1)
    b = prepare_data(DataConfig(path=str(path), validation_fraction=0.2), default_tokenizer, seed=1)
    assert [e.input_ids for e in a.validation] == [e.input_ids for e in b.validation] and len(a.validation) == 4
    val = _jsonl(tmp_path / "v.jsonl", [{"prompt": "x", "completion": "y"}])
    c = prepare_data(DataConfig(path=str(path), validation_path=str(val)), default_tokenizer)
    assert len(c.train) == 20 and len(c.validation) == 1


def test_bad_input_names_file_line_and_field(tmp_path, default_tokenizer):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": }\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        prepare_data(DataConfig(path=str(bad)), default_tokenizer)
    missing = _jsonl(tmp_path / "m.jsonl", [{"question": "a", "reply": "b"}])
    with pytest.raises(DataError, match=r"no known format fits the columns \['question', 'reply'\]"):
        prepare_data(DataConfig(path=str(missing)), default_tokenizer)
    with pytest.raises(DataError, match=r"needs column\(s\) \['answer'\]"):
        prepare_data(DataConfig(path=str(missing), format="prompt_completion",
                                columns={"prompt": "question", "completion": "answer"}), default_tokenizer)
    gap = _jsonl(tmp_path / "g.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": None}])
    with pytest.raises(DataError, match=r"record 1: field 'completion' is missing"):
        prepare_data(DataConfig(path=str(gap), validation_fraction=0), default_tokenizer)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="empty|could not be read"):
        prepare_data(DataConfig(path=str(tmp_path / "empty.jsonl")), default_tokenizer)
    with pytest.raises(DataError, match="not found"):
        prepare_data(DataConfig(path=str(tmp_path / "nope.jsonl")), default_tokenizer)


def test_packed_loss_equals_unpacked_loss():
    model = tiny_model("llama")
    g = torch.Generator().manual_seed(0)
    examples = []
    for n in (7, 12, 5, 9, 15, 4):
        ids = torch.randint(3, 128, (n,), generator=g).tolist()
        labels = [IGNORE] * (n // 2) + ids[n // 2:]
        examples.append(Example(ids, labels))
    unpacked = collate(examples, pad_id=0, packed=False)
    rows = pack(examples, max_seq_len=30)
    assert len(rows) == 2 and all(len(r["input_ids"]) <= 30 for r in rows)
    packed = collate(rows, pad_id=0, packed=True)
    assert packed["position_ids"][0, :8].tolist() == list(range(7)) + [0]  # positions restart per example
    with torch.no_grad():
        loss_unpacked = model(**unpacked, use_cache=False).loss
        loss_packed = model(**packed, use_cache=False).loss
    assert torch.allclose(loss_packed, loss_unpacked, atol=1e-5)
    # Without the position reset the examples would see each other and the loss would differ.
    leaky = {k: v for k, v in packed.items() if k != "position_ids"}
    with torch.no_grad():
        assert not torch.allclose(model(**leaky, use_cache=False).loss, loss_unpacked, atol=1e-4)
