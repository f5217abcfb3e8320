#!/usr/bin/env bash
# Every CUDA check and every side-by-side figure of training and serving, in one call on a
# lent GPU machine (no Rust, no network): pack with `scripts/pack-gpu` here, carry `.gpu`,
# then `bash bench/gpu.sh` there with $OUT set. Prints a table of ratios (also
# $OUT/summary.json, made by bench/gpu_summary.py from what the sections left in $OUT).
#
# A lent machine has minutes, so the work is in sections, most telling first, each with a
# rough cost on an H100/H200. A section starts only if its cost fits before DEADLINE_S
# seconds from the start (default 480: give the device call a timeout of about 540), and
# every command is stopped at DEADLINE_S, so the table is always printed. A section that
# fails costs only its own rows. ONLY=name,name runs just those sections (a later call for
# what an earlier one skipped; serving and decoding need the training section's run in $OUT).
#
#   correctness   the same seed and data for 5 float32 steps on the CPU and on $DEVICE
#   training      lillm-39m at $ROWS rows (the step as a CUDA graph, chunked head loss)
#                 against bench/reference_train.py: the same model and step in PyTorch,
#                 --compile and bf16 autocast; peak GPU memory
#   serving-dense `lillm serve` (CUDA graphs) on that run under 1, 8 and 32 streaming clients
#   decoding      greedy answers with graphs, without capture and eager; a seeded answer
#                 alone and batched; `lillm generate`'s one stream with and without graphs;
#                 a decode step alone at 1, 8 and 32 rows, replayed against uncaptured, and
#                 its kernels (`lillm bench decode`)
#   step          the fused layers (CUDA's default) against their reference on one batch;
#                 the chunked head loss against the full logits; $SMALL_ROWS rows against
#                 $ROWS; the step as a CUDA graph against eager at both
#   large, moe    the larger preset against the compiled reference; the MoE preset's MFU
#                 against the dense one's at the same rows
#   curves        bf16 against float32 on $DEVICE over $CURVE_STEPS steps
#   profile       libtorch's profiler over 5 eager steps of the dense model: the longest kernels
#   job           the job path (coordinator + dataloader + trainer) against one process
#   serving-more  `lillm serve` on the large and MoE runs
#
# Rehearse on a CPU (the test cli/tests/gpu_harness.rs does): DEVICE=cpu DTYPE=float32 with
# tiny presets, a few steps and COMPILE=0.
#
# OUT fills with runs and checkpoints (gigabytes), more files than a device call brings
# back (8 files of 16 MiB at most). With RESULTS set, the script also leaves there the few
# files worth bringing back: table.txt, summary.json and results.tar.gz (every figure, log
# and profile table under 2 MiB, no weights). On the lent machine, keep OUT outside the
# folder that comes back and on that machine, so that a later call with ONLY= finds the
# runs an earlier one made (bench/out is ignored by git, so a lent machine keeps it between
# calls):  RESULTS=$OUT OUT=bench/out/gpu bash bench/gpu.sh
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
SERVE_SECONDS=${SERVE_SECONDS:-6}
PEAK_TFLOPS=${PEAK_TFLOPS:-989}
DEADLINE_S=${DEADLINE_S:-480}
ONLY=${ONLY:-}
RESULTS=${RESULTS:-}
# What every section needs, checked first: a misconfigured machine gets one clear error
# instead of eleven failed sections.
if [ ! -x "$LILLM" ]; then
  echo "gpu.sh: no lillm binary at $LILLM: run scripts/pack-gpu first (or set LILLM=path)" >&2
  exit 2
