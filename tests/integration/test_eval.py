"""deltatune eval on tiny models: outputs, report numbers, base and tuned, seq2seq, bad input."""

import copy
import json
from pathlib import Path

import pytest
import torch

import deltatune as dt
from deltatune.cli import main
from deltatune.data import DataError
from deltatune.evaluate import EvalConfig, run_eval
from deltatune.train import load_config, train
from tiny_models import tiny_chat_model_dir, tiny_t5_dir, word_meaning_data

DIALOGUES = Path(dt.__file__).parent / "datasets" / "dialogues" / "dialogues.jsonl"


@pytest.fixture
def trained(tmp_path, default_tokenizer):
    model = tiny_chat_model_dir(tmp_path / "model", default_tokenizer)
    data = word_meaning_data(tmp_path / "data.jsonl", 24)
    run = tmp_path / "run"
    train(load_config(None, {"model": str(model), "data.path": str(data), "output_dir": str(run), "max_steps": 4,
                             "lr": 1e-2, "lora.r": 4, "batch_size": 4}), log=lambda *_: None)
    return model, data, run


def test_eval_writes_outputs_and_the_report_holds_the_metrics(tmp_path, trained):
    model, data, run = trained
    out = tmp_path / "eval"
    results = run_eval(EvalConfig(adapters=[str(run)], data=str(data), model=str(model), output_dir=str(out),
                                  max_new_tokens=4, limit=6), log=lambda *_: None)
    assert set(results) == {"base", "run"}  # the base and the tuned model, on the same inputs
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == results
    report = (out / "report.md").read_text()
    for model_name, scores in saved.items():
        assert model_name in report
        for value in scores.values():
            assert f"{value:.4f}" in report
    assert (out / "metrics.png").stat().st_size > 0 and (out / "loss.png").is_file()  # curve copied from the run
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and {r["model"] for r in rows} == {"base", "run"}
    assert set(rows[0]) == {"id", "model", "prompt", "prediction", "reference"}
    assert {"rouge1", "bleu", "chrf", "exact_match", "token_f1", "perplexity"} <= set(saved["base"])


