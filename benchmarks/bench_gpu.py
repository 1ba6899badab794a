"""GPU check of the paper-scale path on one GPU: generation, PD vs LM training, evaluation memory. One JSON line.

    python benchmarks/bench_gpu.py              # one CUDA GPU (80 GB+), about 4-6 minutes, nothing downloaded
    python benchmarks/bench_gpu.py --cpu-smoke  # the same script at tiny sizes on CPU (checks its logic end to end)

Everything is random-init and synthetic (no download): a 151,552-token WordLevel tokenizer, token
shards of Zipf-distributed ids (bench_generate's helpers), models of the `pd_lightning.models` presets.

1. generation: a teacher of the 1.9B preset's shape (1.87B parameters at V = 151,552) saved in bf16,
   `generate_store` over 64 sequences of 4,096 tokens at the paper's generation batch (8) and top-0.95-100,
   teacher.dtype=auto (so bf16) and encoder processes as `logits.encode_workers` auto picks them:
   pipeline tokens/s (the store's own generation stats), peak GPU memory (torch.cuda.max_memory_allocated),
   and the device side alone (backbone + chunked head + cut, no writer) for the encoder comparison.
   The head gets a gain so its logits have a std of about 2.5 (a random head's are near uniform).
2. training: the 1.9B preset student, bf16-mixed, loss.fused=true, one GPU: LM-only (alpha 0) and PD
   (alpha 1, kld, reading the store from step 1 through the DataLoader workers), batch 4 x 4,096;
   then PD with FSDP on the one GPU (activation checkpointing per decoder layer) at the paper's
   per-GPU batch 8 x 4,096, reported as an error if it does not run. Step time is the median over the
   timed steps after warm-up (CUDA-synchronised), MFU = the step's FLOPs in `pd_lightning.cost`'s
   convention / step time / the GPU's dense bf16 peak (None for a GPU not in PEAK_BF16).
3. evaluation: the PD student exported as an HF dir, `evaluation.evaluate` with lm-eval's `hf` model
   on cuda (what `pdl eval --device cuda` runs: float32 weights) over 64 items of synth_continuation,
   batch 32: peak GPU memory.

A phase that fails is reported with its error and the others still run. Progress goes to stderr; the last
stdout line is the JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from bench_generate import synthetic_data, synthetic_teacher  # noqa: E402

# Dense bf16 tensor-core peak (FLOP/s, no sparsity) by a substring of torch.cuda.get_device_name.
PEAK_BF16 = {"H200": 989.4e12, "H100": 989.4e12, "H800": 989.4e12, "GH200": 989.4e12, "B200": 2250e12,
             "A100": 312e12, "A800": 312e12, "L40S": 362.05e12, "L40": 181e12, "A10G": 70e12, "L4": 121e12}

SIZES = {
    "gpu": dict(device="cuda", vocab=151_552, seq_len=4096, gen_sequences=64, gen_batch=8, heldout=8,
                teacher=dict(hidden=2048, ffn=6912, layers=24, heads=16, kv_heads=2), teacher_dtype="bfloat16",
                student="1.9B", train_batch=4, fsdp_batch=8, warmup=3, steps=8, eval_items=64, eval_batch=32),
    "cpu-smoke": dict(device="cpu", vocab=4096, seq_len=64, gen_sequences=16, gen_batch=4, heldout=4,
                      teacher=dict(hidden=64, ffn=128, layers=2, heads=4, kv_heads=2), teacher_dtype="float32",
                      student="tiny-1m", train_batch=4, fsdp_batch=None, warmup=1, steps=2, eval_items=4,
                      eval_batch=4),
}


def _log(msg: str) -> None:
    print(f"[bench_gpu] {msg}", file=sys.stderr, flush=True)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak(device: str) -> int | None:
    return int(torch.cuda.max_memory_allocated()) if device == "cuda" else None


def _gib(x: int | None) -> float | None:
    return None if x is None else round(x / 2**30, 3)


def peak_flops() -> float | None:
    """The GPU's dense bf16 peak from PEAK_BF16, or None (CPU, or a GPU not in the table)."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def _phase(name: str, out: dict, fn, *args) -> None:
    t0 = time.perf_counter()
    try:
        out[name] = fn(*args)
    except Exception as exc:  # one failing phase is a result, not the end of the check
        out[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"}
        traceback.print_exc(file=sys.stderr)
    out[name]["phase_seconds"] = round(time.perf_counter() - t0, 1)
    _log(f"{name}: {json.dumps(out[name])}")


# ----------------------------------------------------------------------------- 1. generation


def bench_generation(s: dict, root: Path, data: Path) -> dict:
    from pd_lightning.config import load_config
    from pd_lightning.logits.generate import TeacherLogits, auto_encode_workers, generate_store
    from pd_lightning.logits.store import inspect_store
    from pd_lightning.models import load_causal_lm, teacher_dtype

    t = s["teacher"]
    gain = 2.5 / (0.02 * math.sqrt(t["hidden"]))  # logit std ~2.5: h ~ N(0, 1) per dim after the final norm
    teacher = synthetic_teacher(root / "teacher", data / "tokenizer", s["vocab"], **t, seq_len=s["seq_len"],
                                dtype=s["teacher_dtype"], logit_gain=gain, device=s["device"])
    store = root / "store"
    cfg = load_config("tiny", [f"data.out={data}", f"teacher.path={teacher}", f"logits.store={store}",
                               f"logits.batch_size={s['gen_batch']}", "logits.store_p=0.95", "logits.store_k=100",
                               "logits.p=0.95", "logits.k=100", "logits.sequences_per_shard=16", "teacher.dtype=auto"])
    _reset_peak(s["device"])
    t0 = time.perf_counter()
    generate_store(cfg)
    wall = time.perf_counter() - t0
    peak = _peak(s["device"])
    stats = json.loads((store / "generation_stats-rank0.json").read_text())
    info = inspect_store(store, checksums=False)

    # the device side alone: backbone + per-chunk head, statistics and cut, no writer
    device = torch.device(s["device"], 0) if s["device"] == "cuda" else torch.device("cpu")
    model = load_causal_lm(teacher, dtype=teacher_dtype(teacher, "auto", device)).to(device)
    source = TeacherLogits(model, s["vocab"], device)
    from pd_lightning.data.shards import TokenShards

    shards = TokenShards(data, "train")
    batches = [torch.from_numpy(shards.batch(range(i, i + s["gen_batch"]))).to(device)
               for i in range(0, min(len(shards), 6 * s["gen_batch"]), s["gen_batch"])]
    _reset_peak(s["device"])
    with torch.no_grad():
        for ids in batches[:2]:  # warm-up: kernels, allocator
            source.sparse(ids, 0.95, 100)
        _sync(s["device"])
        t1 = time.perf_counter()
        for ids in batches[2:]:
            source.sparse(ids, 0.95, 100)
        _sync(s["device"])
        device_s = time.perf_counter() - t1
    device_peak = _peak(s["device"])
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    n_timed = sum(b.numel() for b in batches[2:])
    dtype, chunk_rows, mode = str(source.dtype).removeprefix("torch."), source.chunk_rows, source.mode
    del model, source
    return {
        "teacher_params": info["meta"].get("teacher_params"), "teacher_dtype": dtype, "head_mode": mode,
        "vocab_size": s["vocab"], "batch": s["gen_batch"], "seq_len": s["seq_len"], "sequences": len(shards),
        "encode_workers": auto_encode_workers(device), "chunk_rows": chunk_rows,
        "tokens_per_s": stats["tokens_per_s"], "wall_seconds_with_load": round(wall, 1),
        "peak_gpu_gib": _gib(peak), "teacher_weights_gib": round(weights / 2**30, 3),
        "device_only_tokens_per_s": n_timed / device_s if device_s > 0 else None,
        "device_only_peak_gpu_gib": _gib(device_peak),
        "entries_per_token": info["mean_entries_per_token"], "bytes_per_token": info["bytes_per_token"],
        "store": str(store),
    }


# ----------------------------------------------------------------------------- 2. training


class _StepTimer:
    """A Lightning callback: CUDA-synchronised wall time at the end of every training batch."""

    def __init__(self, device: str):
        import lightning.pytorch as pl

        class Timer(pl.Callback):
            def __init__(self):
                self.times: list[float] = []

            def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
                _sync(device)
                self.times.append(time.perf_counter())

        self.callback = Timer()


def bench_training(s: dict, data: Path, store: Path | None, *, alpha: float, strategy: str, batch: int,
                   root: Path, export: Path | None = None) -> dict:
    from pd_lightning import cost
    from pd_lightning.config import load_config
    from pd_lightning.data.shards import read_manifest
    from pd_lightning.logits.store import load_manifest
    from pd_lightning.models import build_model
    from pd_lightning.module import DistillationDataModule, DistillationModule, TargetSpec
    from pd_lightning.train import build_trainer

    gpu = s["device"] == "cuda"
    steps = s["warmup"] + s["steps"]
    cfg = load_config("tiny", [
        f"data.out={data}", f"data.seq_len={s['seq_len']}", f"model.preset={s['student']}", f"loss.alpha={alpha}",
        "loss.kind=kld", "loss.fused=true", f"logits.store={store}", f"trainer.batch_size={batch}",
        f"trainer.max_steps={steps}", f"trainer.precision={'bf16-mixed' if gpu else '32-true'}",
        f"trainer.accelerator={'gpu' if gpu else 'cpu'}", "trainer.devices=1", f"trainer.strategy={strategy}",
        "trainer.num_workers=2", "trainer.log_every_n_steps=1000", f"trainer.out={root / 'train'}"])
    manifest = read_manifest(data)
    targets = None
    if alpha > 0:
        m = load_manifest(store)
        targets = TargetSpec.from_config(cfg.logits, float(m["p"]), int(m["k"]))
    eos = int(manifest["eos_token_id"])
    with torch.device(s["device"]):  # a 1.9B random init is a minute on a CPU, a second on a GPU
        model = build_model(s["student"], int(manifest["vocab_size"]), seed=0, eos_token_id=eos, bos_token_id=eos,
                            pad_token_id=eos, max_seq_len=s["seq_len"])
    shape = cost.model_cost_shape(model)
    module = DistillationModule(model, loss=cfg.loss, optim=cfg.optim, max_steps=steps)
    dm = DistillationDataModule(data, batch, 0, store_root=store if alpha > 0 else None, targets=targets,
                                num_workers=2, val_batches=1)
    timer = _StepTimer(s["device"]).callback
    trainer = build_trainer(cfg, steps, callbacks=[timer], logger=False, validate=False, checkpoints=False)
    _reset_peak(s["device"])
    trainer.fit(module, datamodule=dm)
    peak = _peak(s["device"])
    gaps = [b - a for a, b in zip(timer.times[s["warmup"] - 1 :], timer.times[s["warmup"] :])]
    step_s = statistics.median(gaps)
    tokens = batch * s["seq_len"]
    flops = shape.training_flops(s["seq_len"], tokens)
    peak_f = peak_flops()
    out = {"alpha": alpha, "strategy": strategy, "precision": cfg.trainer.precision, "batch": batch,
           "seq_len": s["seq_len"], "student": s["student"], "params": sum(p.numel() for p in model.parameters()),
           "timed_steps": len(gaps), "step_s": step_s, "tokens_per_s": tokens / step_s,
           "step_tflops": flops / 1e12, "mfu": flops / step_s / peak_f if peak_f else None,
           "peak_gpu_gib": _gib(peak)}
    if export is not None:  # the trained student as an HF dir, for the evaluation phase
        from transformers import AutoTokenizer

        unwrapped = module.model
        unwrapped.to(torch.bfloat16 if gpu else torch.float32).save_pretrained(export)
        AutoTokenizer.from_pretrained(data / "tokenizer").save_pretrained(export)
        (export / "pdl_run.json").write_text(json.dumps({"seq_len": s["seq_len"], "data": str(data)}))
    del trainer, module, model, dm
    if gpu:
        torch.cuda.empty_cache()
    return out


# ----------------------------------------------------------------------------- 3. evaluation


def bench_eval(s: dict, model_dir: Path) -> dict:
    from pd_lightning.evaluation import evaluate

    _reset_peak(s["device"])
    t0 = time.perf_counter()
    res = evaluate(model_dir, tasks="synth_continuation", batch_size=s["eval_batch"], device=s["device"],
                   limit=s["eval_items"])
    return {"task": "synth_continuation", "items": s["eval_items"], "batch": s["eval_batch"], "backend": res["backend"],
            "max_length": res["max_length"], "seconds": round(time.perf_counter() - t0, 1),
            "peak_gpu_gib": _gib(_peak(s["device"])), "dtype": "float32 (pdl eval's)"}


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on CPU: check the script end to end")
    ap.add_argument("--skip-fsdp", action="store_true", help="leave out the FSDP training phase")
    a = ap.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    size = "cpu-smoke" if a.cpu_smoke else "gpu"
    s = SIZES[size]
    if s["device"] == "cuda" and not torch.cuda.is_available():
        print("bench_gpu: no CUDA GPU is visible; run with --cpu-smoke to check the script on CPU", file=sys.stderr)
        raise SystemExit(2)
    started = time.perf_counter()
    out: dict = {"size": size, "device": torch.cuda.get_device_name() if s["device"] == "cuda" else "cpu",
                 "torch": torch.__version__, "peak_bf16_flops": peak_flops()}
    with tempfile.TemporaryDirectory(prefix="bench_gpu-") as root:
        root = Path(root)
        t0 = time.perf_counter()
        data = synthetic_data(root / "data", s["vocab"], s["seq_len"], s["gen_sequences"], s["heldout"])
        _log(f"synthetic data in {time.perf_counter() - t0:.0f}s")
        _phase("generation", out, bench_generation, s, root, data)
        store = Path(out["generation"]["store"]) if "store" in out["generation"] else None
        _phase("train_lm", out, lambda: bench_training(s, data, store, alpha=0.0, strategy="auto",
                                                       batch=s["train_batch"], root=root))
        if store is not None:
            _phase("train_pd", out, lambda: bench_training(s, data, store, alpha=1.0, strategy="auto",
                                                           batch=s["train_batch"], root=root, export=root / "student"))
            if s["fsdp_batch"] and not a.skip_fsdp:
                _phase("train_pd_fsdp", out, lambda: bench_training(s, data, store, alpha=1.0, strategy="fsdp",
                                                                    batch=s["fsdp_batch"], root=root))
        if (root / "student" / "config.json").is_file():
            _phase("eval", out, bench_eval, s, root / "student")
    lm, pd = out.get("train_lm", {}), out.get("train_pd", {})
    if "step_s" in lm and "step_s" in pd:
        out["pd_vs_lm_step_time"] = pd["step_s"] / lm["step_s"]
    gen = out.get("generation", {})
    if gen.get("device_only_tokens_per_s"):
        out["encode_needed_tokens_per_s"] = 2 * gen["device_only_tokens_per_s"]  # the target: 2x the forward
    out["total_seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
