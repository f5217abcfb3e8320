"""Load on a running `lillm serve`: 1, 8 and 32 concurrent streaming clients, each asking
for one completion after another for a fixed time (the 32-stream level for SOAK_SECONDS,
a soak). Prints JSON with, per level, aggregate tokens/s, time to first token and
inter-token latency (p50, p99, in ms), errors, and the server's RSS before and after the
32-stream run.

Each client is its own process. Threads of one process would take turns holding Python's
lock to parse their events: at a GPU's rate (a token per stream every millisecond or so)
that wait, not the server, would be the latency measured. As a check on the clients, each
level also reports what the server itself measured over it (`server_*`, from its
`/metrics` histograms: the upper bound of the bucket that holds the quantile).

usage: generation_bench.py URL MODEL SERVER_PID [SECONDS_PER_LEVEL [SOAK_SECONDS]]"""
import http.client, json, multiprocessing, queue, sys, time
from urllib.parse import urlparse

url, model, pid = sys.argv[1], sys.argv[2], int(sys.argv[3])
seconds = float(sys.argv[4]) if len(sys.argv) > 4 else 20.0
soak_seconds = float(sys.argv[5]) if len(sys.argv) > 5 else seconds
host = urlparse(url)


def connect():
    return http.client.HTTPConnection(host.hostname, host.port, timeout=120)


def completion_stream(seed, max_tokens=64):
    """Yields (text, completion tokens or None) per server-sent event of one streaming
    completion. Plain http.client: on a small machine the clients share the CPU with the
    server, so they must cost as little as possible (the `openai` client's per-chunk parsing
    would be the bottleneck)."""
    conn = connect()
    body = json.dumps({"model": model, "prompt": "The king", "max_tokens": max_tokens,
                       "temperature": 1.0, "seed": seed, "stream": True,
                       "stream_options": {"include_usage": True}})
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}")
    for line in response:
        if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
            continue
        event = json.loads(line[6:])
        usage = event.get("usage")
        text = event["choices"][0]["text"] if event["choices"] else ""
        yield text, usage and usage["completion_tokens"]
    conn.close()


def rss_mib():
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def percentile(values, p):
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(p / 100 * len(values)))]


def server_figures():
    """The server's token counter and latency histograms now: {name: value} for the
    counter, {name: [(upper bound s, cumulative count)]} for each histogram."""
    conn = connect()
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    counters, histograms = {}, {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, value = line.rsplit(" ", 1)
        if "_bucket{le=" in name:
            base, le = name.split("_bucket{le=")
            histograms.setdefault(base, []).append((float(le.strip('"}')), float(value)))
        else:
            counters[name] = float(value)
    return counters, histograms


def bucket_quantile(before, after, q):
    """The upper bound (ms) of the bucket holding quantile q of what a histogram observed
    between two readings; None when it observed nothing, inf past its last bound."""
    counts = [(le, a - b) for (le, a), (_, b) in zip(after, before)]
    total = counts[-1][1] if counts else 0
    if total <= 0:
        return None
    for le, n in counts:
        if n >= q * total:
            return round(1e3 * le, 2)


def client_loop(seed, seconds, go, results):
    """One client: waits for `go`, then asks for completion after completion until
    `seconds` have passed, and puts its figures on `results`."""
    stats = {"tokens": 0, "ttft": [], "itl": [], "errors": 0}
    go.wait()
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = last = time.perf_counter()
        first, gaps, tokens = None, [], 0
        try:
            for text, used in completion_stream(seed):
                now = time.perf_counter()
                if text:
                    if first is None:
                        first = now - start
                    else:
                        gaps.append(now - last)
                    last = now
                if used:
                    tokens = used
        except Exception:
            stats["errors"] += 1
            continue
        stats["tokens"] += tokens
        if first is not None:
            stats["ttft"].append(first)
        stats["itl"].extend(gaps)
        seed += 1000
    results.put(stats)


def level(streams, seconds, every_10s=None):
    """`streams` clients for `seconds`; `every_10s`, if given, is called every 10 s while
    they run."""
    # This process starts no thread: the forked clients inherit nothing half-done.
    fork = multiprocessing.get_context("fork")
    go, results = fork.Event(), fork.Queue()
    clients = [fork.Process(target=client_loop, args=(i, seconds, go, results)) for i in range(streams)]
    [c.start() for c in clients]
    (counters0, hist0) = server_figures()
    start = time.perf_counter()
    go.set()
    stats = []
    while len(stats) < len(clients):
        try:
            stats.append(results.get(timeout=10))
        except queue.Empty:
            # A client that died without its figures fails the level instead of hanging it
            # (each of its requests gives up after 120 s).
            if time.perf_counter() - start > seconds + 150:
                raise RuntimeError(f"{len(clients) - len(stats)} of {streams} clients never reported")
            if every_10s:
                every_10s()
    [c.join() for c in clients]
    wall = time.perf_counter() - start
    (counters1, hist1) = server_figures()
    tokens = sum(s["tokens"] for s in stats)
    ttft = [t for s in stats for t in s["ttft"]]
    itl = [t for s in stats for t in s["itl"]]
    ms = lambda v: round(1e3 * v, 1)
    server = lambda name, q: bucket_quantile(hist0.get(name, []), hist1.get(name, []), q)
    generated = "lillm_serve_generated_tokens_total"
    return {
        "streams": streams,
        "tokens_per_s": round(tokens / wall, 1),
        "ttft_p50_ms": ms(percentile(ttft, 50)),
        "ttft_p99_ms": ms(percentile(ttft, 99)),
        "itl_p50_ms": ms(percentile(itl, 50)),
        "itl_p99_ms": ms(percentile(itl, 99)),
        "errors": sum(s["errors"] for s in stats),
        "server_tokens_per_s": round((counters1.get(generated, 0) - counters0.get(generated, 0)) / wall, 1),
        "server_ttft_p99_ms_at_most": server("lillm_serve_time_to_first_token_seconds", 0.99),
        "server_itl_p50_ms_at_most": server("lillm_serve_inter_token_latency_seconds", 0.50),
        "server_itl_p99_ms_at_most": server("lillm_serve_inter_token_latency_seconds", 0.99),
    }


# Warm-up: the first requests pay for allocations.
for _ in completion_stream(0, 16):
    pass
levels = [level(1, seconds), level(8, seconds)]
# The server's RSS every 10 s of the 32-stream soak: growth would show as a rising series.
rss = [rss_mib()]
levels.append(level(32, soak_seconds, every_10s=lambda: rss.append(rss_mib())))
rss.append(rss_mib())
print(json.dumps({"levels": levels, "rss_mib_before_32": round(rss[0], 1),
                  "rss_mib_after_32": round(rss[-1], 1),
                  "rss_mib_during_32": [round(r, 1) for r in rss],
                  "seconds_per_level": seconds, "soak_seconds": soak_seconds}))
