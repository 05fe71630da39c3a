"""``deltatune compare`` on a tiny model: one process per method, one table, JSON and plot."""

import json

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
