"""What the decode path must not change, asked of a running `lillm serve`: greedy answers
to a few prompts, one after another (the last one over 150 tokens, so that it is prefilled
in chunks), and a seeded sampled answer alone and then among seven other concurrent
requests. Prints JSON; bench/gpu.sh compares servers.

usage: decode_check.py URL MODEL"""
import http.client, json, sys, threading
from urllib.parse import urlparse

url, model = sys.argv[1], sys.argv[2]
host = urlparse(url)
PROMPTS = ["The king", "Good night, sweet prince", "To be, or not", "O Romeo"]


def request(prompt, max_tokens, **sampling):
    conn = http.client.HTTPConnection(host.hostname, host.port, timeout=120)
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, **sampling}
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.read()[:200]}")
    answer = json.loads(response.read())
    conn.close()
    return answer


def complete(prompt, max_tokens, **sampling):
    return request(prompt, max_tokens, **sampling)["choices"][0]["text"]


# Over 150 tokens in this model's tokenizer: more than one 128-token prefill chunk.
UNIT = "The king and the queen of the land said good night to the prince. "
per_unit = request(UNIT, 1, temperature=0)["usage"]["prompt_tokens"]
PROMPTS.append(UNIT * (150 // per_unit + 1))
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
