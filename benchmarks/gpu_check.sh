#!/usr/bin/env bash
# One GPU check of otcbench (≤ 8 minutes on one H100/H200), writing one JSON:
#   1. CUDA + bf16 training of RN50 and ViT-B-32, defenses none and otcclip (`bench train`)
#   2. `bench ot --device cuda` (Sinkhorn against POT)
#   3. the open_clip trainer ratio (benchmarks/openclip_trainer.py, RN50 on a 224 px world)
#   4. a 1-GPU NCCL torchrun of `otcbench train`
#
#   benchmarks/gpu_check.sh [OUT.json]            # default gpu_check.json; logs beside it
#   GPU_CHECK_DRY_RUN=1 benchmarks/gpu_check.sh   # every step on the CPU at toy sizes (tests/test_gpu_check.py)
#
# Without CUDA (and without the dry run) it writes {"skipped": true, ...} and exits 0; GPU_CHECK_REQUIRE=1 makes
# that exit 1. Each step has its own time limit; a failed step is recorded (rc, last log lines) and the
# script goes on, exiting 1 at the end if any step failed. PY (default python) runs otcbench.
set -uo pipefail
OUT=${1:-gpu_check.json}
PY=${PY:-python}
DRY=${GPU_CHECK_DRY_RUN:-0}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
LOGS="${OUT%.json}.logs"
mkdir -p "$LOGS"
trap 'rm -rf "$WORK"' EXIT
OTC=("$PY" -m otcbench.cli)
HERE=$(cd "$(dirname "$0")" && pwd)

if [ "$DRY" = "1" ]; then
  # batch 16: chosen when otcclip's intra loss (1/8 of a batch) crashed BatchNorm below 12 rows; since
  # losses.intra_rows takes 2 rows where BatchNorm needs them, smaller batches run too
  DEVICE=cpu; AMP=none; PREC=fp32; MODELS=(otc-rn-nano otc-vit-tiny); BATCH=16; STEPS=2; EPOCHS=1; SIDE=32
  ROWS=32; OT_ARGS=(--quick --device cpu --no-pot-batch); TR_MODEL=otc-rn-nano
  L_TRAIN=600; L_OT=600; L_RATIO=600; L_DDP=600
else
  if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA device (torch.cuda.is_available() is false): skipped" >&2
    printf '{"skipped": true, "reason": "no CUDA device"}\n' > "$OUT"
    [ "${GPU_CHECK_REQUIRE:-0}" = "1" ] && exit 1
    exit 0
  fi
  DEVICE=cuda; AMP=bf16; PREC=amp_bf16; MODELS=(RN50 ViT-B-32); BATCH=256; STEPS=20; EPOCHS=2; SIDE=224
  ROWS=5120; OT_ARGS=(--quick --device cuda); TR_MODEL=otc-rn-micro
  L_TRAIN=110; L_OT=60; L_RATIO=120; L_DDP=60   # 460 s at most, plus two world renderings: the 8-minute bound
fi

FAILED=0
step() {  # step NAME LIMIT_S CMD...: run with a time limit, stdout to LOGS/NAME.json, stderr to LOGS/NAME.log
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$LOGS/$name.json" 2> "$LOGS/$name.log"
  local rc=$?
  echo "$name $rc $((SECONDS - t0))" >> "$WORK/steps"
  [ "$rc" = 0 ] || { FAILED=1; echo "gpu_check: step $name failed (rc $rc): $LOGS/$name.log" >&2; }
}

"$PY" - > "$LOGS/env.json" 2>&1 <<'EOF'
import json, platform, torch
info = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "cuda_available": torch.cuda.is_available()}
if torch.cuda.is_available():
    info.update(device=torch.cuda.get_device_name(0), bf16=torch.cuda.is_bf16_supported(),
                nccl=str(torch.cuda.nccl.version()))
print(json.dumps(info))
EOF

for m in "${MODELS[@]}"; do
  step "train-$m" "$L_TRAIN" "${OTC[@]}" bench train --model "$m" --defense none --defense otcclip --device "$DEVICE" \
    --amp "$AMP" --batch-size "$BATCH" --steps "$STEPS" --epochs "$EPOCHS" --json
done
step bench-ot "$L_OT" "${OTC[@]}" bench ot "${OT_ARGS[@]}" --json --no-progress

# a world at the model's side for the open_clip ratio and the torchrun
"${OTC[@]}" data synth "$WORK/world" --set n_train="$ROWS" --set image_size="$SIDE" --set probe_train_per_class=2 \
  --set probe_val_per_class=1 --set test_per_class=4 --set targets_per_class=1 > "$LOGS/world.log" 2>&1 || FAILED=1
step openclip-ratio "$L_RATIO" "$PY" "$HERE/openclip_trainer.py" "$WORK/world" --model "${MODELS[0]}" --batch "$BATCH" \
  --device "$DEVICE" --precision "$PREC" --workers 4 --json

"${OTC[@]}" data synth "$WORK/small" --set n_train=$((BATCH * 4)) --set probe_train_per_class=2 \
  --set probe_val_per_class=1 --set test_per_class=2 --set targets_per_class=1 > "$LOGS/small.log" 2>&1 || FAILED=1
step torchrun "$L_DDP" "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 -m otcbench.cli train \
  "$WORK/small" "$WORK/run-ddp" --model "$TR_MODEL" --set train.epochs=1 --set train.batch_size="$BATCH" \
  --set train.device="$DEVICE" --no-progress

"$PY" - "$OUT" "$LOGS" "$WORK/steps" "$DRY" <<'EOF'
import json, sys
from pathlib import Path
out, logs, steps, dry = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4] == "1"
def read(name):
    text = (logs / f"{name}.json").read_text() if (logs / f"{name}.json").is_file() else ""
    try:
        return json.loads(text)
    except ValueError:
        return {"output_tail": text[-2000:]} if text else None
result = {"dry_run": dry, "env": read("env"), "steps": {}}
for line in steps.read_text().splitlines() if steps.is_file() else []:
    name, rc, secs = line.split()
    entry = {"rc": int(rc), "seconds": int(secs), "result": read(name)}
    if rc != "0":
        entry["log_tail"] = (logs / f"{name}.log").read_text()[-2000:]
    result["steps"][name] = entry
result["ok"] = all(s["rc"] == 0 for s in result["steps"].values())
Path(out).write_text(json.dumps(result, indent=2) + "\n")
print(f"gpu_check: {'ok' if result['ok'] else 'FAILED'}; wrote {out}")
EOF
exit $FAILED
