"""`pdl data prepare`: documents -> tokenizer -> packed fixed-length token shards + manifest.

Documents are tokenized, each followed by the EOS token, concatenated into one stream and cut into
`seq_len` tokens per sequence (the paper's pre-training packing; the tail shorter than one sequence
is dropped). The same config gives byte-identical shards. A finished output with the same config
is a no-op; a killed run leaves only temporary files and no manifest, and the next run starts over.
"""

from __future__ import annotations

import itertools
import logging
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from pd_lightning.config import DataConfig, config_hash
from pd_lightning.data.shards import FORMAT, MANIFEST, VERSION, ShardWriter, read_manifest, token_dtype, write_json_atomic
from pd_lightning.data.sources import iter_documents
from pd_lightning.data.tokenizer import load_tokenizer, tokenizer_hash, train_bpe, vocab_size_of
from pd_lightning.errors import ConfigError, DataError
from pd_lightning.progress import ProgressBar

log = logging.getLogger(__name__)

ENCODE_BATCH_DOCS = 512


def data_hash(cfg: DataConfig) -> str:
    """Identity of a dataset: every field that changes the shards' bytes (not where they are written)."""
    fields = {k: v for k, v in vars(cfg).items() if k != "out"}
    if cfg.tokenizer:
        fields["tokenizer"] = tokenizer_hash(load_tokenizer(cfg.tokenizer))
    return config_hash(fields)


def _take_chars(docs: Iterator[str], limit: int) -> Iterator[str]:
    total = 0
    for doc in docs:
        yield doc
        total += len(doc)
        if total >= limit:
            return


def _looks_like_ours(out: Path) -> bool:
    """True when every entry of `out` is something `prepare` writes (safe to overwrite after a kill)."""
    for entry in out.iterdir():
        name = entry.name
        if name in {"tokenizer", MANIFEST, "prepare_stats.json"} or name.startswith(".") or (
            name.endswith(".bin") and name.split("-")[0] in {"train", "heldout"}
        ):
            continue
        return False
    return True


def prepare(cfg: DataConfig) -> Path:
    """Prepare (or reuse) the dataset described by `cfg`; return its directory."""
    out = Path(cfg.out)
    digest = data_hash(cfg)
    if (out / MANIFEST).is_file():
        manifest = read_manifest(out)
        if manifest.get("config_hash") == digest:
            log.info(f"data: {out} is already prepared (config {digest}); nothing to do")
            return out
        raise ConfigError(
            f"data.out={str(out)!r} already holds a different dataset (config {manifest.get('config_hash')}, "
            f"this one is {digest}); choose another data.out or delete that directory"
        )
    if out.exists() and not out.is_dir():
        raise ConfigError(f"data.out={str(out)!r} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not _looks_like_ours(out):
        raise ConfigError(f"data.out={str(out)!r} is a non-empty directory that is not a prepared dataset; choose an empty one")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        return _prepare_into(cfg, out, digest)
    except BaseException:
        if created:  # leave nothing half-written behind for a run that failed or was interrupted
            shutil.rmtree(out, ignore_errors=True)
        raise


def _prepare_into(cfg: DataConfig, out: Path, digest: str) -> Path:
    for stale in itertools.chain(out.glob("*.bin"), out.glob(".*.tmp")):  # leftovers of a killed run
        stale.unlink()
    started = time.perf_counter()

    tok_dir = out / "tokenizer"
    if cfg.tokenizer:
        tok = load_tokenizer(cfg.tokenizer)
        if tok_dir.exists():
            shutil.rmtree(tok_dir)
        tok.save_pretrained(tok_dir)
    else:
        sample = _take_chars(iter_documents(cfg, "train"), cfg.tokenizer_train_chars)
        tok = train_bpe(sample, cfg.vocab_size, tok_dir)
    vocab = vocab_size_of(tok)
    eos = int(tok.eos_token_id)
    dtype = token_dtype(vocab)
    backend = tok.backend_tokenizer

    budgets = {"train": cfg.train_tokens // cfg.seq_len, "heldout": cfg.heldout_tokens // cfg.seq_len}
    splits = {}
    documents = {}
    for split, max_sequences in budgets.items():
        writer = ShardWriter(out, split, cfg.seq_len, dtype, cfg.sequences_per_shard, max_sequences)
        docs = iter_documents(cfg, split)
        n_docs = 0
        with ProgressBar(max_sequences * cfg.seq_len, "tokens", f"prepare {split}") as bar:
            while not writer.full:
                batch = list(itertools.islice(docs, ENCODE_BATCH_DOCS))
                if not batch:
                    break
                encodings = backend.encode_batch(batch, add_special_tokens=False)
                pieces = []
                for enc in encodings:
                    pieces.append(np.asarray(enc.ids, dtype=np.int64))
                    pieces.append(np.array([eos], dtype=np.int64))
                stream = np.concatenate(pieces)
                n_docs += len(batch)
                before = writer.num_sequences
                writer.add(stream)
                bar.advance((writer.num_sequences - before) * cfg.seq_len)
        splits[split] = writer.close()
        documents[split] = n_docs
        if splits[split]["num_sequences"] == 0:
            source = f"data.source={cfg.source!r}" + (f" (data.path={cfg.path!r})" if cfg.path else "")
            raise DataError(
                f"{source} yielded too little text for one {split} sequence of "
                f"data.seq_len={cfg.seq_len} tokens (empty corpus?)"
            )
    seconds = time.perf_counter() - started
    total_tokens = sum(s["num_tokens"] for s in splits.values())
    write_json_atomic(out / "prepare_stats.json", {
        "seconds": round(seconds, 3), "tokens_per_s": round(total_tokens / seconds), "documents": documents,
    })
    write_json_atomic(out / MANIFEST, {
        "format": FORMAT,
        "version": VERSION,
        "config_hash": digest,
        "source": {k: v for k, v in vars(cfg).items() if k != "out"},
        "tokenizer_hash": tokenizer_hash(tok),
        "vocab_size": vocab,
        "eos_token_id": eos,
        "seq_len": cfg.seq_len,
        "dtype": dtype.str,
        "splits": splits,
    })
    log.info(f"data: wrote {total_tokens:,} tokens ({splits['train']['num_sequences']:,} train + "
             f"{splits['heldout']['num_sequences']:,} held-out sequences of {cfg.seq_len}) to {out} "
             f"in {seconds:.1f}s ({total_tokens / seconds:,.0f} tokens/s); vocab {vocab}")
    return out
