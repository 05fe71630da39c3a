"""Learning rates for the LoHa, LoKr and AdaLoRA recipes, chosen on validation data only.

Reads two `deltatune compare` runs of the default job, 60 steps each:
`benchmarks/compare-cpu-lr1e-3.json` (these three methods at 1e-3, `deltatune compare --methods
loha,lokr,adalora --lr 1e-3`) and `benchmarks/compare-cpu-lr4e-3.json` (an earlier comparison of
every method at its recipe's rate, 4e-3 for these three), and picks, per method, the rate with
the lower validation loss after training. Validation loss is measured on the validation split; the test split, on which the
comparison table reports, plays no part. Writes `benchmarks/lr-choice-cpu.json` and prints the table.

    python benchmarks/choose_lr.py
"""

from __future__ import annotations

import json
from pathlib import Path

from tables import lr_choice_table  # benchmarks/tables.py: the docs render the same table

HERE = Path(__file__).parent
RUNS = {1e-3: HERE / "compare-cpu-lr1e-3.json", 4e-3: HERE / "compare-cpu-lr4e-3.json"}
METHODS = ("loha", "lokr", "adalora")


def choose() -> list[dict]:
    losses: dict[str, dict[float, float]] = {m: {} for m in METHODS}
    for lr, path in RUNS.items():
        for row in json.loads(path.read_text()):
            if row["method"] in METHODS and "error" not in row:
                losses[row["method"]][lr] = row["validation_loss_after"]
    return [{"method": m, "validation_loss_after": {f"{lr:g}": loss for lr, loss in sorted(by_lr.items())},
             "chosen_lr": min(by_lr, key=by_lr.get)} for m, by_lr in losses.items()]


if __name__ == "__main__":
    rows = choose()
    (HERE / "lr-choice-cpu.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(lr_choice_table(rows))
