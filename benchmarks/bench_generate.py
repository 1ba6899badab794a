"""Logit generation benchmark at V = 151,552: memory and speed of the chunked path against today's dense one.

    python benchmarks/bench_generate.py            # hidden 256, 2 layers, 4 sequences of 2,048, top-0.95-100
    python benchmarks/bench_generate.py --quick    # 2 sequences of 1,024 (a smoke run, ~2 minutes)

A random-init LlamaForCausalLM teacher (hidden 256, 2 layers, untied head, V = 151,552) saved as an
HF dir with a synthetic 151,552-token tokenizer, over token shards of Zipf-distributed ids. Each
variant runs in its own fresh process (peak RSS = the process's VmHWM, glibc told to unmap every
allocation of 64 KiB or more so freed buffers leave RSS at once and the mark measures live memory):

  forward_hidden  load the teacher, run its backbone over the batches, keep nothing (the reference)
  generate        `generate_store` itself: backbone -> per-chunk LM head + statistics + top-p-k ->
                  AsyncShardWriter (the path `pdl logits generate` runs)
  dense           today's path before this change, verbatim: model(ids).logits[:, :-1].float() ->
                  AsyncShardWriter(max_pending=2), which truncates, encodes and writes on its thread

peak_mem_ratio_generate_vs_forward_hidden = peak RSS(generate) / peak RSS(forward_hidden) (target
<= 1.3); the same ratio for dense; tokens_per_s of generate and dense (median of --reps runs, the two
interleaved); `byte_identical` compares every shard file of the two stores.

The teacher's weights are made resident in every variant (read once after loading: safetensors
weights are memory-mapped, and a backbone-only forward would never touch the LM head's pages; on a
GPU, .to(device) puts every weight in memory).

Encoder: encode + write of LLM-like SparseLogits at V = 151,552, top-0.95-100 (the synthetic
distributions of bench_store: λ·(Gumbel + log Zipf), ~2.6 nats mean entropy) through AsyncShardWriter
with 0 encoder processes (the thread) and with 1 and 2 processes, in `logits.encoding`'s default
(and ctxans on the thread); median tokens/s over --reps rounds, and tokens per CPU second of encoder
work (the processes' start left out), which is what one free core sustains whatever the load. On
this shared 2-core machine 2 processes cannot show their scaling; a GPU node has the cores.

Progress lines go to stderr; the last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

V = 151_552
HERE = Path(__file__).resolve()


# ----------------------------------------------------------------------------- synthetic inputs (also bench_gpu)


def synthetic_tokenizer(out: Path, vocab: int):
    """A WordLevel tokenizer with exactly `vocab` ids ("t0" ... and an <eos>), saved as an HF dir."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"t{i}": i for i in range(vocab - 1)} | {"<eos>": vocab - 1}
    tok = Tokenizer(models.WordLevel(words, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="t0", pad_token="<eos>")
    fast.save_pretrained(out)
    return fast


def synthetic_data(root: Path, vocab: int, seq_len: int, train_sequences: int, heldout_sequences: int = 4,
                   seed: int = 0) -> Path:
    """A prepared-dataset dir (manifest, tokenizer, shards) of Zipf-distributed token ids, as `pdl data prepare` writes."""
    from pd_lightning.data.shards import FORMAT, MANIFEST, VERSION, ShardWriter, token_dtype, write_json_atomic
    from pd_lightning.data.tokenizer import tokenizer_hash

    root.mkdir(parents=True, exist_ok=True)
    tok = synthetic_tokenizer(root / "tokenizer", vocab)
    rng = np.random.default_rng(seed)
    dtype = token_dtype(vocab)
    splits = {}
    for split, n in (("train", train_sequences), ("heldout", heldout_sequences)):
        w = ShardWriter(root, split, seq_len, dtype, max(n, 1), n)
        w.add(np.minimum(rng.zipf(1.2, n * seq_len) - 1, vocab - 1).astype(np.int64))
        splits[split] = w.close()
    write_json_atomic(root / MANIFEST, {
        "format": FORMAT, "version": VERSION, "config_hash": f"synthetic-{vocab}-{seq_len}-{train_sequences}-{seed}",
        "source": {"source": "synthetic"}, "tokenizer_hash": tokenizer_hash(tok), "vocab_size": vocab,
        "eos_token_id": int(tok.eos_token_id), "seq_len": seq_len, "dtype": dtype.str, "splits": splits})
    return root


def synthetic_teacher(out: Path, tokenizer_dir: Path, vocab: int, *, hidden: int, layers: int, heads: int,
                      kv_heads: int, ffn: int, seq_len: int, dtype: str = "float32", seed: int = 0,
                      logit_gain: float = 1.0, device: str = "cpu") -> Path:
    """A random-init Llama teacher saved as an HF dir with the tokenizer; `logit_gain` scales the LM head
    (a random head gives near-uniform next-token distributions; a gain makes them peaked like a real teacher's)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=seq_len,
                      tie_word_embeddings=False, use_cache=False, eos_token_id=vocab - 1, bos_token_id=vocab - 1,
                      pad_token_id=vocab - 1)
    with torch.device(device):  # a 1-2B random init is minutes on a CPU, seconds on a GPU
        model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(logit_gain)
    model.to(getattr(torch, dtype)).save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out


def llm_like_sparse(n_tok: int, p: float, k: int, seed: int):
    """Top-p-k SparseLogits of bench_store's LLM-like synthetic distributions over V ids."""
    import torch

    from pd_lightning.logits.processing import SparseLogits, truncate_top_p_k

    parts = []
    base = -1.1 * torch.log(torch.arange(1, V + 1, dtype=torch.float32))
    for i in range(0, n_tok, 256):
        g = torch.Generator().manual_seed(seed * 1000 + i)
        n = min(256, n_tok - i)
        gumbel = -torch.log(-torch.log(torch.rand(n, V, generator=g).clamp_(1e-12, 1 - 1e-7)))
        sharp = torch.exp(torch.randn(n, 1, generator=g) * 0.5 + math.log(1.7))
        parts.append(truncate_top_p_k(sharp * (gumbel + base), p, k))
    return SparseLogits.cat(parts)


# ----------------------------------------------------------------------------- worker phases


def _vm_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _gen_config(data: Path, teacher: Path, store: Path, batch: int, extra: list[str]):
    from pd_lightning.config import load_config

    return load_config("tiny", [f"data.out={data}", f"teacher.path={teacher}", f"logits.store={store}",
                                f"logits.batch_size={batch}", "logits.store_p=0.95", "logits.store_k=100",
                                "logits.p=0.95", "logits.k=100", "logits.sequences_per_shard=2", *extra])


def phase_forward_hidden(a) -> dict:
    import torch

    from pd_lightning.data.shards import TokenShards
    from pd_lightning.models import load_causal_lm

    model = _resident(load_causal_lm(a.teacher))
    shards = TokenShards(a.data, "train")
    t0 = time.perf_counter()
    with torch.no_grad():
        for first in range(0, len(shards), a.batch):
            ids = torch.from_numpy(shards.batch(range(first, min(first + a.batch, len(shards)))))
            model.model(input_ids=ids).last_hidden_state.sum()
    return {"seconds": time.perf_counter() - t0, "tokens": len(shards) * shards.seq_len}


def phase_generate(a) -> dict:
    from pd_lightning.logits.generate import generate_store

    cfg = _gen_config(a.data, a.teacher, a.store, a.batch, [f"logits.encode_workers={a.workers}"])
    t0 = time.perf_counter()
    generate_store(cfg)
    seconds = time.perf_counter() - t0
    stats = json.loads((Path(a.store) / "generation_stats-rank0.json").read_text())
    return {"seconds": seconds, "generation_seconds": stats["seconds"], "tokens": _tokens(a.data)}


def phase_dense(a) -> dict:
    """Today's path before this change, verbatim (generate.py at the parent commit), into its own store."""
    import torch

    from pd_lightning.cost import model_cost_shape, store_cost_meta
    from pd_lightning.data.shards import TokenShards, read_manifest
    from pd_lightning.logits.generate import teacher_identity
    from pd_lightning.logits.writer import AsyncShardWriter, LogitStoreWriter
    from pd_lightning.models import load_causal_lm

    cfg = _gen_config(a.data, a.teacher, a.store, a.batch, [])
    lg, teacher = cfg.logits, Path(a.teacher)
    manifest = read_manifest(a.data)
    shards = TokenShards(a.data, "train")
    writer = LogitStoreWriter(a.store, vocab_size=int(json.loads((teacher / "config.json").read_text())["vocab_size"]),
                              p=lg.store_p, k=lg.store_k, positions_per_sequence=shards.seq_len - 1,
                              num_sequences=len(shards), sequences_per_shard=lg.sequences_per_shard,
                              teacher=str(teacher.resolve()), teacher_config_hash=teacher_identity(teacher),
                              tokenizer_hash=manifest["tokenizer_hash"], encoding=lg.encoding)
    model = _resident(load_causal_lm(teacher))
    t0 = time.perf_counter()
    with AsyncShardWriter(writer) as aw:
        for s in writer.pending_shards():
            rng = writer.shard_range(s)
            for first in range(rng.start, rng.stop, lg.batch_size):
                last = min(first + lg.batch_size, rng.stop)
                ids = torch.from_numpy(shards.batch(range(first, last)))
                with torch.no_grad():
                    logits = model(input_ids=ids).logits[:, :-1]
                aw.submit(first, logits.float().reshape(-1, logits.size(-1)))
    seconds = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    writer.finalize(meta={"teacher_params": params, **store_cost_meta(model_cost_shape(model), len(shards), shards.seq_len),
                          "data": str(Path(a.data).resolve()), "data_hash": manifest["config_hash"]})
    return {"seconds": seconds, "tokens": _tokens(a.data)}


def _resident(model):
    """Read every weight once: safetensors weights are memory-mapped and count in RSS only once touched, and a
    backbone-only forward never touches the LM head (on a GPU, .to(device) makes every weight resident)."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            p.sum()
    return model


def _tokens(data) -> int:
    from pd_lightning.data.shards import TokenShards

    s = TokenShards(data, "train")
    return len(s) * s.seq_len


def phase_encode(a) -> dict:
    """encode + write tokens/s through AsyncShardWriter with a.workers encoder processes (0 = the thread).

    8 distinct sequences of 2,048 tokens are submitted in turn, a.encode_sequences in all, into shards
    of 8 sequences; timed from the first submit until every shard is on disk (the processes are
    started and warm before, as a long generation amortises their start).
    """
    from pd_lightning.logits.writer import AsyncShardWriter, LogitStoreWriter

    from pd_lightning.config import LogitsConfig

    P = 2048
    encoding = a.encoding or LogitsConfig().encoding  # `pdl logits generate`'s default unless asked
    base = llm_like_sparse(8 * P, 0.95, 100, seed=3)
    seqs = [base.rows(i * P, (i + 1) * P) for i in range(8)]
    n_seq = a.encode_sequences
    rates, own, kids, start_cpu = [], [], [], 0.0
    for r in range(a.reps):
        with tempfile.TemporaryDirectory() as d:
            settings = dict(vocab_size=V, p=0.95, k=100, positions_per_sequence=P, num_sequences=n_seq,
                            sequences_per_shard=8, teacher="synthetic", teacher_config_hash="-", tokenizer_hash="-",
                            encoding=encoding)
            w = LogitStoreWriter(d, **settings)
            make = functools.partial(LogitStoreWriter, d, **settings, verify_existing=False)
            if r == 0 and a.workers:  # the processes' start (spawn, imports) in CPU time, to leave out below
                kids0 = _cpu(resource.RUSAGE_CHILDREN)
                AsyncShardWriter(w, encode_workers=a.workers, make_writer=make).close()
                start_cpu = _cpu(resource.RUSAGE_CHILDREN) - kids0
            aw = AsyncShardWriter(w, max_pending=2, encode_workers=a.workers, make_writer=make)
            aw.flush()
            own0, kids0 = _cpu(resource.RUSAGE_SELF), _cpu(resource.RUSAGE_CHILDREN)
            t0 = time.perf_counter()
            for s in range(n_seq):
                aw.submit(s, seqs[s % 8])
            aw.flush()
            rates.append(n_seq * P / (time.perf_counter() - t0))
            aw.close()  # joins the processes: their CPU time is in RUSAGE_CHILDREN from here
            own.append(_cpu(resource.RUSAGE_SELF) - own0)
            kids.append(_cpu(resource.RUSAGE_CHILDREN) - kids0 - start_cpu)
    tokens = n_seq * P
    encoder_cpu = statistics.median(kids) if a.workers else statistics.median(own)
    return {"tokens_per_s": statistics.median(rates), "rounds": rates,
            # per core of encoder work: the rate one free core sustains (load-independent, unlike wall time)
            "tokens_per_encoder_cpu_s": tokens / encoder_cpu,
            "parent_cpu_s_per_token": statistics.median(own) / tokens,
            "entries_per_token": float(base.counts.float().mean()), "encoding": encoding,
            "process_start_cpu_s": start_cpu}


def _cpu(who: int) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


PHASES = {"forward_hidden": phase_forward_hidden, "generate": phase_generate, "dense": phase_dense,
          "encode": phase_encode}


def _worker(a) -> None:
    out = PHASES[a.phase](a)
    out["peak_rss_bytes"] = _vm_kb("VmHWM") * 1024
    out["process_cpu_s"] = _cpu(resource.RUSAGE_SELF) + _cpu(resource.RUSAGE_CHILDREN)
    print("RESULT " + json.dumps(out))


def _run(phase: str, common: list[str], extra: list[str] = ()) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(64 * 1024), TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(HERE), "--phase", phase, *common, *extra], capture_output=True,
                          text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"phase {phase} failed:\n{proc.stderr[-3000:]}")
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def _log(msg: str) -> None:
    print(f"[bench_generate] {msg}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 sequences of 1,024 tokens, 1 rep")
    ap.add_argument("--sequences", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1, help="sequences per teacher forward")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--encode-sequences", type=int, default=64, help="2,048-token sequences per encoder round")
    ap.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--teacher", help=argparse.SUPPRESS)
    ap.add_argument("--store", help=argparse.SUPPRESS)
    ap.add_argument("--workers", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--encoding", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.phase:
        _worker(a)
        return {}
    if a.quick:
        a.sequences, a.seq_len, a.reps, a.encode_sequences = 2, 1024, 1, 32
    from pd_lightning.logits.store import file_checksum

    res: dict = {"vocab_size": V, "teacher": "llama hidden 256, 2 layers, untied head, random init", "seq_len": a.seq_len,
                 "sequences": a.sequences, "batch": a.batch, "top_p_k": [0.95, 100], "reps": a.reps,
                 "load_avg_1min": _load()}
    with tempfile.TemporaryDirectory() as root:
        root = Path(root)
        t0 = time.perf_counter()
        data = synthetic_data(root / "data", V, a.seq_len, a.sequences)
        # gain 8: logit std ~2.5, so top-0.95 keeps fewer than k entries on some tokens (a plain random head is uniform)
        teacher = synthetic_teacher(root / "teacher", data / "tokenizer", V, hidden=256, layers=2, heads=4, kv_heads=4,
                                    ffn=688, seq_len=a.seq_len, logit_gain=8.0)
        _log(f"inputs ready in {time.perf_counter() - t0:.0f}s")
        common = ["--data", str(data), "--teacher", str(teacher), "--batch", str(a.batch), "--reps", str(a.reps),
                  "--encode-sequences", str(a.encode_sequences)]
        fwd, gen, dense = [], [], []
        for r in range(a.reps):  # interleaved, order rotated: drifting load from other processes hits all alike
            order = [("forward_hidden", fwd), ("generate", gen), ("dense", dense)]
            order = order[r % 3:] + order[: r % 3]
            for phase, acc in order:
                store = root / f"store-{phase}-{r}"
                acc.append(_run(phase, common, ["--store", str(store)]))
                _log(f"round {r} {phase}: {acc[-1]['seconds']:.1f}s, peak RSS {acc[-1]['peak_rss_bytes'] / 2**20:.0f} MiB")
        names = sorted(p.name for p in (root / "store-generate-0").glob("shard-*"))
        identical = names == sorted(p.name for p in (root / "store-dense-0").glob("shard-*")) and all(
            file_checksum(root / "store-generate-0" / n) == file_checksum(root / "store-dense-0" / n) for n in names)
        manifests = [json.loads((root / f"store-{v}-0" / "manifest.json").read_text()) for v in ("generate", "dense")]
        res["manifest_identical"] = manifests[0] == manifests[1]
        res["entries_per_token"] = manifests[0]["num_entries"] / manifests[0]["num_tokens"]
        enc = {w: _run("encode", common, ["--workers", str(w)]) for w in (0, 1, 2)}
        enc["ctxans"] = _run("encode", common, ["--workers", "0", "--encoding", "ctxans"])
        for w, e in enc.items():
            _log(f"encode + write ({e['encoding']}), {w} encoder processes: {e['tokens_per_s']:,.0f} tokens/s, "
                 f"{e['tokens_per_encoder_cpu_s']:,.0f} tokens per encoder CPU second")

    med = lambda xs, key: statistics.median(x[key] for x in xs)  # noqa: E731
    tokens = gen[0]["tokens"]
    res.update({
        "peak_mem_ratio_generate_vs_forward_hidden": med(gen, "peak_rss_bytes") / med(fwd, "peak_rss_bytes"),
        "peak_mem_ratio_dense_vs_forward_hidden": med(dense, "peak_rss_bytes") / med(fwd, "peak_rss_bytes"),
        "peak_rss_mib": {"forward_hidden": med(fwd, "peak_rss_bytes") / 2**20, "generate": med(gen, "peak_rss_bytes") / 2**20,
                         "dense": med(dense, "peak_rss_bytes") / 2**20},
        "tokens_per_s": {"generate": tokens / med(gen, "seconds"), "dense": tokens / med(dense, "seconds"),
                         "forward_hidden": tokens / med(fwd, "seconds")},
        "tokens_per_s_ratio_generate_vs_dense": med(dense, "seconds") / med(gen, "seconds"),
        "byte_identical": identical,
        # CPU-time rates are what a free core sustains; wall rates depend on this machine's load
        "tokens_per_cpu_s": {"generate": tokens / med(gen, "process_cpu_s"), "dense": tokens / med(dense, "process_cpu_s")},
        "encode_tokens_per_s": enc[0]["tokens_per_s"],
        "encode_tokens_per_s_1_process": enc[1]["tokens_per_s"],
        "encode_tokens_per_s_2_processes": enc[2]["tokens_per_s"],
        "encode_tokens_per_core_s": enc[0]["tokens_per_encoder_cpu_s"],
        "encode_tokens_per_core_s_in_processes": enc[2]["tokens_per_encoder_cpu_s"],
        "encode_parent_cpu_s_per_token_with_processes": enc[2]["parent_cpu_s_per_token"],
        "encode_encoding": enc[0]["encoding"],
        "encode_ctxans_tokens_per_s": enc["ctxans"]["tokens_per_s"],
        "encode_ctxans_tokens_per_core_s": enc["ctxans"]["tokens_per_encoder_cpu_s"],
        "encode_entries_per_token": enc[0]["entries_per_token"],
        "encode_rounds": {w: e["rounds"] for w, e in enc.items()},
        "raw": {"forward_hidden": fwd, "generate": gen, "dense": dense},
        "quick": bool(a.quick),
    })
    print(json.dumps(res))
    return res


def _load() -> float | None:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


if __name__ == "__main__":
    main()
