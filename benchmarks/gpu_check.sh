#!/usr/bin/env bash
# One GPU check of lightning_flatness, under 10 minutes on a machine with one or more NVIDIA GPUs.
#
#   bash benchmarks/gpu_check.sh            # writes benchmarks/results/gpu/ (commit it)
#
# Stages (each with its own timeout; a failure or a timeout is recorded in summary.md, never fatal):
#   1. pytest -m cuda        tests/test_cuda.py: the estimators on CUDA (float32 and float64) against CPU
#                            float64 brute-force Hessians; probes, generators, metric states and the solve on
#                            the model's device; the callback under 16-mixed and bf16-mixed training on one
#                            GPU giving the float32/float64 value of the trained weights.
#   2. ddp_nccl              benchmarks/gpu/ddp_nccl.py: Lightning DDP with NCCL on all visible GPUs; values
#                            identical on every rank and equal to one process (float64, 1e-9 relative).
#   3. fsdp_lightning        benchmarks/gpu/fsdp_lightning.py: Lightning FSDPStrategy with the callback; the
#                            failure, if any, is recorded (exception and traceback) in fsdp/fsdp.json.
#   4. fsdp2_sharded         benchmarks/gpu/fsdp2_sharded.py: lightning_flatness.sharded on fully_shard
#                            (FSDP2) modules with NCCL on all visible GPUs against the unsharded value.
#   5. cost                  benchmarks/gpu/bench_cost.py: one default measurement on a CIFAR-size ResNet-18
#                            and a small ViT, float32 vs float64, in units of one training step.
#
# Environment: PY (interpreter, default .venv/bin/python, else python3), GPU_CHECK_OUT (output folder,
# default benchmarks/results/gpu), GPU_CHECK_STAGES (space-separated subset of the stage names above).
# Without CUDA it says so and exits 0, writing nothing.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=$(command -v python3)
OUT=${GPU_CHECK_OUT:-benchmarks/results/gpu}
STAGES=${GPU_CHECK_STAGES:-"pytest_cuda ddp_nccl fsdp_lightning fsdp2_sharded cost"}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONWARNINGS=ignore

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA device here (torch.cuda.is_available() is False for $PY); nothing to check." \
         "Run it on a machine with NVIDIA GPUs. Exiting 0 without writing $OUT."
    exit 0
fi

mkdir -p "$OUT"
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")
SUMMARY="$OUT/summary.md"
{
    echo "# GPU check of lightning_flatness"
    echo
    echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    echo "- command: \`bash benchmarks/gpu_check.sh\` ($NGPU visible GPU(s))"
    echo "- $("$PY" -c "import torch, platform; print(f'python {platform.python_version()}, torch {torch.__version__}, '
        f'CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, NCCL '
        f'{\".\".join(map(str, torch.cuda.nccl.version()))}, GPU 0: {torch.cuda.get_device_name(0)}')")"
    echo
    echo '```'
    nvidia-smi 2>&1 || echo "nvidia-smi not found"
    echo '```'
    echo
    echo "| stage | status | seconds | log |"
    echo "|---|---|---|---|"
} > "$SUMMARY"

stage() {  # name, timeout in seconds, command...
    local name=$1 limit=$2
    shift 2
    case " $STAGES " in *" $name "*) ;; *) return 0 ;; esac
    echo "== $name (timeout ${limit}s): $*" >&2
    local start=$SECONDS status
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    case $rc in
        0) status="passed" ;;
        124|137) status="TIMED OUT after ${limit}s" ;;
        *) status="FAILED (exit $rc)" ;;
    esac
    echo "   $status, $((SECONDS - start)) s" >&2
    echo "| $name | $status | $((SECONDS - start)) | [$name.log]($name.log) |" >> "$SUMMARY"
}

stage pytest_cuda 150 "$PY" -m pytest -m cuda tests/test_cuda.py -q -p no:cacheprovider -n 0
stage ddp_nccl 90 "$PY" benchmarks/gpu/ddp_nccl.py --out "$OUT/ddp"
stage fsdp_lightning 90 "$PY" benchmarks/gpu/fsdp_lightning.py --out "$OUT/fsdp"
stage fsdp2_sharded 60 "$PY" benchmarks/gpu/fsdp2_sharded.py --out "$OUT/fsdp2"
stage cost 200 "$PY" benchmarks/gpu/bench_cost.py --json "$OUT/cost.json"
[ -f "$OUT/cost.log" ] && grep -A20 '^# Cost' "$OUT/cost.log" > "$OUT/cost.md"

{
    echo
    for f in "$OUT"/ddp/ddp.json "$OUT"/fsdp/fsdp.json "$OUT"/fsdp2/fsdp2.json; do
        [ -f "$f" ] || continue
        echo "## $(basename "$f")"; echo; echo '```json'; head -c 4000 "$f"; echo; echo '```'; echo
    done
    [ -f "$OUT/cost.md" ] && cat "$OUT/cost.md"
} >> "$SUMMARY"
rm -f "$OUT"/*/weights.pt
echo "gpu_check: wrote $SUMMARY" >&2
exit 0
