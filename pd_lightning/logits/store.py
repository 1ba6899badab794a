"""The logit store: sharded, memory-mapped, random access by sequence; resumable, multi-rank writes.

Layout of a store directory:

    manifest.json          written by `finalize()` once every shard exists (deterministic JSON)
    shard-000000.bin       sequences [0, S), binary (below)
    shard-000000.json      sidecar: the shard's manifest entry + the store settings, written after
    ...                    the .bin; a shard counts as finished only when both agree

Shard s covers sequences [s·S, min((s+1)·S, N)) with S = `sequences_per_shard`; rank r of W writes
shards s ≡ r (mod W). Files are written as `<name>.tmp` and `os.replace`d, so a torn file never
carries a final name; a resumed writer deletes its own `.tmp` files and rewrites unfinished shards.
Everything is a pure function of the inputs: the same logits give byte-identical shards and manifest.
This module reads stores; `writer` writes them.

Shard binary (little-endian; sections 8-byte aligned, offsets from the file start):

    b"PDLSHARD" | uint32 header length H | H bytes of JSON header (sorted keys) | zero pad to 8
    sections named in header["sections"] = {name: [offset, nbytes]}, in this order:
      counts [S·P] uint8 (uint16 if k >= 256), params [S·P] uint8 (egsqrt), mass [S·P] uint16 (egsqrt),
      stats [S·P, 2 + G] float16 (G = len(power_exponents)), chunks [S·C + 1] uint64 byte offsets into payload, payload uint8
    A sampled store (manifest "sampling": {"method": "sample", "samples": N, ...}; p = 1, k = N) has the same
      sections; its entries are the distinct drawn ids, and the payload has each entry's draw count too (`codec`).
    ctxans (logits.encoding=ctxans) instead: model uint8 (the shard's fitted context model), seq_entries [S] uint32,
      chunks [S·2 + 1] uint64, payload uint8; its per-token columns are entropy-coded in the payload.
    The file ends exactly at the end of payload. Bit layout of the payload: see `codec` (and `ctxans`).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pd_lightning.errors import DataError
from pd_lightning.logits import codec
from pd_lightning.logits.processing import SparseLogits

FORMAT = "pd-lightning-logit-store"
FORMAT_VERSION = 1
MAGIC = b"PDLSHARD"
MANIFEST = "manifest.json"
CHECKSUM = "blake2b-256"
_SETTINGS = ("vocab_size", "p", "k", "positions_per_sequence", "num_sequences", "sequences_per_shard",
             "teacher", "teacher_config_hash", "tokenizer_hash", "encoding", "power_exponents", "sampling")


def sampling_of(manifest: dict[str, Any]) -> dict[str, Any] | None:
    """A sampled store's `sampling` setting ({"method": "sample", "samples": N, "seed": s, "proposal_tau": 1.0});
    None for a top-p-k store (whose manifest has no such key)."""
    return manifest.get("sampling")


def shard_name(index: int) -> str:
    """File name of shard `index`."""
    return f"shard-{index:06d}.bin"


def shard_range(index: int, sequences_per_shard: int, num_sequences: int) -> range:
    """Global sequence ids shard `index` covers (a pure function, shared by every rank)."""
    start = index * sequences_per_shard
    return range(start, min(start + sequences_per_shard, num_sequences))


def num_shards(num_sequences: int, sequences_per_shard: int) -> int:
    """How many shards a store of `num_sequences` has."""
    return -(-num_sequences // sequences_per_shard)


def file_checksum(path: str | Path, chunk_bytes: int = 1 << 23) -> str:
    """blake2b-256 hex digest of a file, streamed (no whole-file load)."""
    h = hashlib.blake2b(digest_size=32)
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            h.update(block)
    return h.hexdigest()


def _load_json(path: Path, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"logit store {what} {path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"logit store {what} {path} is not valid JSON ({e.msg if hasattr(e, 'msg') else e})") from None
    if not isinstance(obj, dict):
        raise DataError(f"logit store {what} {path} is not a JSON object")
    return obj


# ----------------------------------------------------------------------------- async writer


_REQUIRED = ("format", "format_version", "vocab_size", "p", "k", "positions_per_sequence", "num_sequences",
             "sequences_per_shard", "encoding", "shards", "num_entries", "tokenizer_hash")


def load_manifest(path: str | Path) -> dict[str, Any]:
    """Read and sanity-check a store's manifest.json; DataError if missing or malformed."""
    path = Path(path)
    if not (path / MANIFEST).exists():
        sidecars = list(path.glob("shard-*.json")) if path.is_dir() else []
        hint = " (generation unfinished: rerun it to resume and finalize)" if sidecars else ""
        raise DataError(f"logit store {path}: {MANIFEST} is missing{hint}")
    m = _load_json(path / MANIFEST, "manifest")
    missing = [key for key in _REQUIRED if key not in m]
    if missing:
        raise DataError(f"logit store manifest {path / MANIFEST} lacks fields {missing}")
    if m["format"] != FORMAT or m["format_version"] != FORMAT_VERSION:
        raise DataError(f"logit store {path}: format {m['format']!r} v{m['format_version']} is not supported; expected {FORMAT!r} v{FORMAT_VERSION}")
    enc = m["encoding"]
    if enc.get("name") not in codec.ENCODINGS or enc.get("version") not in codec.READABLE_VERSIONS:
        raise DataError(f"logit store {path}: encoding {enc.get('name')!r} v{enc.get('version')} is not supported; "
                        f"expected one of {', '.join(codec.ENCODINGS)} v{codec.ENCODING_VERSION}")
    if enc.get("name") == "ctxans" and enc.get("model_format", 1) != codec.CTXANS_MODEL_FORMAT:
        raise DataError(f"logit store {path}: ctxans format {enc.get('model_format', 1)} (written by an earlier "
                        "pd-lightning, whose coder was constriction's) is not read by this version, which reads format "
                        f"{codec.CTXANS_MODEL_FORMAT}; delete it and run `pdl logits generate` again")
    if enc.get("version") == 1 and float(m["p"]) >= 1.0:
        # v1's top-1.0-k cut kept one entry on confident tokens (an fp32 top-1 log-probability of 0)
        raise DataError(f"logit store {path}: made at p=1 by an earlier version (encoding v1) whose top-1.0-k cut "
                        "dropped entries on confident tokens; delete it and run `pdl logits generate` again")
    expect = 0
    for e in m["shards"]:
        if e.get("first_sequence") != expect or e.get("num_sequences", 0) < 1:
            raise DataError(f"logit store manifest {path / MANIFEST}: shard {e.get('file')!r} does not continue the sequence range at {expect}")
        expect += e["num_sequences"]
    if expect != m["num_sequences"]:
        raise DataError(f"logit store manifest {path / MANIFEST}: shards cover {expect} sequences, manifest says {m['num_sequences']}")
    return m


