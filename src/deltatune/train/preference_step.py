"""Preference tuning in the training loop (``--objective dpo|orpo``): data, reference, step, validation.

The loop (``loop.py``) runs a preference run as it runs SFT, asking a ``PreferenceRun`` for what
differs: the pairs instead of examples, the adapter(s), the loss module, each micro-batch, the
validation pass, checkpoint state and the final evaluation.

The reference (DPO's ``π_ref``) is the model the run starts from: the base with adapters disabled,
or with ``init_adapter`` the supervised adapter, loaded a second time beside the trained copy
("default") as a frozen adapter named "reference" on the same base, as TRL's reference-adapter
option does. No second copy of the base is made either way. Its log-probabilities are computed
once per pair before the first step (TRL's ``precompute_ref_log_probs``), not in every step:

- a step then runs one forward (chosen and rejected rows together) instead of two; the cache costs
  one forward over the training pairs once, so any run of more than one epoch saves forwards (the
  default jobs run one, where the two cost the same);
- the reference is scored in eval mode, so adapter dropout never makes it noisy;
- the cache is a function of the pairs alone (one entry per pair, computed in a fixed order of
  fixed batches), so the data order and its resumption do not touch it; checkpoints carry it, and
  a resumed run uses the very numbers the interrupted one did, whatever thread count or machine it
  resumes on (a forward pass's last bits can depend on them; bit-identical resume is tested).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..adapter_ops import add_adapter, get_state, set_adapter
from ..data.preference import PreparedPreferenceData, prepare_preference_data, load_preference_pairs
from ..evaluate.preference import (as_reference, batch_logps, can_share_prefix, pair_batch, pair_logps,
                                   preference_accuracy, preference_report)
from ..files import write_text_atomically
from ..io import load_adapter
from ..loss import TrainingLoss
from .config import ConfigError, TrainConfig
from .contexts import autocast
from .objectives import PairLogps, objective_loss
from .validation import eval_batch_size

# The shipped preference data: Velmar questions, the right order chosen and a wrong one rejected
DEFAULT_DATA = Path(__file__).resolve().parents[1] / "datasets" / "velmar_pairs"
# The default preference jobs' settings where a flag does not give them (LoRA; beta 0.1 and ORPO's
# lambda 0.1 as TRL's): chosen on the validation split of the shipped pairs by
# benchmarks/preference_job.py --sweep, see docs/training.md
DEFAULT_LR = {"dpo": 1e-3, "orpo": 2e-3}
DEFAULT_EPOCHS = 1.0


class PreferenceLoss(nn.Module):
    """``forward(batch) -> loss`` for one micro-batch of pairs (``pair_batch``'s rows plus
    ``reference_logps``, ``(pairs, 2)``); the metrics of the step's micro-batches add up until
    ``take_metrics``."""

    def __init__(self, model: nn.Module, cfg: TrainConfig):
        super().__init__()
        self.scorer = TrainingLoss(model)
        # the beginning all rows of a micro-batch share (a chat template's system prompt) runs once, the
        # rows continuing from its key/value cache; gradient checkpointing and compiled blocks run
        # without a cache in training, so they take whole rows
        self.share_prefix = (can_share_prefix(self.scorer) and not cfg.gradient_checkpointing
                             and not cfg.compile)
        self.objective, self.beta, self.label_smoothing, self.orpo_lambda = (
            cfg.objective, cfg.beta, cfg.label_smoothing, cfg.orpo_lambda)
        self._sums: dict[str, float] = {}
        self._pairs = 0

    def describe(self) -> str:
        """One line for the run log."""
        path = self.scorer.describe().removeprefix("loss: ")
        shared = "; the rows' shared beginning runs once per micro-batch" if self.share_prefix else ""
        return f"loss: {self.objective}, completion log-probabilities from {path}{shared}"

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        sums, counts = batch_logps(self.scorer, batch)
        result = objective_loss(self.objective, PairLogps.from_rows(sums, counts), batch.get("reference_logps"),
                                self.beta, self.label_smoothing, self.orpo_lambda)
        pairs = len(sums) // 2
        for key, value in result.metrics().items():
            self._sums[key] = self._sums.get(key, 0.0) + value * pairs
        self._pairs += pairs
        return result.loss

    def take_metrics(self) -> dict[str, float]:
        """Pair-weighted means since the last call (the step's micro-batches), then start again."""
        out = {k: v / self._pairs for k, v in self._sums.items()} if self._pairs else {}
        self._sums, self._pairs = {}, 0
        return out


class PreferenceRun:
    """What a dpo or orpo run does differently from SFT; the loop calls it at each such point."""

    def __init__(self, cfg: TrainConfig, world: int, log=print):
        if world > 1:
            raise ConfigError(f"objective {cfg.objective}: preference tuning runs in one process for now, "
                              "not under torchrun")
        self.cfg, self.log = cfg, log
        self.reference_name: Optional[str] = "reference" if cfg.init_adapter else None
        self.loss: Optional[PreferenceLoss] = None
        self.train_pairs: list = []
        self.val_pairs: list = []
        self.cache: dict[str, torch.Tensor] = {}  # split -> (pairs, 2) reference log-probability sums
        self.eval_metrics: dict[str, float] = {}
        self.pad_id, self.device = 0, torch.device("cpu")  # set by start
        if not cfg.lr and cfg.method == "lora":
            cfg.lr = DEFAULT_LR[cfg.objective]
        if not cfg.epochs and not cfg.max_steps:
            cfg.epochs = DEFAULT_EPOCHS

    @staticmethod
    def default_data() -> Path:
        """The folder of the shipped preference data (train, validation, test)."""
        return DEFAULT_DATA

    def prepare(self, tokenizer, seq2seq: bool) -> PreparedPreferenceData:
        """The tokenized pairs of the run's data."""
        if seq2seq:
            raise ConfigError(f"objective {self.cfg.objective}: preference tuning trains causal language models; "
                              "this model is an encoder-decoder")
        return prepare_preference_data(self.cfg.data, tokenizer, self.cfg.seed, self.cfg.objective)

    def attach(self, model, adapter_cfg):
        """Add the trained adapter "default": a new one of ``adapter_cfg``, or ``init_adapter``
        loaded twice (trained, and frozen as "reference"). Returns the live config."""
        if not self.cfg.init_adapter:
            add_adapter(model, adapter_cfg, "default")
        else:
            try:
                load_adapter(model, self.cfg.init_adapter, "default", trainable=True)
                load_adapter(model, self.cfg.init_adapter, self.reference_name, trainable=False)
            except (FileNotFoundError, ValueError) as err:
                raise ConfigError(f"init_adapter: {err}") from None
            set_adapter(model, "default")
        return get_state(model).configs["default"]

    def loss_module(self, model) -> PreferenceLoss:
        """The module the loop calls for a micro-batch's loss (in place of ``TrainingLoss``)."""
        self.loss = PreferenceLoss(model, self.cfg)
        return self.loss

    def _pairs_per_pass(self) -> int:
        return max(1, eval_batch_size(self.cfg) // 2)  # a pair is two rows

    def _reference(self, model, pairs, pad_id: int, device) -> torch.Tensor:
        if not pairs:
            return torch.zeros(0, 2, dtype=torch.float64)
        with as_reference(model, self.reference_name), autocast(self.cfg.precision, device):
            return pair_logps(model, pairs, self._pairs_per_pass(), pad_id)[0]

    def start(self, model, train_pairs: list, val_pairs: list, pad_id: int, device, state: Optional[dict]) -> None:
        """The reference log-probabilities of every training and validation pair: from the
        checkpoint ``state`` when resuming, else computed now (DPO; ORPO has no reference)."""
        self.train_pairs, self.val_pairs, self.pad_id, self.device = train_pairs, val_pairs, pad_id, device
        if self.cfg.objective != "dpo":
            return
        if state is not None:
            if not isinstance(state, dict) or not {"train", "validation"} <= set(state):
                raise ConfigError("--resume: the checkpoint holds no reference log-probabilities (was it written "
                                  "by a run with another objective?)")
            self.cache = {k: state[k] for k in ("train", "validation")}
            if len(self.cache["train"]) != len(train_pairs) or len(self.cache["validation"]) != len(val_pairs):
                raise ConfigError("--resume: the checkpoint's reference log-probabilities are for other data "
                                  f"({len(self.cache['train'])} training pairs, this run has {len(train_pairs)})")
            self.log(f"reference: the log-probabilities of {len(train_pairs)} training and {len(val_pairs)} "
                     "validation pairs from the checkpoint")
            return
        self.cache = {"train": self._reference(model, train_pairs, pad_id, device),
                      "validation": self._reference(model, val_pairs, pad_id, device)}
        reference = f"adapter {self.cfg.init_adapter}" if self.cfg.init_adapter else "the base, adapters disabled"
        self.log(f"reference: {reference}; the log-probabilities of {len(train_pairs)} training and "
                 f"{len(val_pairs)} validation pairs computed")

    def state(self) -> dict:
        """What a checkpoint keeps: the reference log-probabilities."""
        return dict(self.cache)

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """The micro-batch of training pairs ``indices``, with their reference log-probabilities."""
        batch = pair_batch([self.train_pairs[i] for i in indices], self.pad_id, self.loss.share_prefix)
        if "train" in self.cache:
            batch["reference_logps"] = self.cache["train"][indices]
        return batch

    @torch.no_grad()
    def validate(self, model) -> Optional[float]:
        """The objective's loss over the validation pairs (all of them at once); its metrics go to
        ``eval_metrics``."""
        if not self.val_pairs:
            return None
        with autocast(self.cfg.precision, self.device):
            sums, counts = pair_logps(model, self.val_pairs, self._pairs_per_pass(), self.pad_id)
        policy = PairLogps(sums[:, 0], sums[:, 1], counts[:, 0], counts[:, 1])
        result = objective_loss(self.cfg.objective, policy, self.cache.get("validation"), self.cfg.beta,
                                self.cfg.label_smoothing, self.cfg.orpo_lambda)
        metrics = result.metrics()
        self.eval_metrics = {"eval_reward_accuracy": metrics["reward_accuracy"],
                             "eval_reward_margin": metrics["reward_margin"],
                             "eval_preference_accuracy": preference_accuracy(sums)}
        return result.loss.item()

    def final_eval(self, model, tokenizer, output_dir: Path, log) -> dict:
        """Held-out preference accuracy before (the reference) and after (the tuned model), and the
        reward accuracy, on the test file when the run has one, else on the validation pairs."""
        cfg = self.cfg
        pairs = load_preference_pairs(cfg.data.test_path, tokenizer, cfg.data, cfg.objective)[0] \
            if cfg.data.test_path else self.val_pairs
        with autocast(cfg.precision, self.device):
            after = pair_logps(model, pairs, self._pairs_per_pass(), self.pad_id)
            with as_reference(model, self.reference_name):
                before = pair_logps(model, pairs, self._pairs_per_pass(), self.pad_id)
        report = preference_report(before, after, cfg.objective, cfg.beta, cfg.orpo_lambda)
        report["reference"] = "adapter " + cfg.init_adapter if cfg.init_adapter else "base (adapters disabled)"
        rows = [{"chosen_before": b[0], "rejected_before": b[1], "chosen_after": a[0], "rejected_after": a[1]}
                for b, a in zip(before[0].tolist(), after[0].tolist())]
        (output_dir / "eval").mkdir(parents=True, exist_ok=True)
        write_text_atomically(output_dir / "eval" / "preference_pairs.jsonl",
                              "".join(json.dumps(r) + "\n" for r in rows))
        log(f"held-out preference accuracy ({report['pairs']} pairs, chosen more likely than rejected): "
            f"{report['preference_accuracy_before']:.3f} before -> {report['preference_accuracy_after']:.3f} after; "
            f"reward accuracy {report['reward_accuracy']:.3f}, margin {report['reward_margin']:.3f}")
        return report
