"""Writing a logit store: shards encoded and written atomically, resumable, one rank's share of many.

`LogitStoreWriter` turns (truncated) teacher logits into the shards and manifest whose byte layout
the `store` module documents; `AsyncShardWriter` runs truncation, encoding and writing off the
teacher's thread (optionally in encoder processes) so generation overlaps the next forward.
Everything is a pure function of the inputs: the same logits give byte-identical shards and manifest.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import queue
import threading
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pd_lightning.config import check_field
from pd_lightning.errors import ConfigError, DataError, choice_error
from pd_lightning.logits import codec
from pd_lightning.logits.processing import SparseLogits, check_power_exponents, narrow, truncate_top_p_k
from pd_lightning.logits.store import (CHECKSUM, FORMAT, FORMAT_VERSION, MAGIC, MANIFEST, _SETTINGS, LogitStore,
                                       _load_json, file_checksum, num_shards, sampling_of, shard_name, shard_range)


def _dumps(obj: Any) -> str:
    # sorted keys, fixed separators: the same content is always the same bytes
    return json.dumps(obj, sort_keys=True, indent=1, ensure_ascii=True) + "\n"


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _discard(tmp)
        raise


def _discard(path: Path) -> None:
    """Remove a partly written file, best effort (a full disk gets the space back; a read-only one keeps it)."""
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


# What to do about an OSError while writing a store, by errno (the reason itself is os.strerror's).
_WRITE_FIXES = {
    errno.ENOSPC: "free space",
    errno.EDQUOT: "free space (or raise the disk quota)",
    errno.EROFS: "make it writable (or choose another logits.store)",
    errno.EACCES: "fix its permissions",
    errno.EPERM: "fix its permissions",
}
GENERATION_RERUN = "generation resumes from the last whole shard"


def store_write_error(store: str | Path, exc: OSError, doing: str, rerun: str = GENERATION_RERUN) -> DataError:
    """The one-line error for an OSError while writing a store (full disk, quota, read-only, permissions).

    E.g. "logits.store='/x': no space left on device while writing shard-000003.bin; free space and run
    the same command again: generation resumes from the last whole shard". `rerun` says what the same
    command does then (an online store's teacher run starts over instead).
    """
    reason = os.strerror(exc.errno).lower() if exc.errno else (str(exc) or type(exc).__name__)
    fix = _WRITE_FIXES.get(exc.errno, "fix the cause")
    return DataError(f"logits.store={str(store)!r}: {reason} while {doing}; {fix} and run the same command again: {rerun}")


def _encoding_info(encoding: str, value_step: float, vocab_size: int) -> dict[str, Any]:
    info: dict[str, Any] = {"name": encoding, "version": codec.ENCODING_VERSION, "index_bits": codec.index_bits(vocab_size)}
    if encoding in ("egsqrt", "ctxans"):
        info["value_step"] = value_step
    else:
        info["value_scale"] = codec.FIXED_VALUE_SCALE
    if encoding == "ctxans":
        info["model_format"] = codec.CTXANS_MODEL_FORMAT
    return info


# ----------------------------------------------------------------------------- writer


class LogitStoreWriter:
    """Writes one rank's shards of a store; resumes from finished shards; `finalize` writes the manifest.

    Feed it whole sequences in any order with `write_sequences(first_sequence, sparse)`; a shard is
    encoded batch by batch (only compact bytes are held) and written once all its sequences arrived.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        vocab_size: int,
        p: float,
        k: int,
        positions_per_sequence: int,
        num_sequences: int,
        sequences_per_shard: int,
        teacher: str,
        teacher_config_hash: str,
        tokenizer_hash: str,
        encoding: str = "egsqrt",
        value_step: float = codec.DEFAULT_VALUE_STEP,
        rank: int = 0,
        world_size: int = 1,
        verify_existing: bool = True,
        rerun: str = GENERATION_RERUN,
        power_exponents: tuple[float, ...] = (),
        sampling: dict[str, Any] | None = None,
    ):
        if encoding not in codec.ENCODINGS:
            raise choice_error("logits.encoding", encoding, codec.ENCODINGS)
        for name, val, lo in (("vocab_size", vocab_size, 2), ("k", k, 1), ("positions_per_sequence", positions_per_sequence, 1),
                              ("num_sequences", num_sequences, 1), ("sequences_per_shard", sequences_per_shard, 1),
                              ("world_size", world_size, 1)):
            if int(val) != val or val < lo:
                raise ConfigError(f"logits.{name}={val!r} is out of range; expected an integer >= {lo}")
        check_field("logits.p", p)
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank={rank!r} is out of range; expected 0 <= rank < {world_size}")
        if encoding in ("egsqrt", "ctxans") and not 2.0**-16 <= value_step <= 0.25:
            raise ConfigError(f"logits.value_step={value_step!r} is out of range; expected 2^-16 <= value_step <= 0.25")
        self.path = Path(path)
        self.vocab_size, self.p, self.k = int(vocab_size), float(p), int(k)
        self.positions = int(positions_per_sequence)
        self.num_sequences, self.sequences_per_shard = int(num_sequences), int(sequences_per_shard)
        self.encoding, self.value_step = encoding, float(value_step)
        self.rank, self.world_size = rank, world_size
        self.power_exponents = check_power_exponents(power_exponents)
        # a sampled store: {"method": "sample", "samples": N, "seed": s, "proposal_tau": 1.0}; its entries are
        # the distinct drawn ids (at most N = k per token), p = 1 (no cut). None: a top-p-k store.
        self.samples = 0
        if sampling is not None:
            self.samples = int(sampling["samples"])
            if encoding == "ctxans":
                raise ConfigError("logits.encoding='ctxans' does not code sampled stores (their draw counts); "
                                  "use egsqrt or fixed")
            if self.k != self.samples or self.p != 1.0:
                raise ConfigError(f"a sampled store keeps up to samples={self.samples} ids per token at p=1; got "
                                  f"k={self.k}, p={self.p}")
        self.settings: dict[str, Any] = {
            "vocab_size": self.vocab_size, "p": self.p, "k": self.k, "positions_per_sequence": self.positions,
            "num_sequences": self.num_sequences, "sequences_per_shard": self.sequences_per_shard,
            "teacher": str(teacher), "teacher_config_hash": str(teacher_config_hash),
            "tokenizer_hash": str(tokenizer_hash),
            "encoding": _encoding_info(encoding, self.value_step, self.vocab_size),
            "power_exponents": list(self.power_exponents),
        }
        if sampling is not None:  # top-p-k stores carry no key: their settings are those of earlier versions
            self.settings["sampling"] = dict(sampling)
        self.num_shards = num_shards(self.num_sequences, self.sequences_per_shard)
        self.rerun = rerun  # what running the same command again does, for the one-line write errors
        self._lock = threading.Lock()
        self._parts: dict[int, dict[int, codec.EncodedBatch]] = {}
        self._received: dict[int, np.ndarray] = {}
        self.finished: set[int] = set()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._resume(verify_existing)
        except OSError as e:
            raise self.write_error(e, "opening the store for writing") from None

    def write_error(self, exc: OSError, doing: str) -> DataError:
        """The one-line DataError for an OSError while writing this store (see `store_write_error`)."""
        return store_write_error(self.path, exc, doing, self.rerun)

    # -- resume -------------------------------------------------------------------------------

    def own_shards(self) -> list[int]:
        """Shard indices this rank writes (s ≡ rank mod world_size)."""
        return list(range(self.rank, self.num_shards, self.world_size))

    def pending_shards(self) -> list[int]:
        """This rank's shards still to write, ascending."""
        return [s for s in self.own_shards() if s not in self.finished]

    def shard_range(self, index: int) -> range:
        """Global sequence ids of shard `index`."""
        return shard_range(index, self.sequences_per_shard, self.num_sequences)

    def _check_settings(self, found: dict[str, Any], where: str) -> None:
        for key in _SETTINGS:
            if found.get(key) != self.settings.get(key):
                raise DataError(
                    f"{where} was written with {key}={found.get(key)!r}, but this run has {key}={self.settings.get(key)!r}; "
                    "use a new store directory or the original settings")

    def _resume(self, verify: bool) -> None:
        manifest = self.path / MANIFEST
        if manifest.exists():
            self._check_settings(_load_json(manifest, "manifest"), str(manifest))
        for s in self.own_shards():
            bin_path, side = self.path / shard_name(s), self.path / shard_name(s).replace(".bin", ".json")
            for tmp in (bin_path.with_name(bin_path.name + ".tmp"), side.with_name(side.name + ".tmp")):
                tmp.unlink(missing_ok=True)  # torn writes from a killed run are never trusted
            if not side.exists():
                bin_path.unlink(missing_ok=True)  # a .bin without sidecar may predate a crash: redo it
                continue
            entry = _load_json(side, "shard sidecar")
            self._check_settings(entry.get("settings", {}), str(side))
            ok = bin_path.exists() and bin_path.stat().st_size == entry.get("bytes")
            if ok and verify:
                ok = file_checksum(bin_path) == entry.get("checksum")
            if ok:
                self.finished.add(s)
            else:
                side.unlink()
                bin_path.unlink(missing_ok=True)

    # -- writing ------------------------------------------------------------------------------

    def write_sequences(self, first_sequence: int, sparse: SparseLogits) -> list[int]:
        """Add whole sequences [first, first + len(sparse)/P); writes shards that became complete; returns them."""
        n_rows = len(sparse)
        if n_rows % self.positions:
            raise ValueError(f"got {n_rows} token rows, not a multiple of positions_per_sequence={self.positions}")
        n_seq = n_rows // self.positions
        if first_sequence < 0 or first_sequence + n_seq > self.num_sequences:
            raise ValueError(f"sequences [{first_sequence}, {first_sequence + n_seq}) outside [0, {self.num_sequences})")
        if tuple(sparse.power_exponents) != self.power_exponents:
            raise ValueError(f"entries carry power sums for {list(sparse.power_exponents)}, the store keeps "
                             f"{list(self.power_exponents)}")
        if sparse.samples != self.samples or sparse.sampled != bool(self.samples):
            raise ValueError(f"entries are {'sampled' if sparse.sampled else 'top-p-k'} (samples={sparse.samples}), the "
                             f"store is {'sampled' if self.samples else 'top-p-k'} (samples={self.samples})")
        if sparse.width > self.k:
            sparse = sparse.first_columns(self.k)
        done = []
        seq = first_sequence
        while seq < first_sequence + n_seq:
            shard = seq // self.sequences_per_shard
            rng = self.shard_range(shard)
            stop = min(rng.stop, first_sequence + n_seq)
            if shard % self.world_size != self.rank or shard in self.finished:
                raise ValueError(f"shard {shard} is not pending on rank {self.rank}; feed only pending_shards()")
            a, b = (seq - first_sequence) * self.positions, (stop - first_sequence) * self.positions
            if self.encoding == "ctxans":
                from pd_lightning.logits import ctxans  # here, not at the top: its coder needs numba (55 MiB resident)

                encode = ctxans.symbolize
            else:
                encode = partial(codec.encode, encoding=self.encoding)
            enc = encode(sparse.rows(a, b), self.positions, self.vocab_size, self.k, value_step=self.value_step)
            with self._lock:
                parts = self._parts.setdefault(shard, {})
                got = self._received.setdefault(shard, np.zeros(len(rng), bool))
                if got[seq - rng.start : stop - rng.start].any():
                    raise ValueError(f"sequences [{seq}, {stop}) were already written to shard {shard}")
                got[seq - rng.start : stop - rng.start] = True
                parts[seq - rng.start] = enc
                complete = bool(got.all())
                if complete:
                    del self._parts[shard], self._received[shard]
            if complete:
                self._write_shard(shard, [parts[key] for key in sorted(parts)])
                done.append(shard)
            seq = stop
        return done

    def _write_shard(self, index: int, parts: list) -> None:
        rng = self.shard_range(index)
        if self.encoding == "ctxans":  # the model is fitted to the whole shard, then each sequence is coded
            from pd_lightning.logits import ctxans

            enc = ctxans.encode_shard(ctxans.Symbols.cat(parts), self.positions, self.vocab_size, self.k, self.value_step)
            cols = {"model": enc.model, "seq_entries": enc.seq_entries.astype("<u4"),
                    "chunks": codec._excl_cumsum(enc.chunk_sizes.astype(np.int64)).astype("<u8"), "payload": enc.payload}
            parts = [enc]
        else:
            cols = {"counts": np.concatenate([e.counts for e in parts])}
        if self.encoding == "egsqrt":
            cols["params"] = np.concatenate([e.params for e in parts])
            cols["mass"] = np.concatenate([e.mass for e in parts]).astype("<u2")
        if self.encoding != "ctxans":
            cols["stats"] = np.concatenate([e.stats for e in parts]).astype("<f2")
            cols["chunks"] = codec._excl_cumsum(np.concatenate([e.chunk_sizes for e in parts]).astype(np.int64)).astype("<u8")
            cols["payload"] = np.concatenate([e.payload for e in parts])
            if cols["counts"].dtype == np.uint16:
                cols["counts"] = cols["counts"].astype("<u2")
        n_entries = int(sum(e.num_entries for e in parts))
        header: dict[str, Any] = {
            "format": FORMAT, "version": FORMAT_VERSION, "shard_index": index, "first_sequence": rng.start,
            "num_sequences": len(rng), "positions_per_sequence": self.positions, "vocab_size": self.vocab_size,
            "k": self.k, "encoding": self.settings["encoding"], "num_entries": n_entries,
            "dtypes": {name: a.dtype.str for name, a in cols.items()},
        }
        # section offsets depend on the header length, which depends on the offsets: iterate to a fixed point
        sections: dict[str, list[int]] = {}
        for _ in range(4):
            header["sections"] = sections
            head = json.dumps(header, sort_keys=True).encode()
            pos = _align8(12 + len(head))
            new = {}
            for name, a in cols.items():
                new[name] = [pos, int(a.nbytes)]
                pos = _align8(pos + a.nbytes) if name != "payload" else pos + a.nbytes
            if new == sections:
                break
            sections = new
        header["sections"] = sections
        head = json.dumps(header, sort_keys=True).encode()
        bin_path = self.path / shard_name(index)
        tmp = bin_path.with_name(bin_path.name + ".tmp")
        h = hashlib.blake2b(digest_size=32)
        try:  # a full disk or an unwritable dir: drop the torn .tmp, keep every finished shard (resumable)
            with open(tmp, "wb") as f:
                def put(data: bytes | memoryview) -> None:
                    f.write(data)
                    h.update(data)
                put(MAGIC + np.uint32(len(head)).astype("<u4").tobytes() + head)
                for name, a in cols.items():
                    pad = sections[name][0] - f.tell()
                    put(b"\0" * pad)
                    put(memoryview(np.ascontiguousarray(a)).cast("B"))
                f.flush()
                os.fsync(f.fileno())
                size = f.tell()
            os.replace(tmp, bin_path)
        except OSError as e:
            _discard(tmp)
            raise self.write_error(e, f"writing {bin_path.name}") from None
        entry = {
            "file": bin_path.name, "index": index, "first_sequence": rng.start, "num_sequences": len(rng),
            "num_tokens": len(rng) * self.positions, "num_entries": n_entries, "bytes": size,
            "checksum": h.hexdigest(), "settings": self.settings,
        }
        side = self.path / bin_path.name.replace(".bin", ".json")
        try:
            _write_atomic(side, _dumps(entry).encode())
        except OSError as e:
            _discard(bin_path)  # a .bin without its sidecar is redone on resume anyway: give its space back now
            raise self.write_error(e, f"writing {side.name}") from None
        with self._lock:
            self.finished.add(index)

    # -- manifest -----------------------------------------------------------------------------

    def finalize(self, meta: dict[str, Any] | None = None) -> dict[str, Any]:
        """Write manifest.json once every shard of every rank is finished (call on one rank after a barrier)."""
        if self._parts:
            raise ValueError(f"shards {sorted(self._parts)} have sequences buffered but are incomplete")
        shards, missing = [], []
        for s in range(self.num_shards):
            side = self.path / shard_name(s).replace(".bin", ".json")
            if not side.exists():
                missing.append(s)
                continue
            entry = _load_json(side, "shard sidecar")
            self._check_settings(entry.pop("settings", {}), str(side))
            bin_path = self.path / entry["file"]
            if not bin_path.exists() or bin_path.stat().st_size != entry["bytes"]:
                raise DataError(f"logit store shard {entry['file']}: size on disk does not match its sidecar; rerun generation to rewrite it")
            shards.append(entry)
        if missing:
            raise DataError(f"logit store {self.path}: shards {missing[:8]}{'...' if len(missing) > 8 else ''} are not written yet; "
                            "finish generation on every rank before finalize()")
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "checksum_algorithm": CHECKSUM,
            **{key: self.settings[key] for key in _SETTINGS if key in self.settings},
            "num_tokens": self.num_sequences * self.positions,
            "num_entries": int(sum(e["num_entries"] for e in shards)),
            "total_bytes": int(sum(e["bytes"] for e in shards)),
            "shards": shards, "meta": dict(meta or {}),
        }
        try:
            _write_atomic(self.path / MANIFEST, _dumps(manifest).encode())
        except OSError as e:
            raise self.write_error(e, f"writing {MANIFEST}") from None
        return manifest