class _Shard:
    """One memory-mapped shard with zero-copy views of its sections."""

    def __init__(self, path: Path, entry: dict[str, Any], manifest: dict[str, Any]):
        self.name = entry["file"]
        try:
            self._open(path, entry, manifest)
        except DataError:
            raise
        except Exception as e:  # a corrupt header can fail in many ways; all of them mean the same to the user
            raise DataError(f"logit store shard {self.name}: malformed header ({type(e).__name__}); "
                            "the shard is corrupt (run `pdl logits verify`)") from None

    def _open(self, path: Path, entry: dict[str, Any], manifest: dict[str, Any]) -> None:
        mm = np.memmap(path, dtype=np.uint8, mode="r")
        bad = lambda what: DataError(f"logit store shard {self.name}: {what}; the shard is corrupt (run `pdl logits verify`)")  # noqa: E731
        if mm.size < 12 or bytes(mm[:8]) != MAGIC:
            raise bad("bad magic bytes")
        hlen = int(np.frombuffer(mm[8:12], "<u4")[0])
        try:
            h = json.loads(bytes(mm[12 : 12 + hlen]).decode())
        except (ValueError, UnicodeDecodeError):
            raise bad("unreadable header") from None
        want = {"first_sequence": entry["first_sequence"], "num_sequences": entry["num_sequences"],
                "positions_per_sequence": manifest["positions_per_sequence"], "vocab_size": manifest["vocab_size"],
                "k": manifest["k"], "encoding": manifest["encoding"], "num_entries": entry["num_entries"]}
        for key, val in want.items():
            if h.get(key) != val:
                raise bad(f"header {key}={h.get(key)!r} but the manifest says {val!r}")
        self.header = h
        n_tok = h["num_sequences"] * h["positions_per_sequence"]
        enc = h["encoding"]["name"]
        self.samples = int((sampling_of(manifest) or {}).get("samples", 0))
        if self.samples and enc == "ctxans":
            raise bad("a sampled store cannot be ctxans-coded")
        c = codec.chunks_per_sequence(enc, self.samples > 0)
        n_stats = 2 + len(manifest.get("power_exponents", []))
        shapes = {"counts": (n_tok,), "params": (n_tok,), "mass": (n_tok,), "stats": (n_tok, n_stats),
                  "chunks": (h["num_sequences"] * c + 1,), "payload": (-1,), "model": (-1,), "seq_entries": (h["num_sequences"],)}
        names = codec.sections(enc)
        views = {}
        end = 0
        for name in names:
            try:
                off, nbytes = h["sections"][name]
                dt = np.dtype(h["dtypes"][name])
            except (KeyError, TypeError, ValueError):
                raise bad(f"header lacks section {name}") from None
            if off < end or off + nbytes > mm.size or nbytes % dt.itemsize:
                raise bad(f"section {name} [{off}, {off + nbytes}) does not fit the file of {mm.size} bytes")
            if dt.kind not in "uf" or dt.itemsize > 8:
                raise bad(f"section {name} has dtype {dt.str}")
            arr = np.frombuffer(mm, dtype=dt, count=nbytes // dt.itemsize, offset=off)
            shape = shapes[name]
            if shape[0] != -1 and arr.size != int(np.prod(shape)):
                raise bad(f"section {name} holds {arr.size} values, expected {int(np.prod(shape))}")
            views[name] = arr.reshape(shape)
            end = off + nbytes
        if end != mm.size:
            raise bad(f"file is {mm.size} bytes but its sections end at {end}")
        ch = views["chunks"]
        if ch[0] != 0 or ch[-1] != views["payload"].size or np.any(np.diff(ch.astype(np.int64)) < 0):
            raise bad("chunk offsets are not monotone within the payload")
        self.views = views
        self.encoding = enc
        self.value_step = float(h["encoding"].get("value_step", 0.0))
        self._mm = mm
        if enc == "ctxans":
            if int(views["seq_entries"].astype(np.int64).sum()) != h["num_entries"]:
                raise bad("per-sequence entry counts do not sum to the header's num_entries")
            from pd_lightning.logits import ctxans  # here, not at the top: its coder needs numba (55 MiB resident)

            try:
                self.model = ctxans.ShardModel.from_bytes(views["model"], ctxans.model_layout(
                    manifest["k"], manifest["vocab_size"], self.value_step, n_stats))
            except (codec.CorruptChunk, ValueError) as e:
                raise bad(str(e)) from None

    def decode(self, local: np.ndarray, manifest: dict[str, Any]) -> tuple[np.ndarray, ...]:
        v = self.views
        try:
            if self.encoding == "ctxans":
                from pd_lightning.logits import ctxans

                return ctxans.decode_arrays(
                    self.model, v["seq_entries"], v["chunks"], v["payload"], local, manifest["positions_per_sequence"],
                    manifest["vocab_size"], manifest["k"], self.value_step)
            return codec.decode_arrays(v["counts"], v.get("params"), v.get("mass"), v["stats"], v["chunks"], v["payload"], local,
                                manifest["positions_per_sequence"], manifest["vocab_size"], manifest["k"],
                                self.encoding, self.value_step, self.samples)
        except (codec.CorruptChunk, IndexError, ValueError, OverflowError) as e:
            raise DataError(f"logit store shard {self.name}: {e}; the shard is corrupt (run `pdl logits verify`)") from None


_MALLOC_TUNED = False


def keep_freed_memory_for_reuse() -> bool:
    """Let glibc reuse freed blocks of up to 64 MiB instead of unmapping them (once per process).

    Decoding a batch allocates and frees dozens of 0.1-10 MB numpy arrays. By default glibc serves
    each from a fresh mmap and unmaps it when freed, so every array is page-faulted in again; with
    the blocks kept, decoding a 16 x 128-token batch of ~92 entries per token takes 9.9 ms instead of
    20.3 (measured, one core). The heap keeps up to 128 MiB of freed memory. Skipped off glibc and
    where the user set MALLOC_MMAP_THRESHOLD_ themselves. Returns whether it applied.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return _MALLOC_TUNED
    _MALLOC_TUNED = True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
        return bool(libc.mallopt(m_mmap_threshold, 64 << 20)) and bool(libc.mallopt(m_trim_threshold, 128 << 20))
    except (OSError, AttributeError):  # not glibc
        return False


class LogitStore:
    """Read-only store: `store.sequence(i)`, `store.sequences(ids)` -> SparseLogits of P positions each.

    Opening reads only the manifest and stats each shard's size (a truncated or missing shard is
    refused here); shards are memory-mapped lazily on first access and structurally checked then;
    `verify_checksums=True` also hashes each shard on first access.
    """

    def __init__(self, path: str | Path, verify_checksums: bool = False):
        self.path = Path(path)
        self.verify_checksums = verify_checksums
        self.manifest = load_manifest(self.path)
        m = self.manifest
        for e in m["shards"]:
            f = self.path / e["file"]
            if not f.exists():
                raise DataError(f"logit store shard {e['file']} is missing from {self.path}")
            size = f.stat().st_size
            if size != e["bytes"]:
                raise DataError(f"logit store shard {e['file']}: {size} bytes on disk, manifest says {e['bytes']} (truncated or replaced)")
        self._starts = np.array([e["first_sequence"] for e in m["shards"]] + [m["num_sequences"]], dtype=np.int64)
        self._shards: dict[int, _Shard] = {}
        self._lock = threading.Lock()

    # DataLoader workers get a copy without open memmaps and reopen lazily (no pickled arrays)
    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "verify_checksums": self.verify_checksums}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], state["verify_checksums"])

    def __len__(self) -> int:
        return int(self.manifest["num_sequences"])

    @property
    def positions_per_sequence(self) -> int:
        return int(self.manifest["positions_per_sequence"])

    @property
    def p(self) -> float:
        return float(self.manifest["p"])

    @property
    def k(self) -> int:
        return int(self.manifest["k"])

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    @property
    def power_exponents(self) -> tuple[float, ...]:
        """The exponents a of the per-token log Σ_v q_v^a the store keeps (older stores: none)."""
        return tuple(float(a) for a in self.manifest.get("power_exponents", []))

    @property
    def samples(self) -> int:
        """Draws per position of a sampled store; 0 for a top-p-k store."""
        return int((sampling_of(self.manifest) or {}).get("samples", 0))

    def _shard(self, s: int) -> _Shard:
        with self._lock:
            shard = self._shards.get(s)
            if shard is None:
                entry = self.manifest["shards"][s]
                f = self.path / entry["file"]
                if self.verify_checksums and file_checksum(f) != entry["checksum"]:
                    raise DataError(f"logit store shard {entry['file']}: checksum mismatch (corrupt or modified)")
                shard = self._shards[s] = _Shard(f, entry, self.manifest)
            return shard

    def sequence(self, i: int) -> SparseLogits:
        """Entries of sequence i: SparseLogits with P rows, K = store k columns, descending."""
        return self.sequences([i])

    def sequences(self, ids: Sequence[int] | np.ndarray) -> SparseLogits:
        """Entries of several sequences, rows sequence-major in the order of `ids` (len(ids)·P rows)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size == 0:
            raise ValueError("no sequence ids given")
        if ids.min() < 0 or ids.max() >= len(self):
            raise IndexError(f"sequence ids must lie in [0, {len(self)})")
        shard_of = np.searchsorted(self._starts, ids, side="right") - 1
        P, k = self.positions_per_sequence, self.k
        n = len(ids) * P
        # numpy all the way (torch ops on tiny tensors cost more than the decode), one torch view at the end
        exps, samples = self.power_exponents, self.samples
        out = [np.zeros((n, k), np.int64), np.full((n, k), -np.inf, np.float32), np.zeros(n, np.int64),
               np.zeros(n, np.float32), np.zeros(n, np.float32),
               np.zeros((n, len(exps)), np.float32) if exps else None, np.zeros((n, k), np.int32) if samples else None]
        for s in np.unique(shard_of):
            sel = np.flatnonzero(shard_of == s)
            rows = (sel[:, None] * P + np.arange(P)).reshape(-1)
            for dst, src in zip(out, self._shard(int(s)).decode(ids[sel] - self._starts[s], self.manifest)):
                if dst is not None:
                    dst[rows] = src
        t = [None if a is None else torch.from_numpy(a) for a in out]
        return SparseLogits(*t[:5], t[5], exps, t[6], samples)


