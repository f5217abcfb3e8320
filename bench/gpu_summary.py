"""The table of bench/gpu.sh, from what its sections left in OUT (their JSON files, logs,
params.json and sections.jsonl). It prints a row for every figure the script measures:
a figure whose section was skipped for time, failed or was not asked for reads "not run"
with the reason, so a partial run still shows everything it did measure. It can be run
again on a copy of OUT (say, one fetched from a GPU machine whose call was cut off).

Exit status: 1 if a check failed or a section failed, 3 if the run is incomplete (a section
skipped or stopped at the deadline, or a figure missing), 0 otherwise.

usage: gpu_summary.py OUT"""
import json, os, re, sys

out = sys.argv[1]
p = json.load(open(f"{out}/params.json"))
dense, large, moe, dtype, device = p["dense"], p["large"], p["moe"], p["dtype"], p["device"]
rows, small, large_rows, moe_rows = p["rows"], p["small_rows"], p["large_rows"], p["moe_rows"]
fast, fast_step = p["fast_decode"], p["fast_step"]
asked_side = "compiled PyTorch" if p["compile"] == "1" else "eager PyTorch"
on_cuda = device.startswith("cuda")
sections = {}
if os.path.exists(f"{out}/sections.jsonl"):
    for line in open(f"{out}/sections.jsonl"):
        s = json.loads(line)
        sections[s["section"]] = s
r = lambda name: json.load(open(f"{out}/{name}.json"))
table, failed, missing = [], [], []


def row(what, ours, theirs="", ratio="", target="", ok=None):
    table.append({"what": what, "lillm": ours, "baseline": theirs, "ratio": ratio, "target": target, "ok": ok})
    if ok is False:
        failed.append(what)


def figures(section, what, compute):
    """Rows from `compute`; where its inputs are missing, one row saying why not."""
    try:
        compute()
    except (OSError, KeyError, IndexError, ValueError, TypeError, ZeroDivisionError) as e:
        s = sections.get(section)
        why = "not asked for (ONLY)" if s is None else s["status"] if s["status"] != "ok" else f"{type(e).__name__}: {e}"
        row(what, "not run", why[:60])
        missing.append(what)


def correctness():
    cpu, dev = r("same-cpu")["losses"], r("same-device")["losses"]
    diff = max(abs(a - b) for a, b in zip(cpu, dev)) if len(cpu) == len(dev) == 5 else float("inf")
    row("same seed, CPU vs device, float32, 5 steps: max |loss diff|", f"{diff:.2e}", target="<= 1e-3", ok=diff <= 1e-3)