fi
torch_check=0
TORCH_LIB=$("$PYTHON" -c 'import os, sys, torch
print(os.path.join(os.path.dirname(torch.__file__), "lib"))
sys.exit(3 if sys.argv[1] == "cuda" and not torch.cuda.is_available() else 0)' "$DEVICE" 2>/dev/null) ||
  torch_check=$?
if [ "$torch_check" = 3 ]; then
  echo "gpu.sh: torch under $PYTHON sees no CUDA device; to rehearse on a CPU: DEVICE=cpu DTYPE=float32 DENSE=tiny LARGE=tiny MOE=tiny-moe COMPILE=0 (see cli/tests/gpu_harness.rs)" >&2
  exit 2
elif [ "$torch_check" != 0 ]; then
  echo "gpu.sh: $PYTHON cannot import torch; set PYTHON to a python that has torch 2.11" >&2
  exit 2
fi
mkdir -p "$OUT"
rm -f "$OUT/sections.jsonl"
export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/gpu.txt" 2>/dev/null ||
  echo "$DEVICE (no nvidia-smi)" > "$OUT/gpu.txt"
echo "== on $(cat "$OUT/gpu.txt"), $($LILLM --version 2>/dev/null | head -n 1 || echo lillm), deadline ${DEADLINE_S}s"

# The step as a CUDA graph and the decode step as CUDA graphs (auto/graphs on CUDA); on a
# CPU rehearsal, the same fixed-shape steps uncaptured.
FAST_STEP=auto FAST_DECODE=graphs
[ "$DEVICE" = cpu ] && FAST_STEP=static FAST_DECODE=static
"$PYTHON" -c 'import json, sys; k = sys.argv[1::2]; print(json.dumps(dict(zip(k, sys.argv[2::2]))))' \
  dense "$DENSE" large "$LARGE" moe "$MOE" rows "$ROWS" small_rows "$SMALL_ROWS" \
  large_rows "$LARGE_ROWS" moe_rows "$MOE_ROWS" dtype "$DTYPE" device "$DEVICE" \
  compile "$COMPILE" fast_decode "$FAST_DECODE" fast_step "$FAST_STEP" > "$OUT/params.json"

# past_deadline: whether DEADLINE_S has passed, so that a command that failed was stopped by
# it rather than broken (bash counts whole seconds: one second's grace).
past_deadline() { ((SECONDS + 1 >= DEADLINE_S)); }

# within CMD...: CMD, stopped when the deadline passes.
within() {
  local left=$((DEADLINE_S - SECONDS))
  ((left > 0)) || return 124
  timeout -k 5 "$left" "$@"
}

# section NAME COST_S FUNCTION: runs FUNCTION in a subshell (its servers and traps end with
# it) unless ONLY leaves it out or COST_S would pass the deadline; records the outcome in
# $OUT/sections.jsonl.
section() {
  local name=$1 cost=$2 fn=$3 status rc
  [ -z "$ONLY" ] || [[ ",$ONLY," == *",$name,"* ]] || return 0
  local left=$((DEADLINE_S - SECONDS)) started=$SECONDS
  if ((left < cost)); then
    status="skipped: needs ~${cost}s, ${left}s left"
  else
    echo "== $name"
    set +e
    (
      set -e
      "$fn"
    )
    rc=$?
    set -e
    if [ "$rc" = 0 ]; then
      status=ok
    elif past_deadline; then
      status="stopped at the deadline"
    else
      status="failed (exit $rc)"
    fi
  fi
  echo "== $name: $status"
  printf '{"section": "%s", "status": "%s", "seconds": %d}\n' "$name" "$status" \
    $((SECONDS - started)) >> "$OUT/sections.jsonl"
}

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
# one broken path (a CUDA graph capture that crashes, say) costs its row, not the section.
train() {
  local name=$1 preset=$2 rows=$3 dtype=$4 device=$5 steps=$6
  shift 6
  rm -rf "${OUT:?}/$name" "$OUT/$name.failed.log"
  echo "-- lillm $name: $preset, $rows x $BLOCK, $dtype on $device, $steps steps"
  local run=(train --preset "$preset" --data "$DATA" --out "$OUT/$name" --device "$device"
    --dtype "$dtype" --batch-size "$rows" --block-size "$BLOCK" --grad-accum 1
    --max-iters "$steps" --warmup-iters 10 --lr-decay-iters "$steps" --eval-interval 100000
    --eval-iters 1 --log-interval 10 --peak-tflops "$PEAK_TFLOPS")
  local rc=0
  within "$LILLM" "${run[@]}" "$@" > "$OUT/$name.log" 2>&1 || rc=$?
  if [ "$rc" != 0 ] && past_deadline; then
    return "$rc"
  elif [ "$rc" != 0 ]; then
    echo "-- lillm $name FAILED ($(tail -n 1 "$OUT/$name.log")); again with --step-mode eager"
    mv "$OUT/$name.log" "$OUT/$name.failed.log"
    rm -rf "${OUT:?}/$name"
    local flags=() skip=0 flag
    for flag in "$@"; do
      if [ "$skip" = 1 ]; then skip=0; continue; fi
      if [ "$flag" = --step-mode ]; then skip=1; continue; fi
      flags+=("$flag")
    done
    within "$LILLM" "${run[@]}" "${flags[@]}" --step-mode eager > "$OUT/$name.log" 2>&1
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
  local run=(bench/reference_train.py --data "$DATA" --vocab "$vocab" --d-model "$d"
    --n-layers "$layers" --q-heads "$qh" --kv-heads "$kvh" --block-size "$BLOCK"
    --batch-size "$rows" --steps "$STEPS" --warmup-steps 10 --device "$DEVICE" --dtype "$DTYPE")
  echo "-- reference $name: $preset, $rows x $BLOCK, $DTYPE on $DEVICE ${compile[*]}"
  local rc=0
  within "$PYTHON" "${run[@]}" "${compile[@]}" > "$OUT/$name.json" 2> "$OUT/$name.log" || rc=$?
  if [ "$rc" = 0 ] || [ ${#compile[@]} = 0 ] || past_deadline; then
    return "$rc"
  else
    # torch.compile needs a working Triton and C compiler; without them the row says it
    # measured eager PyTorch (the JSON's "compiled": false) rather than nothing.
    echo "-- reference $name FAILED under torch.compile ($(tail -n 1 "$OUT/$name.log")); again eager"
    mv "$OUT/$name.log" "$OUT/$name.failed.log"
    within "$PYTHON" "${run[@]}" > "$OUT/$name.json" 2> "$OUT/$name.log"
  fi
}

# start_server NAME CHECKPOINT MODEL DECODE: `lillm serve` in the background ($SERVER, $URL),
# stopped when the section's subshell exits.
start_server() {
  local name=$1 checkpoint=$2 model=$3 decode=$4
  $LILLM serve --checkpoint "$checkpoint" --port 0 --device "$DEVICE" --dtype "$DTYPE" \
    --model-name "$model" --max-batch 32 --decode "$decode" > "$OUT/$name.log" 2>&1 &
  SERVER=$!
  trap 'kill $SERVER 2>/dev/null || true' EXIT
  until grep -q "serving" "$OUT/$name.log" 2>/dev/null; do
    kill -0 $SERVER 2>/dev/null || { cat "$OUT/$name.log"; return 1; }
    ! past_deadline || return 124
    sleep 0.2
  done
  URL=$(sed -n 's/.* on \(http:[^ ]*\)\/ .*/\1/p' "$OUT/$name.log")
}
stop_server() { kill $SERVER; wait $SERVER 2>/dev/null || true; }

# serve_under_load NAME MODEL: the run $OUT/NAME served under 1, 8 and 32 streams.
serve_under_load() {
  local name=$1 model=$2
  echo "-- lillm serve on the $model run ($FAST_DECODE), 1, 8 and 32 streams x ${SERVE_SECONDS}s"
  start_server "serve-$name" "$OUT/$name" "$model" "$FAST_DECODE"
  within "$PYTHON" bench/generation_bench.py "$URL" "$model" $SERVER "$SERVE_SECONDS" "$SERVE_SECONDS" \
    > "$OUT/serve-$name.json"
  stop_server
}

correctness() {
  local tiny=(--preset tiny --data "$DATA" --block-size 128 --batch-size 8 --max-iters 5
    --eval-interval 100 --eval-iters 1 --log-interval 1 --dtype float32)
  rm -rf "$OUT/same-cpu" "$OUT/same-device"
  within "$LILLM" train "${tiny[@]}" --device cpu --out "$OUT/same-cpu" > "$OUT/same-cpu.log" 2>&1
  within "$LILLM" train "${tiny[@]}" --device "$DEVICE" --out "$OUT/same-device" > "$OUT/same-device.log" 2>&1
  figures "$OUT/same-cpu" > "$OUT/same-cpu.json"
  figures "$OUT/same-device" > "$OUT/same-device.json"
}

training() {
  train dense "$DENSE" "$ROWS" "$DTYPE" "$DEVICE" "$STEPS" --head-loss chunked --step-mode "$FAST_STEP"
  reference ref-dense "$DENSE" "$ROWS"
}

serving_dense() { serve_under_load dense "$DENSE"; }

decoding() {
  # On a CPU rehearsal the fast decoder is `static` itself: it runs once.
  local decode
  for decode in $(printf '%s\n' eager static "$FAST_DECODE" | uniq); do
    start_server "check-$decode" "$OUT/dense" "$DENSE" "$decode"
    within "$PYTHON" bench/decode_check.py "$URL" "$DENSE" > "$OUT/check-$decode.json"
    stop_server
  done
  for decode in eager "$FAST_DECODE"; do
    within "$LILLM" generate --checkpoint "$OUT/dense" --prompt "The king" --max-new-tokens 256 \
      --temperature 1.0 --seed 3 --device "$DEVICE" --dtype "$DTYPE" --decode "$decode" \
      --timing > "$OUT/generate-$decode.txt" 2> "$OUT/generate-$decode.log"
    "$PYTHON" -c '
import json, re, sys
line = [l for l in open(sys.argv[1]) if "tokens/s" in l][-1]
n, rate = re.match(r"(\d+) tokens.*: ([\d.na/]+) tokens/s", line).groups()
print(json.dumps({"tokens": int(n), "tokens_per_s": float(rate) if rate != "n/a" else None}))
' "$OUT/generate-$decode.log" > "$OUT/generate-$decode.json"
  done
  within "$LILLM" bench decode --preset "$DENSE" --device "$DEVICE" --dtype "$DTYPE" \
    --rows 1,8,32 > "$OUT/decode-step.json" 2> "$OUT/decode-step.log"
}

step() {
  within "$LILLM" bench kernels --preset "$DENSE" --device "$DEVICE" --dtype "$DTYPE" \
    --rows "$SMALL_ROWS" --block "$BLOCK" > "$OUT/kernels.json" 2> "$OUT/kernels.log"
  train dense-full "$DENSE" "$ROWS" "$DTYPE" "$DEVICE" "$STEPS" --head-loss full
  train dense-small "$DENSE" "$SMALL_ROWS" "$DTYPE" "$DEVICE" "$STEPS" --step-mode "$FAST_STEP"
  # The dense run's head loss, so that the two runs differ only in how the step runs.
  train dense-eager "$DENSE" "$ROWS" "$DTYPE" "$DEVICE" "$STEPS" --head-loss chunked --step-mode eager
  train dense-small-eager "$DENSE" "$SMALL_ROWS" "$DTYPE" "$DEVICE" "$STEPS" --step-mode eager
}

large() {
  train large "$LARGE" "$LARGE_ROWS" "$DTYPE" "$DEVICE" "$STEPS" --step-mode "$FAST_STEP"
  reference ref-large "$LARGE" "$LARGE_ROWS"
}

moe() {
  train moe "$MOE" "$MOE_ROWS" "$DTYPE" "$DEVICE" "$STEPS" --step-mode "$FAST_STEP"
  train dense-moe-rows "$DENSE" "$MOE_ROWS" "$DTYPE" "$DEVICE" "$STEPS"
}

curves() {
  train curve-f32 "$DENSE" "$SMALL_ROWS" float32 "$DEVICE" "$CURVE_STEPS"
  train curve-low "$DENSE" "$SMALL_ROWS" "$DTYPE" "$DEVICE" "$CURVE_STEPS"
}

profile() {
  train profile "$DENSE" "$ROWS" "$DTYPE" "$DEVICE" 30 --profile-steps 20:25 --step-mode eager
}

job() {
  free_port() { "$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
  local cport
  cport=$(free_port)
  rm -rf "$OUT/job"
  $LILLM coordinator --nodes 1 --listen 127.0.0.1:$cport --metrics-listen 127.0.0.1:$(free_port) \
    --store-port "$(free_port)" --state-dir "$OUT/job/coordinator" > "$OUT/coordinator.log" 2>&1 &
  local coordinator=$!
  $LILLM dataloader --coordinator 127.0.0.1:$cport --data "$DATA" --node gpu \
    --listen 127.0.0.1:"$(free_port)" > "$OUT/dataloader.log" 2>&1 &
  local loader=$!
  trap "kill $coordinator $loader 2>/dev/null || true" EXIT
  train job "$DENSE" "$ROWS" "$DTYPE" "$DEVICE" "$STEPS" --coordinator 127.0.0.1:$cport --node gpu
}

serving_more() {
  serve_under_load large "$LARGE"
  serve_under_load moe "$MOE"
}

# bring_back DIR: into DIR, what a device call can bring back: the table, summary.json and
# one archive of the small files the sections left (figures, logs, profile tables; no
# weights, no trace over 2 MiB).
bring_back() {
  mkdir -p "$1"
  cp "$OUT/table.txt" "$OUT/summary.json" "$1/" 2>/dev/null || true
  (cd "$OUT" && find . -maxdepth 2 -type f -size -2048k \( -name '*.json' -o -name '*.jsonl' \
    -o -name '*.log' -o -name '*.txt' -o -name '*.toml' \) -print0 |
    tar --null -czf - -T -) > "$1/results.tar.gz"
}

section correctness 30 correctness
section training 150 training
section serving-dense 45 serving_dense
section decoding 75 decoding
section step 90 step
section large 100 large
section moe 50 moe
section curves 60 curves
section profile 25 profile
section job 30 job
section serving-more 90 serving_more

status=0
"$PYTHON" bench/gpu_summary.py "$OUT" > "$OUT/table.txt" || status=$?
cat "$OUT/table.txt"
[ -z "$RESULTS" ] || bring_back "$RESULTS"
exit "$status"