# ----------------------------------------------------------------------------- inspect / verify


def check_compatible(manifest: dict[str, Any], vocab_size: int, tokenizer_hash: str) -> None:
    """Refuse a store made with another vocabulary or tokenizer (DataError naming both values)."""
    if int(manifest.get("vocab_size", -1)) != int(vocab_size):
        raise DataError(f"logit store vocab_size={manifest.get('vocab_size')!r} does not match the student's vocab_size={vocab_size!r}; "
                        "regenerate the store with the student's tokenizer")
    if str(manifest.get("tokenizer_hash")) != str(tokenizer_hash):
        raise DataError(f"logit store tokenizer_hash={manifest.get('tokenizer_hash')!r} does not match the data's tokenizer_hash={tokenizer_hash!r}; "
                        "regenerate the store with the same tokenizer")


def verify_store(path: str | Path, deep: bool = False) -> dict[str, Any]:
    """Check every shard's size, checksum and structure; DataError naming the first bad shard.

    deep=True also decodes every sequence (ids in range, codes consistent with counts).
    """
    store = LogitStore(path)  # sizes checked here
    for s, e in enumerate(store.manifest["shards"]):
        if file_checksum(store.path / e["file"]) != e["checksum"]:
            raise DataError(f"logit store shard {e['file']}: checksum mismatch (corrupt or modified); regenerate this shard")
        shard = store._shard(s)
        if shard.encoding == "ctxans":  # counts live in the entropy-coded payload: the per-sequence totals must agree
            cnt = shard.views["seq_entries"].astype(np.int64)
            bad = (int(cnt.sum()) != e["num_entries"] or cnt.min() < store.positions_per_sequence
                   or cnt.max() > store.k * store.positions_per_sequence)
        else:
            cnt = shard.views["counts"].astype(np.int64)
            bad = cnt.min() < 1 or cnt.max() > store.k or int(cnt.sum()) != e["num_entries"]
        if bad:
            raise DataError(f"logit store shard {e['file']}: kept-entry counts are out of range or do not sum to {e['num_entries']}")
        if deep:
            for a in range(0, e["num_sequences"], 64):
                shard.decode(np.arange(a, min(a + 64, e["num_sequences"])), store.manifest)
    return inspect_store(path, checksums=False) | {"checksums_ok": True}


