"""The lilLM model and training step in eager Python PyTorch, for `make bench`.

Same architecture, ops, batch shapes and optimizer as `lillm train` (SDPA with GQA, rms_norm,
real-valued adjacent-pair RoPE, SwiGLU, tied head, AdamW, clipping at 1.0), fed by the same
kind of random windows from the same token shards. Prints steady-state tokens/s as JSON.

On a GPU (`--device cuda`) it is the anchor of bench/gpu.sh: `--dtype bfloat16` trains under
bf16 autocast with float32 weights (as lillm does), `--compile` wraps the model in
torch.compile (the original's fastest configuration), and the JSON adds the peak GPU memory.
"""
import argparse, json, math, os, time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, d, qh, kvh, hidden):
        super().__init__()
        hd = d // qh
        self.qh, self.kvh, self.hd = qh, kvh, hd
        self.attn_norm = nn.RMSNorm(d, eps=1e-6)
        self.ffn_norm = nn.RMSNorm(d, eps=1e-6)
        self.wq = nn.Linear(d, qh * hd, bias=False)
        self.wk = nn.Linear(d, kvh * hd, bias=False)
        self.wv = nn.Linear(d, kvh * hd, bias=False)
        self.wo = nn.Linear(qh * hd, d, bias=False)
        self.w1 = nn.Linear(d, hidden, bias=False)
        self.w2 = nn.Linear(hidden, d, bias=False)
        self.w3 = nn.Linear(d, hidden, bias=False)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        h = self.attn_norm(x)
        q = self.wq(h).view(B, T, self.qh, self.hd)
        k = self.wk(h).view(B, T, self.kvh, self.hd)
        v = self.wv(h).view(B, T, self.kvh, self.hd)

        def rope(t):
            p = t.float().view(B, T, t.shape[2], self.hd // 2, 2)
            e, o = p[..., 0], p[..., 1]
            return torch.stack([e * cos - o * sin, e * sin + o * cos], -1).view(B, T, t.shape[2], self.hd).type_as(t)

        q, k = rope(q).transpose(1, 2), rope(k).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v.transpose(1, 2), is_causal=True, enable_gqa=True)
        x = x + self.wo(a.transpose(1, 2).reshape(B, T, -1))
        h = self.ffn_norm(x)
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h))


class LilLM(nn.Module):
    def __init__(self, vocab, d, layers, qh, kvh, seq):
        super().__init__()
        hidden = 128 * math.ceil(int(2 * 4 * d / 3) / 128)
        self.tok_emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d, qh, kvh, hidden) for _ in range(layers))
        self.norm = nn.RMSNorm(d, eps=1e-6)
        hd = d // qh
        inv = 1.0 / (10000.0 ** (torch.arange(0, hd, 2).float() / hd))
        ang = torch.outer(torch.arange(seq).float(), inv)
        self.register_buffer("cos", ang.cos().view(1, seq, 1, hd // 2), persistent=False)
        self.register_buffer("sin", ang.sin().view(1, seq, 1, hd // 2), persistent=False)

    def forward(self, ids, targets):
        T = ids.shape[1]
        x = self.tok_emb(ids)
        for b in self.blocks:
            x = b(x, self.cos[:, :T], self.sin[:, :T])
        logits = F.linear(self.norm(x), self.tok_emb.weight)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--vocab", type=int, required=True)
    ap.add_argument("--d-model", type=int, required=True)
    ap.add_argument("--n-layers", type=int, required=True)
    ap.add_argument("--q-heads", type=int, required=True)
    ap.add_argument("--kv-heads", type=int, required=True)
    ap.add_argument("--block-size", type=int, required=True)
    ap.add_argument("--batch-size", type=int, required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--warmup-steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--compile", action="store_true")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(1337)
    manifest = json.load(open(os.path.join(a.data, "manifest.json")))
    data = np.memmap(os.path.join(a.data, manifest["train"][0]["file"]), dtype=np.uint16, mode="r")
    device = torch.device(a.device)
    model = LilLM(a.vocab, a.d_model, a.n_layers, a.q_heads, a.kv_heads, a.block_size).to(device)
    cuda = device.type == "cuda"
    # The fused CUDA AdamW is what a tuned PyTorch run uses; on CPU the default stays.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, **({"fused": True} if cuda else {}))
    step_model = torch.compile(model) if a.compile else model
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=a.dtype == "bfloat16")
    rng = np.random.default_rng(0)
    timed, start = 0, None
    for step in range(a.steps + a.warmup_steps):
        if step == a.warmup_steps:
            start = time.perf_counter()
        ix = rng.integers(0, len(data) - a.block_size - 1, a.batch_size)
        w = torch.from_numpy(np.stack([data[i : i + a.block_size + 1].astype(np.int64) for i in ix]))
        w = w.pin_memory().to(device, non_blocking=True) if cuda else w
        with autocast:
            loss = step_model(w[:, :-1], w[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step + 1 == a.warmup_steps and cuda:
            torch.cuda.synchronize()
        if step >= a.warmup_steps:
            timed += 1
    final_loss = loss.item()  # waits for the last step
    secs = time.perf_counter() - start
    result = {"tokens_per_s": timed * a.batch_size * a.block_size / secs, "step_ms": 1e3 * secs / timed, "final_loss": final_loss,
              "compiled": a.compile}
    if cuda:
        result["peak_gpu_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    print(json.dumps(result))


if __name__ == "__main__":
    main()