def _choice_log_likelihoods(model, tokenizer, prompt, choices):
    """Sum of log p(choice tokens | prompt) per choice, from one plain forward pass each (the test's own count)."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    totals = []
    for choice in choices:
        cont = tokenizer(" " + choice, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([prompt_ids + cont])).logits[0].float(), dim=-1)
        totals.append(sum(logp[len(prompt_ids) - 1 + i, t].item() for i, t in enumerate(cont)))
    return totals


def test_choice_accuracy_by_log_likelihood(tmp_path, trained):
    model, _, run = trained
    # Forced records: each longer choice repeats the shorter one and adds tokens, so its log-likelihood
    # is the shorter one's plus negative terms: any model picks the shortest. Three answers name it, one
    # does not, so these four contribute exactly 3 right answers whatever the weights are.
    forced = ["meaning", "meaning meaning", "meaning meaning meaning"]
    records = [{"prompt": f"Word {i}:", "completion": " meaning", "choices": forced, "answer": answer}
               for i, answer in enumerate([0, 0, 0, 2])]
    # Free records: the model's choice is found by the test's own computation below.
    records += [{"prompt": f"Word {i}:", "completion": f" meaning {i % 5}",
                 "choices": [f"meaning {j}" for j in range(5)], "answer": i % 5} for i in range(5)]
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    results = run_eval(EvalConfig(adapters=[str(run / "adapter")], data=str(data), model=str(model),
                                  output_dir=str(tmp_path / "mc"), max_new_tokens=2, metrics=["exact_match"]),
                       log=lambda *_: None)
    base, tokenizer = dt.load_model(str(model))
    tuned = dt.load_adapter(copy.deepcopy(base), run / "adapter")
    for name, net in (("base", base.eval()), ("run", tuned.eval())):  # "run": the adapter's run folder
        picks = []
        for r in records:
            totals = _choice_log_likelihoods(net, tokenizer, r["prompt"], r["choices"])
            picks.append(max(range(len(totals)), key=totals.__getitem__))
        assert picks[:4] == [0, 0, 0, 0], picks  # the forced records really are forced
        right = sum(p == r["answer"] for p, r in zip(picks, records))
        assert results[name]["choice_accuracy"] == right / len(records), (name, picks)


def test_seq2seq_summaries_on_a_tiny_t5(tmp_path, default_tokenizer):
    model = tiny_t5_dir(tmp_path / "t5", default_tokenizer)
    run = tmp_path / "t5run"
    train(load_config(None, {"model": str(model), "data.path": str(DIALOGUES), "output_dir": str(run),
                             "max_steps": 3, "lr": 1e-2, "lora.r": 4, "lora.target_modules": ["q", "v"],
                             "batch_size": 4}), log=lambda *_: None)
    assert main(["eval", "--adapter", str(run), "--data", str(DIALOGUES), "--model", str(model), "--limit", "4",
                 "--max-new-tokens", "6", "--output-dir", str(tmp_path / "out")]) == 0
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert set(saved) == {"base", "t5run"} and "rougeLsum" in saved["t5run"]


def test_bad_input(tmp_path, trained, default_tokenizer):
    model, data, run = trained
    text_only = tmp_path / "text.jsonl"
    text_only.write_text(json.dumps({"text": "no reference here"}) + "\n")
    with pytest.raises(DataError, match="evaluation needs a reference"):
        run_eval(EvalConfig(data=str(text_only), model=str(model), output_dir=str(tmp_path / "o")))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="empty|could not be read"):
        run_eval(EvalConfig(data=str(empty), model=str(model), output_dir=str(tmp_path / "o")))
    other = tiny_t5_dir(tmp_path / "other", default_tokenizer)  # an adapter made for a Llama, a T5 base
    with pytest.raises(DataError, match="does not fit this base model"):
        run_eval(EvalConfig(adapters=[str(run)], data=str(data), model=str(other), output_dir=str(tmp_path / "o")))
    with pytest.raises(FileNotFoundError, match="holds no adapter"):
        run_eval(EvalConfig(adapters=[str(tmp_path)], data=str(data), model=str(model), output_dir=str(tmp_path / "o")))


def test_eval_compares_adapters_of_different_methods(tmp_path, trained):
    """LoRA, (IA)³ and prompt tuning side by side in one eval: each is switched in on the same model."""
    model, data, lora_run = trained
    runs = [str(lora_run)]
    for method, options in (("ia3", {}), ("prompt_tuning", {"num_virtual_tokens": 4})):
        out = tmp_path / method
        train(load_config(None, {"model": str(model), "data.path": str(data), "output_dir": str(out), "max_steps": 3,
                                 "batch_size": 4, "method": method, "adapter": options}), log=lambda *_: None)
        runs.append(str(out))
    results = run_eval(EvalConfig(adapters=runs, data=str(data), model=str(model), output_dir=str(tmp_path / "eval"),
                                  max_new_tokens=4, limit=6), log=lambda *_: None)
    assert set(results) == {"base", "run", "ia3", "prompt_tuning"}
    predictions = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    by_model = {}
    for row in predictions:
        by_model.setdefault(row["model"], []).append(row["prediction"])
    assert all(len(v) == 6 for v in by_model.values())
    # each adapter was really in place for its turn (the tiny model's greedy text barely differs)
    perplexities = [results[m]["perplexity"] for m in ("base", "run", "ia3", "prompt_tuning")]
    assert len(set(perplexities)) == 4


def test_eval_ranks_scores_each_cut_of_a_dylora_adapter(tmp_path, default_tokenizer):
    model = tiny_chat_model_dir(tmp_path / "model", default_tokenizer)
    data = word_meaning_data(tmp_path / "data.jsonl", 24)
    run = tmp_path / "dy"
    train(load_config(None, {"model": str(model), "data.path": str(data), "output_dir": str(run), "max_steps": 4,
                             "lr": 1e-2, "method": "dylora", "lora.r": 4, "batch_size": 4}), log=lambda *_: None)
    out = tmp_path / "eval"
    assert main(["eval", "--adapter", str(run), "--data", str(data), "--model", str(model), "--ranks", "1,2,4",
                 "--output-dir", str(out), "--max-new-tokens", "4", "--limit", "6"]) == 0
    results = json.loads((out / "metrics.json").read_text())
    assert list(results) == ["base", "dy@r1", "dy@r2", "dy@r4"]
    # each cut is its own model: the perplexities of the references differ between ranks
    assert len({round(results[k]["perplexity"], 6) for k in results}) == 4
    report = (out / "report.md").read_text()
    assert "## Score against rank" in report and "| dy | 2 |" in report
    assert (out / "ranks.png").stat().st_size > 0
    # the rank-2 row is what the adapter exported at rank 2 scores as a plain LoRA adapter
    assert main(["export", "--adapter", str(run / "adapter"), "--rank", "2", "--out", str(tmp_path / "r2")]) == 0
    alone = run_eval(EvalConfig(adapters=[str(tmp_path / "r2")], data=str(data), model=str(model),
                                output_dir=str(tmp_path / "eval2"), max_new_tokens=4, limit=6), log=lambda *_: None)
    assert alone["r2"]["perplexity"] == pytest.approx(results["dy@r2"]["perplexity"], rel=1e-5)
    with pytest.raises(DataError, match="--ranks"):
        run_eval(EvalConfig(adapters=[str(run)], data=str(data), model=str(model), ranks=[8],
                            output_dir=str(tmp_path / "bad")), log=lambda *_: None)
