#!/usr/bin/env bash
# On a lent GPU machine (no Rust, no network): the trainer actor on one GPU through the whole
# job path — coordinator, dataloader, trainer with an NCCL group of world size 1 — with the
# lillm-39m preset in bf16, then tokens/s and MFU. First a correctness check: the same tiny
# model and seed for a few steps on CPU and on CUDA (float32) must give the same losses.
#
# Carry: the release `lillm` binary and a prepared dataset (vocab 4096 from `make demo`), e.g.
#   mkdir -p .gpu && cp target/release/lillm .gpu/ && cp -r demo-run/data .gpu/data
# and run `bash bench/gpu_train.sh` with $OUT set (logs land there).
set -euo pipefail
LILLM=${LILLM:-.gpu/lillm}
DATA=${DATA:-.gpu/data}
OUT=${OUT:-/tmp/lillm-gpu}
STEPS=${STEPS:-300}
PEAK_TFLOPS=${PEAK_TFLOPS:-989}
# Overridable to rehearse the script on a CPU machine: DEVICE=cpu DTYPE=float32 PRESET=tiny.
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-bfloat16}
PRESET=${PRESET:-lillm-39m}
BATCH=${BATCH:-32}
BLOCK=${BLOCK:-512}
mkdir -p "$OUT"
TORCH_LIB=$(python3 -c 'import torch, os; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | tee "$OUT/gpu.txt" || true

echo "== correctness: 5 steps, tiny model, float32, CPU vs CUDA"
TINY=(--preset tiny --vocab-size 4096 --d-model 128 --n-layers 4 --q-heads 4 --kv-heads 2
  --max-seq-len 128 --block-size 128 --batch-size 8 --max-iters 5 --eval-interval 100
  --eval-iters 1 --log-interval 1 --dtype float32 --data "$DATA")
rm -rf "$OUT/cpu" "$OUT/cuda"
$LILLM train "${TINY[@]}" --device cpu --out "$OUT/cpu" > "$OUT/cpu.log" 2>&1
$LILLM train "${TINY[@]}" --device "$DEVICE" --out "$OUT/cuda" > "$OUT/cuda.log" 2>&1
python3 - "$OUT" <<'PY'
import json, sys
def losses(run):
    return [r["loss"] for r in map(json.loads, open(f"{sys.argv[1]}/{run}/metrics.jsonl")) if "loss" in r]
cpu, cuda = losses("cpu"), losses("cuda")
diff = max(abs(a - b) for a, b in zip(cpu, cuda))
print(f"cpu  {cpu}\ncuda {cuda}\nmax |diff| {diff:.2e}")
assert len(cpu) == len(cuda) == 5 and diff < 1e-3, "CPU and CUDA disagree"
PY

echo "== the job on one device ($DEVICE): $PRESET, $DTYPE, world size 1, $STEPS steps"
PORT=7370
rm -rf "$OUT/job"
$LILLM coordinator --nodes 1 --listen 127.0.0.1:$PORT --metrics-listen 127.0.0.1:$((PORT+1)) \
  --store-port $((PORT+2)) --state-dir "$OUT/job/coordinator" > "$OUT/coordinator.log" 2>&1 &
COORD=$!
$LILLM dataloader --coordinator 127.0.0.1:$PORT --data "$DATA" --node gpu \
  --listen 127.0.0.1:$((PORT+3)) > "$OUT/dataloader.log" 2>&1 &
LOADER=$!
trap 'kill $COORD $LOADER 2>/dev/null || true' EXIT
$LILLM train --preset "$PRESET" --vocab-size 4096 --data "$DATA" --out "$OUT/job" \
  --device "$DEVICE" --dtype "$DTYPE" --batch-size "$BATCH" --block-size "$BLOCK" --grad-accum 1 \
  --max-iters "$STEPS" --warmup-iters 50 --lr-decay-iters "$STEPS" --eval-interval 1000 \
  --eval-iters 5 --log-interval 25 --peak-tflops "$PEAK_TFLOPS" \
  --coordinator 127.0.0.1:$PORT --node gpu > "$OUT/trainer.log" 2>&1
$LILLM status --coordinator 127.0.0.1:$PORT | tee "$OUT/status.txt"
python3 - "$OUT/job/metrics.jsonl" "$PEAK_TFLOPS" "$PRESET $DTYPE on $DEVICE" <<'PY'
import json, sys
recs = [json.loads(l) for l in open(sys.argv[1])]
steps = max(r["step"] for r in recs)
train = [r for r in recs if "loss" in r and r["step"] > steps // 5]
tps = sum(r["tokens_per_s"] for r in train) / len(train)
mfu = sum(r["mfu"] for r in train) / len(train)
print(f"{sys.argv[3]}, world size 1 via coordinator + dataloader: {tps:,.0f} tokens/s, "
      f"MFU {100*mfu:.1f}% (peak {sys.argv[2]} TFLOP/s), final loss {train[-1]['loss']:.3f}")
PY
