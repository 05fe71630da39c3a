"""What a run writes besides checkpoints: the output folder rules, metrics.jsonl, the loss curve."""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..files import write_atomically, write_text_atomically
from .config import ConfigError, TrainConfig


def prepare_output_dir(cfg: TrainConfig, is_main: bool, name_from_main=None, log=print) -> Path:
    """The run folder. A non-empty folder is refused unless resuming or overwriting; overwriting
    moves the earlier run aside whole (saying where) before anything is written, so neither a
    resume nor a reader can take its checkpoints, adapter or metrics for the new run's."""
    if cfg.output_dir:
        folder = Path(cfg.output_dir)
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        folder = Path("runs") / f"train-{stamp}"
        if name_from_main is not None:
            folder = Path(name_from_main(str(folder)))
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"output_dir {folder} exists and is not a folder")
    occupied = folder.is_dir() and any(folder.iterdir())
    if occupied and not (cfg.resume or cfg.overwrite):
        raise ConfigError(f"output_dir {folder} is not empty; pass --resume to continue its run or --overwrite "
                          "to write into it anyway")
    if cfg.resume and not folder.is_dir():
        raise ConfigError(f"--resume: {folder} does not exist, so there is nothing to resume")
    if is_main:
        if occupied and cfg.overwrite:
            aside = _free_name(folder.with_name(f"{folder.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"))
            folder.rename(aside)
            log(f"--overwrite: moved the earlier run in {folder} to {aside}")
        folder.mkdir(parents=True, exist_ok=True)
    return folder


def _free_name(path: Path) -> Path:
    """``path``, or ``path-2``, ``path-3``... whichever does not exist yet."""
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate


class MetricsLog:
    """Appends one JSON object per logged step; on resume, later lines of the old run are dropped.

    When TensorBoard is installed, the same numbers also go to ``<output_dir>/tensorboard``.
    """

    def __init__(self, path: Path, active: bool, truncate_after: int = 0):
        self.path = path
        self.active = active
        self.board = None
        if active and path.is_file():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= truncate_after]
            write_text_atomically(path, "".join(line + "\n" for line in kept))
        if active:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                SummaryWriter = None
            if SummaryWriter is not None:
                self.board = SummaryWriter(str(path.parent / "tensorboard"), purge_step=truncate_after + 1)

    def write(self, record: dict) -> None:
        if not self.active:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.board is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.board.add_scalar(key, value, record["step"])
            self.board.flush()

    def close(self) -> None:
        if self.board is not None:
            self.board.close()


def write_loss_curve(metrics: Path, png: Path) -> None:
    """Train (and validation) loss against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] if metrics.is_file() else []
    fig, ax = plt.subplots(figsize=(6, 4))
    trained = [r for r in rows if "loss" in r]
    ax.plot([r["step"] for r in trained], [r["loss"] for r in trained], alpha=0.7, label="train loss (each step)")
    evals = [r for r in rows if "eval_loss" in r]
    if evals:
        # markers show where validation loss was measured; the line between them is not data
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o--", markersize=5,
                label=f"validation loss ({len(evals)} evaluations)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    write_atomically(png, lambda p: fig.savefig(p, format="png"))
    plt.close(fig)
