"""Logit store benchmark: size, fidelity and speed against naive encodings; generation overhead.

Synthetic LLM-like teacher distributions at V = 151,552: logits z = λ_t · (G + log π) with G i.i.d.
Gumbel noise, π a Zipfian id popularity (π_i ∝ (i+1)^-1.1, so kept ids concentrate on frequent, low
BPE ids as a real teacher's do) and a per-token sharpness λ_t = exp(N(log 1.7, 0.5²)) that mixes
peaked and flat tokens (mean entropy ≈ 2.6 nats). The worst case draws ids uniformly (π flat).

For top-0.95-100 and top-0.95-50 it writes real stores (ctxans, the entropy-coded encoding; egsqrt, the
default; fixed) and measures,
side by side, the naive int32 index + fp32 value layout (8 B/entry), Megatron-LM's 17-bit index + fp16
value layout (17 bits cannot address 151,552 ids; we charge 17 bits anyway, i.e. 33 bits/entry, in
its favour) and general-purpose compressors run on the egsqrt shard files in the same run (xz -9e via
Python's lzma, preset 9 | PRESET_EXTREME; zstd -19 via the `zstandard` package, or the `zstd` binary).
Per case: bytes/entry and bytes/token (whole files: headers, models, per-token columns, offsets),
mean KL(exact truncated || decoded) on the kept support, decode tokens/s via LogitStore: random
batches of 16 sequences, the encodings alternating on the same batches, medians over repetitions,
and the median of the per-repetition ratios (ctxans ÷ egsqrt).

Real store (`--real-store DIR`, a store made by `pdl logits generate`, whose manifest names its teacher
and token shards; or `--real-build DIR`, which prepares the tiny config's data, trains its teacher
and caches both in DIR): the teacher runs once over the first `--real-sequences` sequences and
the same truncated entries are written as ctxans and egsqrt stores side by side (the egsqrt shards
are also what xz / zstd compress). Unlike the i.i.d. synthetic tokens, consecutive positions of a
real sequence are correlated. Both encodings decode to bit-identical entries (checked on every
sequence), so they have the same KL (reported on the first 64 sequences).

Target families (`families`): on the same Zipf distributions, sampled stores of N ∈ {8, 12, 32, 64}
draws per position (logits.sampling=sample) beside top-0.95-k for k ∈ {5, 10, 20, 50, 100}, all egsqrt:
bytes/token, entries/token and the mean squared target error Σ_v (t_v - p_v)² against the full teacher
(top-k: bias²; sampled: variance, which averages out over steps).

Generation overhead: a random-init transformers LlamaForCausalLM (hidden 256, 4 layers, vocab 32k,
sequence 256) is the "teacher forward"; (forward + truncate + encode + write, with truncate/encode/
write on AsyncShardWriter's background thread overlapping the next forward) ÷ (forward alone), wall
clock, best of alternating rounds, forward on one intra-op thread (the writer gets the other core).
Also reported: the CPU-time ratio and `free_core_overlap_ratio` = max(1, writer CPU / forward CPU),
the wall ratio on a machine whose second core is really free (a shared, loaded machine is not).

The generation overhead is measured for ctxans (`generation_overhead_median`, the bound issue 22 sets for
the new encoding) and for egsqrt (`generation_overhead_median_egsqrt`) in the same alternating rounds.

Prints progress lines, then one JSON object as the last line. `--quick` for a fast run.
"""

from __future__ import annotations

import argparse
import json
import lzma
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pd_lightning.logits.processing import SparseLogits, narrow, sample_teacher, sample_uniforms, truncate_top_p_k
from pd_lightning.logits.store import LogitStore, inspect_store
from pd_lightning.logits.writer import AsyncShardWriter, LogitStoreWriter

V = 151_552
P = 256  # positions per synthetic sequence


def llm_like_logits(n: int, zipf: bool, seed: int) -> torch.Tensor:
    """[n, V] logits: λ_t · (Gumbel + log Zipf popularity); see module docstring."""
    g = torch.Generator().manual_seed(seed)
    gumbel = -torch.log(-torch.log(torch.rand(n, V, generator=g).clamp_(1e-12, 1 - 1e-7)))
    base = -1.1 * torch.log(torch.arange(1, V + 1, dtype=torch.float32)) if zipf else torch.zeros(V)
    sharp = torch.exp(torch.randn(n, 1, generator=g) * 0.5 + math.log(1.7))
    return sharp * (gumbel + base)


