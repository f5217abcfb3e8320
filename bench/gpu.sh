#!/usr/bin/env bash
# Every CUDA check and every side-by-side figure of training and serving, in one call on a
# lent GPU machine (no Rust, no network): pack with `scripts/pack-gpu` here, carry `.gpu`,
# then `bash bench/gpu.sh` there with $OUT set. Prints a table of ratios (also
# $OUT/summary.json) and exits non-zero if a correctness check failed.
#
#   correctness   the same seed and data for 5 float32 steps on the CPU and on $DEVICE
#   curves        bf16 against float32 on $DEVICE over $CURVE_STEPS steps
#   kernels       the fused layers (CUDA's default) against their reference on one batch:
#                 logits and gradients within bf16 tolerance, forward+backward time
#   head loss     the loss through the output head a chunk at a time (CUDA's default)
#                 against the full logits: losses, speed, peak memory
#   training      lillm against bench/reference_train.py (the same model and step in
#                 PyTorch, --compile and bf16 autocast) at $ROWS and $SMALL_ROWS rows, the
#                 step as a CUDA graph (auto) against eager: captured, same losses, speed; the
#                 larger preset, the MoE preset's MFU against the dense one's, the job path
#                 (coordinator + dataloader + trainer) against one process; peak GPU memory
#   profile       libtorch's profiler over 5 steps of the dense model: the longest kernels
#   serving       `lillm serve` (CUDA graphs) on the dense, large and MoE runs under 1, 8 and
#                 32 streaming clients; greedy answers with graphs, without capture and
#                 eager; a seeded answer alone and batched; `lillm generate`'s one stream
#
# Rehearse on a CPU (the test cli/tests/gpu_harness.rs does): DEVICE=cpu DTYPE=float32 with
# tiny presets, a few steps and COMPILE=0.
set -euo pipefail
LILLM=${LILLM:-.gpu/lillm}
DATA=${DATA:-.gpu/data}
OUT=${OUT:-/tmp/lillm-gpu}
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-bfloat16}
DENSE=${DENSE:-lillm-39m}
LARGE=${LARGE:-lillm-300m}
MOE=${MOE:-lillm-moe-8x39m}
BLOCK=${BLOCK:-512}
ROWS=${ROWS:-128}
SMALL_ROWS=${SMALL_ROWS:-32}
LARGE_ROWS=${LARGE_ROWS:-32}
MOE_ROWS=${MOE_ROWS:-64}
STEPS=${STEPS:-60}
CURVE_STEPS=${CURVE_STEPS:-300}
COMPILE=${COMPILE:-1}
SERVE_SECONDS=${SERVE_SECONDS:-10}
PEAK_TFLOPS=${PEAK_TFLOPS:-989}
mkdir -p "$OUT"
TORCH_LIB=$("$PYTHON" -c 'import torch, os; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/gpu.txt" 2>/dev/null ||
  echo "$DEVICE (no nvidia-smi)" > "$OUT/gpu.txt"
echo "== on $(cat "$OUT/gpu.txt"), $($LILLM --version 2>/dev/null || echo lillm)"

# figures RUN: the mean of the log windows after the first third of the run (compilation,
# allocator warm-up and the first evaluation are behind it), as JSON.
figures() {
  "$PYTHON" - "$1" <<'PY'
import json, sys
recs = [json.loads(l) for l in open(f"{sys.argv[1]}/metrics.jsonl")]
train = [r for r in recs if "tokens_per_s" in r]
last = max(r["step"] for r in train)
steady = [r for r in train if r["step"] > last // 3] or train[-1:]
mean = lambda k: sum(r[k] for r in steady) / len(steady) if all(k in r for r in steady) else None
peak = [r["peak_gpu_gib"] for r in train if "peak_gpu_gib" in r]
print(json.dumps({"tokens_per_s": mean("tokens_per_s"), "step_ms": mean("step_ms"), "mfu": mean("mfu"),
                  "peak_gpu_gib": max(peak) if peak else None, "losses": [r["loss"] for r in train]}))
PY
}

# train NAME PRESET ROWS DTYPE DEVICE STEPS [FLAGS...]: a single-process run into $OUT/NAME.
# A run that fails is kept as $OUT/NAME.failed.log and run again with an eager step, so that
# one broken path (a CUDA graph capture that crashes, say) costs its row, not the session.
train() {
  local name=$1 preset=$2 rows=$3 dtype=$4 device=$5 steps=$6
  shift 6
  rm -rf "${OUT:?}/$name" "$OUT/$name.failed.log"
  echo "-- lillm $name: $preset, $rows x $BLOCK, $dtype on $device, $steps steps"
  local run=(train --preset "$preset" --data "$DATA" --out "$OUT/$name" --device "$device"
    --dtype "$dtype" --batch-size "$rows" --block-size "$BLOCK" --grad-accum 1
    --max-iters "$steps" --warmup-iters 10 --lr-decay-iters "$steps" --eval-interval 100000
    --eval-iters 1 --log-interval 10 --peak-tflops "$PEAK_TFLOPS")
  if ! $LILLM "${run[@]}" "$@" > "$OUT/$name.log" 2>&1; then
    echo "-- lillm $name FAILED ($(tail -n 1 "$OUT/$name.log")); again with --step-mode eager"
    mv "$OUT/$name.log" "$OUT/$name.failed.log"
    rm -rf "${OUT:?}/$name"
    local flags=() skip=0 flag
    for flag in "$@"; do
      if [ "$skip" = 1 ]; then skip=0; continue; fi
      if [ "$flag" = --step-mode ]; then skip=1; continue; fi
      flags+=("$flag")
    done
    $LILLM "${run[@]}" "${flags[@]}" --step-mode eager > "$OUT/$name.log" 2>&1
  fi
  figures "$OUT/$name" > "$OUT/$name.json"
}

# reference NAME PRESET ROWS: the same model and step in PyTorch, into $OUT/NAME.json.
reference() {
  local name=$1 preset=$2 rows=$3
  local shape
  shape=$($LILLM model info --preset "$preset" | "$PYTHON" -c '
import json, sys
text = sys.stdin.read()
m = json.loads(text[: text.index("}") + 1])
print(m["vocab_size"], m["d_model"], m["n_layers"], m["q_heads"], m["kv_heads"])')
  read -r vocab d layers qh kvh <<< "$shape"
  local compile=()
  [ "$COMPILE" = 1 ] && compile=(--compile)
  echo "-- reference $name: $preset, $rows x $BLOCK, $DTYPE on $DEVICE ${compile[*]}"
  "$PYTHON" bench/reference_train.py --data "$DATA" --vocab "$vocab" --d-model "$d" \
    --n-layers "$layers" --q-heads "$qh" --kv-heads "$kvh" --block-size "$BLOCK" \
    --batch-size "$rows" --steps "$STEPS" --warmup-steps 10 --device "$DEVICE" \
    --dtype "$DTYPE" "${compile[@]}" > "$OUT/$name.json" 2> "$OUT/$name.log"
}

echo "== correctness: the same seed for 5 float32 steps on the CPU and on $DEVICE"
TINY=(--preset tiny --data "$DATA" --block-size 128 --batch-size 8 --max-iters 5
  --eval-interval 100 --eval-iters 1 --log-interval 1 --dtype float32)
rm -rf "$OUT/same-cpu" "$OUT/same-device"
$LILLM train "${TINY[@]}" --device cpu --out "$OUT/same-cpu" > "$OUT/same-cpu.log" 2>&1
$LILLM train "${TINY[@]}" --device "$DEVICE" --out "$OUT/same-device" > "$OUT/same-device.log" 2>&1
figures "$OUT/same-cpu" > "$OUT/same-cpu.json"
figures "$OUT/same-device" > "$OUT/same-device.json"

echo "== curves: $DTYPE against float32 on $DEVICE, $CURVE_STEPS steps"
train curve-f32 "$DENSE" "$SMALL_ROWS" float32 "$DEVICE" "$CURVE_STEPS"
train curve-low "$DENSE" "$SMALL_ROWS" "$DTYPE" "$DEVICE" "$CURVE_STEPS"

# The training step as a CUDA graph (auto on CUDA); on a CPU rehearsal, the same step
# uncaptured.
FAST_STEP=auto
[ "$DEVICE" = cpu ] && FAST_STEP=static

echo "== kernels: the fused layers against their reference on one $DENSE batch"
$LILLM bench kernels --preset "$DENSE" --device "$DEVICE" --dtype "$DTYPE" --rows "$SMALL_ROWS" \
  --block "$BLOCK" > "$OUT/kernels.json" 2> "$OUT/kernels.log"

echo "== training speed"
train dense "$DENSE" "$ROWS" "$DTYPE" "$DEVICE" "$STEPS" --head-loss chunked --step-mode "$FAST_STEP"
train dense-full "$DENSE" "$ROWS" "$DTYPE" "$DEVICE" "$STEPS" --head-loss full
reference ref-dense "$DENSE" "$ROWS"
train dense-small "$DENSE" "$SMALL_ROWS" "$DTYPE" "$DEVICE" "$STEPS" --step-mode "$FAST_STEP"
train dense-eager "$DENSE" "$ROWS" "$DTYPE" "$DEVICE" "$STEPS" --step-mode eager
train dense-small-eager "$DENSE" "$SMALL_ROWS" "$DTYPE" "$DEVICE" "$STEPS" --step-mode eager
train large "$LARGE" "$LARGE_ROWS" "$DTYPE" "$DEVICE" "$STEPS" --step-mode "$FAST_STEP"
reference ref-large "$LARGE" "$LARGE_ROWS"
train moe "$MOE" "$MOE_ROWS" "$DTYPE" "$DEVICE" "$STEPS" --step-mode "$FAST_STEP"
train dense-moe-rows "$DENSE" "$MOE_ROWS" "$DTYPE" "$DEVICE" "$STEPS"

echo "== profile: what an eager $DENSE step at $ROWS rows spends its time on (steps 20 to 24)"
train profile "$DENSE" "$ROWS" "$DTYPE" "$DEVICE" 30 --profile-steps 20:25 --step-mode eager

echo "== the job path: coordinator + dataloader + one trainer"
free_port() { "$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
CPORT=$(free_port)
rm -rf "$OUT/job"
$LILLM coordinator --nodes 1 --listen 127.0.0.1:$CPORT --metrics-listen 127.0.0.1:$(free_port) \
  --store-port "$(free_port)" --state-dir "$OUT/job/coordinator" > "$OUT/coordinator.log" 2>&1 &
COORD=$!
$LILLM dataloader --coordinator 127.0.0.1:$CPORT --data "$DATA" --node gpu \
  --listen 127.0.0.1:"$(free_port)" > "$OUT/dataloader.log" 2>&1 &
LOADER=$!
trap 'kill $COORD $LOADER 2>/dev/null || true' EXIT
train job "$DENSE" "$ROWS" "$DTYPE" "$DEVICE" "$STEPS" --coordinator 127.0.0.1:$CPORT --node gpu
kill $COORD $LOADER 2>/dev/null || true

# The decode step as CUDA graphs; on a CPU rehearsal, the same fixed-shape step uncaptured.
FAST_DECODE=graphs
[ "$DEVICE" = cpu ] && FAST_DECODE=static

# start_server NAME CHECKPOINT MODEL DECODE: `lillm serve` in the background ($SERVER, $URL).
start_server() {
  local name=$1 checkpoint=$2 model=$3 decode=$4
  $LILLM serve --checkpoint "$checkpoint" --port 0 --device "$DEVICE" --dtype "$DTYPE" \
    --model-name "$model" --max-batch 32 --decode "$decode" > "$OUT/$name.log" 2>&1 &
  SERVER=$!
  trap 'kill $SERVER 2>/dev/null || true' EXIT
  until grep -q "serving" "$OUT/$name.log" 2>/dev/null; do
    kill -0 $SERVER 2>/dev/null || { cat "$OUT/$name.log"; exit 1; }
    sleep 0.2
  done
  URL=$(sed -n 's/.* on \(http:[^ ]*\)\/ .*/\1/p' "$OUT/$name.log")
}
stop_server() { kill $SERVER; wait $SERVER 2>/dev/null || true; }

for run in dense:$DENSE large:$LARGE moe:$MOE; do
  name=${run%%:*} model=${run#*:}
  echo "== serving: lillm serve on the $model run ($FAST_DECODE), 1, 8 and 32 streams x ${SERVE_SECONDS}s"
  start_server "serve-$name" "$OUT/$name" "$model" "$FAST_DECODE"
  "$PYTHON" bench/generation_bench.py "$URL" "$model" $SERVER "$SERVE_SECONDS" "$SERVE_SECONDS" \
    > "$OUT/serve-$name.json"
  stop_server
done

echo "== decode check: greedy answers with and without graphs, a seeded answer alone and batched"
# On a CPU rehearsal the fast decoder is `static` itself: it runs once.
for decode in $(printf '%s\n' eager static "$FAST_DECODE" | uniq); do
  start_server "check-$decode" "$OUT/dense" "$DENSE" "$decode"
  "$PYTHON" bench/decode_check.py "$URL" "$DENSE" > "$OUT/check-$decode.json"
  stop_server
done

echo "== lillm generate: one stream, 256 tokens, eager and $FAST_DECODE"
for decode in eager "$FAST_DECODE"; do
  $LILLM generate --checkpoint "$OUT/dense" --prompt "The king" --max-new-tokens 256 \
    --temperature 1.0 --seed 3 --device "$DEVICE" --dtype "$DTYPE" --decode "$decode" \
    --timing > "$OUT/generate-$decode.txt" 2> "$OUT/generate-$decode.log"
  "$PYTHON" -c '
import json, re, sys
line = [l for l in open(sys.argv[1]) if "tokens/s" in l][-1]
n, rate = re.match(r"(\d+) tokens.*: ([\d.na/]+) tokens/s", line).groups()
print(json.dumps({"tokens": int(n), "tokens_per_s": float(rate) if rate != "n/a" else None}))
' "$OUT/generate-$decode.log" > "$OUT/generate-$decode.json"
done

"$PYTHON" - "$OUT" "$DENSE" "$LARGE" "$MOE" "$ROWS" "$SMALL_ROWS" "$LARGE_ROWS" "$MOE_ROWS" "$DTYPE" "$COMPILE" "$FAST_DECODE" "$FAST_STEP" "$DEVICE" <<'PY'
import json, os, re, sys
out, dense, large, moe, rows, small, large_rows, moe_rows, dtype, compiled, fast, fast_step, device = sys.argv[1:]
torch_side = "compiled PyTorch" if compiled == "1" else "eager PyTorch"
r = lambda name: json.load(open(f"{out}/{name}.json"))
gpu = open(f"{out}/gpu.txt").read().strip()
rows_out, failed = [], []
def row(what, ours, theirs, ratio, target, ok=None):
    rows_out.append({"what": what, "lillm": ours, "baseline": theirs, "ratio": ratio, "target": target, "ok": ok})
    if ok is False:
        failed.append(what)

cpu, dev = r("same-cpu")["losses"], r("same-device")["losses"]
diff = max(abs(a - b) for a, b in zip(cpu, dev)) if len(cpu) == len(dev) == 5 else float("inf")
row("same seed, CPU vs device, float32, 5 steps: max |loss diff|", f"{diff:.2e}", "", "", "<= 1e-3", diff <= 1e-3)
f32, low = r("curve-f32")["losses"], r("curve-low")["losses"]
tail = max(1, len(f32) // 5)
gap = abs(sum(f32[-tail:]) / tail - sum(low[-tail:]) / tail)
row(f"{dtype} vs float32 loss, mean of the last {tail} windows", f"{gap:.3f}", "", "", "<= 0.05", gap <= 0.05)

chunked, full = r("dense"), r("dense-full")
early = min(3, len(chunked["losses"]), len(full["losses"]))
head_diff = max(abs(a - b) for a, b in zip(chunked["losses"][:early], full["losses"][:early]))
row(f"chunked vs full head loss, {dtype}: max |loss diff|, first {early} windows", f"{head_diff:.2e}", "", "",
    "<= 0.02", head_diff <= 0.02)
row(f"chunked vs full head loss, {dense} {rows} rows tokens/s", f"{chunked['tokens_per_s']:,.0f}",
    f"{full['tokens_per_s']:,.0f}", f"{chunked['tokens_per_s'] / full['tokens_per_s']:.2f}x", ">= 1.0x")

k = r("kernels")
row("fused SwiGLU kernel in use (compiled at run time, checked against the reference)",
    "yes" if k["fused_swiglu"] else "no", "", "", "yes on CUDA", k["fused_swiglu"] if device.startswith("cuda") else None)
row(f"fused vs reference kernels, {dense} {dtype}: logits / gradients max rel diff",
    f"{k['logits_rel_diff']:.1e} / {k['grads_rel_diff']:.1e}", "", "", "<= 2e-2 each",
    max(k["logits_rel_diff"], k["grads_rel_diff"]) <= 2e-2)
row(f"fused vs reference kernels, {dense} {small} rows forward+backward ms", f"{k['fused_ms']:.2f}",
    f"{k['reference_ms']:.2f}", f"{k['reference_ms'] / k['fused_ms']:.2f}x", ">= 1.0x")

def speed(what, ours, ref, target):
    a, b = r(ours), r(ref)
    ratio = a["tokens_per_s"] / b["tokens_per_s"]
    row(what + " tokens/s", f"{a['tokens_per_s']:,.0f}", f"{b['tokens_per_s']:,.0f}", f"{ratio:.2f}x", target)
    return a, b
d, ref = speed(f"{dense} {rows} rows vs {torch_side}", "dense", "ref-dense", ">= 1.0x (aim 1.4x)")
speed(f"{large} {large_rows} rows vs {torch_side}", "large", "ref-large", ">= 1.0x")
s = r("dense-small")
row(f"{dense}: {small} rows vs {rows} rows tokens/s", f"{s['tokens_per_s']:,.0f}", f"{d['tokens_per_s']:,.0f}",
    f"{s['tokens_per_s'] / d['tokens_per_s']:.2f}", ">= 0.80")
def capture(name):
    """How a run's step ran, from what it said about its CUDA graph."""
    if os.path.exists(f"{out}/{name}.failed.log"):
        last = open(f"{out}/{name}.failed.log").read().strip().splitlines()[-1:] or [""]
        return "run failed (then eager): " + last[0][:100]
    text = open(f"{out}/{name}.log").read()
    refused = re.search(r"not captured as a CUDA graph \((.*)\); running", text)
    if refused:
        return "not captured: " + refused.group(1)[:120]
    if "captured as a CUDA graph" in text:
        return "captured"
    return "static (uncaptured)" if "step static" in text else "eager"
for name, preset, n in [("dense", dense, rows), ("dense-small", dense, small), ("large", large, large_rows),
                        ("moe", moe, moe_rows)]:
    how = capture(name)
    row(f"step as one CUDA graph, {name} run ({preset}, {n} rows)", how, "", "", "captured",
        how == "captured" if device.startswith("cuda") else None)
for graphed, eager, n in [("dense", "dense-eager", rows), ("dense-small", "dense-small-eager", small)]:
    g, e = r(graphed), r(eager)
    early = min(3, len(g["losses"]), len(e["losses"]))
    step_diff = max(abs(a - b) for a, b in zip(g["losses"][:early], e["losses"][:early]))
    row(f"{dense} {n} rows, {fast_step} vs eager step: max |loss diff|, first {early} windows", f"{step_diff:.2e}", "",
        "", "<= 0.02", step_diff <= 0.02)
    row(f"{dense} {n} rows, {fast_step} vs eager step tokens/s", f"{g['tokens_per_s']:,.0f}", f"{e['tokens_per_s']:,.0f}",
        f"{g['tokens_per_s'] / e['tokens_per_s']:.2f}x", ">= 1.0x")
m, dm = r("moe"), r("dense-moe-rows")
if m["mfu"] is not None and dm["mfu"]:
    row(f"{moe} vs {dense} MFU at {moe_rows} rows", f"{100*m['mfu']:.1f}%", f"{100*dm['mfu']:.1f}%",
        f"{m['mfu'] / dm['mfu']:.2f}", ">= 0.70")
peak = lambda x: f"{x:.1f} GiB" if x is not None else "n/a"
row(f"chunked vs full head loss, {dense} {rows} rows peak GPU memory", peak(chunked["peak_gpu_gib"]),
    peak(full["peak_gpu_gib"]), "", "lower")
row(f"{dense} {rows} rows peak GPU memory", peak(d["peak_gpu_gib"]), peak(ref.get("peak_gpu_gib")), "",
    "<= the reference's")
j = r("job")
row(f"job path vs one process, {dense} {rows} rows", f"{j['tokens_per_s']:,.0f}", f"{d['tokens_per_s']:,.0f}",
    f"{j['tokens_per_s'] / d['tokens_per_s']:.2f}", "~1.0")
errors = 0
for name, model in [("dense", dense), ("large", large), ("moe", moe)]:
    for level in r(f"serve-{name}")["levels"]:
        target = {1: ">= 1000 tok/s", 8: "p99 <= 3x p50, TTFT p99 <= 50 ms", 32: ">= 20000 tok/s"}
        row(f"serve {model} ({fast}) {level['streams']} streams: tokens/s; TTFT p99, ITL p50/p99 ms",
            f"{level['tokens_per_s']:,.0f}",
            f"{level['ttft_p99_ms']:.0f} / {level['itl_p50_ms']:.1f} / {level['itl_p99_ms']:.1f}", "",
            target.get(level["streams"], "") if name == "dense" else "")
        errors += level["errors"]
row("serving: failed requests, every model and level", f"{errors}", "", "", "0", errors == 0)
eager, fixed, graphs = r("check-eager"), r("check-static"), r(f"check-{fast}")
if fast != "static":
    row(f"greedy answers, {fast} vs static (the same step uncaptured)",
        f"{sum(a == b for a, b in zip(graphs['greedy'], fixed['greedy']))}/{len(fixed['greedy'])}", "", "",
        "all identical", graphs["greedy"] == fixed["greedy"])
row(f"greedy answers, {fast} vs eager", f"{sum(a == b for a, b in zip(graphs['greedy'], eager['greedy']))}"
    f"/{len(eager['greedy'])}", "", "", "identical (in float32; bf16 may round apart)")
row(f"seeded answer alone vs among 8 streams ({fast})", "same" if graphs["alone"] == graphs["together"] else "differs",
    "", "", "same", graphs["alone"] == graphs["together"])
g_fast, g_eager = r(f"generate-{fast}"), r("generate-eager")
if g_fast["tokens_per_s"] and g_eager["tokens_per_s"]:
    row(f"lillm generate {dense}, one stream, {g_fast['tokens']} tokens: tokens/s ({fast} vs eager)",
        f"{g_fast['tokens_per_s']:,.0f}", f"{g_eager['tokens_per_s']:,.0f}",
        f"{g_fast['tokens_per_s'] / g_eager['tokens_per_s']:.2f}x", ">= 1000 tok/s")
print(f"\nlillm on {gpu}")
print(f"{'what':<66} {'lillm':>12} {'baseline':>22} {'ratio':>7}  target")
for x in rows_out:
    mark = {True: " ok", False: " FAILED", None: ""}[x["ok"]]
    print(f"{x['what']:<66} {x['lillm']:>12} {x['baseline']:>22} {x['ratio']:>7}  {x['target']}{mark}")
json.dump({"device": gpu, "rows": rows_out}, open(f"{out}/summary.json", "w"), indent=1)
print()
print("".join(open(f"{out}/profile/profile-rank0.txt").readlines()[:40]))
sys.exit(1 if failed else 0)
PY
