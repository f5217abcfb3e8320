#!/usr/bin/env python3
"""Chaos run: a `lillm train --nproc N` job under its supervisor while a random member
(trainer, dataloader or coordinator) is SIGKILLed every few seconds, and every other trainer
fault is a freeze instead (SIGSTOP for --freeze seconds, past the heartbeat timeout, then
SIGCONT: a silent failure whose sockets stay open); then the final weights are compared
with an uninterrupted run of the same job. With `--dataloaders 2` or more in TRAIN_ARGS,
every other dataloader fault is a freeze too: the coordinator evicts it and places its
shards on the others, and it takes a share back when it returns.

Prints failures injected and detected, detection time (kill -> the supervisor's report;
freeze -> the coordinator's eviction), recovery time (kill or SIGCONT -> the next completed
step), steps recomputed per failure, steps whose loss differs from the uninterrupted run,
and the final max |dW|. Exits 1 if the model differs or a failure went undetected.

  python bench/chaos.py --lillm target/release/lillm --data DATA --out DIR \
      [--duration 60] [--every 4] [--freeze 3.5] [--nproc 2] [--seed 1] [--json FILE] \
      -- TRAIN_ARGS...

TRAIN_ARGS are `lillm train` flags (model, steps, ...) without --data/--out/--nproc.
"""

import argparse
import datetime
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import time

from safetensors.numpy import load_file

ROLES = ("trainer", "dataloader", "coordinator")


