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

# pytest-xdist runs the suite in several worker processes (`-n`, set in pyproject.toml). Each
# worker takes an equal share of the cores for PyTorch's threads, as deltatune's processes under
# torchrun do: two workers each spinning two threads on two cores made every op wait for the
# other's. Processes the tests start inherit the count through OMP_NUM_THREADS.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):  # (imported here: after TRITON_INTERPRET is set)
    from deltatune.hardware import set_cpu_threads

    _threads = set_cpu_threads(processes_on_this_machine=int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    if _threads is not None:  # None: OMP_NUM_THREADS was given, and it stays
        os.environ["OMP_NUM_THREADS"] = str(_threads)

MAX_WORKERS = 4  # more workers multiply the models held in memory for little gain


def pytest_xdist_auto_num_workers(config) -> int:
    """``-n auto``: one worker per physical core, at most ``MAX_WORKERS``."""
    from deltatune.hardware import physical_cores

    return min(physical_cores(), MAX_WORKERS)


# Worst |logit difference| per PEFT parity case, printed at the end of the run. A test's figures
# travel in its report's user_properties, so they reach the summary from xdist's workers too.
PARITY_RESULTS: dict[str, float] = {}


@pytest.fixture
def parity_results(request) -> dict[str, float]:
    found: dict[str, float] = {}
    yield found
    request.node.user_properties.extend(("parity", (case, float(diff))) for case, diff in found.items())


def pytest_runtest_logreport(report):
    if report.when == "teardown":
        PARITY_RESULTS.update(dict(value for key, value in report.user_properties if key == "parity"))


def pytest_terminal_summary(terminalreporter):
    if PARITY_RESULTS and not os.environ.get("PYTEST_XDIST_WORKER"):  # the controller's summary only
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
