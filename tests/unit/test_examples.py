"""Every example config in examples/ parses into a TrainConfig."""

from pathlib import Path

import pytest

from deltatune.train import load_config

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_parses(path):
    from deltatune.train.methods import adapter_config

    cfg = load_config(str(path))
    config = adapter_config(cfg, "CAUSAL_LM", total_steps=60)  # the method and its fields are valid
    assert config.peft_type == {"lora": "LORA", "adalora": "ADALORA", "prompt_tuning": "PROMPT_TUNING"}[cfg.method]


def test_there_are_examples():
    assert {"cpu-default.yaml", "chat-sft.yaml", "qlora-7b.yaml", "flan-t5-summarization.yaml"} <= {
        p.name for p in EXAMPLES}
