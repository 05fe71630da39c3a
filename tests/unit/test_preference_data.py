"""Preference records: text and chat layouts, the prompt masked, EOS, truncation, and errors that
name the file, line and field."""

import json

import pytest

from deltatune.data import DataConfig, DataError
from deltatune.data.preference import (PreferencePair, load_preference_pairs, prepare_preference_data,
                                       truncate_pair)
from deltatune.data.tokenize import IGNORE

QUESTION = "Which order is the cod in?"
GOOD, BAD = "The cod belongs to the Deepfin.", "The cod belongs to the Skyrell."


def _write(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def _pair(tmp_path, tok, record, **config) -> PreferencePair:
    pairs, _ = load_preference_pairs(_write(tmp_path / "d.jsonl", [record]), tok, DataConfig(**config))
    return pairs[0]


def test_text_pairs_mask_the_prompt_and_end_with_eos(tmp_path, default_tokenizer):
    tok = default_tokenizer
    pair = _pair(tmp_path, tok, {"prompt": "Q: cod?", "chosen": " Deepfin", "rejected": " Skyrell"})
    assert pair.prompt_ids == tok("Q: cod?")["input_ids"]
    assert pair.chosen_ids == tok(" Deepfin", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert pair.rejected_ids == tok(" Skyrell", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    chosen, rejected = pair.examples()
    assert chosen.input_ids == pair.prompt_ids + pair.chosen_ids
    assert chosen.labels == [IGNORE] * len(pair.prompt_ids) + pair.chosen_ids  # only the completion is trained
    assert rejected.labels[len(pair.prompt_ids):] == pair.rejected_ids


def test_chat_forms_render_with_the_template_and_agree(tmp_path, default_tokenizer):
    tok = default_tokenizer
    user = [{"role": "user", "content": QUESTION}]
    explicit = _pair(tmp_path, tok, {"prompt": user, "chosen": [{"role": "assistant", "content": GOOD}],
                                     "rejected": [{"role": "assistant", "content": BAD}]})
    prompt_text = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    assert explicit.prompt_ids == tok(prompt_text, add_special_tokens=False)["input_ids"]
    assert tok.decode(explicit.chosen_ids) == GOOD + "<|im_end|>\n"  # the template's end of turn is EOS
    assert explicit.chosen_ids.count(tok.eos_token_id) == 1  # not appended a second time
    # chosen and rejected as whole conversations sharing the prompt (TRL's implicit prompt)
    implicit = _pair(tmp_path, tok, {"chosen": user + [{"role": "assistant", "content": GOOD}],
                                     "rejected": user + [{"role": "assistant", "content": BAD}]})
    assert implicit == explicit
    # a message-list prompt with plain-text answers, and plain text with data.chat_template
    assert _pair(tmp_path, tok, {"prompt": user, "chosen": GOOD, "rejected": BAD}) == explicit
    assert _pair(tmp_path, tok, {"prompt": QUESTION, "chosen": GOOD, "rejected": BAD}, chat_template=True) == explicit
    assert _pair(tmp_path, tok, {"prompt": QUESTION, "chosen": GOOD, "rejected": BAD}) != explicit


def test_multi_turn_prompts_keep_earlier_assistant_turns_in_the_prompt(tmp_path, default_tokenizer):
    tok = default_tokenizer
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
               {"role": "user", "content": QUESTION}]
    pair = _pair(tmp_path, tok, {"chosen": history + [{"role": "assistant", "content": GOOD}],
                                 "rejected": history + [{"role": "assistant", "content": BAD}]})
    assert "Hello." in tok.decode(pair.prompt_ids) and tok.decode(pair.chosen_ids).startswith(GOOD)


def test_columns_map_other_names(tmp_path, default_tokenizer):
    record = {"question": "Q: cod?", "good": " Deepfin", "bad": " Skyrell"}
    columns = {"prompt": "question", "chosen": "good", "rejected": "bad"}
    same = {"prompt": "Q: cod?", "chosen": " Deepfin", "rejected": " Skyrell"}
    assert _pair(tmp_path, default_tokenizer, record, columns=columns) == _pair(tmp_path, default_tokenizer, same)


def test_truncation_keeps_the_prompt_and_drops_pairs_without_room(tmp_path, default_tokenizer):
    pair = PreferencePair([1, 2, 3], [4, 5, 6, 7], [8, 9])
    cut, was_cut = truncate_pair(pair, 5)
    assert was_cut and cut == PreferencePair([1, 2, 3], [4, 5], [8, 9])
    assert truncate_pair(pair, 7) == (pair, False)
    assert truncate_pair(pair, 3) == (None, True)  # the prompt alone fills max_seq_len: nothing to compare
    long_prompt = "word " * 40
    path = _write(tmp_path / "t.jsonl", [{"prompt": long_prompt, "chosen": " yes", "rejected": " no"},
                                         {"prompt": "short", "chosen": " yes " * 20, "rejected": " no"}])
    data = prepare_preference_data(DataConfig(path=path, validation_fraction=0.0, max_seq_len=20), default_tokenizer)
    assert data.train_stats.dropped == 1 and data.train_stats.truncated == 2 and data.train_stats.examples == 1
    kept = data.train[0]
    assert len(kept.prompt_ids) + len(kept.chosen_ids) == 20 and kept.rejected_ids[-1] == default_tokenizer.eos_token_id


def test_a_held_out_fraction_or_a_validation_file(tmp_path, default_tokenizer):
    records = [{"prompt": f"Q{i}", "chosen": " a", "rejected": " b"} for i in range(20)]
    path = _write(tmp_path / "d.jsonl", records)
    data = prepare_preference_data(DataConfig(path=path, validation_fraction=0.25), default_tokenizer, seed=1)
    assert (data.train_stats.examples, data.validation_stats.examples) == (15, 5)
    held = {r["prompt"] for r in data.validation_records}
    assert len(held) == 5 and held <= {r["prompt"] for r in records}
    val = _write(tmp_path / "v.jsonl", records[:3])
    data = prepare_preference_data(DataConfig(path=path, validation_path=val), default_tokenizer)
    assert (data.train_stats.examples, data.validation_stats.examples) == (20, 3)


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "p", "chosen": "a"}', r"d\.jsonl:3: field 'rejected' is missing"),
    ('{"prompt": "p", "chosen": {"text": "a"}, "rejected": "b"}',
     r"d\.jsonl:3: field 'chosen': expected text or a list"),
    ('{"prompt": "p", "chosen": [{"role": "assistant"}], "rejected": "b"}',
     r"d\.jsonl:3: field 'chosen': expected a non-empty list of \{role, content\}"),
    ('{"prompt": [{"role": "user", "content": "p"}], "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}',
     r"d\.jsonl:3: field 'chosen': a completion holds assistant messages only \(found role 'user'\)"),
    ('{"chosen": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "a"}], '
     '"rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]}',
     r"d\.jsonl:3: fields 'chosen' and 'rejected': without a 'prompt' field the two chats must begin"),
    ('{"chosen": "a", "rejected": "b"}', r"d\.jsonl:3: field 'prompt' is missing"),
    ('{"prompt": "p", "chosen": "a", "rejected": "b"', r"d\.jsonl:3: not valid JSON"),
])
def test_bad_records_name_file_line_and_field(tmp_path, default_tokenizer, line, message):
    good = '{"prompt": "p", "chosen": "a", "rejected": "b"}'
    path = _write(tmp_path / "d.jsonl", [good, "", line])  # a blank line: line numbers still count it
    with pytest.raises(DataError, match=message):
        load_preference_pairs(path, default_tokenizer, DataConfig())


def test_sft_data_and_other_files(tmp_path, default_tokenizer):
    sft = _write(tmp_path / "sft.jsonl", [{"prompt": "p", "completion": "c"}])
    with pytest.raises(DataError, match=r"sft\.jsonl: objective dpo needs preference pairs, columns \['prompt', "
                                        r"'chosen', 'rejected'\].*the data has \['completion', 'prompt'\]"):
        load_preference_pairs(sft, default_tokenizer, DataConfig())
    csv = tmp_path / "d.csv"
    csv.write_text("prompt,chosen,rejected\nQ1,a,b\nQ2,,b\n")
    with pytest.raises(DataError, match=r"d\.csv: record 1: field 'chosen' is missing"):
        load_preference_pairs(str(csv), default_tokenizer, DataConfig())
    empty = tmp_path / "e.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="the dataset is empty"):
        load_preference_pairs(str(empty), default_tokenizer, DataConfig())
