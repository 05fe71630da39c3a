"""``deltatune compare`` on a tiny model: one process per method, one table, JSON and plot."""

import json

import pytest

from deltatune.cli import main
from tiny_models import tiny_chat_model_dir, word_meaning_data


def test_compare_two_methods(tmp_path, default_tokenizer):
    model = tiny_chat_model_dir(tmp_path / "model", default_tokenizer)
    data = word_meaning_data(tmp_path / "data.jsonl", 24)
    out = tmp_path / "cmp"
    code = main(["compare", "--methods", "ia3,bitfit,lora", "--max-steps", "2", "--model", str(model),
                 "--data", str(data), "--output-dir", str(out), "--batch-size", "4"])
    assert code == 1  # bitfit fails on a model without biases, and says so in its row
    rows = json.loads((out / "compare.json").read_text())
    assert [r["method"] for r in rows] == ["ia3", "bitfit", "lora"]
    assert "no biases" in rows[1]["error"]
    assert rows[1]["reason"].startswith("SelectiveConfig: ")  # the run's own message, without the CLI's prefix
    for row in (rows[0], rows[2]):
        assert row["trainable_parameters"] > 0 and row["adapter_bytes"] > 0 and row["peak_memory_mib"] > 0
        # the row carries its run's own numbers (not merely something that is not None)
        summary = json.loads((out / row["method"] / "summary.json").read_text())
        assert row["validation_loss_before"] == summary["initial_validation_loss"]
        assert row["validation_loss_after"] == summary["final_validation_loss"]
        assert row["exact_match"] == summary["evaluation"]["default"]["exact_match"]
        assert isinstance(row["exact_match"], float)
        assert (out / row["method"] / "adapter" / "adapter_config.json").is_file()
    assert rows[0]["trainable_parameters"] < rows[2]["trainable_parameters"]  # (IA)³ is the smaller delta
    table = (out / "compare.md").read_text()
    assert all(f"| {m} |" in table for m in ("ia3", "bitfit", "lora"))
    assert (out / "compare.png").stat().st_size > 0


def test_compare_passes_its_settings_to_each_run(tmp_path):
    from deltatune.cli.compare import CompareConfig, _train_command

    cmd = _train_command(CompareConfig(max_steps=60, eval_steps=20, lr=1e-3), "lora", tmp_path / "lora")
    assert cmd[cmd.index("--eval-steps") + 1] == "20"
    assert cmd[cmd.index("--max-steps") + 1] == "60" and cmd[cmd.index("--lr") + 1] == "0.001"
    # by default the passes at step 0 and the end, the two the table reads, whatever they cost
    cmd = _train_command(CompareConfig(max_steps=40), "lora", tmp_path / "lora")
    assert cmd[cmd.index("--eval-steps") + 1] == "40"
    # a method's own settings reach its runs only
    options = CompareConfig(method_options={"trainable_tokens": {"token_indices": [1, 2]}})
    cmd = _train_command(options, "trainable_tokens", tmp_path / "tt")
    assert json.loads(cmd[cmd.index("--adapter") + 1]) == {"token_indices": [1, 2]}
    assert "--adapter" not in _train_command(options, "lora", tmp_path / "lora")
    # a labelled variant runs its recipe with its own settings, in a folder (and a row) of its own
    options = CompareConfig(method_options={"lora@eva": {"init_lora_weights": "eva"}})
    cmd = _train_command(options, "lora@eva", tmp_path / "lora@eva")
    assert cmd[cmd.index("--method") + 1] == "lora" and cmd[cmd.index("--output-dir") + 1].endswith("lora@eva")
    assert json.loads(cmd[cmd.index("--adapter") + 1]) == {"init_lora_weights": "eva"}


