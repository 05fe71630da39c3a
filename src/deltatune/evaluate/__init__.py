"""Evaluation: generate with the base model and with adapters, score, and report side by side."""

from .metrics import METRICS, compute
from .runner import EvalConfig, run_eval

__all__ = ["EvalConfig", "METRICS", "compute", "run_eval"]
