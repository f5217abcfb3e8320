"""Load on a running `lillm serve`: 1, 8 and 32 concurrent streaming clients, each asking
for one completion after another for a fixed time (the 32-stream level for SOAK_SECONDS,
a soak). Prints JSON with, per level, aggregate tokens/s, time to first token and
inter-token latency (p50, p99, in ms), errors, and the server's RSS before and after the
32-stream run.

usage: generation_bench.py URL MODEL SERVER_PID [SECONDS_PER_LEVEL [SOAK_SECONDS]]"""
import http.client, json, sys, threading, time
from urllib.parse import urlparse

url, model, pid = sys.argv[1], sys.argv[2], int(sys.argv[3])
seconds = float(sys.argv[4]) if len(sys.argv) > 4 else 20.0
soak_seconds = float(sys.argv[5]) if len(sys.argv) > 5 else seconds
host = urlparse(url)


def completion_stream(seed, max_tokens=64):
    """Yields (text, completion tokens or None) per server-sent event of one streaming
    completion. Plain http.client: on this 2-core machine the clients share the CPU with the
    server, so they must cost as little as possible (the `openai` client's per-chunk parsing
    would be the bottleneck)."""
    conn = http.client.HTTPConnection(host.hostname, host.port, timeout=120)
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


def client_loop(seed, deadline, stats, lock):
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
            with lock:
                stats["errors"] += 1
            continue
        with lock:
            stats["tokens"] += tokens
            if first is not None:
                stats["ttft"].append(first)
            stats["itl"].extend(gaps)
        seed += 1000


def level(streams, seconds):
    stats, lock = {"tokens": 0, "ttft": [], "itl": [], "errors": 0}, threading.Lock()
    start = time.perf_counter()
    deadline = start + seconds
    threads = [threading.Thread(target=client_loop, args=(i, deadline, stats, lock)) for i in range(streams)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    wall = time.perf_counter() - start
    ms = lambda v: round(1e3 * v, 1)
    return {
        "streams": streams,
        "tokens_per_s": round(stats["tokens"] / wall, 1),
        "ttft_p50_ms": ms(percentile(stats["ttft"], 50)),
        "ttft_p99_ms": ms(percentile(stats["ttft"], 99)),
        "itl_p50_ms": ms(percentile(stats["itl"], 50)),
        "itl_p99_ms": ms(percentile(stats["itl"], 99)),
        "errors": stats["errors"],
    }


# Warm-up: the first requests pay for allocations.
for _ in completion_stream(0, 16):
    pass
levels = [level(1, seconds), level(8, seconds)]
# The server's RSS every 10 s of the 32-stream soak: growth would show as a rising series.
rss = [rss_mib()]
soaking = threading.Event()
def sample_rss():
    while not soaking.wait(10):
        rss.append(rss_mib())
sampler = threading.Thread(target=sample_rss)
sampler.start()
levels.append(level(32, soak_seconds))
soaking.set()
sampler.join()
rss.append(rss_mib())
print(json.dumps({"levels": levels, "rss_mib_before_32": round(rss[0], 1),
                  "rss_mib_after_32": round(rss[-1], 1),
                  "rss_mib_during_32": [round(r, 1) for r in rss],
                  "seconds_per_level": seconds, "soak_seconds": soak_seconds}))
