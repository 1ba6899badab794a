"""`pdl logits generate`: one teacher pass over the token shards into a top-p-k logit store.

The store is generated once per teacher and corpus at the loosest truncation a sweep needs
(`logits.store_p`, `logits.store_k`); every narrower (p, k) and every τ is derived from it at load
time. Position t of sequence i holds the teacher's distribution over token t+1, so a store keeps
`seq_len - 1` positions per sequence, aligned with the shards by sequence index.

No dense [B·T, V] logits ever exist (`TeacherLogits`): the teacher's backbone runs to hidden
states, then the LM head, the full-vocabulary statistics (log-normaliser, entropy, logit std, power
sums) and the top-p-k cut run per chunk of positions on the teacher's device, in fp32 whatever the
teacher's dtype (bf16 on CUDA by default: `teacher.dtype`); only the SparseLogits cross to the
writer. On CPU the chunks are the 64-row groups `truncate_top_p_k` uses, so the store is byte-identical
to truncating the model's dense fp32 logits. Vocabulary rows at or past the tokenizer's size (a
model vocabulary padded past its tokenizer's) are left out, which is masking them to -inf before
truncation and statistics; the store records the tokenizer's vocabulary as its `vocab_size` and the
teacher's own row count in `meta.teacher_vocab_size`.

Encoding and writing run off the forward's thread (`AsyncShardWriter`: a thread, or
`logits.encode_workers` encoder processes) while the next batch goes through the teacher.
Generation resumes from the last whole shard after any kill and
the finished store is byte-identical to an uninterrupted run. With several ranks (`torchrun`,
`RANK`/`WORLD_SIZE` in the environment) each rank writes a disjoint set of shards; the last rank to
finish finds every shard present and writes the manifest.

Cost record: the manifest's `meta` holds the generation FLOPs (`pd_lightning.cost` convention,
teacher forward over every token of every sequence) and the teacher's shape; it holds only
deterministic facts, so a resumed store stays byte-identical to an uninterrupted one. Wall time is
not deterministic and lives in `generation_stats-rank<r>.json`, one per rank, accumulated over every
session that worked on the store (a killed session counts up to its last finished shard);
`inspect_store` adds them up.

A full disk, a quota, a read-only or an unwritable `logits.store` ends generation with one DataError
line naming the store, the reason and the file (exit 2 from the CLI), also when the write failed on
the background thread; no torn shard keeps a final name, so the same command resumes once fixed.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch

from pd_lightning.config import PDLConfig
from pd_lightning.cost import model_cost_shape, store_cost_meta
from pd_lightning.data.shards import TokenShards, read_manifest, write_json_atomic
from pd_lightning.data.tokenizer import load_tokenizer, tokenizer_hash
from pd_lightning.errors import DataError
from pd_lightning.logits.processing import (SparseLogits, check_power_exponents, power_exponents_for, sample_chunk,
                                            sample_uniforms, truncate_chunk)
from pd_lightning.logits.store import MANIFEST, load_manifest, shard_name
from pd_lightning.logits.writer import AsyncShardWriter, LogitStoreWriter, store_write_error
from pd_lightning.models import load_causal_lm, teacher_dtype
from pd_lightning.progress import ProgressBar

log = logging.getLogger(__name__)

STATS_FILE = "generation_stats.json"
# Rows per head chunk on CPU: the groups `truncate_top_p_k` truncates in (and a GEMM height whose
# per-row results equal the full-batch product's), so CPU stores are byte-identical to the dense path.
CPU_CHUNK_ROWS = 64
# On accelerators a chunk's fp32 [rows, V] logits take about this many bytes (2 such buffers live:
# the logits, overwritten by the statistics, and one work buffer), in multiples of 64 rows, at most 4,096 rows.
ACCEL_CHUNK_BYTES = 512 * 2**20


def stats_path(store_dir: Path, rank: int) -> Path:
    """The per-rank wall-time record of a store's generation."""
    return store_dir / f"{STATS_FILE[:-5]}-rank{rank}.json"


