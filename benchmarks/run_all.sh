#!/usr/bin/env bash
# Full benchmark run behind benchmarks/RESULTS.md (about 15 minutes on 2 cores, 1 thread each).
#   PY:          the project's interpreter (default .venv/bin/python)
#   BACKPACK_PY: an interpreter with backpack-for-pytorch installed (see RESULTS.md, "BackPACK setup");
#                without it bench_backpack.py still runs and says BackPACK was skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
BACKPACK_PY=${BACKPACK_PY:-/tmp/venv-backpack/bin/python}
[ -x "$BACKPACK_PY" ] || BACKPACK_PY=$PY
OUT=benchmarks/results
mkdir -p "$OUT"
export PYTHONWARNINGS=ignore

run() {  # output label, interpreter, module, args...
    local label=$1 py=$2 module=$3
    shift 3
    echo "== $label: $py -m benchmarks.$module $*" >&2
    local start=$SECONDS
    "$py" -m "benchmarks.$module" "$@" > "$OUT/$label.md" 2> "$OUT/$label.stderr"
    [ -s "$OUT/$label.stderr" ] || rm -f "$OUT/$label.stderr"
    echo "   $((SECONDS - start)) s" >&2
}

library_sum() { find lightning_flatness -name '*.py' | sort | xargs md5sum | md5sum | cut -c1-12; }
BEFORE=$(library_sum)
echo "library checksum $BEFORE" >&2

run bench_accuracy "$PY" bench_accuracy --json "$OUT/accuracy.json" --plot benchmarks/accuracy.png
run bench_backpack "$BACKPACK_PY" bench_backpack --json "$OUT/backpack.json"
run bench_backpack_warm "$BACKPACK_PY" bench_backpack_warm --json "$OUT/backpack_warm.json"
run bench_callback "$PY" bench_callback --json "$OUT/callback.json"
run bench_scaling "$PY" bench_scaling --json "$OUT/scaling.json" --plot benchmarks/scaling.png
run bench_accuracy_fd_study "$PY" bench_accuracy --fd-study --json "$OUT/fd_study.json"

AFTER=$(library_sum)
if [ "$BEFORE" != "$AFTER" ]; then
    echo "WARNING: lightning_flatness changed during the run ($BEFORE -> $AFTER); rerun for consistent numbers" >&2
fi
