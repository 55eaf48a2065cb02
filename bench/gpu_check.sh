#!/usr/bin/env bash
# The GPU check, one command (under 8 minutes on one H200): bf16 extraction through the Ray pipeline into the
# store vs the bare forward, our SAE step vs the dense autograd step at C = 8192 and 131072, and the SAE
# trainer's CUDA path (training, checkpoint round trip, bit-identical resume). Each figure is printed beside
# the H200 reference figure in bench/gpu_check.py (H200_REFERENCE) with their ratio. See bench/gpu_check.py for what each part measures.
#
#   bash bench/gpu_check.sh                     # on the GPU machine, after the two wheel installs (--plan)
#   bash bench/gpu_check.sh --cpu-smoke         # the same code paths at tiny sizes on CPU (CI, dry runs)
#   bash bench/gpu_check.sh --plan              # the exact `device` tool calls to make
#   bash bench/gpu_check.sh --parts sae_train   # only some parts (extract,sae_speed,sae_train)
#   other options (--images N, --batch N, --train-steps N, --lancedb-shim auto|force|off, --keep) go through.
#
# Writes summary.json, summary.txt, preflight.json and one log per part to $OUT if set, else to a temp dir.
# Exit status: 0 when every part passed, 1 when one failed (the others still ran), 2 on a usage error.
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2

if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"   # this checkout's venv (not on the GPU)
else PY=python3; fi

MODE=gpu; PARTS="extract,sae_speed,sae_train"; KEEP=0; SKIP_PRE=0; PASS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-smoke) MODE=cpu-smoke ;;
    --plan) exec "$PY" bench/gpu_check.py --plan ;;
    --parts) PARTS=${2:?--parts needs a value}; shift ;;
    --parts=*) PARTS=${1#--parts=} ;;
    --keep) KEEP=1 ;;
    --skip-preflight) SKIP_PRE=1 ;;
    --images|--batch|--train-steps|--lancedb-shim|--fail-part) PASS+=("$1" "${2:?$1 needs a value}"); shift ;;
    --images=*|--batch=*|--train-steps=*|--lancedb-shim=*|--fail-part=*) PASS+=("$1") ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
SMOKE=(); [ "$MODE" = cpu-smoke ] && SMOKE=(--cpu-smoke)

# Timeouts per step (seconds), from TIMEOUTS in gpu_check.py; on the GPU their sum stays under 8 minutes.
eval "$("$PY" bench/gpu_check.py --timeouts ${SMOKE[@]+"${SMOKE[@]}"})" || exit 2

# The packed Ray/Lance wheels (see bench/gpu_check.py) live in /tmp/site; the repo root makes spg_dist importable for the driver
# and, through the inherited environment, for the Ray workers it starts.
if [ -d /tmp/site ]; then export PYTHONPATH="$ROOT:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
else export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"; fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TQDM_DISABLE=1 RAY_USAGE_STATS_ENABLED=0 \
  RAY_ENABLE_UV_RUN_RUNTIME_ENV=0 TOKENIZERS_PARALLELISM=false

OUTDIR=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_out.XXXXXX")}
mkdir -p "$OUTDIR"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_work.XXXXXX")
cleanup() { [ "$KEEP" = 1 ] && echo "work folder kept: $WORK" || rm -rf "$WORK"; }
trap cleanup EXIT

if command -v timeout >/dev/null 2>&1; then
  limit() { local t=$1; shift; timeout -k 15 "$t" "$@"; }
else
  echo "gpu_check.sh: no \`timeout\` here: parts run without their time limits" >&2
  limit() { shift; "$@"; }
fi

echo "== gpu_check ($MODE) in $ROOT with $PY; results -> $OUTDIR"
if [ "$SKIP_PRE" = 0 ]; then
  limit "$T_PRE" "$PY" bench/gpu_check.py --preflight --work "$WORK" ${SMOKE[@]+"${SMOKE[@]}"} 2>&1 \
    | tee "$OUTDIR/preflight.log"
  [ -f "$WORK/preflight.json" ] && cp "$WORK/preflight.json" "$OUTDIR/preflight.json"
fi

for part in ${PARTS//,/ }; do
  case "$part" in
    extract) t=$T_EXTRACT ;; sae_speed) t=$T_SAE_SPEED ;; sae_train) t=$T_SAE_TRAIN ;;
    *) echo "gpu_check.sh: unknown part $part (extract, sae_speed, sae_train)" >&2; exit 2 ;;
  esac
  echo "== $part (limit ${t} s)"
  start=$SECONDS
  limit "$t" "$PY" bench/gpu_check.py --part "$part" --work "$WORK" ${SMOKE[@]+"${SMOKE[@]}"} ${PASS[@]+"${PASS[@]}"} \
    >"$OUTDIR/$part.log" 2>&1
  rc=$?
  echo "== $part: exit $rc after $((SECONDS - start)) s (log: $OUTDIR/$part.log)"
  if [ "$rc" != 0 ]; then
    [ "$rc" = 124 ] || [ "$rc" = 137 ] && echo "   (killed by its ${t} s limit)"
    tail -n 25 "$OUTDIR/$part.log" | sed 's/^/   | /'
  fi
done

"$PY" bench/gpu_check.py --summarize --parts "$PARTS" --work "$WORK" --out "$OUTDIR" ${SMOKE[@]+"${SMOKE[@]}"}
rc=$?
exit "$rc"