def test_compare_chooses_each_rate_on_validation_and_scores_only_that_one_on_test(tmp_path, default_tokenizer):
    model = tiny_chat_model_dir(tmp_path / "model", default_tokenizer)
    data = word_meaning_data(tmp_path / "data.jsonl", 24)
    test = word_meaning_data(tmp_path / "test.jsonl", 8)
    out = tmp_path / "cmp"
    args = ["compare", "--methods", "ia3", "--max-steps", "2", "--model", str(model), "--data", str(data),
            "--test-data", str(test), "--output-dir", str(out), "--batch-size", "4", "--lr-search", "4",
            "--lr-search-tries", "3"]
    assert main(args) == 0
    [row] = json.loads((out / "compare.json").read_text())
    tried = sorted(p for p in (out / "ia3").iterdir() if p.is_dir())
    assert 2 <= len(tried) <= 3 and len(row["validation_loss_by_lr"]) == len(tried)
    losses = {}
    for run in tried:  # every rate trained without a test evaluation; the row names the best
        summary = json.loads((run / "summary.json").read_text())
        assert "evaluation" not in summary
        losses[run.name.removeprefix("lr-")] = summary["final_validation_loss"]
    assert row["validation_loss_by_lr"] == losses
    best = min(losses, key=losses.get)
    assert f"{row['lr']:g}" == best and row["validation_loss_after"] == losses[best]
    assert row["evaluation_split"] == "test"
    metrics = json.loads((out / "ia3" / f"lr-{best}" / "eval" / "metrics.json").read_text())
    [tuned] = [scores for name, scores in metrics.items() if name != "base"]
    assert row["exact_match"] == tuned["exact_match"] and row["base_exact_match"] == metrics["base"]["exact_match"]
    assert [p.parent.name for p in (out / "ia3").glob("lr-*/eval")] == [f"lr-{best}"]  # only the chosen one
    assert "lr (chosen on validation)" in (out / "compare.md").read_text()
    # a second call finds the runs done and trains nothing again, nor scores the chosen adapter again
    stamps = {run: (run / "summary.json").stat().st_mtime_ns for run in tried}
    scored = (out / "ia3" / f"lr-{best}" / "eval" / "metrics.json").stat().st_mtime_ns
    assert main(args) == 0
    assert {run: (run / "summary.json").stat().st_mtime_ns for run in tried} == stamps
    assert (out / "ia3" / f"lr-{best}" / "eval" / "metrics.json").stat().st_mtime_ns == scored
    assert json.loads((out / "compare.json").read_text())[0]["lr"] == row["lr"]


def test_lr_search_and_a_fixed_lr_exclude_each_other(tmp_path):
    from deltatune.cli.compare import CompareConfig, run_compare

    with pytest.raises(ValueError, match="exclude each other"):
        run_compare(CompareConfig(methods=["lora"], lr=1e-3, lr_search=4.0, output_dir=str(tmp_path)))


def test_method_groups_name_every_runnable_recipe_once():
    from deltatune.cli.compare import DEFAULT_METHODS, NEEDS_OPTIONS, method_group
    from deltatune.train.methods import RECIPES

    assert method_group("classic") == DEFAULT_METHODS and method_group("ia3") == ["ia3"]
    assert sorted(method_group("classic") + method_group("catalogue")) == sorted(method_group("all"))
    assert set(method_group("all")) == set(RECIPES) - set(NEEDS_OPTIONS)
    assert "oft" in method_group("catalogue") and "lora" not in method_group("catalogue")
    # a method that needs settings joins the groups once they are given
    assert "xlora" in method_group("catalogue", frozenset({"xlora"})) and "xlora" not in method_group("catalogue")


@pytest.mark.parametrize("options, words", [({"lora": 3}, "not a mapping"), ({"nope": {"r": 2}}, "nope")])
def test_method_options_are_checked_before_any_run(tmp_path, options, words):
    from deltatune.cli.compare import CompareConfig, run_compare
    from deltatune.train import ConfigError

    with pytest.raises(ConfigError, match=words):
        run_compare(CompareConfig(methods=["lora"], method_options=options, output_dir=str(tmp_path / "cmp")))
    assert not (tmp_path / "cmp").exists()


@pytest.mark.parametrize("methods, options, words", [
    (["lora@eva"], {}, r"'lora@eva' is a variant \(NAME@LABEL\); give its settings"),
    (["nope@x"], {"nope@x": {"r": 2}}, "nope@x"),
])
def test_variants_need_their_settings_and_a_known_recipe(tmp_path, methods, options, words):
    from deltatune.cli.compare import CompareConfig, run_compare
    from deltatune.train import ConfigError

    with pytest.raises(ConfigError, match=words):
        run_compare(CompareConfig(methods=methods, method_options=options, output_dir=str(tmp_path / "cmp")))
    assert not (tmp_path / "cmp").exists()