def encoded_bytes(sparse: SparseLogits, positions: int, vocab_size: int, k: int, encoding: str, value_step: float) -> int:
    """Bytes the sections of a shard holding exactly these whole sequences take (no header, no alignment):
    the per-token columns, the chunk offsets and the payload, as `_write_shard` lays them out."""
    n_seq = len(sparse) // positions
    if encoding == "ctxans":
        from pd_lightning.logits import ctxans

        enc = ctxans.encode_shard(ctxans.symbolize(sparse, positions, vocab_size, k, value_step), positions, vocab_size,
                                  k, value_step)
        return int(enc.model.nbytes + 4 * n_seq + 8 * (len(enc.chunk_sizes) + 1) + enc.payload.nbytes)
    e = codec.encode(sparse, positions, vocab_size, k, encoding, value_step)
    cols = [e.counts, e.stats.astype("<f2")] + ([e.params, e.mass] if encoding == "egsqrt" else [])
    return int(sum(a.nbytes for a in cols) + 8 * (len(e.chunk_sizes) + 1) + e.payload.nbytes)


def bytes_at_truncation(path: str | Path, p: float, k: int, *, max_sequences: int = 256) -> tuple[float, float]:
    """(bytes / token, entries / token) a store of the same teacher made at top-p-k would take, estimated by
    encoding the narrowed entries of the store's first `max_sequences` sequences in its own encoding: every
    per-token column and chunk offset counted, shard headers not (under 0.1% at 1,024 sequences a shard).

    A run that reads a top-1.0-100 store at top-0.95-5 thereby reports the storage its targets need, the
    x axis on which top-p-k and sampled targets are compared at equal bytes. A sampled store reports its own.
    """
    store = LogitStore(path)
    m = store.manifest
    if sampling_of(m) is not None:
        return int(m["total_bytes"]) / max(int(m["num_tokens"]), 1), int(m["num_entries"]) / max(int(m["num_tokens"]), 1)
    n = min(len(store), int(max_sequences))
    sparse = narrow(store.sequences(np.arange(n)), p, k, store.p, store.k)
    enc = m["encoding"]
    nbytes = encoded_bytes(sparse, store.positions_per_sequence, store.vocab_size, min(int(k), store.k),
                                  enc["name"], float(enc.get("value_step", codec.DEFAULT_VALUE_STEP)))
    tokens = len(sparse)
    return nbytes / tokens, float(sparse.counts.sum()) / tokens


