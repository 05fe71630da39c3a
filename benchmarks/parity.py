"""The PEFT parity figures: the worst |logit difference| per case between the same adapter in
deltatune and in HF PEFT, both directions, as the parity tests measure them.

Runs `pytest tests/parity` (CPU, float32, tiny random models) and writes
`benchmarks/parity-cpu.json` ({case: worst difference}); prints the table the docs show.

    python benchmarks/parity.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent


def main() -> int:
    out = HERE / "parity-cpu.json"
    env = {**os.environ, "DELTATUNE_PARITY_JSON": str(out)}
    status = subprocess.run([sys.executable, "-m", "pytest", "-q", "tests/parity"], cwd=HERE.parent, env=env).returncode
    if status != 0:
        return status  # a failing parity test: no figures are written from it
    from tables import parity_table

    print(parity_table(json.loads(out.read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