def children(pid):
    """(pid, role, cmdline) of the launcher's child processes."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = open(f"/proc/{entry}/stat").read()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            cmd = open(f"/proc/{entry}/cmdline", "rb").read().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid != pid or len(cmd) < 2:
            continue
        sub = cmd[1].decode()
        role = {"train": "trainer"}.get(sub, sub)
        if role in ROLES:
            out.append((int(entry), role, b" ".join(cmd).decode()))
    return out


def log_matches(path, pattern):
    """(seconds since the epoch, match) of the timestamped lines of a log matching `pattern`."""
    found = []
    if not os.path.exists(path):
        return found
    for line in open(path, errors="replace"):
        hit = re.search(pattern, line)
        stamp = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+)Z", line)
        if hit and stamp:
            ts = datetime.datetime.fromisoformat(stamp.group(1)[:26]).replace(tzinfo=datetime.timezone.utc)
            found.append((ts.timestamp(), hit))
    return found


def losses(run):
    path = os.path.join(run, "metrics.jsonl")
    out = {}
    if os.path.exists(path):
        for line in open(path):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line being written
            if "loss" in rec:
                out[rec["step"]] = rec["loss"]
    return out


def final_weights(run):
    ckpts = sorted(d for d in os.listdir(os.path.join(run, "checkpoints")) if d.startswith("step-"))
    return ckpts[-1], load_file(os.path.join(run, "checkpoints", ckpts[-1], "model.safetensors"))


def train(lillm, args, data, out, nproc, extra=(), env=None, log=None):
    cmd = [lillm, "train", *args, "--data", data, "--out", out, "--nproc", str(nproc), *extra]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log or subprocess.DEVNULL, env=env)


def dataloaders_of(train_args):
    """The --dataloaders a job starts (1 unless TRAIN_ARGS say otherwise)."""
    for i, arg in enumerate(train_args):
        if arg == "--dataloaders" and i + 1 < len(train_args):
            return int(train_args[i + 1])
        if arg.startswith("--dataloaders="):
            return int(arg.split("=", 1)[1])
    return 1


def pct(values, fn):
    return f"{fn(values):.2f}" if values else "-"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lillm", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of fault injection")
    parser.add_argument("--every", type=float, default=4.0, help="mean seconds between kills")
    parser.add_argument("--freeze", type=float, default=3.5,
                        help="seconds a frozen trainer stays stopped (0: SIGKILL only)")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("train_args", nargs=argparse.REMAINDER)
    opts = parser.parse_args()
    train_args = [a for a in opts.train_args if a != "--"]
    rng = random.Random(opts.seed)
    # Freezing the only dataloader would stop the job for the freeze, not test a failover.
    freezable = {"trainer"} | ({"dataloader"} if dataloaders_of(train_args) >= 2 else set())
    os.makedirs(opts.out, exist_ok=False)

    reference = os.path.join(opts.out, "reference")
    t0 = time.time()
    if train(opts.lillm, train_args, opts.data, reference, opts.nproc).wait() != 0:
        sys.exit("the uninterrupted run failed")
    print(f"uninterrupted run: {time.time() - t0:.1f} s", flush=True)

    run = os.path.join(opts.out, "chaos")
    env = dict(os.environ, RUST_LOG="info")
    log_path = os.path.join(opts.out, "chaos.log")
    log = open(log_path, "w")
    job = train(opts.lillm, train_args, opts.data, run, opts.nproc, ["--max-restarts", "1000"], env, log)
    kills = []  # (time, role, pid, last step seen, "kill" or "freeze", time the fault ended)
    seen = {}  # step -> first time its loss line was seen
    start = time.time()
    next_kill = start + rng.uniform(0.5, 1.5) * opts.every
    order = []
    frozen = None  # (pid, when to SIGCONT, index in kills, role)
    faults = {role: 0 for role in ROLES}
    while job.poll() is None:
        now = time.time()
        for step in losses(run):
            seen.setdefault(step, now)
        if frozen and now >= frozen[1]:
            os.kill(frozen[0], signal.SIGCONT)
            kills[frozen[2]] = kills[frozen[2]][:5] + (time.time(),)
            print(f"{now - start:6.1f} s: SIGCONT {frozen[3]} {frozen[0]}", flush=True)
            frozen = None
            next_kill = time.time() + rng.uniform(0.5, 1.5) * opts.every
        if not frozen and now - start < opts.duration and now >= next_kill and seen:
            if not order:  # every role in turn, in a random order
                order = list(ROLES)
                rng.shuffle(order)
            role = order.pop()
            victims = [c for c in children(job.pid) if c[1] == role]
            if victims:
                pid, _, _ = rng.choice(victims)
                freeze = role in freezable and opts.freeze > 0 and faults[role] % 2 == 1
                faults[role] += 1
                sig = signal.SIGSTOP if freeze else signal.SIGKILL
                os.kill(pid, sig)
                when = time.time()
                kills.append((when, role, pid, max(seen), "freeze" if freeze else "kill", when))
                if freeze:
                    frozen = (pid, when + opts.freeze, len(kills) - 1, role)
                print(f"{when - start:6.1f} s: {sig.name} {role} {pid} at step {max(seen)}", flush=True)
            next_kill = time.time() + rng.uniform(0.5, 1.5) * opts.every
        time.sleep(0.02)
    if frozen:
        os.kill(frozen[0], signal.SIGCONT)
    now = time.time()
    for step in losses(run):
        seen.setdefault(step, now)
    log.close()
    if job.returncode != 0:
        sys.exit(f"the chaos run failed (exit {job.returncode}); see {log_path}")

    # Detection: the supervisor's report of each death (a timestamped log line). Steps
    # recomputed: where the next group started (the state it took) vs the last step the
    # job had completed when the trainer was killed.
    deaths = [t for t, _ in log_matches(log_path, r"died \(killed by SIGKILL\)")]
    coordinator_log = os.path.join(run, "logs", "coordinator.log")
    evictions = [t for t, _ in log_matches(coordinator_log, r"missed heartbeats")]
    shard_moves = len(log_matches(coordinator_log, r"shards move to the other dataloaders"))
    regroups = [(t, int(m.group(1))) for t, m in log_matches(log_path, r"the group starts from the state of step (\d+)")]
    detection, recovery, recomputed, undetected = [], [], [], 0
    for when, role, pid, last_step, kind, ended in kills:
        reports = evictions if kind == "freeze" else deaths
        after = [t - when for t in reports if t >= when - 0.05]
        if after:
            detection.append(max(0.0, min(after)))
        else:
            undetected += 1
        next_steps = [t - ended for s, t in seen.items() if t > ended]
        if next_steps:
            recovery.append(min(next_steps))
        if role == "trainer":
            starts = [step for t, step in regroups if t >= when - 0.05]
            if starts:
                recomputed.append(max(0, last_step - starts[0]))
    ref, got = losses(reference), losses(run)
    differing = sum(1 for s in ref if got.get(s) != ref[s]) + sum(1 for s in got if s not in ref)
    (ref_name, ref_w), (got_name, got_w) = final_weights(reference), final_weights(run)
    max_dw = max(float(abs(ref_w[k].astype("float64") - got_w[k].astype("float64")).max()) for k in ref_w)
    figures = {
        "duration_s": round(time.time() - start, 1),
        "failures_injected": len(kills),
        "by_role": {r: sum(1 for k in kills if k[1] == r) for r in ROLES},
        "trainer_freezes": sum(1 for k in kills if k[4] == "freeze" and k[1] == "trainer"),
        "dataloader_freezes": sum(1 for k in kills if k[4] == "freeze" and k[1] == "dataloader"),
        "shard_moves": shard_moves,
        "failures_detected": len(kills) - undetected,
        "detection_s_median": statistics.median(detection) if detection else None,
        "detection_s_max": max(detection) if detection else None,
        "recovery_s_median": statistics.median(recovery) if recovery else None,
        "recovery_s_max": max(recovery) if recovery else None,
        "steps_recomputed_per_trainer_failure_max": max(recomputed) if recomputed else 0,
        "steps_with_a_different_loss": differing,
        "final_checkpoint": got_name,
        "final_max_abs_dw": max_dw,
    }
    print(f"failures injected: {len(kills)} {figures['by_role']} ({figures['trainer_freezes']} trainer freezes, "
          f"{figures['dataloader_freezes']} dataloader freezes); detected: {figures['failures_detected']}")
    if "dataloader" in freezable:
        print(f"placements that moved a dataloader's shards to the others: {shard_moves}")
    print(f"detection s: median {pct(detection, statistics.median)}, max {pct(detection, max)}")
    print(f"recovery s (kill or SIGCONT -> next completed step): median {pct(recovery, statistics.median)}, max {pct(recovery, max)}")
    print(f"steps recomputed per trainer failure: max {figures['steps_recomputed_per_trainer_failure_max']}")
    print(f"steps whose loss differs from the uninterrupted run: {differing} of {len(ref)}")
    print(f"final weights ({got_name} vs {ref_name}): max |dW| = {max_dw:.3g}")
    if opts.json:
        json.dump(figures, open(opts.json, "w"), indent=2)
    if undetected or differing or max_dw != 0.0 or got_name != ref_name:
        sys.exit("chaos changed the model or a failure went undetected")


if __name__ == "__main__":
    main()