def synth_sparse(n_tok: int, zipf: bool, p: float, k: int, seed: int) -> SparseLogits:
    parts = [truncate_top_p_k(llm_like_logits(256, zipf, seed * 1000 + i), p, k) for i in range(n_tok // 256)]
    return SparseLogits.cat(parts)


def support_kl(exact: SparseLogits, decoded: SparseLogits, vocab: int = V) -> torch.Tensor:
    """KL(exact || decoded) per token, both renormalised on the kept set (matched by id)."""
    def by_id(s: SparseLogits) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.where(torch.isfinite(s.logprobs), s.indices, vocab)
        ids, order = torch.sort(ids, 1)
        return ids, torch.log_softmax(torch.gather(s.logprobs, 1, order), 1)
    ia, la = by_id(exact)
    ib, lb = by_id(decoded)
    assert torch.equal(ia, ib), "decoded ids differ"
    return torch.where(torch.isfinite(la), la.exp() * (la - lb), torch.zeros_like(la)).sum(1)


def naive_cases(s: SparseLogits) -> dict:
    """Sizes and KL of the two naive layouts (values rounded as they would store them)."""
    n_tok, entries = len(s), int(s.counts.sum())
    fin = torch.isfinite(s.logprobs)
    out = {}
    for name, idx_bits, dtype in (("int32_fp32", 32, torch.float32), ("megatron_17bit_fp16", 17, torch.float16)):
        lp = torch.where(fin, s.logprobs.to(dtype).float(), s.logprobs)
        dec = SparseLogits(s.indices, lp, s.counts, s.entropy, s.logit_std)
        nbytes = math.ceil(entries * (idx_bits + (32 if dtype == torch.float32 else 16)) / 8) + n_tok  # + a count byte/token
        out[name] = {"bytes_per_entry": nbytes / entries, "bytes_per_token": nbytes / n_tok,
                     "mean_kl": float(support_kl(s, dec).mean())}
    return out


def write_store(s: SparseLogits, p: float, k: int, encoding: str, path: Path, *, vocab: int = V, positions: int = P) -> float:
    """Write `s` (whole sequences) as one store (a sampled one when `s` carries draws); returns the encode + write
    seconds."""
    n_seq = len(s) // positions
    sampling = {"method": "sample", "samples": s.samples, "seed": 0, "proposal_tau": 1.0} if s.sampled else None
    w = LogitStoreWriter(path, vocab_size=vocab, p=p, k=k, positions_per_sequence=positions, num_sequences=n_seq,
                         sequences_per_shard=n_seq, teacher="synthetic", teacher_config_hash="-",
                         tokenizer_hash="-", encoding=encoding, power_exponents=s.power_exponents, sampling=sampling)
    t0 = time.perf_counter()
    for a in range(0, n_seq, 8):
        w.write_sequences(a, s.rows(a * positions, min(a + 8, n_seq) * positions))
    w.finalize()
    return time.perf_counter() - t0


def _zstd_19(data: bytes) -> int | None:
    try:
        import zstandard

        return len(zstandard.ZstdCompressor(level=19).compress(data))
    except ImportError:
        pass
    if shutil.which("zstd"):
        return len(subprocess.run(["zstd", "-19", "-c", "-q"], input=data, capture_output=True, check=True).stdout)
    return None


def compressor_sizes(store: Path) -> dict:
    """xz -9e and zstd -19 of a store's shard files: each file alone (as they stay randomly accessible) and
    all of them as one stream (the compressors' best case)."""
    files = sorted(store.glob("shard-*.bin"))
    blobs = [f.read_bytes() for f in files]
    xz = lambda b: len(lzma.compress(b, format=lzma.FORMAT_XZ, preset=9 | lzma.PRESET_EXTREME))  # noqa: E731
    per_file_zstd = [_zstd_19(b) for b in blobs]
    return {"shard_bytes": sum(map(len, blobs)),
            "xz_9e_bytes": sum(xz(b) for b in blobs), "xz_9e_bytes_one_stream": xz(b"".join(blobs)),
            "zstd_19_bytes": None if None in per_file_zstd else sum(per_file_zstd),
            "zstd_19_bytes_one_stream": _zstd_19(b"".join(blobs))}


def compare_decode(paths: dict[str, Path], seconds: float, batch: int = 16) -> dict:
    """Decode tokens/s of each store on the same random batches, the stores alternating within every
    repetition (so load from other processes hits them alike); medians, and the median per-repetition ratio
    of each store to the first one."""
    stores = {name: LogitStore(path) for name, path in paths.items()}
    n_seq, positions = len(next(iter(stores.values()))), next(iter(stores.values())).positions_per_sequence
    rng = np.random.default_rng(0)
    for st in stores.values():  # warm: page cache, models, malloc arenas
        st.sequences(rng.integers(0, n_seq, batch))
    times: dict[str, list[float]] = {name: [] for name in stores}
    t_end = time.perf_counter() + seconds
    rep = 0
    while time.perf_counter() < t_end or rep < 10:
        ids = rng.integers(0, n_seq, batch)
        names = list(stores) if rep % 2 == 0 else list(stores)[::-1]
        for name in names:
            t0 = time.perf_counter()
            stores[name].sequences(ids)
            times[name].append(time.perf_counter() - t0)
        rep += 1
    first = next(iter(stores))
    out = {"repetitions": rep, "batch_sequences": batch}
    for name, ts in times.items():
        out[name] = {"decode_tokens_per_s": batch * positions / float(np.median(ts)),
                     "decode_ms_per_batch_median": 1e3 * float(np.median(ts))}
        if name != first:
            out[f"ratio_{name}_vs_{first}"] = float(np.median(np.array(times[first]) / np.array(ts)))
    return out


def store_case(s: SparseLogits, p: float, k: int, root: Path, decode_seconds: float, tag: str) -> dict:
    """ctxans, egsqrt and fixed stores of the same entries: sizes, KL, speeds; xz / zstd of the egsqrt shards."""
    out, paths = {}, {}
    for encoding in ("ctxans", "egsqrt", "fixed"):
        path = paths[encoding] = root / f"{tag}-{encoding}-{p}-{k}"
        enc_s = write_store(s, p, k, encoding, path)
        info = inspect_store(path, checksums=False)
        decoded = LogitStore(path).sequences(range(len(s) // P))
        kl = support_kl(s, decoded)
        out[encoding] = {"bytes_per_entry": info["bytes_per_entry"], "bytes_per_token": info["bytes_per_token"],
                         "entries_per_token": info["mean_entries_per_token"], "mean_kl": float(kl.mean()),
                         "p99_kl": float(kl.quantile(0.99)), "encode_write_tokens_per_s": len(s) / enc_s}
    speeds = compare_decode({"egsqrt": paths["egsqrt"], "ctxans": paths["ctxans"], "fixed": paths["fixed"]}, decode_seconds)
    for encoding in ("ctxans", "egsqrt", "fixed"):
        out[encoding]["decode_tokens_per_s"] = speeds[encoding]["decode_tokens_per_s"]
    out["decode_ratio_ctxans_vs_egsqrt"] = speeds["ratio_ctxans_vs_egsqrt"]
    comp = compressor_sizes(paths["egsqrt"])
    entries = int(s.counts.sum())
    for key in ("xz_9e", "zstd_19"):
        if comp[f"{key}_bytes"] is not None:
            out[f"egsqrt_{key}"] = {"bytes_per_entry": comp[f"{key}_bytes"] / entries, "bytes_per_token": comp[f"{key}_bytes"] / len(s),
                                    "bytes_per_entry_one_stream": comp[f"{key}_bytes_one_stream"] / entries}
    return out


# ----------------------------------------------------------------------------- real store


TOPK_KS = (5, 10, 20, 50, 100)  # top-0.95-k beside ...
SAMPLED_NS = (8, 12, 32, 64)  # ... sampled stores of N draws per position


def _target_sq_error(ids: torch.Tensor, t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Σ_v (t_v - p_v)² per token against the full teacher p [n, V] (t on the ids, 0 elsewhere), in float64."""
    on = t > 0
    p_at = p.gather(1, ids)
    kept_p2 = torch.where(on, p_at * p_at, 0.0).sum(1)
    return torch.where(on, (t - p_at) ** 2, 0.0).sum(1) + (p * p).sum(1) - kept_p2


def families_case(n_tok: int, root: Path, seed: int = 1) -> dict:
    """Sampled (N draws, logits.sampling=sample) vs top-0.95-k targets on the same Zipf distributions at
    V = 151,552: bytes/token and entries/token of egsqrt stores written by the real writer (whole files), and
    the mean squared target error E Σ_v (t_v - p_v)² against the full τ=1 teacher: top-k's is its bias²
    (the tail's mass moved onto the head, the same every epoch), the sampled one's is variance, (1 - Σ p²)/N
    in expectation, and averages out over steps. One sequence of P positions per 256 tokens."""
    tops: dict[int, list] = {k: [] for k in TOPK_KS}
    draws: dict[int, list] = {n: [] for n in SAMPLED_NS}
    err = {f"top-0.95-{k}": [] for k in TOPK_KS} | {f"sampled-{n}": [] for n in SAMPLED_NS}
    for i in range(n_tok // P):
        z = llm_like_logits(P, True, seed * 1000 + i)
        p = torch.softmax(z.double(), -1)
        top = truncate_top_p_k(z, 0.95, max(TOPK_KS))
        for k in TOPK_KS:
            s = narrow(top, 0.95, k, store_p=0.95, store_k=max(TOPK_KS))
            tops[k].append(s)
            t = torch.softmax(s.logprobs.double(), -1)  # the renormalised top-p-k target (τ = 1)
            err[f"top-0.95-{k}"].append(_target_sq_error(s.indices, t, p))
        for n in SAMPLED_NS:
            s = sample_teacher(z, torch.from_numpy(sample_uniforms(seed, [i], P, n)))
            draws[n].append(s)
            err[f"sampled-{n}"].append(_target_sq_error(s.indices, s.draws.double() / n, p))
    out = {}
    for name, parts, p_store, k_store in ([(f"top-0.95-{k}", tops[k], 0.95, k) for k in TOPK_KS]
                                          + [(f"sampled-{n}", draws[n], 1.0, n) for n in SAMPLED_NS]):
        s = SparseLogits.cat(parts)
        path = root / f"family-{name}"
        write_store(s, p_store, k_store, "egsqrt", path)
        info = inspect_store(path, checksums=False)
        out[name] = {"bytes_per_token": info["bytes_per_token"], "entries_per_token": info["mean_entries_per_token"],
                     "bytes_per_entry": info["bytes_per_entry"],
                     "mean_target_sq_error": float(torch.cat(err[name]).mean())}
        shutil.rmtree(path)
    return out


def build_real_teacher(workdir: Path, quick: bool) -> tuple[Path, Path]:
    """The tiny config's token shards and trained teacher in `workdir` (reused when already there)."""
    from pd_lightning.config import load_config
    from pd_lightning.data.prepare import prepare
    from pd_lightning.train import train_teacher

    data, teacher = workdir / "data", workdir / "teacher"
    cfg = load_config("tiny", [f"data.out={data}", f"teacher.out={teacher}",
                               f"data.train_tokens={200_000 if quick else 400_000}",
                               f"teacher.max_steps={150 if quick else 400}"])
    if not (data / "manifest.json").is_file():
        prepare(cfg.data)
    if not (teacher / "config.json").is_file():
        train_teacher(cfg)
    return data, teacher


def real_case(teacher: Path, data: Path, p: float, k: int, power_exponents: tuple, n_seq: int,
              sequences_per_shard: int, root: Path, decode_seconds: float, reference: Path | None) -> dict:
    """One teacher pass over the first n_seq sequences, the same entries written as ctxans and egsqrt stores."""
    from pd_lightning.data.shards import TokenShards
    from pd_lightning.models import load_causal_lm

    shards = TokenShards(data, "train")
    n_seq = min(n_seq, len(shards))
    positions = shards.seq_len - 1
    model = load_causal_lm(teacher, what="teacher").eval()
    vocab = int(model.config.vocab_size)
    writers, paths = {}, {}
    for encoding in ("ctxans", "egsqrt"):
        paths[encoding] = root / f"real-{encoding}"
        writers[encoding] = LogitStoreWriter(
            paths[encoding], vocab_size=vocab, p=p, k=k, positions_per_sequence=positions, num_sequences=n_seq,
            sequences_per_shard=sequences_per_shard, teacher=str(teacher), teacher_config_hash="-", tokenizer_hash="-",
            encoding=encoding, power_exponents=power_exponents)
    exact, enc_s = [], {e: 0.0 for e in writers}
    for first in range(0, n_seq, 32):
        last = min(first + 32, n_seq)
        with torch.no_grad():
            logits = model(input_ids=torch.from_numpy(shards.batch(range(first, last)))).logits[:, :-1]
        sp = truncate_top_p_k(logits.float().reshape(-1, logits.size(-1)), p, k, power_exponents=power_exponents)
        if first < 64:
            exact.append(sp.rows(0, (min(last, 64) - first) * positions))
        for e, w in writers.items():
            t0 = time.perf_counter()
            w.write_sequences(first, sp)
            enc_s[e] += time.perf_counter() - t0
    for w in writers.values():
        w.finalize()
    stores = {e: LogitStore(path) for e, path in paths.items()}
    identical = True
    for a in range(0, n_seq, 64):
        x, y = (stores[e].sequences(range(a, min(a + 64, n_seq))) for e in ("ctxans", "egsqrt"))
        identical &= all(torch.equal(u, v) for u, v in zip(x._tensors(), y._tensors()))
        identical &= x.log_power_sums is None or torch.equal(x.log_power_sums, y.log_power_sums)
    exact_s = SparseLogits.cat(exact)
    n_exact = len(exact_s) // positions
    out: dict = {"teacher": str(teacher), "sequences": n_seq, "positions_per_sequence": positions, "vocab_size": vocab,
                 "decoded_identical": bool(identical)}
    for e, path in paths.items():
        info = inspect_store(path, checksums=False)
        kl = support_kl(exact_s, stores[e].sequences(range(n_exact)), vocab)
        out[e] = {"bytes": info["bytes"], "bytes_per_entry": info["bytes_per_entry"], "bytes_per_token": info["bytes_per_token"],
                  "entries_per_token": info["mean_entries_per_token"], "mean_kl_first_64_sequences": float(kl.mean()),
                  "encode_write_tokens_per_s": n_seq * positions / enc_s[e]}
    comp = compressor_sizes(paths["egsqrt"])
    out["egsqrt_compressed"] = comp
    speeds = compare_decode({"egsqrt": paths["egsqrt"], "ctxans": paths["ctxans"]}, decode_seconds)
    for e in paths:
        out[e]["decode_tokens_per_s"] = speeds[e]["decode_tokens_per_s"]
    out["decode_ratio_ctxans_vs_egsqrt"] = speeds["ratio_ctxans_vs_egsqrt"]
    new = out["ctxans"]["bytes"]
    out["bytes_ratio_ctxans_vs_egsqrt"] = new / comp["shard_bytes"]
    out["bytes_ratio_ctxans_vs_xz_9e"] = new / comp["xz_9e_bytes"]
    out["bytes_ratio_ctxans_vs_xz_9e_one_stream"] = new / comp["xz_9e_bytes_one_stream"]
    if comp["zstd_19_bytes"]:
        out["bytes_ratio_ctxans_vs_zstd_19"] = new / comp["zstd_19_bytes"]
    if reference is not None and (reference / "manifest.json").is_file():
        # the regenerated egsqrt shards against the given store's (byte-identical when it is an egsqrt store of this code)
        ref = json.loads((reference / "manifest.json").read_text())
        whole = [e for e in ref["shards"] if e["first_sequence"] + e["num_sequences"] <= n_seq]
        out["egsqrt_shards_identical_to_reference"] = (
            ref["encoding"]["name"] == "egsqrt" and all(
                (reference / e["file"]).read_bytes() == (paths["egsqrt"] / e["file"]).read_bytes() for e in whole))
    return out


def generation_overhead(n_batches: int, rounds: int, batch: int = 4, seq: int = 256) -> dict:
    """(forward + async truncate/encode/write) ÷ (forward alone) with a small random Llama, per encoding.

    Rounds alternate forward-only and pipeline runs (ctxans and egsqrt) over the
    same batches, rotating which goes first; `generation_overhead` uses each side's fastest round,
    `generation_overhead_median` the medians (load from other processes on a shared machine hits all
    alike as far as it can).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=32_000, max_position_embeddings=seq)
    model = LlamaForCausalLM(cfg).eval()
    data = torch.randint(0, 32_000, (n_batches * batch, seq))

    def forward(i: int) -> torch.Tensor:
        with torch.inference_mode():
            return model(data[i * batch : (i + 1) * batch]).logits

    forward(0)  # warm-up
    wall: dict[str, list[float]] = {"forward": [], "ctxans": [], "egsqrt": []}
    cpu: dict[str, list[float]] = {name: [] for name in wall}

    def run(name: str) -> None:
        with tempfile.TemporaryDirectory() as d:
            c0, t0 = time.process_time(), time.perf_counter()
            if name == "forward":
                for i in range(n_batches):
                    forward(i)
            else:
                w = LogitStoreWriter(d, vocab_size=32_000, p=0.95, k=100, positions_per_sequence=seq,
                                     num_sequences=n_batches * batch, sequences_per_shard=2 * batch,
                                     teacher="tiny-llama", teacher_config_hash="-", tokenizer_hash="-", encoding=name)
                with AsyncShardWriter(w, max_pending=2) as aw:
                    for i in range(n_batches):
                        aw.submit(i * batch, forward(i))
                w.finalize()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)

    names = list(wall)
    for r in range(rounds):  # rotate which goes first so drifting load hits all alike
        for name in names[r % 3:] + names[: r % 3]:
            run(name)
    med = {name: float(np.median(ts)) for name, ts in wall.items()}
    med_cpu = {name: float(np.median(ts)) for name, ts in cpu.items()}
    tokens = n_batches * batch * seq
    out = {"wall_s": wall, "cpu_s": cpu, "tokens_per_round": tokens, "forward_tokens_per_s": tokens / min(wall["forward"]),
           "threads": torch.get_num_threads(), "load_avg_1min": _load()}
    for name in ("ctxans", "egsqrt"):
        writer_cpu = med_cpu[name] - med_cpu["forward"]
        sfx = "" if name == "ctxans" else "_egsqrt"
        out |= {f"generation_overhead{sfx}": min(wall[name]) / min(wall["forward"]),
                f"generation_overhead_median{sfx}": med[name] / med["forward"],
                # with a free core for the writer thread the wall ratio would be max(1, writer / forward)
                f"free_core_overlap_ratio{sfx}": max(1.0, writer_cpu / med_cpu["forward"]),
                f"writer_cpu_s_per_token{sfx}": writer_cpu / tokens,
                f"cpu_time_ratio{sfx}": med_cpu[name] / med_cpu["forward"]}
    out["forward_cpu_s_per_token"] = med_cpu["forward"] / tokens
    return out


def _load() -> float | None:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def main(argv: list[str] | None = None) -> dict:
    """Run every case; print progress and a final one-line JSON object."""
    from pd_lightning.logits.store import keep_freed_memory_for_reuse

    keep_freed_memory_for_reuse()  # decoding is measured as the training loader runs it (module.py sets this too)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer tokens, batches and repetitions (a few minutes)")
    ap.add_argument("--tokens", type=int, default=None, help="synthetic tokens per case (multiple of 256)")
    ap.add_argument("--real-store", type=Path, default=None,
                    help="a store made by `pdl logits generate`: its teacher and token shards make the real case")
    ap.add_argument("--real-build", type=Path, default=None,
                    help="no --real-store: prepare tiny data and train its teacher in this dir (reused when there)")
    ap.add_argument("--real-teacher", type=Path, default=None, help="with --real-data: a trained teacher dir for the real case")
    ap.add_argument("--real-data", type=Path, default=None, help="with --real-teacher: its token shards (`pdl data prepare`)")
    ap.add_argument("--real-sequences", type=int, default=2048, help="sequences of the real case")
    ap.add_argument("--no-generation", action="store_true", help="skip the generation-overhead measurement")
    args = ap.parse_args(argv)
    n_tok = args.tokens or (1024 if args.quick else 3072)
    n_tok = max(256, n_tok // 256 * 256)
    decode_s = 2.0 if args.quick else 6.0
    results: dict = {"vocab_size": V, "synthetic_tokens": n_tok}
    log = lambda msg: print(f"[bench_store] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    with tempfile.TemporaryDirectory() as root:
        for zipf, tag in ((True, "zipf"), (False, "worst_case_uniform_ids")):
            t0 = time.perf_counter()
            s100 = synth_sparse(n_tok, zipf, 0.95, 100, seed=1 if zipf else 2)
            synth_tps = n_tok / (time.perf_counter() - t0)
            for k in (100, 50):
                # top-0.95-50 is a prefix of top-0.95-100 (tests prove narrow == direct truncation)
                s = s100 if k == 100 else narrow(s100, 0.95, 50, store_p=0.95, store_k=100)
                case = {"mean_entropy_nats": float(s.entropy.mean()), "entries_per_token": float(s.counts.float().mean()),
                        "synthesize_and_truncate_tokens_per_s": synth_tps}
                case.update(store_case(s, 0.95, k, Path(root), decode_s, tag))
                case.update(naive_cases(s))
                results[f"{tag}_top-0.95-{k}"] = case
                log(f"{tag} top-0.95-{k}: ctxans {case['ctxans']['bytes_per_entry']:.3f} B/entry, egsqrt "
                    f"{case['egsqrt']['bytes_per_entry']:.3f}, xz -9e {case['egsqrt_xz_9e']['bytes_per_entry']:.3f}, KL "
                    f"{case['ctxans']['mean_kl']:.2e}, decode ctxans/egsqrt {case['decode_ratio_ctxans_vs_egsqrt']:.2f}")
        t0 = time.perf_counter()
        families = families_case(min(n_tok, 1024), Path(root))  # 9 stores of 1,024 tokens: bytes/token to ~1%
        results["families"] = families
        log(f"families ({time.perf_counter() - t0:.0f} s): " + ", ".join(
            f"{name} {c['bytes_per_token']:.1f} B/token ({c['entries_per_token']:.1f} entries)"
            for name, c in families.items()))
        real = None
        if args.real_store is not None or args.real_build is not None or args.real_teacher is not None:
            if args.real_teacher is not None:
                if args.real_data is None:
                    ap.error("--real-teacher needs --real-data")
                teacher, data, p, k, exps, per_shard = args.real_teacher, args.real_data, 0.95, 100, (), 1024
            elif args.real_store is not None:
                from pd_lightning.logits.store import load_manifest

                m = load_manifest(args.real_store)
                teacher, data = Path(m["teacher"]), Path(m["meta"]["data"])
                p, k, exps, per_shard = float(m["p"]), int(m["k"]), tuple(m.get("power_exponents", [])), int(m["sequences_per_shard"])
            else:
                data, teacher = build_real_teacher(args.real_build, args.quick)
                p, k, exps, per_shard = 0.95, 100, (), 1024
            log(f"real store: teacher {teacher} over the first {args.real_sequences} sequences of {data}")
            real = real_case(teacher, data, p, k, exps, args.real_sequences, per_shard, Path(root) / "real", decode_s,
                             args.real_store)
            results["real"] = real
            log(f"real: ctxans {real['ctxans']['bytes_per_token']:.2f} B/token, egsqrt {real['egsqrt']['bytes_per_token']:.2f}, "
                f"ratio {real['bytes_ratio_ctxans_vs_egsqrt']:.3f}, vs xz -9e {real['bytes_ratio_ctxans_vs_xz_9e']:.3f}, "
                f"decode ratio {real['decode_ratio_ctxans_vs_egsqrt']:.2f}")
    gen = None
    if not args.no_generation:
        # one intra-op thread for the forward: the writer thread gets the other core, as a GPU generator's CPU does
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        # Steady state: the writer's work on the *last* batch can never overlap a forward, so a run of
        # n batches pays ~1/n of a writer step extra; real generation runs thousands of batches, so
        # measure enough of them (measured on a quiet machine: 3 batches read 1.22, 12 batches 1.04).
        gen = generation_overhead(4 if args.quick else 12, rounds=3 if args.quick else 5)
        torch.set_num_threads(threads)
        log(f"generation overhead (median) ctxans {gen['generation_overhead_median']:.3f}, "
            f"egsqrt {gen['generation_overhead_median_egsqrt']:.3f}")
    main_case = results["zipf_top-0.95-100"]
    worst = results["worst_case_uniform_ids_top-0.95-100"]
    summary = {
        "new_encoding": "ctxans",
        "new_bytes_per_entry": main_case["ctxans"]["bytes_per_entry"],
        "new_bytes_per_token": main_case["ctxans"]["bytes_per_token"],
        "new_mean_kl": main_case["ctxans"]["mean_kl"],
        "new_vs_egsqrt_bytes_ratio": main_case["ctxans"]["bytes_per_entry"] / main_case["egsqrt"]["bytes_per_entry"],
        "decode_ratio_new_vs_egsqrt": main_case["decode_ratio_ctxans_vs_egsqrt"],
        "new_decode_tokens_per_s": main_case["ctxans"]["decode_tokens_per_s"],
        "xz_9e_of_egsqrt_bytes_per_entry": main_case["egsqrt_xz_9e"]["bytes_per_entry"],
        "zstd_19_of_egsqrt_bytes_per_entry": main_case.get("egsqrt_zstd_19", {}).get("bytes_per_entry"),
        # egsqrt (the previous default), as before
        "bytes_per_entry": main_case["egsqrt"]["bytes_per_entry"],
        "bytes_per_token": main_case["egsqrt"]["bytes_per_token"],
        "entries_per_token": main_case["egsqrt"]["entries_per_token"],
        "mean_kl": main_case["egsqrt"]["mean_kl"],
        "baseline_fp16_bytes_per_entry": main_case["megatron_17bit_fp16"]["bytes_per_entry"],
        "baseline_fp32_bytes_per_entry": main_case["int32_fp32"]["bytes_per_entry"],
        "fixed_bytes_per_entry": main_case["fixed"]["bytes_per_entry"],
        "decode_tokens_per_s": main_case["egsqrt"]["decode_tokens_per_s"],
        "worst_case_new_bytes_per_entry": worst["ctxans"]["bytes_per_entry"],
        "worst_case_bytes_per_entry": worst["egsqrt"]["bytes_per_entry"],
        "worst_case_bytes_per_token": worst["egsqrt"]["bytes_per_token"],
        "worst_case_mean_kl": worst["egsqrt"]["mean_kl"],
        "worst_case_decode_tokens_per_s": worst["egsqrt"]["decode_tokens_per_s"],
        "worst_case_decode_ratio_new_vs_egsqrt": worst["decode_ratio_ctxans_vs_egsqrt"],
        "top-0.95-50_new_bytes_per_entry": results["zipf_top-0.95-50"]["ctxans"]["bytes_per_entry"],
        "top-0.95-50_bytes_per_entry": results["zipf_top-0.95-50"]["egsqrt"]["bytes_per_entry"],
        "top-0.95-50_mean_kl": results["zipf_top-0.95-50"]["egsqrt"]["mean_kl"],
        # sampled vs top-p-k targets on the same distributions (egsqrt stores): bytes/token, entries/token
        "families_bytes_per_token": {name: c["bytes_per_token"] for name, c in families.items()},
        "families_entries_per_token": {name: c["entries_per_token"] for name, c in families.items()},
        "families_mean_target_sq_error": {name: c["mean_target_sq_error"] for name, c in families.items()},
    }
    if real is not None:
        summary |= {
            "real_bytes_ratio_new_vs_egsqrt": real["bytes_ratio_ctxans_vs_egsqrt"],
            "real_bytes_ratio_new_vs_xz": real["bytes_ratio_ctxans_vs_xz_9e"],
            "real_bytes_ratio_new_vs_xz_one_stream": real["bytes_ratio_ctxans_vs_xz_9e_one_stream"],
            "real_bytes_ratio_new_vs_zstd": real.get("bytes_ratio_ctxans_vs_zstd_19"),
            "real_new_bytes_per_token": real["ctxans"]["bytes_per_token"],
            "real_egsqrt_bytes_per_token": real["egsqrt"]["bytes_per_token"],
            "real_entries_per_token": real["ctxans"]["entries_per_token"],
            "real_mean_kl": real["ctxans"]["mean_kl_first_64_sequences"],
            "real_decoded_identical": real["decoded_identical"],
            "real_decode_ratio_new_vs_egsqrt": real["decode_ratio_ctxans_vs_egsqrt"],
        }
    if gen is not None:
        summary |= {"generation_overhead": gen["generation_overhead"],
                    "generation_overhead_median": gen["generation_overhead_median"],
                    "generation_overhead_median_egsqrt": gen["generation_overhead_median_egsqrt"],
                    "generation_cpu_time_ratio": gen["cpu_time_ratio"],
                    "generation_free_core_overlap_ratio": gen["free_core_overlap_ratio"],
                    "load_avg_1min": gen["load_avg_1min"]}
    summary |= {"quick": bool(args.quick), "details": results, "generation": gen}
    print(json.dumps(summary, sort_keys=False))
    return summary


if __name__ == "__main__":
    main()
