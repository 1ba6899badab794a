"""Benchmark: plain LM loss vs our sparse PD loss (unfused, fused) vs naive dense KD. Prints JSON lines.

    python benchmarks/bench_loss.py            # V = 151,552, 2,048 tokens, hidden 512, top-100, α = 0.9
    python benchmarks/bench_loss.py --quick    # small sizes, seconds

Variants (all forward + backward, KD distance = forward KL):
  lm     logits = h @ W^T, F.cross_entropy                                       (a)
  pd     logits = h @ W^T, distillation_loss(logits, ...)                        (b)
  fused  distillation_loss(hidden=h, lm_head_weight=W, fused=True)               (c)
  dense  logits = h @ W^T, (1-α)·CE + α·F.kl_div(log_softmax, dense teacher)     (d)

Memory: each variant runs in its own fresh process. After setup (inputs, teacher tensors, a tiny
warm-up that starts thread pools) the process resets its peak-RSS mark (`5` > /proc/self/clear_refs),
records VmRSS as the baseline, runs one step and reads VmHWM: peak = VmHWM - baseline, i.e. every byte
the step made resident (logits, loss intermediates, gradients of h and W). glibc is told to mmap every
allocation of 64 KiB or more (MALLOC_MMAP_THRESHOLD_), so freed buffers leave RSS at once and the high
-water mark measures live memory rather than allocator caching. Median over --mem-reps steps.
Time: one separate process times the variants interleaved round-robin, order rotated every round (so
load from other processes on a shared machine hits them alike); medians over --reps rounds. Two timings:
"loss_only" (lm, pd, dense: the loss on given logits, fwd + bwd, after one warm-up round; the strict
comparison of the loss code, used for time_ratio_pd_vs_lm) and "with_head" (lm, pd, fused: LM-head
matmul + loss, what a training step pays; the only one defined for fused; dense is left out there
because it pays the same matmul as lm and would add minutes).
The last line is one JSON object with the ratios and the raw seconds and bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

VARIANTS = ("lm", "pd", "fused", "dense")


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def _setup(a):
    import torch

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    n, v, hdim, k = a.tokens, a.vocab, a.hidden, a.k
    h = torch.randn(n, hdim, generator=g).requires_grad_()
    w = (torch.randn(v, hdim, generator=g) * hdim**-0.5).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=g)
    # Distinct indices per row without an [N, V] temporary: a random start plus a fixed stride.
    stride = max(1, v // k - 1)
    idx = (torch.randint(0, v, (n, 1), generator=g) + torch.arange(k) * stride) % v
    q = torch.softmax(torch.randn(n, k, generator=g) * 2, -1).sort(-1, descending=True).values
    return dict(h=h, w=w, labels=labels, idx=idx, q=q)


def _step(variant: str, s: dict, a, logits=None, chunk_size=None) -> None:
    """One forward + backward; with `logits` given (a leaf), the LM head is skipped."""
    import torch
    import torch.nn.functional as F

    from pd_lightning.losses import distillation_loss

    alpha = a.alpha
    if variant == "fused":
        loss = distillation_loss(None, s["labels"], s["idx"], s["q"], alpha=alpha, kind="kld", hidden=s["h"],
                                 lm_head_weight=s["w"], fused=True, chunk_size=chunk_size).loss
    else:
        z = logits if logits is not None else s["h"] @ s["w"].t()
        if variant == "lm":
            loss = F.cross_entropy(z, s["labels"])
        elif variant == "pd":
            loss = distillation_loss(z, s["labels"], s["idx"], s["q"], alpha=alpha, kind="kld",
                                     chunk_size=chunk_size).loss
        elif variant == "dense":
            q_dense = torch.zeros_like(z).scatter_(1, s["idx"], s["q"])
            kd = F.kl_div(torch.log_softmax(z, -1), q_dense, reduction="batchmean")
            loss = (1 - alpha) * F.cross_entropy(z, s["labels"]) + alpha * kd
        else:
            raise ValueError(variant)
        del z
    loss.backward()


def _zero(s: dict, *extra) -> None:
    for t in (s["h"], s["w"], *extra):
        t.grad = None


def worker_memory(a) -> dict:
    """Peak resident bytes of one step of `a.worker` above the post-setup baseline (own process)."""
    import argparse as _ap

    s = _setup(a)
    tiny = _ap.Namespace(**{**vars(a), "tokens": 4, "vocab": 64, "hidden": 8, "k": 4})
    _step(a.worker, _setup(tiny), tiny)  # start thread pools, lazy inits
    peaks = []
    for _ in range(a.mem_reps):
        _zero(s)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        base = _status_kb("VmRSS")
        _step(a.worker, s, a, chunk_size=a.chunk_size)
        peaks.append((_status_kb("VmHWM") - base) * 1024)
    return {"variant": a.worker, "peak_bytes": int(statistics.median(peaks)), "peak_bytes_all": peaks}


def worker_time(a) -> dict:
    """Median seconds per fwd+bwd, variants interleaved round-robin (order rotated each round) in one process."""
    import argparse as _ap

    s = _setup(a)
    tiny = _ap.Namespace(**{**vars(a), "tokens": 4, "vocab": 64, "hidden": 8, "k": 4})
    st = _setup(tiny)
    for v in VARIANTS:  # thread pools, lazy inits
        _step(v, st, tiny)
    z = (s["h"].detach() @ s["w"].detach().t()).requires_grad_()
    head_vs = ("lm", "pd", "fused")  # dense pays the same matmul as lm: its with-head time adds nothing
    head = {v: [] for v in head_vs}
    loss_only = {v: [] for v in ("lm", "pd", "dense")}
    for r in range(a.reps + 1):  # round 0 warms the loss-only path (the with-head steps are costly)
        order = list(loss_only)[r % 3:] + list(loss_only)[: r % 3]
        for v in order:
            _zero(s, z)
            t0 = time.perf_counter()
            _step(v, s, a, logits=z, chunk_size=a.chunk_size)
            if r:
                loss_only[v].append(time.perf_counter() - t0)
        if r:
            for v in head_vs[r % 3:] + head_vs[: r % 3]:
                _zero(s)
                t0 = time.perf_counter()
                _step(v, s, a, chunk_size=a.chunk_size)
                head[v].append(time.perf_counter() - t0)
    return {"with_head_s": {v: statistics.median(x) for v, x in head.items()},
            "loss_only_s": {v: statistics.median(x) for v, x in loss_only.items()},
            "with_head_all_s": head, "loss_only_all_s": loss_only}


def _run_worker(args: list[str], exact_rss: bool) -> dict:
    env = dict(os.environ)
    if exact_rss:  # memory workers only; timing keeps glibc's defaults (a real training process has them)
        env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, os.path.abspath(__file__), *args], env=env, check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    """Run every variant (memory: one process each; time: one interleaved process) and print JSON."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes (V=32768, 512 tokens, hidden 128, chunk 128)")
    p.add_argument("--vocab", type=int, default=151_552)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--alpha", type=float, default=0.9)
    p.add_argument("--reps", type=int, default=3, help="timed rounds (after one warm-up round)")
    p.add_argument("--mem-reps", type=int, default=1, help="measured steps per memory process")
    p.add_argument("--chunk-size", type=int, default=None, help="tokens per chunk for pd/fused (default: auto)")
    p.add_argument("--worker", choices=VARIANTS + ("time",), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.quick:
        a.vocab, a.tokens, a.hidden = 32_768, 512, 128
        # Auto chunking would take all 512 tokens at this V; 128 shows the flat-memory effect.
        a.chunk_size = a.chunk_size or 128
    if a.worker == "time":
        print(json.dumps(worker_time(a)))
        return
    if a.worker:
        print(json.dumps(worker_memory(a)))
        return

    t_start = time.perf_counter()
    sizes = ["--vocab", str(a.vocab), "--tokens", str(a.tokens), "--hidden", str(a.hidden), "--k", str(a.k),
             "--alpha", str(a.alpha), "--reps", str(a.reps), "--mem-reps", str(a.mem_reps)]
    if a.chunk_size:
        sizes += ["--chunk-size", str(a.chunk_size)]
    mem = {}
    for v in VARIANTS:
        mem[v] = _run_worker([*sizes, "--worker", v], exact_rss=True)
        print(json.dumps(mem[v]), flush=True)
    tm = _run_worker([*sizes, "--worker", "time"], exact_rss=False)
    print(json.dumps(tm), flush=True)
    peak = {v: mem[v]["peak_bytes"] for v in VARIANTS}
    head, lonly = tm["with_head_s"], tm["loss_only_s"]
    summary = {
        "vocab": a.vocab, "tokens": a.tokens, "hidden": a.hidden, "k": a.k, "alpha": a.alpha, "reps": a.reps,
        "chunk_size": a.chunk_size or "auto",
        "time_ratio_pd_vs_lm": lonly["pd"] / lonly["lm"],
        "time_ratio_pd_vs_lm_with_head": head["pd"] / head["lm"],
        "time_ratio_fused_vs_lm": head["fused"] / head["lm"],
        "time_ratio_dense_vs_lm": lonly["dense"] / lonly["lm"],  # loss only
        "mem_ratio_fused_vs_lm": peak["fused"] / peak["lm"],
        "mem_ratio_fused_vs_dense": peak["fused"] / peak["dense"],
        "mem_ratio_pd_vs_lm": peak["pd"] / peak["lm"],
        **{f"seconds_loss_only_{v}": lonly[v] for v in lonly},
        **{f"seconds_with_head_{v}": head[v] for v in head},
        **{f"peak_bytes_{v}": peak[v] for v in VARIANTS},
        "bench_wall_s": time.perf_counter() - t_start,
    }
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
