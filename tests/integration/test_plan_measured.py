"""``deltatune plan``'s per-rank peak against the peak of real ``deltatune train`` runs (two steps
each, in fresh processes with glibc returning freed blocks): three tiny models and the default
model, within 15%. Runs benchmarks/plan_check.py's cases without their timed runs."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _plan_check():
    spec = importlib.util.spec_from_file_location("plan_check", ROOT / "benchmarks" / "plan_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


CHECK = _plan_check()
CASES = [c for c in CHECK.CASES if c.model.startswith("tiny")] + \
    [c for c in CHECK.CASES if c.name == "default lora 1x256"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return CHECK.run_cases(CASES, tmp_path_factory.mktemp("plan-check"), with_speed=False)  # memory only


@pytest.mark.parametrize("index", range(len(CASES)), ids=[c.name for c in CASES])
def test_predicted_peak_is_within_15_percent_of_the_measured_one(results, index):
    result = results[index]
    assert abs(result["memory_error"]) <= CHECK.MEMORY_TOLERANCE, result
    # the breakdown adds up to the prediction, and the trainable count is the run's own
    assert sum(result["breakdown_mib"].values()) == pytest.approx(result["predicted_peak_mib"])
    assert result["predicted_trainable_parameters"] == result["trainable_parameters"]
