"""What the decode path must not change, asked of a running `lillm serve`: greedy answers
to a few prompts, one after another, and a seeded sampled answer alone and then among
seven other concurrent requests. Prints JSON; bench/gpu.sh compares servers.

usage: decode_check.py URL MODEL"""
import http.client, json, sys, threading
from urllib.parse import urlparse

url, model = sys.argv[1], sys.argv[2]
host = urlparse(url)
PROMPTS = ["The king", "Good night, sweet prince", "To be, or not", "O Romeo"]


def complete(prompt, max_tokens, **sampling):
    conn = http.client.HTTPConnection(host.hostname, host.port, timeout=120)
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, **sampling}
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.read()[:200]}")
    text = json.loads(response.read())["choices"][0]["text"]
    conn.close()
    return text


greedy = [complete(p, 48, temperature=0) for p in PROMPTS]
sampled = lambda seed: complete("The king", 48, temperature=1.0, seed=seed)
alone = sampled(7)
answers = [None] * 8
start = threading.Barrier(8)


def worker(i):
    start.wait()
    answers[i] = sampled(7 if i == 0 else 100 + i)


threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
[t.start() for t in threads]
[t.join() for t in threads]
print(json.dumps({"greedy": greedy, "alone": alone, "together": answers[0]}))