def _align8(n: int) -> int:
    return (n + 7) // 8 * 8


class AsyncShardWriter:
    """Runs (truncate +) encode + write off the caller's thread, overlapping the next teacher forward.

    `submit(first_sequence, data)` takes ready SparseLogits on any device (what generation hands over:
    it never builds dense logits) or dense logits [B·P, V], truncated to the writer's top-p-k here (the
    online store does this). At most `max_pending` batches wait, so memory stays bounded.

    encode_workers = 0: the background thread encodes and writes (one core, sharing the GIL with the
    caller). encode_workers = n > 0: n encoder processes (spawned, so safe beside CUDA), each with its
    own writer from `make_writer` (a picklable factory of a writer with this one's settings, e.g.
    `functools.partial(LogitStoreWriter, **kwargs)`), write whole shards: the batches of this rank's
    j-th pending shard go to process j mod n, so while one process fits and codes a finished shard the
    next shard's batches go to another and n shards are coded at once. Every byte comes from the same
    writer code, so the store is byte-identical to the thread's. A batch must lie within one shard
    (generation's batches do); a process holds at most `max_pending` batches in its queue.

    Errors from the thread or a process are raised by the next submit(), flush() or close(); after one,
    nothing more is written (finished shards stay, the failed one is left to the resume).
    """

    def __init__(self, writer: LogitStoreWriter, max_pending: int = 2, encode_workers: int = 0,
                 make_writer=None):
        self.writer = writer
        self._q: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._failed = False  # set with the first error; stays set after the error is raised
        self._procs: list = []  # (process, its input queue)
        self._outstanding = 0  # batches handed to processes and not yet acknowledged
        if encode_workers > 0:
            if make_writer is None:
                raise ValueError("encode_workers > 0 needs make_writer, a picklable factory of this store's writer")
            self._start_processes(int(encode_workers), make_writer, max_pending)
        self._thread = threading.Thread(target=self._run, name="logit-store-writer", daemon=True)
        self._thread.start()

    # -- encoder processes ----------------------------------------------------------------------

    def _start_processes(self, n: int, make_writer, max_pending: int) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self._acks = ctx.Queue()
        try:
            for i in range(n):
                q = ctx.Queue(maxsize=max(1, max_pending))
                proc = ctx.Process(target=_encoder_process, args=(make_writer, q, self._acks, i), daemon=True,
                                   name=f"logit-store-encoder-{i}")
                proc.start()
                self._procs.append((proc, q))
            # Every process opens its writer (a resume scan that deletes stray .tmp files) before any shard is written.
            for _ in range(n):
                _, _, err = self._ack()
                if err is not None:
                    raise err
        except BaseException:
            self._stop_processes()
            raise

    def _ack(self) -> tuple:
        """The next acknowledgement (worker, first sequence or "ready", error or None); a dead process is an error."""
        while True:
            try:
                wid, what, err = self._acks.get(timeout=1.0)
                return wid, what, _rebuilt(err)
            except queue.Empty:
                dead = [p for p, _ in self._procs if not p.is_alive()]
                if dead:
                    raise RuntimeError(f"logit store encoder process {dead[0].name} died (exit code {dead[0].exitcode}); "
                                       f"{GENERATION_RERUN} when the same command runs again")

    def _take_ack(self) -> None:
        _, _, err = self._ack()
        self._outstanding -= 1
        if err is not None and not self._failed:
            self._error, self._failed = err, True

    def _send(self, first: int, data: SparseLogits) -> None:
        n_seq = len(data) // self.writer.positions
        shard = first // self.writer.sequences_per_shard
        if (first + max(n_seq, 1) - 1) // self.writer.sequences_per_shard != shard:
            raise ValueError(f"sequences [{first}, {first + n_seq}) span two shards; with encoder processes a batch "
                             "must lie within one shard")
        proc, q = self._procs[(shard // self.writer.world_size) % len(self._procs)]
        item = (first, _sparse_arrays(data))
        while True:
            try:
                q.put(item, timeout=1.0)
                break
            except queue.Full:
                while self._outstanding and not self._acks.empty():
                    self._take_ack()
                if not proc.is_alive():
                    raise RuntimeError(f"logit store encoder process {proc.name} died (exit code {proc.exitcode}); "
                                       f"{GENERATION_RERUN} when the same command runs again")
        self._outstanding += 1
        while self._outstanding and not self._acks.empty():
            self._take_ack()

    def _stop_processes(self) -> None:
        for _, q in self._procs:
            try:
                q.put(None, timeout=5.0)
            except (queue.Full, ValueError, OSError):
                pass
        for proc, q in self._procs:
            proc.join(timeout=60.0)
            if proc.is_alive():  # a write cut short leaves only a .tmp, which a resume deletes
                proc.terminate()
                proc.join()
            q.close()
        self._procs = []

    # -- the thread -----------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            item = self._q.get()
            try:
                if item is None or item is _FLUSH:
                    while self._procs and self._outstanding:
                        self._take_ack()  # every batch handed out is on disk (or failed)
                    if item is None:
                        return
                    continue
                if self._failed:
                    continue
                first, data = item
                if not isinstance(data, SparseLogits):
                    data = truncate_top_p_k(data.detach(), self.writer.p, self.writer.k,
                                            power_exponents=self.writer.power_exponents)
                data = data.to("cpu")
                if self._procs:
                    self._send(first, data)
                else:
                    self.writer.write_sequences(first, data)
            except BaseException as e:  # handed to the caller's thread
                if not self._failed:
                    self._error = e
                self._failed = True
                if item is None:
                    return
            finally:
                self._q.task_done()

    def _raise(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def submit(self, first_sequence: int, data: torch.Tensor | SparseLogits) -> None:
        """Queue whole sequences starting at global id `first_sequence` (blocks while the queue is full)."""
        self._raise()
        self._q.put((first_sequence, data))

    def flush(self) -> None:
        """Wait until every submitted batch is written."""
        if self._thread.is_alive():
            self._q.put(_FLUSH)
            self._q.join()
        self._raise()

    def close(self) -> None:
        """Flush, stop the thread (and the encoder processes), re-raise any background error."""
        self._stop()
        self._raise()

    def _stop(self) -> None:
        if self._thread.is_alive():
            self._q.put(None)
            self._thread.join()
        if self._procs:
            self._stop_processes()

    def __enter__(self) -> "AsyncShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # the caller failed: stop quietly (its error is the one to report), keep only whole shards
            self._failed = True
            self._stop()
            self._error = None


_FLUSH = object()  # a queue item: wait for the encoder processes


def _sparse_arrays(s: SparseLogits) -> tuple:
    """CPU SparseLogits as compact numpy arrays for an encoder process (columns cut to the widest row, int32 ids)."""
    width = max(int(s.counts.max()), 1) if len(s) else 1
    sums = None if s.log_power_sums is None else s.log_power_sums.numpy()
    draws = None if s.draws is None else s.draws[:, :width].numpy()
    return (s.indices[:, :width].to(torch.int32).numpy(), s.logprobs[:, :width].numpy(), s.counts.numpy(),
            s.entropy.numpy(), s.logit_std.numpy(), sums, tuple(s.power_exponents), draws, s.samples)


def _sparse_from_arrays(arrays: tuple) -> SparseLogits:
    idx, lp, counts, entropy, std, sums, exps, draws, samples = arrays
    return SparseLogits(torch.from_numpy(idx.astype(np.int64)), torch.from_numpy(lp), torch.from_numpy(counts),
                        torch.from_numpy(entropy), torch.from_numpy(std),
                        None if sums is None else torch.from_numpy(sums), exps,
                        None if draws is None else torch.from_numpy(draws), samples)


def _portable(exc: BaseException) -> tuple[str, str]:
    """An exception as (kind, one-line message) for the way back to the parent (no pickled objects)."""
    kind = next((c.__name__ for c in (DataError, ConfigError) if isinstance(exc, c)), "RuntimeError")
    message = str(exc) if kind != "RuntimeError" else f"{type(exc).__name__}: {exc}"
    return kind, message


def _rebuilt(err: tuple[str, str] | None) -> BaseException | None:
    """The parent's exception for a `_portable` error: the same one-line DataError / ConfigError, else RuntimeError."""
    if err is None:
        return None
    kind, message = err
    return {"DataError": DataError, "ConfigError": ConfigError}.get(kind, RuntimeError)(message)


def _encoder_process(make_writer, inq, acks, wid: int) -> None:
    """An encoder process: build the writer, then write the batches it is sent; one acknowledgement per batch."""
    import multiprocessing

    torch.set_num_threads(1)  # numpy does the work; one process per core
    try:
        writer = make_writer()
    except BaseException as e:
        acks.put((wid, "ready", _portable(e)))
        return
    acks.put((wid, "ready", None))
    parent = multiprocessing.parent_process()
    failed = False
    while True:
        try:
            item = inq.get(timeout=2.0)
        except queue.Empty:
            if parent is not None and not parent.is_alive():
                return  # the generation was killed: nothing to write for
            continue
        if item is None or (parent is not None and not parent.is_alive()):
            return  # stopped, or the generation was killed: a batch of a dead run is not written
        first, arrays = item
        err = None
        if not failed:
            try:
                writer.write_sequences(first, _sparse_from_arrays(arrays))
            except BaseException as e:  # e.g. a full disk: the one-line DataError goes back to the parent
                err, failed = _portable(e), True
        acks.put((wid, first, err))


# ----------------------------------------------------------------------------- reader


__all__ = ["AsyncShardWriter", "LogitStoreWriter", "store_write_error"]