def _previous_seconds(path: Path) -> float:
    """Seconds earlier sessions of this rank spent generating (0 for a fresh store)."""
    try:
        return float(json.loads(path.read_text()).get("seconds", 0.0))
    except (OSError, ValueError, AttributeError):
        return 0.0


def teacher_dir(cfg: PDLConfig) -> Path:
    """The teacher used for logits: `teacher.path` if set, else the dir `pdl teacher train` writes."""
    return Path(cfg.teacher.path or cfg.teacher.out)


def teacher_identity(path: Path, *, mtimes: bool = False) -> str:
    """A cheap, stable identity of a teacher dir: its config and the names and sizes of its weight files.

    `mtimes=True` adds the weight files' modification times, so a teacher retrained in place differs
    (the sweep cache's key); the store manifests record the identity without them.
    """
    h = hashlib.sha256((path / "config.json").read_bytes())
    for f in sorted(path.iterdir()):
        if f.suffix in {".safetensors", ".bin", ".pt"} or f.name.endswith(".index.json"):
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}".encode() + (f":{st.st_mtime_ns}".encode() if mtimes else b""))
    return h.hexdigest()[:16]


def _rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def check_teacher_matches_shards(teacher: Path, data_manifest: dict) -> tuple[str, int]:
    """Refuse a teacher whose tokenizer differs from the shards' before any forward pass."""
    if not (teacher / "tokenizer.json").is_file() and not (teacher / "tokenizer_config.json").is_file():
        raise DataError(f"teacher dir {str(teacher)!r} has no tokenizer; save the teacher's tokenizer into it "
                        "(tokenizer.save_pretrained) so its vocabulary can be checked against the shards")
    tok_hash = tokenizer_hash(load_tokenizer(teacher, what="teacher tokenizer"))
    if tok_hash != data_manifest["tokenizer_hash"]:
        raise DataError(
            f"teacher tokenizer (hash {tok_hash}) in {str(teacher)!r} differs from the token shards' tokenizer "
            f"(hash {data_manifest['tokenizer_hash']}); prepare the data with data.tokenizer={str(teacher)!r}"
        )
    try:
        config = json.loads((teacher / "config.json").read_text())
    except FileNotFoundError:
        raise DataError(f"teacher dir {str(teacher)!r} has no config.json; expected a Hugging Face model dir "
                        "(save_pretrained output)") from None
    except (ValueError, UnicodeDecodeError):
        config = None
    if not isinstance(config, dict):
        raise DataError(f"teacher dir {str(teacher)!r} has an unreadable config.json (expected a JSON object)")
    vocab = int(config.get("vocab_size") or 0)
    if vocab < int(data_manifest["vocab_size"]):
        raise DataError(f"teacher vocab_size={vocab} in {str(teacher)!r} is smaller than the shards' vocabulary "
                        f"({data_manifest['vocab_size']} token ids)")
    return tok_hash, vocab