def generation_cost(path: str | Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """What a store cost: teacher FLOPs (pd_lightning.cost convention), wall seconds, bytes per 1e9 tokens.

    Seconds come from the per-rank `generation_stats-rank<r>.json` files (`generate.stats_path`):
    `generation_seconds` is the slowest rank's total (wall time), `generation_device_seconds` the sum
    over ranks; both None for stores without them (online stores, whose logits are a by-product of
    the teacher's own training).
    """
    from pd_lightning.cost import store_generation_flops

    seconds, devices = [], set()
    for f in sorted(Path(path).glob("generation_stats-rank*.json")):
        try:
            stats = json.loads(f.read_text())
            seconds.append(float(stats["seconds"]))
            devices.add(str(stats.get("device", "?")))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # an unreadable stats file loses its seconds, never the store
    tokens = max(int(manifest["num_tokens"]), 1)
    return {
        "generation_flops": store_generation_flops(manifest),
        "generation_seconds": max(seconds) if seconds else None,
        "generation_device_seconds": sum(seconds) if seconds else None,
        "generation_device": ", ".join(sorted(devices)) or None,
        "bytes_per_billion_tokens": int(manifest["total_bytes"]) / tokens * 1e9,
    }


def inspect_store(path: str | Path, checksums: bool = True) -> dict[str, Any]:
    """Summary of a store (tokens, entries/token, bytes/token, bytes/entry, p, k, teacher, cost, ...).

    checksums=True hashes every shard: `checksums_ok` is then True/False and `bad_shard` names the
    first mismatch; with checksums=False `checksums_ok` is None.
    """
    m = LogitStore(path).manifest
    ok, bad = None, None
    if checksums:
        ok = True
        for e in m["shards"]:
            if file_checksum(Path(path) / e["file"]) != e["checksum"]:
                ok, bad = False, e["file"]
                break
    tokens, entries, nbytes = m["num_tokens"], m["num_entries"], m["total_bytes"]
    return generation_cost(path, m) | {
        "path": str(path), "teacher": m.get("teacher"), "teacher_config_hash": m.get("teacher_config_hash"),
        "tokenizer_hash": m["tokenizer_hash"], "vocab_size": m["vocab_size"], "p": m["p"], "k": m["k"],
        "encoding": m["encoding"], "power_exponents": m.get("power_exponents", []),
        "sampling": sampling_of(m) or {"method": "topk"},
        "positions_per_sequence": m["positions_per_sequence"],
        "sequences": m["num_sequences"], "tokens": tokens, "entries": entries,
        "mean_entries_per_token": entries / max(tokens, 1), "bytes": nbytes,
        "bytes_per_token": nbytes / max(tokens, 1), "bytes_per_entry": nbytes / max(entries, 1),
        "shards": len(m["shards"]), "checksums_ok": ok, "bad_shard": bad, "meta": m.get("meta", {}),
    }


__all__ = [
    "LogitStore", "check_compatible", "file_checksum", "generation_cost", "inspect_store", "load_manifest", "num_shards",
    "sampling_of", "shard_name", "shard_range", "verify_store",
]
