"""The time-to-quality benchmark, the defaults sweep and the saved-activation count as smoke
tests (tiny model, not timed), and the standard-library task they build."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tiny_models import tiny_chat_model_dir

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, default_tokenizer):
    return tiny_chat_model_dir(tmp_path_factory.mktemp("model"), default_tokenizer)


def test_the_docstring_task_keeps_test_modules_out_of_training(tmp_path):
    from quality_tasks import build_docstrings

    files = build_docstrings(tmp_path, n_train=120, n_validation=20, n_test=20)
    splits = {name: [json.loads(line) for line in path.read_text().splitlines()] for name, path in files.items()}
    assert {name: len(records) for name, records in splits.items()} == {"train": 120, "validation": 20, "test": 20}
    top = {name: {r["module"].split(".")[0] for r in records} for name, records in splits.items()}
    assert not top["test"] & top["train"] and not top["validation"] & top["train"]
    for record in splits["train"][:20]:
        assert record["prompt"].startswith("Summarize") and record["prompt"].rstrip().endswith("Summary:")
        assert record["completion"].startswith(" ") and record["completion"].endswith(".")
        assert record["completion"].strip() not in record["prompt"]  # the docstring is taken out of the code


def test_quality_benchmark_runs_all_three_and_scores_them(tmp_path, tiny_dir):
    out = tmp_path / "quality.json"
    subprocess.run([sys.executable, str(BENCHMARKS / "quality.py"), "--small", "--tasks", "docstrings", "--model",
                    str(tiny_dir), "--work", str(tmp_path / "work"), "--out", str(out)], check=True,
                   capture_output=True)
    [task] = json.loads(out.read_text())["tasks"]
    assert set(task["runs"]) == {"loop", "deltatune_loop_settings", "deltatune_defaults"}
    for run in task["runs"].values():
        assert 0 <= run["score"]["rougeL"] <= 1 and run["peak_memory_mib"] > 0 and 0 <= run["padding_share"] < 1
        assert run["score"]["validation_loss"] > 0  # the scorer's own loss on the validation split
        assert run["time_seconds"]["steps"] > 0 and run["wall_seconds"] >= run["time_seconds"]["total"]
    assert task["runs"]["loop"]["steps"] == task["runs"]["deltatune_loop_settings"]["steps"] == 2
    assert task["base_score"]["validation_loss"] > 0
    assert set(task["ratios"]) >= {"defaults_time_over_loop", "loop_settings_step_speedup"}
    low, high = task["ratios"]["defaults_score_minus_loop_ci95"]
    assert low <= task["ratios"]["defaults_score_minus_loop"] <= high
    # --rescore scores the recorded adapters again and keeps the recorded times
    times = {name: run["time_seconds"] for name, run in task["runs"].items()}
    subprocess.run([sys.executable, str(BENCHMARKS / "quality.py"), "--small", "--tasks", "docstrings", "--model",
                    str(tiny_dir), "--work", str(tmp_path / "work"), "--out", str(out), "--rescore"], check=True,
                   capture_output=True)
    [again] = json.loads(out.read_text())["tasks"]
    assert again["rescored"] and {name: run["time_seconds"] for name, run in again["runs"].items()} == times
    assert again["runs"]["loop"]["score"]["rougeL"] == task["runs"]["loop"]["score"]["rougeL"]  # greedy: the same


def test_paired_bootstrap_interval():
    from quality import paired_bootstrap

    same = [0.2, 0.9, 0.5, 1.0]
    assert paired_bootstrap(same, same) == (0.0, 0.0)
    assert paired_bootstrap([x + 0.1 for x in same], same) == pytest.approx((0.1, 0.1))
    ours, theirs = [1.0, 0.0, 1.0, 1.0, 0.5, 0.8] * 5, [0.9, 0.2, 1.0, 0.7, 0.5, 0.9] * 5
    low, high = paired_bootstrap(ours, theirs)
    mean = sum(a - b for a, b in zip(ours, theirs)) / len(ours)
    assert low < mean < high and high - low < 0.2


def test_sweep_writes_rows_and_a_plot(tmp_path, tiny_dir):
    out = tmp_path / "sweep.json"
    subprocess.run([sys.executable, str(BENCHMARKS / "sweep_defaults.py"), "--small", "--tasks", "docstrings",
                    "--model", str(tiny_dir), "--work", str(tmp_path / "work"), "--out", str(out)], check=True,
                   capture_output=True)
    [row] = json.loads(out.read_text())
    assert row["steps"] == 2 and row["validation_loss"] > 0 and row["setting"]["batch-size"] == 8 and row["task"] == "docstrings"
    assert out.with_suffix(".png").stat().st_size > 0


def test_the_scorers_validation_loss_does_not_depend_on_padding(tiny_dir):
    """A mean over completion tokens, weighted by their count: padded batches give what the rows
    give one by one."""
    import torch
    from quality_score import validation_loss
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(0)
    examples = []
    for prompt_len, completion_len in [(5, 3), (12, 2), (3, 7), (9, 4)]:
        ids = torch.randint(1, 100, (prompt_len + completion_len,), generator=generator).tolist()
        examples.append((ids, [-100] * prompt_len + ids[prompt_len:]))
    with torch.no_grad():  # one row at a time, no padding: scored tokens are the completion's
        losses = [model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss.item()
                  for ids, labels in examples]
    sums = [(loss * (len(ids) - p), len(ids) - p) for loss, (ids, _), p in zip(losses, examples, (5, 12, 3, 9))]
    by_hand = sum(total for total, _ in sums) / sum(count for _, count in sums)
    assert validation_loss(model, examples, pad=0, batch=4) == pytest.approx(by_hand, rel=1e-5)


def test_saved_activations_counts_less_with_cheap_recompute(tmp_path, tiny_dir):
    out = tmp_path / "saved.json"
    subprocess.run([sys.executable, str(BENCHMARKS / "saved_activations.py"), "--model", str(tiny_dir), "--rows", "2",
                    "--tokens", "24", "--repeats", "2", "--out", str(out)], check=True, capture_output=True)
    result = json.loads(out.read_text())
    kept, lean = result["runs"]["kept"], result["runs"]["cheap_recompute"]
    assert 0 < lean["saved_bytes"] < 0.85 * kept["saved_bytes"]
    assert result["saved_ratio"] == lean["saved_bytes"] / kept["saved_bytes"] and len(kept["seconds"]) == 2


def test_dylora_rank_benchmark_scores_every_cut_beside_a_lora_per_rank(tmp_path, tiny_dir):
    out = tmp_path / "ranks.json"
    subprocess.run([sys.executable, str(BENCHMARKS / "dylora_ranks.py"), "--small", "--ranks", "2,4", "--model",
                    str(tiny_dir), "--work", str(tmp_path / "work"), "--out", str(out)], check=True,
                   capture_output=True)
    report = json.loads(out.read_text())
    assert report["quantize"] == "nf4" and [row["rank"] for row in report["rows"]] == [2, 4]
    for row in report["rows"]:
        for who in ("dylora", "lora"):
            assert 0 <= row[who]["rougeL"] <= 1 and row[who]["perplexity"] > 1
    assert set(report["train_seconds"]) == {"dylora", "lora-r2", "lora-r4"}
    # the two cuts of the one DyLoRA adapter are different models
    assert report["rows"][0]["dylora"]["perplexity"] != report["rows"][1]["dylora"]["perplexity"]
