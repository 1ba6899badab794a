"""`pdl logits generate`: one teacher pass over the token shards into a top-p-k logit store.

The store is generated once per teacher and corpus at the loosest truncation a sweep needs
(`logits.store_p`, `logits.store_k`); every narrower (p, k) and every τ is derived from it at load
time. Position t of sequence i holds the teacher's distribution over token t+1, so a store keeps
`seq_len - 1` positions per sequence, aligned with the shards by sequence index.

Truncation, encoding and writing run on a background thread (`AsyncShardWriter`) while the next
batch goes through the teacher. Generation resumes from the last whole shard after any kill and
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

import hashlib
import json
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
from pd_lightning.logits.processing import power_exponents_for
from pd_lightning.logits.store import (MANIFEST, AsyncShardWriter, LogitStoreWriter, load_manifest, shard_name,
                                       store_write_error)
from pd_lightning.models import load_causal_lm
from pd_lightning.progress import ProgressBar

STATS_FILE = "generation_stats.json"


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


def generate_store(cfg: PDLConfig, *, quiet: bool = False) -> Path:
    """Generate (or resume, or reuse) the logit store `logits.store` from the teacher over `data.out`."""
    lg = cfg.logits
    data_dir, store_dir, teacher = Path(cfg.data.out), Path(lg.store), teacher_dir(cfg)
    data_manifest = read_manifest(data_dir)
    if not teacher.is_dir():
        raise DataError(f"teacher dir {str(teacher)!r} does not exist; set teacher.path to an HF model dir or run "
                        "`pdl teacher train` first")
    tok_hash, vocab = check_teacher_matches_shards(teacher, data_manifest)
    shards = TokenShards(data_dir, "train")
    rank, world = _rank_and_world()
    created = not store_dir.exists()
    writer = LogitStoreWriter(
        store_dir, vocab_size=vocab, p=lg.store_p, k=lg.store_k, positions_per_sequence=shards.seq_len - 1,
        num_sequences=len(shards), sequences_per_shard=lg.sequences_per_shard, teacher=str(teacher.resolve()),
        teacher_config_hash=teacher_identity(teacher), tokenizer_hash=tok_hash, rank=rank, world_size=world,
        power_exponents=power_exponents_for(lg),
    )
    if (store_dir / MANIFEST).is_file():
        if not quiet:
            print(f"logits: {store_dir} is complete ({len(shards):,} sequences); nothing to do")
        return store_dir
    pending = writer.pending_shards()
    try:
        model = load_causal_lm(teacher, what="teacher.path")
    except BaseException:
        if created:  # nothing is written yet: leave no empty store behind for an unusable teacher
            shutil.rmtree(store_dir, ignore_errors=True)
        raise
    device = _device()
    model.to(device)
    params = sum(p.numel() for p in model.parameters())
    todo = sum(len(writer.shard_range(s)) for s in pending)
    if not quiet:
        done_before = len(writer.own_shards()) - len(pending)
        print(f"logits: top-{lg.store_p}-{lg.store_k} of {teacher} ({params / 1e6:.1f}M params) over {todo:,} sequences "
              f"into {store_dir} (rank {rank}/{world}, {done_before} shards already done, device {device})")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
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
    with ProgressBar(todo * shards.seq_len, "tokens", "logits generate") as bar, AsyncShardWriter(writer) as async_writer:
        for s in pending:
            rng = writer.shard_range(s)
            for first in range(rng.start, rng.stop, lg.batch_size):
                last = min(first + lg.batch_size, rng.stop)
                ids = torch.from_numpy(shards.batch(range(first, last))).to(device)
                with torch.no_grad(), autocast:
                    logits = model(input_ids=ids).logits[:, :-1]
                # fp32 for truncation: top-p on bf16 probabilities would move the cut by whole entries.
                async_writer.submit(first, logits.float().reshape(-1, logits.size(-1)))
                bar.advance((last - first) * shards.seq_len)
                done_sequences += last - first
            record_stats()  # per shard, so a killed session still leaves its time on record
    record_stats()
    if all((store_dir / shard_name(s).replace(".bin", ".json")).is_file() for s in range(writer.num_shards)):
        # Deterministic facts only: the manifest of a resumed run must equal an uninterrupted one's.
        writer.finalize(meta={"teacher_params": params, **store_cost_meta(model_cost_shape(model), len(shards),
                                                                          shards.seq_len),
                              "data": str(data_dir.resolve()), "data_hash": data_manifest["config_hash"]})
        if not quiet:
            m = load_manifest(store_dir)
            print(f"logits: wrote {m['num_tokens']:,} tokens, {m['num_entries'] / m['num_tokens']:.1f} entries/token, "
                  f"{m['total_bytes'] / m['num_tokens']:.1f} bytes/token to {store_dir}")
    return store_dir


def _device_name(device: torch.device) -> str:
    """"cpu" or "cuda:<GPU name>": what the cost was paid on."""
    return f"cuda:{torch.cuda.get_device_name(device)}" if device.type == "cuda" else device.type
