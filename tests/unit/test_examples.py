"""Every example config in examples/ parses into a TrainConfig."""

from pathlib import Path

import pytest

from deltatune.train import load_config

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_parses(path):
    cfg = load_config(str(path))
    assert cfg.method == "lora" and cfg.lora.r > 0


def test_there_are_examples():
    assert {"cpu-default.yaml", "chat-sft.yaml", "qlora-7b.yaml", "flan-t5-summarization.yaml"} <= {
        p.name for p in EXAMPLES}
