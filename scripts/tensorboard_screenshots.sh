#!/usr/bin/env bash
# Screenshots of TensorBoard for the docs (docs/_static/tensorboard/*.png), from a real run:
# trains examples/train_mnist1d_monitor.py (20 epochs, about a minute on one core), serves the run with
# TensorBoard on 127.0.0.1 only, and photographs the SCALARS, CUSTOM SCALARS, IMAGES and TEXT
# dashboards with headless Chromium (Debian: apt-get install -y chromium).
#
#   bash scripts/tensorboard_screenshots.sh              # uses .venv/bin/python
#   PYTHON=/path/to/python OUT=/tmp/shots bash scripts/tensorboard_screenshots.sh
set -euo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"
PYTHON="${PYTHON:-.venv/bin/python}"
OUT="${OUT:-docs/_static/tensorboard}"
EPOCHS="${EPOCHS:-20}"
CHROMIUM="${CHROMIUM:-$(command -v chromium || command -v chromium-browser || true)}"
[ -n "$CHROMIUM" ] || { echo "needs chromium (apt-get install -y chromium)" >&2; exit 1; }
work="$(mktemp -d)"
tb_pid=""
cleanup() { [ -n "$tb_pid" ] && kill "$tb_pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
mkdir -p "$OUT"

echo "== training (the worktree's lightning_flatness, $EPOCHS epochs) into $work/runs"
PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" examples/train_mnist1d_monitor.py \
    --max-epochs "$EPOCHS" --logdir "$work/runs" --no-progress-bar --seed 0 > "$work/train.log" 2>&1 \
    || { tail -30 "$work/train.log"; exit 1; }

port="$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
echo "== TensorBoard on 127.0.0.1:$port"
"$PYTHON" -m tensorboard.main --logdir "$work/runs" --host 127.0.0.1 --port "$port" \
    > "$work/tensorboard.log" 2>&1 &
tb_pid=$!
"$PYTHON" - "$port" <<'PY'
import sys, time, urllib.request
url = f"http://127.0.0.1:{sys.argv[1]}/data/plugins_listing"
for _ in range(120):
    try:
        if urllib.request.urlopen(url, timeout=2).status == 200:
            break
    except OSError:
        time.sleep(0.5)
else:
    sys.exit("TensorBoard did not start")
PY

shot() {  # name, URL fragment
    "$CHROMIUM" --headless --no-sandbox --disable-gpu --disable-background-networking --disable-component-update \
        --disable-sync --no-first-run --hide-scrollbars --window-size=1400,1000 --virtual-time-budget=15000 \
        --screenshot="$OUT/$1.png" "http://127.0.0.1:$port/$2" > "$work/chromium-$1.log" 2>&1
    echo "   $OUT/$1.png"
}
echo "== screenshots"
shot scalars "#scalars&tagFilter=%5Esharpness%2F(normalized%7Cnormalized_stderr%7Cmatrix_normalized%7Chessian_trace)%24&_smoothingWeight=0"
shot custom_scalars "#custom_scalars"
shot images "#images"
shot text "#text"
echo "== done"
