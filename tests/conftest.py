import json
import os
import sys
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run in its interpreter (set before any kernel module is imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).parent))

# Worst |logit difference| per PEFT parity case, printed at the end of the run.
PARITY_RESULTS: dict[str, float] = {}


@pytest.fixture
def parity_results() -> dict[str, float]:
    return PARITY_RESULTS


def pytest_terminal_summary(terminalreporter):
    if PARITY_RESULTS:
        terminalreporter.write_sep("-", "PEFT parity: worst |logit difference| per case")
        for case, diff in sorted(PARITY_RESULTS.items()):
            terminalreporter.write_line(f"{case:70s} {diff:.3e}")
        out = os.environ.get("DELTATUNE_PARITY_JSON")  # set by benchmarks/parity.py
        if out:
            Path(out).write_text(json.dumps(dict(sorted(PARITY_RESULTS.items())), indent=2) + "\n")


@pytest.fixture(scope="session")
def default_tokenizer():
    """The embedded default model's tokenizer (SmolLM2, with a chat template)."""
    from transformers import AutoTokenizer

    from deltatune.loading import default_model_dir

    tok = AutoTokenizer.from_pretrained(default_model_dir())
    tok.pad_token = tok.pad_token or tok.eos_token
    return tok
