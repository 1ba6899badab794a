"""Tokenizers: any local HF tokenizer dir (a teacher's), or a byte-level BPE trained on the corpus.

The trained BPE is saved as an ordinary HF tokenizer dir, so `AutoTokenizer.from_pretrained`
(lm-eval, vLLM, anything) loads it. Its identity is `tokenizer_hash`: a hash of the serialised
tokenizer pipeline, so two dirs with the same vocabulary and merges hash equal however they were
written, and shards, stores and models that disagree are refused before any compute.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from pd_lightning.errors import DataError

EOS_TOKEN = "<|endoftext|>"  # separates documents in packed sequences; also BOS and PAD


def train_bpe(texts: Iterator[str], vocab_size: int, out_dir: str | Path) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts` and save it as a HF tokenizer dir (atomically)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tokenizer-", dir=out_dir.parent))
    hf.save_pretrained(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return hf


def load_tokenizer(path: str | Path, what: str = "data.tokenizer") -> PreTrainedTokenizerBase:
    """Load a local HF tokenizer dir, refusing anything we could not hash or pack with."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{what}={str(path)!r} is not a directory; expected a Hugging Face tokenizer dir")
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # transformers raises many types for a broken dir
        raise DataError(f"{what}={str(path)!r} is not a loadable tokenizer dir: {str(exc).splitlines()[0][:160]}") from None
    if not getattr(tok, "is_fast", False):
        raise DataError(f"{what}={str(path)!r} has no fast (tokenizers) tokenizer; save it with tokenizer.json")
    if tok.eos_token_id is None:
        raise DataError(f"{what}={str(path)!r} defines no eos_token; documents could not be separated when packing")
    return tok


def tokenizer_hash(tok: PreTrainedTokenizerBase) -> str:
    """A stable identity of a tokenizer's vocabulary, merges and pipeline."""
    blob = tok.backend_tokenizer.to_str().encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


def vocab_size_of(tok: PreTrainedTokenizerBase) -> int:
    """Number of token ids the tokenizer can emit (base vocabulary plus added tokens)."""
    return len(tok)