def chunk_rows_for(vocab: int, device: torch.device) -> int:
    """Positions per head chunk: CPU_CHUNK_ROWS on CPU, else ~ACCEL_CHUNK_BYTES of fp32 logits (multiple of 64)."""
    if device.type == "cpu":
        return CPU_CHUNK_ROWS
    return int(min(4096, max(64, ACCEL_CHUNK_BYTES // (4 * vocab) // 64 * 64)))


class TeacherLogits:
    """A teacher's next-token logits over its first `vocab` ids, one fp32 chunk of positions at a time.

    mode "hidden" (every HF causal LM whose logits are `post(lm_head(base_model(ids)))`): the backbone
    `model.base_model` runs to hidden states [N, H]; a chunk is `h @ W[:vocab]^T (+ b)` with an fp32
    result, then the model's own post-processing when its config names one (Gemma-2's
    `final_logit_softcapping`, Cohere's `logit_scale`, Granite's `logits_scaling`). fp32 teachers
    multiply in fp32. 16-bit teachers on CUDA multiply their own bf16/fp16 W and h with fp32
    accumulation and an fp32 result (`torch.mm(..., out_dtype=float32)`, torch >= 2.8): the logits are
    never rounded to 16 bits; on an older torch the result is the teacher's dtype, upcast (what
    autocast gave before). 16-bit teachers on CPU multiply an fp32 copy of W.
    mode "logits" (the fallback, for a head this cannot reproduce, see `check`): the model's own
    forward logits, in its dtype, read one chunk at a time (so [B, T, V] exists once, in the model's
    dtype, never in fp32 or in the writer's queue).
    """

    def __init__(self, model: torch.nn.Module, vocab: int, device: torch.device, chunk_rows: int | None = None):
        self.model, self.vocab, self.device = model, int(vocab), device
        self.dtype = next(model.parameters()).dtype
        self.chunk_rows = int(chunk_rows or chunk_rows_for(self.vocab, device))
        self.mode, self.why_logits = "hidden", ""
        head = model.get_output_embeddings()
        backbone = getattr(model, "base_model", model)
        weight = getattr(head, "weight", None)
        if backbone is model or not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            self.mode, self.why_logits = "logits", "its LM head is not a linear layer after a base model"
        elif weight.shape[0] < self.vocab:
            raise DataError(f"teacher LM head has {weight.shape[0]} rows, fewer than the tokenizer's {self.vocab} ids")
        self.backbone, self.head = backbone, head
        self._w = self._b = None
        self._out_dtype = False  # CUDA 16-bit: torch.mm(h, W^T, out_dtype=float32)
        if self.mode == "hidden":
            w = weight.detach()[: self.vocab]
            bias = getattr(head, "bias", None)
            self._b = None if bias is None else bias.detach()[: self.vocab].float()
            if device.type == "cuda" and w.dtype in (torch.bfloat16, torch.float16):
                self._out_dtype = _mm_out_dtype_works(w)
                self._w = w
            else:
                self._w = w if w.dtype == torch.float32 else w.float()
        cfg = model.config
        self.softcap = float(getattr(cfg, "final_logit_softcapping", None) or 0.0)
        self.scale = float(getattr(cfg, "logit_scale", None) or 1.0)
        self.divide = float(getattr(cfg, "logits_scaling", None) or 1.0)
        self._buffers: list[torch.Tensor | None] = [None, None]

    # -- rows ---------------------------------------------------------------------------------

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """What the chunks are computed from for ids [B, T]: hidden states [B·(T-1), H] ("hidden"), or the
        model's logits [B, T, V_model] ("logits"); position t predicts token t+1, the last position is dropped."""
        if self.mode == "logits":
            return _no_cache(self.model, ids).logits
        out = _no_cache(self.backbone, ids)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return hidden[:, :-1].reshape(-1, hidden.shape[-1])

    def num_positions(self, rows: torch.Tensor) -> int:
        return rows.shape[0] if self.mode == "hidden" else rows.shape[0] * (rows.shape[1] - 1)

    def _buffer(self, i: int) -> torch.Tensor:
        """Reused buffers (fresh chunk-sized ones would page-fault on every chunk): 0 = [rows, V] fp32 logits,
        1 = the [1, rows, V] work buffer of `truncate_chunk` (which overwrites the logits as its other one)."""
        if self._buffers[i] is None:
            shape = (self.chunk_rows, self.vocab) if i == 0 else (1, self.chunk_rows, self.vocab)
            self._buffers[i] = torch.empty(shape, device=self.device)
        return self._buffers[i]

    def chunk(self, rows: torch.Tensor, start: int, n: int) -> torch.Tensor:
        """fp32 logits [n, vocab] of positions [start, start + n) (a view of a reused buffer)."""
        if self.mode == "logits":
            t = rows.shape[1] - 1
            pos = torch.arange(start, start + n, device=rows.device)
            flat = rows.reshape(-1, rows.shape[-1])
            z = self._buffer(0)[:n]
            z.copy_(flat.index_select(0, pos // t * rows.shape[1] + pos % t)[:, : self.vocab])
            return z
        total = rows.shape[0]
        lo = start
        if self.device.type == "cpu" and n < CPU_CHUNK_ROWS <= total:
            # a short tail as the last 64 rows: a GEMM this short would round differently from the full product
            lo = start + n - CPU_CHUNK_ROWS
        m = start + n - lo
        h = rows[lo : start + n]
        if self._w.dtype == torch.float32:
            out = self._buffer(0)[:m]
            h = h if h.dtype == torch.float32 else h.float()
            if self._b is None:
                torch.mm(h, self._w.t(), out=out)
            else:  # F.linear's own kernel for a bias, so CPU rows equal the model's logits bit for bit
                torch.addmm(self._b, h, self._w.t(), out=out)
        else:
            out = torch.mm(h, self._w.t(), out_dtype=torch.float32) if self._out_dtype else torch.mm(h, self._w.t()).float()
            if self._b is not None:
                out.add_(self._b)
        z = out[m - n :]
        if self.scale != 1.0:
            z.mul_(self.scale)
        if self.divide != 1.0:
            z.div_(self.divide)
        if self.softcap:
            z.div_(self.softcap).tanh_().mul_(self.softcap)
        return z

    # -- truncation ---------------------------------------------------------------------------

    def sparse(self, ids: torch.Tensor, p: float, k: int, exponents: tuple[float, ...] = (),
               uniforms: torch.Tensor | None = None) -> SparseLogits:
        """Top-p-k SparseLogits (on the teacher's device) of every predicting position of ids [B, T]; with
        `uniforms` [B·(T-1), N] (`sample_uniforms`) the sampled entries of N draws per position instead."""
        exponents = check_power_exponents(exponents)
        kk = min(int(k), self.vocab)
        work = self._buffer(1)
        rows = self.rows(ids)
        n_pos = self.num_positions(rows)
        parts = []
        for start in range(0, n_pos, self.chunk_rows):
            n = min(self.chunk_rows, n_pos - start)
            z = self.chunk(rows, start, n)
            if uniforms is None:
                parts.append(truncate_chunk(z, p, kk, work, exponents, z_scratch=True))
            else:
                parts.append(sample_chunk(z, uniforms[start : start + n], work, exponents, z_scratch=True))
        return parts[0] if len(parts) == 1 else SparseLogits.cat(parts)

    def check(self, ids: torch.Tensor) -> float:
        """Largest |chunked - model logits| / (1 + max |model logits|) on ids; falls back to mode "logits" when
        the chunked head does not reproduce the model's own logits (an architecture with another head)."""
        if self.mode == "logits":
            return 0.0
        ref = _no_cache(self.model, ids).logits[:, :-1, : self.vocab].float()
        ref = ref.reshape(-1, self.vocab)
        rows = self.rows(ids)
        got = torch.cat([self.chunk(rows, s, min(self.chunk_rows, rows.shape[0] - s)).clone()
                         for s in range(0, rows.shape[0], self.chunk_rows)])
        err = float((got - ref).abs().max() / (1 + ref.abs().max()))
        # fp32: rounding-level differences only; 16-bit: the model's logits are rounded to its dtype
        tol = 1e-4 if self.dtype == torch.float32 else 2e-2
        if not err <= tol:
            self.mode = "logits"
            self.why_logits = f"its head is not lm_head(base_model(ids)) (relative difference {err:.2g} on a probe)"
            self._w = self._b = None
        return err


def _no_cache(module: torch.nn.Module, ids: torch.Tensor):
    """module(input_ids=ids) without building a KV cache (nothing is decoded after), for modules that take the flag."""
    try:
        return module(input_ids=ids, use_cache=False)
    except TypeError:  # a forward without a cache argument
        return module(input_ids=ids)


def _mm_out_dtype_works(w: torch.Tensor) -> bool:
    """Whether this torch multiplies 16-bit CUDA matrices into an fp32 result (`mm(..., out_dtype=)`, torch >= 2.8)."""
    try:
        probe = torch.mm(torch.ones(1, w.shape[1], dtype=w.dtype, device=w.device), w[:2].t(), out_dtype=torch.float32)
    except (TypeError, RuntimeError, NotImplementedError):
        return False
    return probe.dtype == torch.float32


def auto_encode_workers(device: torch.device) -> int:
    """Encoder processes per rank for logits.encode_workers=null: 0 on CPU (the thread), else min(4, cores per
    local rank - 2), at least 1."""
    if device.type == "cpu":
        return 0
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    return max(1, min(4, cpus // local - 2))


def generate_store(cfg: PDLConfig) -> Path:
    """Generate (or resume, or reuse) the logit store `logits.store` from the teacher over `data.out`."""
    lg = cfg.logits
    data_dir, store_dir, teacher = Path(cfg.data.out), Path(lg.store), teacher_dir(cfg)
    data_manifest = read_manifest(data_dir)
    if not teacher.is_dir():
        raise DataError(f"teacher dir {str(teacher)!r} does not exist; set teacher.path to an HF model dir or run "
                        "`pdl teacher train` first")
    tok_hash, _ = check_teacher_matches_shards(teacher, data_manifest)
    # The tokenizer's ids are the distribution's support: rows of a padded model vocabulary past them are left out.
    vocab = int(data_manifest["vocab_size"])
    shards = TokenShards(data_dir, "train")
    rank, world = _rank_and_world()
    created = not store_dir.exists()
    sampled = lg.sampling == "sample"
    # a sampled store keeps up to `samples` distinct drawn ids per token and no cut (p = 1, k = samples)
    store_p, store_k = (1.0, lg.samples) if sampled else (lg.store_p, lg.store_k)
    sampling = {"method": "sample", "samples": lg.samples, "seed": lg.sample_seed, "proposal_tau": 1.0} if sampled else None
    settings = dict(
        vocab_size=vocab, p=store_p, k=store_k, positions_per_sequence=shards.seq_len - 1,
        num_sequences=len(shards), sequences_per_shard=lg.sequences_per_shard, teacher=str(teacher.resolve()),
        teacher_config_hash=teacher_identity(teacher), tokenizer_hash=tok_hash, rank=rank, world_size=world,
        power_exponents=power_exponents_for(lg), encoding=lg.encoding, sampling=sampling,
    )
    writer = LogitStoreWriter(store_dir, **settings)
    if (store_dir / MANIFEST).is_file():
        log.info(f"logits: {store_dir} is complete ({len(shards):,} sequences); nothing to do")
        return store_dir
    pending = writer.pending_shards()
    device = _device()
    try:
        model = load_causal_lm(teacher, dtype=teacher_dtype(teacher, cfg.teacher.dtype, device), what="teacher.path")
    except BaseException:
        if created:  # nothing is written yet: leave no empty store behind for an unusable teacher
            shutil.rmtree(store_dir, ignore_errors=True)
        raise
    model.to(device)
    params = sum(p.numel() for p in model.parameters())
    todo = sum(len(writer.shard_range(s)) for s in pending)
    exponents = power_exponents_for(lg)
    source = TeacherLogits(model, vocab, device)
    workers = auto_encode_workers(device) if lg.encode_workers is None else int(lg.encode_workers)
    if pending:
        with torch.no_grad():  # one short probe: does lm_head(base_model(ids)) reproduce the model's logits?
            first = writer.shard_range(pending[0]).start
            source.check(torch.from_numpy(shards.batch([first])[:, :32]).to(device))
    done_before = len(writer.own_shards()) - len(pending)
    rows = getattr(model.get_output_embeddings(), "weight", None)
    padded = f", {rows.shape[0] - vocab:,} padded vocabulary rows left out" if rows is not None and rows.shape[0] > vocab else ""
    what = f"{lg.samples} draws per position (seed {lg.sample_seed})" if sampled else f"top-{lg.store_p}-{lg.store_k}"
    log.info(f"logits: {what} of {teacher} ({params / 1e6:.1f}M params, "
             f"{str(source.dtype).removeprefix('torch.')}{padded}) over {todo:,} sequences into {store_dir} "
             f"(rank {rank}/{world}, {done_before} shards already done, device {device}, "
             f"{workers or 'no'} encoder processes)")
    if source.mode == "logits":
        log.info(f"logits: {teacher}: {source.why_logits}; truncating its full logits chunk by chunk, which holds "
                 f"[{lg.batch_size}, {shards.seq_len}, V] logits in {str(source.dtype).removeprefix('torch.')} per batch")
    stats_file = stats_path(store_dir, rank)
    earlier = _previous_seconds(stats_file)  # a resumed store: its earlier sessions' time counts too
    done_sequences = 0

    def record_stats() -> None:
        elapsed = time.perf_counter() - started
        try:
            write_json_atomic(stats_file, {
                "seconds": round(earlier + elapsed, 3), "seconds_this_session": round(elapsed, 3),
                "sequences_this_session": done_sequences, "device": _device_name(device),
                "tokens_per_s": round(done_sequences * shards.seq_len / max(elapsed, 1e-9))})
        except OSError as e:
            async_writer.flush()  # a shard that failed to write on the same disk is the better message
            raise store_write_error(store_dir, e, f"writing {stats_file.name}") from None

    started = time.perf_counter()
    with ProgressBar(todo * shards.seq_len, "tokens", "logits generate") as bar, \
            AsyncShardWriter(writer, encode_workers=workers, make_writer=functools.partial(
                LogitStoreWriter, store_dir, **settings, verify_existing=False)) as async_writer:
        for s in pending:
            rng = writer.shard_range(s)
            for first in range(rng.start, rng.stop, lg.batch_size):
                last = min(first + lg.batch_size, rng.stop)
                ids = torch.from_numpy(shards.batch(range(first, last))).to(device)
                uniforms = None
                if sampled:  # counter-based: the draws of a sequence do not depend on the batch or the rank
                    uniforms = torch.from_numpy(sample_uniforms(lg.sample_seed, range(first, last), shards.seq_len - 1,
                                                                lg.samples)).to(device)
                with torch.no_grad():
                    # backbone -> per-chunk fp32 head, statistics and top-p-k (or draws) on the device: no [B·T, V] tensor
                    sparse = source.sparse(ids, store_p, store_k, exponents, uniforms)
                async_writer.submit(first, sparse)
                bar.advance((last - first) * shards.seq_len)
                done_sequences += last - first
            record_stats()  # per shard, so a killed session still leaves its time on record
    record_stats()
    if all((store_dir / shard_name(s).replace(".bin", ".json")).is_file() for s in range(writer.num_shards)):
        # Deterministic facts only: the manifest of a resumed run must equal an uninterrupted one's.
        writer.finalize(meta={"teacher_params": params, **store_cost_meta(model_cost_shape(model), len(shards),
                                                                          shards.seq_len),
                              "data": str(data_dir.resolve()), "data_hash": data_manifest["config_hash"]})
        m = load_manifest(store_dir)
        log.info(f"logits: wrote {m['num_tokens']:,} tokens, {m['num_entries'] / m['num_tokens']:.1f} entries/token, "
                 f"{m['total_bytes'] / m['num_tokens']:.1f} bytes/token to {store_dir}")
    return store_dir


def _device_name(device: torch.device) -> str:
    """"cpu" or "cuda:<GPU name>": what the cost was paid on."""
    return f"cuda:{torch.cuda.get_device_name(device)}" if device.type == "cuda" else device.type