def curves():
    f32, low = r("curve-f32")["losses"], r("curve-low")["losses"]
    tail = max(1, len(f32) // 5)
    gap = abs(sum(f32[-tail:]) / tail - sum(low[-tail:]) / tail)
    row(f"{dtype} vs float32 loss, mean of the last {tail} windows", f"{gap:.3f}", target="<= 0.05", ok=gap <= 0.05)


def speed(what, ours, ref, target):
    """Tokens/s against the reference, named as what it ran (compiled, or eager where
    torch.compile failed on the machine)."""
    a, b = r(ours), r(ref)
    ratio = a["tokens_per_s"] / b["tokens_per_s"]
    side = "compiled PyTorch" if b.get("compiled") else "eager PyTorch"
    row(f"{what} vs {side} tokens/s", f"{a['tokens_per_s']:,.0f}", f"{b['tokens_per_s']:,.0f}", f"{ratio:.2f}x", target)


def peak(x):
    return f"{x:.1f} GiB" if x is not None else "n/a"


def dense_speed():
    speed(f"{dense} {rows} rows", "dense", "ref-dense", ">= 1.0x (aim 1.4x)")
    row(f"{dense} {rows} rows peak GPU memory", peak(r("dense")["peak_gpu_gib"]),
        peak(r("ref-dense").get("peak_gpu_gib")), target="<= the reference's")


def early_loss_diff(a, b):
    """(windows compared, largest |loss difference|) over the first three log windows of two
    runs of the same seed and data: later windows drift apart by rounding alone."""
    early = min(3, len(a["losses"]), len(b["losses"]))
    return early, max(abs(x - y) for x, y in zip(a["losses"][:early], b["losses"][:early]))


def head_loss():
    chunked, full = r("dense"), r("dense-full")
    early, diff = early_loss_diff(chunked, full)
    row(f"chunked vs full head loss, {dtype}: max |loss diff|, first {early} windows", f"{diff:.2e}",
        target="<= 0.02", ok=diff <= 0.02)
    row(f"chunked vs full head loss, {dense} {rows} rows tokens/s", f"{chunked['tokens_per_s']:,.0f}",
        f"{full['tokens_per_s']:,.0f}", f"{chunked['tokens_per_s'] / full['tokens_per_s']:.2f}x", ">= 1.0x")
    row(f"chunked vs full head loss, {dense} {rows} rows peak GPU memory", peak(chunked["peak_gpu_gib"]),
        peak(full["peak_gpu_gib"]), target="lower")


def kernels():
    k = r("kernels")
    for name, key in (("SwiGLU", "fused_swiglu"), ("RoPE", "fused_rope")):
        row(f"fused {name} kernel in use (compiled at run time, checked against the reference)",
            "yes" if k[key] else "no", target="yes on CUDA", ok=k[key] if on_cuda else None)
    row(f"fused vs reference kernels, {dense} {dtype}: logits / gradients max rel diff",
        f"{k['logits_rel_diff']:.1e} / {k['grads_rel_diff']:.1e}", target="<= 2e-2 each",
        ok=max(k["logits_rel_diff"], k["grads_rel_diff"]) <= 2e-2)
    row(f"fused vs reference kernels, {dense} {small} rows forward+backward ms", f"{k['fused_ms']:.2f}",
        f"{k['reference_ms']:.2f}", f"{k['reference_ms'] / k['fused_ms']:.2f}x", ">= 1.0x")
    for alone in k.get("each_alone", []):
        row(f"fused {alone['layer']} alone vs reference, {dense} {small} rows forward+backward ms", f"{alone['ms']:.2f}",
            f"{k['reference_ms']:.2f}", f"{k['reference_ms'] / alone['ms']:.2f}x", ">= 1.0x")
    head = k["head_loss"]
    row(f"chunked vs full head loss alone, {dense} {dtype}: |loss diff| / gradients max rel diff",
        f"{head['loss_diff']:.1e} / {head['grads_rel_diff']:.1e}", target="<= 2e-2 each",
        ok=max(head["loss_diff"], head["grads_rel_diff"]) <= 2e-2)
    row(f"chunked vs full head loss alone, {dense} {small} rows forward+backward ms", f"{head['chunked_ms']:.2f}",
        f"{head['full_ms']:.2f}", f"{head['full_ms'] / head['chunked_ms']:.2f}x", ">= 1.0x")


def small_rows():
    s, d = r("dense-small"), r("dense")
    row(f"{dense}: {small} rows vs {rows} rows tokens/s", f"{s['tokens_per_s']:,.0f}", f"{d['tokens_per_s']:,.0f}",
        f"{s['tokens_per_s'] / d['tokens_per_s']:.2f}", ">= 0.80")


def capture(name):
    """How a run's step ran, from what it said about its CUDA graph (a run that did not
    finish has no figures: KeyError/OSError make its row "not run")."""
    r(name)
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


def captured(name, preset, n):
    def compute():
        how = capture(name)
        row(f"step as one CUDA graph, {name} run ({preset}, {n} rows)", how, target="captured",
            ok=how == "captured" if on_cuda else None)
    return compute


def step_against_eager(graphed, eager, n):
    def compute():
        g, e = r(graphed), r(eager)
        early, diff = early_loss_diff(g, e)
        row(f"{dense} {n} rows, {fast_step} vs eager step: max |loss diff|, first {early} windows", f"{diff:.2e}",
            target="<= 0.02", ok=diff <= 0.02)
        row(f"{dense} {n} rows, {fast_step} vs eager step tokens/s", f"{g['tokens_per_s']:,.0f}",
            f"{e['tokens_per_s']:,.0f}", f"{g['tokens_per_s'] / e['tokens_per_s']:.2f}x", ">= 1.0x")
    return compute


def moe_mfu():
    m, dm = r("moe"), r("dense-moe-rows")
    row(f"{moe} vs {dense} MFU at {moe_rows} rows", f"{100 * m['mfu']:.1f}%", f"{100 * dm['mfu']:.1f}%",
        f"{m['mfu'] / dm['mfu']:.2f}", ">= 0.70")


def job_path():
    j, d = r("job"), r("dense")
    row(f"job path vs one process, {dense} {rows} rows", f"{j['tokens_per_s']:,.0f}", f"{d['tokens_per_s']:,.0f}",
        f"{j['tokens_per_s'] / d['tokens_per_s']:.2f}", "~1.0")


def serving(name, model):
    def compute():
        served = r(f"serve-{name}")
        targets = {1: ">= 1000 tok/s", 8: "p99 <= 3x p50, TTFT p99 <= 50 ms", 32: ">= 20000 tok/s"}
        bound = lambda ms: "-" if ms is None else f"{ms:g}"
        for level in served["levels"]:
            row(f"serve {model} ({fast}) {level['streams']} streams: tokens/s; TTFT p99, ITL p50/p99 ms",
                f"{level['tokens_per_s']:,.0f}",
                f"{level['ttft_p99_ms']:.0f} / {level['itl_p50_ms']:.1f} / {level['itl_p99_ms']:.1f}",
                target=targets.get(level["streams"], "") if name == "dense" else "")
            # What the server measured itself (bucket bounds): a gap between the two is the
            # clients' or the HTTP path's, not the decoder's.
            row(f"serve {model} ({fast}) {level['streams']} streams, by the server: tokens/s; at most ms",
                f"{level['server_tokens_per_s']:,.0f}",
                " / ".join(bound(level[f"server_{k}_ms_at_most"]) for k in ("ttft_p99", "itl_p50", "itl_p99")))
        errors = sum(level["errors"] for level in served["levels"])
        row(f"serve {model}: failed requests", f"{errors}", target="0", ok=errors == 0)
    return compute


def decode_check():
    eager, fixed, graphs = r("check-eager"), r("check-static"), r(f"check-{fast}")
    if fast != "static":
        row(f"greedy answers, {fast} vs static (the same step uncaptured)",
            f"{sum(a == b for a, b in zip(graphs['greedy'], fixed['greedy']))}/{len(fixed['greedy'])}",
            target="all identical", ok=graphs["greedy"] == fixed["greedy"])
    row(f"greedy answers, {fast} vs eager",
        f"{sum(a == b for a, b in zip(graphs['greedy'], eager['greedy']))}/{len(eager['greedy'])}",
        target="identical (in float32; bf16 may round apart)")
    row(f"seeded answer alone vs among 8 streams ({fast})", "same" if graphs["alone"] == graphs["together"] else "differs",
        target="same", ok=graphs["alone"] == graphs["together"])


def generate():
    g_fast, g_eager = r(f"generate-{fast}"), r("generate-eager")
    row(f"lillm generate {dense}, one stream, {g_fast['tokens']} tokens: tokens/s ({fast} vs eager)",
        f"{g_fast['tokens_per_s']:,.0f}", f"{g_eager['tokens_per_s']:,.0f}",
        f"{g_fast['tokens_per_s'] / g_eager['tokens_per_s']:.2f}x", ">= 1000 tok/s")


def decode_step():
    for level in r("decode-step")["levels"]:
        n, uncaptured, graph = level["rows"], level["uncaptured_ms"], level["graph_ms"]
        what = f"decode step alone, {dense} {n} rows: ms replayed vs uncaptured"
        target = "<= 1.0 ms (1000 tok/s)" if n == 1 else ""
        if graph is not None:
            row(what, f"{graph:.3f}", f"{uncaptured:.3f}", f"{uncaptured / graph:.2f}x", target,
                ok=graph <= 1.0 if n == 1 else None)
        else:
            why = level["graph_error"] or f"no graphs on {device}"
            row(what, "not captured", f"{uncaptured:.3f}", target=why[:60], ok=False if on_cuda else None)
        kernels = level["kernels"]
        row(f"decode step alone, {dense} {n} rows: kernels (operator calls); GPU ms",
            f"{kernels if kernels is not None else '-'} ({level['operators']})",
            f"{level['kernel_ms']:.3f}" if level["kernel_ms"] is not None else "")


figures("correctness", "same seed, CPU vs device", correctness)
figures("training", f"{dense} {rows} rows vs {asked_side}", dense_speed)
figures("serving-dense", f"serve {dense} ({fast})", serving("dense", dense))
figures("decoding", "greedy and seeded answers", decode_check)
figures("decoding", f"lillm generate {dense}, one stream", generate)
figures("decoding", f"decode step alone, {dense}", decode_step)
figures("step", "fused kernels against the reference", kernels)
figures("step", "chunked vs full head loss", head_loss)
figures("step", f"{dense}: {small} rows vs {rows} rows", small_rows)
for name, section, preset, n in [("dense", "training", dense, rows), ("dense-small", "step", dense, small),
                                 ("large", "large", large, large_rows), ("moe", "moe", moe, moe_rows)]:
    figures(section, f"step as one CUDA graph, {name} run", captured(name, preset, n))
figures("step", f"{dense} {rows} rows, {fast_step} vs eager step", step_against_eager("dense", "dense-eager", rows))
figures("step", f"{dense} {small} rows, {fast_step} vs eager step",
        step_against_eager("dense-small", "dense-small-eager", small))
figures("large", f"{large} {large_rows} rows vs {asked_side}",
        lambda: speed(f"{large} {large_rows} rows", "large", "ref-large", ">= 1.0x"))
figures("moe", f"{moe} vs {dense} MFU", moe_mfu)
figures("curves", f"{dtype} vs float32 loss", curves)
figures("job", "job path vs one process", job_path)
figures("serving-more", f"serve {large} ({fast})", serving("large", large))
figures("serving-more", f"serve {moe} ({fast})", serving("moe", moe))

gpu = open(f"{out}/gpu.txt").read().strip()
print(f"\nlillm on {gpu}")
print(f"{'what':<66} {'lillm':>12} {'baseline':>22} {'ratio':>7}  target")
for x in table:
    mark = {True: " ok", False: " FAILED", None: ""}[x["ok"]]
    print(f"{x['what']:<66} {x['lillm']:>12} {x['baseline']:>22} {x['ratio']:>7}  {x['target']}{mark}")
print("\nsections: " + ", ".join(f"{s['section']} {s['status']} ({s['seconds']} s)" for s in sections.values()))
broken = [s["section"] for s in sections.values() if s["status"].startswith("failed")]
incomplete = [s["section"] for s in sections.values() if s["status"] != "ok" and s["section"] not in broken] + missing
json.dump({"device": gpu, "rows": table, "sections": list(sections.values()), "failed_checks": failed,
           "failed_sections": broken, "incomplete": incomplete}, open(f"{out}/summary.json", "w"), indent=1)
if os.path.exists(f"{out}/profile/profile-rank0.txt"):
    print()
    print("".join(open(f"{out}/profile/profile-rank0.txt").readlines()[:40]))
sys.exit(1 if failed or broken else 3 if incomplete else 0)
