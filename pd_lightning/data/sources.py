"""Document sources: the built-in corpus, local text / jsonl / parquet files, and `datasets` datasets.

Every source yields plain strings, one per document, for a split ("train" or "heldout").
Sources without their own held-out split send a fixed, hash-chosen fraction of documents to
"heldout" (the same documents on every machine), and never to "train".
"""

from __future__ import annotations

import glob
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

from pd_lightning.config import DataConfig
from pd_lightning.errors import DataError

SPLITS = ("train", "heldout")


def _is_heldout(index: int, fraction: float) -> bool:
    """A stable pseudo-random choice of held-out documents (independent of Python's hash seed)."""
    digest = hashlib.blake2b(index.to_bytes(8, "little"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < fraction


def _files(cfg: DataConfig, suffixes: tuple[str, ...]) -> list[Path]:
    """The files named by data.path (a file, a directory or a glob), sorted for determinism."""
    path = Path(cfg.path or "")
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(suffixes))
    else:
        files = sorted(Path(p) for p in glob.glob(str(cfg.path), recursive=True) if Path(p).is_file())
    if not files:
        raise DataError(f"data.path={cfg.path!r} matches no {'/'.join(suffixes)} files for data.source={cfg.source!r}")
    return files


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"data.path file {str(path)!r} is not UTF-8 text (binary file?)") from None


def _split_filter(docs: Iterator[str], split: str, fraction: float) -> Iterator[str]:
    want_heldout = split == "heldout"
    for i, doc in enumerate(docs):
        if _is_heldout(i, fraction) == want_heldout:
            yield doc


def _text_docs(cfg: DataConfig) -> Iterator[str]:
    # One file is one document: a pre-training corpus of .txt files usually stores one per file.
    for path in _files(cfg, (".txt", ".md")):
        text = _read_text(path)
        if "\x00" in text:
            raise DataError(f"data.path file {str(path)!r} contains NUL bytes; expected plain text")
        if text.strip():
            yield text


def _jsonl_docs(cfg: DataConfig) -> Iterator[str]:
    for path in _files(cfg, (".jsonl", ".json")):
        with path.open(encoding="utf-8", errors="strict") as fh:
            try:
                for line_no, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        raise DataError(f"data.path file {str(path)!r} line {line_no} is not valid JSON") from None
                    if not isinstance(record, dict) or cfg.text_field not in record:
                        raise DataError(
                            f"data.text_field={cfg.text_field!r} is missing in {str(path)!r} line {line_no}"
                        )
                    text = record[cfg.text_field]
                    if isinstance(text, str) and text.strip():
                        yield text
            except UnicodeDecodeError:
                raise DataError(f"data.path file {str(path)!r} is not UTF-8 JSON lines (binary file?)") from None


def _parquet_docs(cfg: DataConfig) -> Iterator[str]:
    import pyarrow.parquet as pq

    for path in _files(cfg, (".parquet",)):
        try:
            pf = pq.ParquetFile(path)
        except Exception as exc:  # pyarrow raises several unrelated types for a bad file
            raise DataError(f"data.path file {str(path)!r} is not a readable parquet file: {str(exc).splitlines()[0]}") from None
        if cfg.text_field not in pf.schema_arrow.names:
            raise DataError(
                f"data.text_field={cfg.text_field!r} is not a column of {str(path)!r}; columns: {', '.join(pf.schema_arrow.names)}"
            )
        for batch in pf.iter_batches(columns=[cfg.text_field], batch_size=1024):
            for text in batch.column(0).to_pylist():
                if isinstance(text, str) and text.strip():
                    yield text


def _hf_docs(cfg: DataConfig) -> Iterator[str]:
    import datasets

    try:
        ds = datasets.load_dataset(cfg.path, split=cfg.hf_split, streaming=True)
    except Exception as exc:  # offline, unknown name, missing split: all surface as one line
        raise DataError(
            f"data.path={cfg.path!r} (a datasets dataset) cannot be loaded: {str(exc).splitlines()[0][:200]}; "
            "download it once with network access (it is then cached) or export it to jsonl/parquet"
        ) from None
    for record in ds:
        text = record.get(cfg.text_field)
        if text is None:
            raise DataError(f"data.text_field={cfg.text_field!r} is not a column of dataset {cfg.path!r}")
        if isinstance(text, str) and text.strip():
            yield text


def iter_documents(cfg: DataConfig, split: str) -> Iterator[str]:
    """Yield the documents of one split of the configured source, in a deterministic order."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if cfg.source == "builtin":
        from pd_lightning.data import corpus

        yield from corpus.iter_documents(split, seed=cfg.corpus_seed)
        return
    readers = {"text": _text_docs, "jsonl": _jsonl_docs, "parquet": _parquet_docs, "hf": _hf_docs}
    yield from _split_filter(readers[cfg.source](cfg), split, cfg.heldout_fraction)
