"""Token shards: fixed-length packed sequences in raw little-endian uint16/uint32 files + a JSON manifest.

Layout of a prepared dataset directory:

    manifest.json            format, config hash, tokenizer hash, vocab size, seq_len, dtype, splits
    tokenizer/               the HF tokenizer dir the shards were made with
    train-00000.bin ...      [sequences, seq_len] tokens, row-major
    heldout-00000.bin ...

Sequence i of a split is row i of the concatenation of its shards. Shards are written to a
temporary name and renamed, and the manifest is written last, so a killed `pdl data prepare`
leaves nothing that a later run trusts. Readers memory-map shards (no whole-file loads) and check
each shard's size against the manifest on open; `verify` checks every checksum.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pd_lightning.errors import DataError

FORMAT = "pdl-token-shards"
VERSION = 1
MANIFEST = "manifest.json"


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype that holds every token id."""
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
    """Write bytes to `path` through a temporary file and a rename (never a torn file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON deterministically (sorted keys) and atomically."""
    write_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_manifest(root: str | Path) -> dict[str, Any]:
    """Read and sanity-check a token-shard manifest."""
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        raise DataError(f"{str(root)!r} is not a prepared dataset (no {MANIFEST}); run `pdl data prepare` first")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DataError(f"{str(path)!r} is not valid JSON (corrupt manifest)") from None
    if manifest.get("format") != FORMAT:
        raise DataError(f"{str(path)!r} has format={manifest.get('format')!r}; expected {FORMAT!r}")
    if manifest.get("version") != VERSION:
        raise DataError(f"{str(path)!r} has version={manifest.get('version')!r}; this pd-lightning reads version {VERSION}")
    return manifest


@dataclass
class TokenShards:
    """Random access by sequence index to one split of a prepared dataset (memory-mapped)."""

    root: Path
    split: str
    manifest: dict[str, Any]

    def __init__(self, root: str | Path, split: str = "train"):
        self.root = Path(root)
        self.split = split
        self.manifest = read_manifest(self.root)
        splits = self.manifest["splits"]
        if split not in splits:
            raise DataError(f"split={split!r} is not in {str(self.root)!r}; it has {', '.join(splits)}")
        self.seq_len = int(self.manifest["seq_len"])
        self.vocab_size = int(self.manifest["vocab_size"])
        self.tokenizer_hash = str(self.manifest["tokenizer_hash"])
        self.dtype = np.dtype(self.manifest["dtype"])
        self._shards: list[np.memmap] = []
        self._starts: list[int] = []
        start = 0
        for entry in splits[split]["shards"]:
            path = self.root / entry["file"]
            n = int(entry["num_sequences"])
            expected = n * self.seq_len * self.dtype.itemsize
            if not path.is_file():
                raise DataError(f"token shard {str(path)!r} listed in the manifest is missing")
            size = path.stat().st_size
            if size != expected:
                raise DataError(f"token shard {str(path)!r} has {size} bytes; the manifest says {expected} (truncated?)")
            self._shards.append(np.memmap(path, dtype=self.dtype, mode="r", shape=(n, self.seq_len)))
            self._starts.append(start)
            start += n
        self._len = start

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> np.ndarray:
        """Sequence `index` as an int64 array of seq_len tokens."""
        if not 0 <= index < self._len:
            raise IndexError(f"sequence {index} out of range [0, {self._len})")
        shard = int(np.searchsorted(self._starts, index, side="right")) - 1
        return np.asarray(self._shards[shard][index - self._starts[shard]], dtype=np.int64)

    def batch(self, indices: list[int] | np.ndarray) -> np.ndarray:
        """Several sequences as an int64 [len(indices), seq_len] array."""
        return np.stack([self[int(i)] for i in indices]) if len(indices) else np.zeros((0, self.seq_len), np.int64)

    def verify(self) -> None:
        """Check every shard's checksum against the manifest; raise DataError naming the first bad shard."""
        for entry in self.manifest["splits"][self.split]["shards"]:
            path = self.root / entry["file"]
            if file_sha256(path) != entry["sha256"]:
                raise DataError(f"token shard {str(path)!r} fails its checksum (corrupt); re-run `pdl data prepare`")


class ShardWriter:
    """Accumulate token ids into fixed-length sequences and write full shards atomically."""

    def __init__(self, root: Path, split: str, seq_len: int, dtype: np.dtype, sequences_per_shard: int,
                 max_sequences: int | None):
        self.root, self.split, self.seq_len, self.dtype = root, split, seq_len, dtype
        self.sequences_per_shard = sequences_per_shard
        self.max_sequences = max_sequences
        self._buffer: list[np.ndarray] = []
        self._buffered = 0
        self.num_sequences = 0
        self.shards: list[dict[str, Any]] = []

    @property
    def full(self) -> bool:
        return self.max_sequences is not None and self.num_sequences >= self.max_sequences

    def add(self, ids: np.ndarray) -> int:
        """Append a token stream piece; returns how many tokens were accepted (0 once full)."""
        if self.full:
            return 0
        self._buffer.append(ids.astype(self.dtype, copy=False))
        self._buffered += len(ids)
        accepted = len(ids)
        while not self.full and self._buffered >= self._next_shard_rows() * self.seq_len:
            self._flush(self.sequences_per_shard)
        return accepted

    def _next_shard_rows(self) -> int:
        # The last shard of a budgeted split is short: flush it as soon as the budget is covered.
        if self.max_sequences is None:
            return self.sequences_per_shard
        return min(self.sequences_per_shard, self.max_sequences - self.num_sequences)

    def _flush(self, max_rows: int) -> None:
        stream = np.concatenate(self._buffer) if len(self._buffer) > 1 else self._buffer[0]
        rows = min(max_rows, len(stream) // self.seq_len)
        if self.max_sequences is not None:
            rows = min(rows, self.max_sequences - self.num_sequences)
        if rows <= 0:
            return
        take = rows * self.seq_len
        block, rest = stream[:take], stream[take:]
        self._buffer, self._buffered = ([rest] if len(rest) else []), len(rest)
        name = f"{self.split}-{len(self.shards):05d}.bin"
        data = np.ascontiguousarray(block).tobytes()
        write_atomic(self.root / name, data)
        self.shards.append({"file": name, "num_sequences": rows, "sha256": hashlib.sha256(data).hexdigest()})
        self.num_sequences += rows

    def close(self) -> dict[str, Any]:
        """Write the last (partial) shard, dropping the tail shorter than one sequence."""
        while self._buffered >= self.seq_len and not self.full:
            self._flush(self.sequences_per_shard)
        return {"num_sequences": self.num_sequences, "num_tokens": self.num_sequences * self.seq_len,
                "shards": self.shards}
