"""Generation speed of a running `lillm serve`: one stream, then 8 concurrent streams.
Prints JSON: single-stream tokens/s, time to first token, aggregate tokens/s for 8 streams."""
import json, sys, threading, time

from openai import OpenAI

url, model = sys.argv[1], sys.argv[2]
client = OpenAI(base_url=url + "/v1", api_key="none")


def stream(seed, out):
    start = time.perf_counter()
    first, tokens = None, 0
    for chunk in client.completions.create(model=model, prompt="The king", max_tokens=64, temperature=1.0, seed=seed, stream=True):
        if chunk.choices[0].text and first is None:
            first = time.perf_counter() - start
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    out.append((tokens, first or 0.0, time.perf_counter() - start))


stream(0, [])  # warm-up
single = []
for seed in range(3):
    stream(seed + 1, single)
tokens = sum(t for t, _, _ in single)
secs = sum(s for _, _, s in single)
concurrent = []
threads = [threading.Thread(target=stream, args=(100 + i, concurrent)) for i in range(8)]
start = time.perf_counter()
[t.start() for t in threads]
[t.join() for t in threads]
wall = time.perf_counter() - start
print(json.dumps({
    "single_tokens_per_s": tokens / secs,
    "ttft_ms": 1e3 * sum(f for _, f, _ in single) / len(single),
    "concurrent8_tokens_per_s": sum(t for t, _, _ in concurrent) / wall,
}))
