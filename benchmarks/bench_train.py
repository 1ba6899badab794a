"""Training-step benchmark (issue 5): PD step vs LM step, and DataLoader throughput vs step consumption.

    python benchmarks/bench_train.py                      # ~2 min on a loaded 2-core CPU box (setup ~50 s)
    python benchmarks/bench_train.py --quick              # ~1 min
    python benchmarks/bench_train.py --workdir /tmp/bt    # keep (and reuse) the dataset, teacher and store
    python benchmarks/bench_train.py --encoding ctxans    # the same with the store entropy-coded (issue 22)

Setup (skipped for the parts already in --workdir): the test suite's recipe (tests/conftest.py) --
`prepare` a built-in-corpus dataset (default 300k train tokens, 2,048-token BPE, sequences of 128,
i.e. the tiny.yaml shapes), `train_teacher` a tiny-1m teacher for 100 steps, `generate_store` its
top-0.95-100 logit store. All real components, no mocks.

1. Step time (`step_time_ratio_pd_vs_lm`): one process, `torch.set_num_threads(1)`. Three copies of the
   student (`--preset`, default tiny-1m) with identical initial weights, each in a `DistillationModule`
   with its own AdamW from `configure_optimizers()`:
     lm     α = 0   (plain LM loss; the teacher targets of the batch are ignored)
     pd     α = 0.9 (KD kind nll on the batch's teacher targets), loss.fused = false
     fused  α = 0.9, loss.fused = true (LM head inside the chunked loss)
   A step = zero_grad + `compute_loss` + backward + grad-norm clip (1.0, as the Trainer does) + AdamW
   step + LR-scheduler step. No Trainer, no data loading: `--batches` batches are decoded beforehand
   and cycled; every round runs all three variants on the same batch, order rotated each round (load
   from other processes hits them alike). Medians over `--reps` rounds after `--warmup` rounds.
   `step_time_ratio_pd_vs_lm` = median(pd) / median(lm); `step_time_ratio_fused_vs_lm` likewise; also
   the median of the per-round ratios (robust to load drifting across rounds).
2. Loader throughput (`loader_throughput_ratio`): `DistillationDataModule(...).train_dataloader()` with
   the same TargetSpec (store decode + top-p-k narrowing + temperature inside the dataset), alone,
   for num_workers 0 and 1: batches/s over `--loader-batches` batches after the first few (worker
   start-up and prefetch fill excluded), as the median over chunks of 10 batches (like the step
   medians, robust to load spikes; the plain overall rate is reported too). Ratio = loader batches/s ÷ (1 / median PD step time).
   Target >= 10. Also a per-stage breakdown of one batch in-process (token gather, store decode,
   narrowing + temperature), so a miss says where the time goes. Wall-clock ratios move with machine
   load (the step and the loader are timed at different moments); `loader_throughput_ratio_cpu` =
   CPU s of a PD step / CPU s of one in-process `__getitem__` is the load-independent counterpart.

Load on a shared machine inflates everything; `os.getloadavg()` before and after is in the JSON.
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(1)

VARIANTS = ("lm", "pd", "fused")
ALPHA = 0.9


def log(msg: str) -> None:
    print(f"[bench_train {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def data_overrides(a, work: Path) -> list[str]:
    return [f"data.train_tokens={a.train_tokens}", "data.heldout_tokens=20000", f"data.vocab_size={a.vocab}",
            "data.tokenizer_train_chars=400000", f"data.seq_len={a.seq_len}", "data.sequences_per_shard=1024",
            f"data.out={work / 'data'}", f"teacher.out={work / 'teacher'}", "teacher.preset=tiny-1m",
            f"teacher.max_steps={a.teacher_steps}", "teacher.batch_size=16", "teacher.lr=5e-3",
            f"logits.store={work / ('store' if a.encoding == 'egsqrt' else f'store-{a.encoding}')}",
            f"logits.encoding={a.encoding}", "logits.batch_size=32", "logits.store_p=0.95", "logits.store_k=100",
            "logits.p=0.95", "logits.k=100", f"model.preset={a.preset}"]


def setup(a, work: Path):
    """Dataset, teacher and store in `work` (each reused when already complete). Returns (cfg, seconds)."""
    from pd_lightning.config import load_config
    from pd_lightning.data.prepare import prepare
    from pd_lightning.logits.generate import generate_store
    from pd_lightning.train import train_teacher

    cfg = load_config("tiny", data_overrides(a, work))
    times = {}
    t = time.perf_counter()
    prepare(cfg.data)
    times["prepare_s"] = time.perf_counter() - t
    t = time.perf_counter()
    train_teacher(cfg)
    times["teacher_s"] = time.perf_counter() - t
    t = time.perf_counter()
    generate_store(cfg)
    times["store_s"] = time.perf_counter() - t
    torch.set_num_threads(1)  # in case anything above changed it
    return cfg, {k: round(v, 2) for k, v in times.items()}


def target_spec(cfg):
    from pd_lightning.logits.store import load_manifest
    from pd_lightning.module import TargetSpec

    m = load_manifest(Path(cfg.logits.store))
    return TargetSpec.from_config(cfg.logits, float(m["p"]), int(m["k"])), m


# ----------------------------------------------------------------------------- 1. step time


def make_modules(cfg, vocab: int):
    import dataclasses

    from pd_lightning.data.shards import read_manifest
    from pd_lightning.models import build_model
    from pd_lightning.module import DistillationModule

    manifest = read_manifest(Path(cfg.data.out))
    eos = int(manifest["eos_token_id"])
    base = build_model(cfg.model.preset, vocab, seed=0, eos_token_id=eos, bos_token_id=eos, pad_token_id=eos,
                       max_seq_len=max(int(manifest["seq_len"]), 1024))
    base.train()
    out = {}
    for v in VARIANTS:
        loss = dataclasses.replace(cfg.loss, kind="nll", alpha=0.0 if v == "lm" else ALPHA, fused=v == "fused")
        module = DistillationModule(copy.deepcopy(base), loss=loss, optim=cfg.optim, max_steps=1000)
        opt = module.configure_optimizers()
        out[v] = (module, opt["optimizer"], opt["lr_scheduler"]["scheduler"], 0.0 if v == "lm" else ALPHA)
    params = sum(p.numel() for p in base.parameters())
    return out, params


def one_step(module, optimizer, scheduler, alpha: float, batch: dict, clip: float) -> tuple[float, float]:
    """Wall and CPU seconds of one full optimizer step."""
    t, c = time.perf_counter(), time.process_time()
    optimizer.zero_grad(set_to_none=True)
    out = module.compute_loss(batch, alpha)
    out.loss.backward()
    if clip:
        torch.nn.utils.clip_grad_norm_(module.parameters(), clip)
    optimizer.step()
    scheduler.step()
    return time.perf_counter() - t, time.process_time() - c


def bench_steps(a, cfg, spec, vocab: int) -> dict:
    from pd_lightning.module import DistillationBatches

    ds = DistillationBatches(cfg.data.out, "train", cfg.logits.store, spec)
    bs = a.batch_size
    batches = [ds[list(range(i * bs, (i + 1) * bs))] for i in range(a.batches)]
    modules, params = make_modules(cfg, vocab)
    clip = cfg.optim.grad_clip
    times = {v: [] for v in VARIANTS}
    cpu = {v: [] for v in VARIANTS}
    losses = {}
    for r in range(a.warmup + a.reps):
        batch = batches[r % len(batches)]
        order = VARIANTS[r % 3:] + VARIANTS[:r % 3]
        for v in order:
            module, opt, sched, alpha = modules[v]
            dt, dc = one_step(module, opt, sched, alpha, batch, clip)
            if r >= a.warmup:
                times[v].append(dt)
                cpu[v].append(dc)
    for v in VARIANTS:  # sanity: the three variants really computed what they claim
        module, _, _, alpha = modules[v]
        with torch.no_grad():
            o = module.compute_loss(batches[0], alpha)
        losses[v] = {"loss": round(float(o.loss), 4), "lm_loss": round(float(o.lm_loss), 4),
                     "kd_loss": None if o.kd_loss is None else round(float(o.kd_loss), 4)}
    med = {v: statistics.median(times[v]) for v in VARIANTS}
    per_round = {v: statistics.median(p / l for p, l in zip(times[v], times["lm"])) for v in ("pd", "fused")}
    b0 = batches[0]
    return {
        "student_preset": cfg.model.preset, "student_params": params, "batch_size": bs,
        "seq_len": int(b0["input_ids"].shape[1]), "vocab_size": vocab,
        "teacher_support_mean": round(float(b0["support"]), 2), "teacher_width": int(b0["teacher_indices"].shape[1]),
        "reps": a.reps, "warmup": a.warmup,
        "step_s_median": {v: round(med[v], 5) for v in VARIANTS},
        "step_s_min": {v: round(min(times[v]), 5) for v in VARIANTS},
        "step_s_p90": {v: round(sorted(times[v])[int(0.9 * (len(times[v]) - 1))], 5) for v in VARIANTS},
        "step_cpu_s_median": {v: round(statistics.median(cpu[v]), 5) for v in VARIANTS},
        "step_time_ratio_pd_vs_lm": round(med["pd"] / med["lm"], 4),
        "step_time_ratio_fused_vs_lm": round(med["fused"] / med["lm"], 4),
        "step_time_ratio_pd_vs_lm_per_round_median": round(per_round["pd"], 4),
        "step_time_ratio_fused_vs_lm_per_round_median": round(per_round["fused"], 4),
        "final_losses_batch0": losses,
    }


# ----------------------------------------------------------------------------- 2. loader


class _NoTrainer:
    """What train_dataloader() reads from the Trainer: the step (a fresh run starts at 0) and one rank."""

    global_step = 0
    global_rank = 0
    world_size = 1


def bench_loader(a, cfg, spec, num_workers: int) -> dict:
    from pd_lightning.module import DistillationDataModule

    dm = DistillationDataModule(cfg.data.out, a.batch_size, 0, store_root=cfg.logits.store, targets=spec,
                                num_workers=num_workers)
    dm.trainer = _NoTrainer()
    loader = dm.train_dataloader()
    skip = 4 if num_workers == 0 else 8  # worker start-up + filling the prefetch queue (4 x workers)
    t0 = time.perf_counter()
    it = iter(loader)
    first = None
    for i in range(skip):
        next(it)
        if i == 0:
            first = time.perf_counter() - t0
    chunk, rates = 10, []
    t = time.perf_counter()
    for _ in range(max(1, a.loader_batches // chunk)):
        c = time.perf_counter()
        for _ in range(chunk):
            b = next(it)
        rates.append(chunk / (time.perf_counter() - c))
    dt = time.perf_counter() - t
    n = chunk * len(rates)
    assert "teacher_probs" in b and b["input_ids"].shape[0] == a.batch_size
    del it, loader  # shut persistent workers down
    return {"num_workers": num_workers, "batches": n, "seconds": round(dt, 4),
            "batches_per_s": round(statistics.median(rates), 2), "batches_per_s_overall": round(n / dt, 2),
            "batches_per_s_min_chunk": round(min(rates), 2), "first_batch_s": round(first, 4)}


def loader_breakdown(a, cfg, spec, rounds: int = 10) -> dict:
    """Median seconds per batch of each stage of DistillationBatches.__getitem__, in-process."""
    import numpy as np

    from pd_lightning.data.shards import TokenShards
    from pd_lightning.logits.processing import teacher_targets
    from pd_lightning.logits.store import LogitStore
    from pd_lightning.module import BatchStepSampler, DistillationBatches

    shards, store = TokenShards(cfg.data.out, "train"), LogitStore(cfg.logits.store)
    ds = DistillationBatches(cfg.data.out, "train", cfg.logits.store, spec)
    sampler = iter(BatchStepSampler(len(shards), a.batch_size, seed=1))
    stages = {"tokens": [], "store_decode": [], "narrow_temperature": [], "getitem_total": []}
    cpu = []
    ds[next(sampler)]  # open files
    for _ in range(rounds):
        idx = next(sampler)
        t = time.perf_counter()
        shards.batch(idx)
        t1 = time.perf_counter()
        sparse = store.sequences(idx)
        t2 = time.perf_counter()
        teacher_targets(sparse, spec.p, spec.k, spec.tau, spec.method, spec.store_p, spec.store_k, **spec.params)
        t3, c3 = time.perf_counter(), time.process_time()
        ds[idx]
        t4, c4 = time.perf_counter(), time.process_time()
        cpu.append(c4 - c3)
        for k, v in zip(stages, (t1 - t, t2 - t1, t3 - t2, t4 - t3)):
            stages[k].append(v)
    out = {f"{k}_s": round(float(np.median(v)), 5) for k, v in stages.items()}
    out["getitem_cpu_s"] = round(float(np.median(cpu)), 5)
    return out


# ----------------------------------------------------------------------------- main


def main(argv=None) -> dict:
    from pd_lightning.logits.store import keep_freed_memory_for_reuse

    keep_freed_memory_for_reuse()  # the loader is measured as training runs it (module.py sets this too)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", help="keep dataset/teacher/store here and reuse them (default: a temp dir)")
    ap.add_argument("--preset", default="tiny-1m", help="student preset")
    ap.add_argument("--quick", action="store_true", help="fewer tokens, teacher steps and repetitions (~1 min)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--train-tokens", type=int, default=None)
    ap.add_argument("--teacher-steps", type=int, default=None)
    ap.add_argument("--reps", type=int, default=None, help="timed rounds (each: lm, pd, fused)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batches", type=int, default=4, help="pre-decoded batches cycled in the step timing")
    ap.add_argument("--loader-batches", type=int, default=None)
    ap.add_argument("--workers", default="0,1", help="num_workers values to measure")
    ap.add_argument("--encoding", default="egsqrt", choices=("egsqrt", "ctxans"),
                    help="the store's encoding (logits.encoding); each has its own store in --workdir")
    ap.add_argument("--recommended-workers", type=int, default=1,
                    help="num_workers whose ratio is reported as loader_throughput_ratio")
    a = ap.parse_args(argv)
    a.train_tokens = a.train_tokens or (100_000 if a.quick else 300_000)
    a.teacher_steps = a.teacher_steps or (30 if a.quick else 100)
    a.reps = a.reps or (8 if a.quick else 40)
    a.loader_batches = a.loader_batches or (30 if a.quick else 200)
    workers = [int(w) for w in a.workers.split(",")]

    started = time.perf_counter()
    load_before = os.getloadavg()
    tmp = None
    if a.workdir:
        work = Path(a.workdir)
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="bench_train-")
        work = Path(tmp.name)
    log(f"setup in {work} (load {load_before[0]:.2f})")
    cfg, setup_times = setup(a, work)
    spec, store_manifest = target_spec(cfg)
    vocab = int(store_manifest["vocab_size"])
    log(f"setup done {setup_times}; timing steps ({a.warmup}+{a.reps} rounds)")

    steps = bench_steps(a, cfg, spec, vocab)
    print(json.dumps({"part": "steps", **steps}), flush=True)
    pd_step = steps["step_s_median"]["pd"]
    consume = 1.0 / pd_step
    log(f"steps {steps['step_s_median']}; loader")

    loaders = {}
    for w in workers:
        r = bench_loader(a, cfg, spec, w)
        r["throughput_ratio"] = round(r["batches_per_s"] / consume, 3)
        loaders[w] = r
        print(json.dumps({"part": "loader", **r}), flush=True)
    breakdown = loader_breakdown(a, cfg, spec)
    print(json.dumps({"part": "loader_breakdown", **breakdown}), flush=True)

    rec = a.recommended_workers if a.recommended_workers in loaders else workers[0]
    result = {
        "step_time_ratio_pd_vs_lm": steps["step_time_ratio_pd_vs_lm"],
        "loader_throughput_ratio": loaders[rec]["throughput_ratio"],
        "loader_throughput_ratio_num_workers": rec,
        **{f"loader_throughput_ratio_workers{w}": r["throughput_ratio"] for w, r in loaders.items()},
        "loader_target_met": loaders[rec]["throughput_ratio"] >= 10,
        "store_encoding": a.encoding,
        # Load-independent view: CPU seconds of a PD step / CPU seconds to build one batch in-process,
        # i.e. how many steps one free core of loader work keeps fed (wall ratios move with machine load).
        "loader_throughput_ratio_cpu": round(steps["step_cpu_s_median"]["pd"] / breakdown["getitem_cpu_s"], 3),
        "step_time_ratio_fused_vs_lm": steps["step_time_ratio_fused_vs_lm"],
        "step_time_ratio_pd_vs_lm_per_round_median": steps["step_time_ratio_pd_vs_lm_per_round_median"],
        "step_time_ratio_fused_vs_lm_per_round_median": steps["step_time_ratio_fused_vs_lm_per_round_median"],
        "pd_step_consumption_batches_per_s": round(consume, 3),
        "step_s_median": steps["step_s_median"], "step_s_min": steps["step_s_min"], "step_s_p90": steps["step_s_p90"],
        "step_cpu_s_median": steps["step_cpu_s_median"],
        "loader_batches_per_s": {str(w): r["batches_per_s"] for w, r in loaders.items()},
        "loader_batches_per_s_overall": {str(w): r["batches_per_s_overall"] for w, r in loaders.items()},
        "loader_first_batch_s": {str(w): r["first_batch_s"] for w, r in loaders.items()},
        "loader_breakdown_s_per_batch": breakdown,
        "student_preset": steps["student_preset"], "student_params": steps["student_params"],
        "batch_size": a.batch_size, "seq_len": steps["seq_len"], "vocab_size": vocab, "alpha": ALPHA, "kd_kind": "nll",
        "teacher_store": f"top-{spec.store_p}-{spec.store_k}", "teacher_support_mean": steps["teacher_support_mean"],
        "reps": a.reps, "warmup": a.warmup, "quick": a.quick, "torch_threads": torch.get_num_threads(),
        "setup_s": setup_times, "total_s": round(time.perf_counter() - started, 1),
        "loadavg_before": [round(x, 2) for x in load_before], "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "cpu_count": os.cpu_count(), "torch": torch.__version__,
    }
    print(json.dumps(result), flush=True)
    if tmp is not None:
        tmp.cleanup()
    return result


if __name__ == "__main__":
    main()
