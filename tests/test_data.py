"""Corpus sources, tokenizer, packing into token shards: determinism, no-op re-runs, corruption."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pd_lightning.config import load_config
from pd_lightning.data.prepare import prepare
from pd_lightning.data.shards import TokenShards, read_manifest
from pd_lightning.data.tokenizer import load_tokenizer, tokenizer_hash
from pd_lightning.errors import ConfigError, DataError


SMALL = ["data.train_tokens=60000", "data.heldout_tokens=6000", "data.vocab_size=400",
         "data.tokenizer_train_chars=150000", "data.seq_len=32", "data.sequences_per_shard=500"]


def small_cfg(out: Path, *extra: str):
    return load_config("tiny", [*SMALL, f"data.out={out}", *extra]).data


def test_prepared_dataset_is_consistent(tiny_data):
    manifest = read_manifest(tiny_data)
    train, held = TokenShards(tiny_data, "train"), TokenShards(tiny_data, "heldout")
    assert len(train) == 300000 // 64 and len(held) == 20000 // 64
    assert manifest["vocab_size"] == 512 and manifest["dtype"] == "<u2"
    tok = load_tokenizer(tiny_data / "tokenizer")
    assert tokenizer_hash(tok) == manifest["tokenizer_hash"]
    seq = train[3]
    assert seq.shape == (64,) and seq.max() < 512
    text = tok.decode(seq)
    assert len(text) > 64  # real text, multi-character tokens
    train.verify()
    held.verify()
    # document separators are present: packing keeps EOS between documents
    assert (np.concatenate([train[i] for i in range(50)]) == manifest["eos_token_id"]).sum() > 0


def test_same_config_gives_byte_identical_shards(tmp_path):
    a = prepare(small_cfg(tmp_path / "a"))
    b = prepare(small_cfg(tmp_path / "b"))
    files = sorted(p.name for p in a.glob("*.bin"))
    assert len(files) >= 3  # several train shards + held-out
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "tokenizer" / "tokenizer.json").read_bytes() == (b / "tokenizer" / "tokenizer.json").read_bytes()
    assert (a / "manifest.json").read_bytes() == (b / "manifest.json").read_bytes()


def test_rerun_is_noop_and_other_config_refused(tmp_path, pdl_log):
    out = prepare(small_cfg(tmp_path / "d"))
    stamp = (out / "train-00000.bin").stat().st_mtime_ns
    prepare(small_cfg(tmp_path / "d"))
    assert "nothing to do" in pdl_log.text
    assert (out / "train-00000.bin").stat().st_mtime_ns == stamp
    with pytest.raises(ConfigError, match="different dataset"):
        prepare(small_cfg(tmp_path / "d", "data.seq_len=48"))


def test_killed_run_leftovers_are_not_trusted(tmp_path):
    reference = prepare(small_cfg(tmp_path / "ref"))
    out = tmp_path / "killed"
    out.mkdir()
    (out / "train-00000.bin").write_bytes(b"\x00" * 10)  # a torn shard from a killed run (no manifest)
    (out / ".train-00001.bin.tmp").write_bytes(b"junk")
    prepare(small_cfg(out))
    assert (out / "train-00000.bin").read_bytes() == (reference / "train-00000.bin").read_bytes()
    assert not list(out.glob(".*.tmp"))


def test_refuses_foreign_nonempty_output(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    with pytest.raises(ConfigError, match="non-empty directory"):
        prepare(small_cfg(out))
    assert (out / "thesis.tex").read_text() == "precious"


def test_truncated_or_corrupt_shard_is_detected(tmp_path):
    out = prepare(small_cfg(tmp_path / "c"))
    shard = out / "train-00001.bin"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match="train-00001.bin.*checksum"):
        TokenShards(out, "train").verify()
    shard.write_bytes(bytes(data[:-2]))
    with pytest.raises(DataError, match="train-00001.bin.*truncated"):
        TokenShards(out, "train")
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="corrupt manifest"):
        TokenShards(out, "train")


def test_local_jsonl_text_and_parquet_sources(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = [f"Document number {i} talks about the river {i % 7} and the hill {i % 5}. " * 3 for i in range(400)]
    jl = tmp_path / "corpus.jsonl"
    jl.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    txt_dir = tmp_path / "txt"
    txt_dir.mkdir()
    for i, d in enumerate(docs):
        (txt_dir / f"{i:04d}.txt").write_text(d)
    pq.write_table(pa.table({"content": docs}), tmp_path / "corpus.parquet")
    common = ["data.train_tokens=4000", "data.heldout_tokens=200", "data.vocab_size=300", "data.seq_len=16",
              "data.heldout_fraction=0.1"]
    outs = {}
    for name, extra in {
        "jsonl": ["data.source=jsonl", f"data.path={jl}"],
        "text": ["data.source=text", f"data.path={txt_dir}"],
        "parquet": ["data.source=parquet", f"data.path={tmp_path / 'corpus.parquet'}", "data.text_field=content"],
    }.items():
        cfg = load_config(None, [*common, *extra, f"data.out={tmp_path / ('out-' + name)}"]).data
        outs[name] = prepare(cfg)
        assert len(TokenShards(outs[name], "train")) == 4000 // 16
        assert len(TokenShards(outs[name], "heldout")) >= 1
    # the same documents in the same order give the same shards whatever the container format
    assert (outs["jsonl"] / "train-00000.bin").read_bytes() == (outs["parquet"] / "train-00000.bin").read_bytes()


@pytest.mark.parametrize(
    "setup,needle",
    [
        (lambda p: (p / "empty.jsonl").write_text(""), "too little text"),
        (lambda p: (p / "bin.jsonl").write_bytes(bytes(range(256)) * 10), "not UTF-8"),
        (lambda p: (p / "bad.jsonl").write_text('{"text": "a"}\n{oops\n'), "line 2 is not valid JSON"),
        (lambda p: (p / "nofield.jsonl").write_text('{"body": "a"}\n'), "data.text_field='text' is missing"),
    ],
)
def test_bad_corpora_are_refused_with_one_line(tmp_path, setup, needle):
    setup(tmp_path)
    path = next(tmp_path.glob("*.jsonl"))
    cfg = load_config(None, ["data.source=jsonl", f"data.path={path}", "data.vocab_size=300",
                             f"data.out={tmp_path / 'out'}"]).data
    with pytest.raises(DataError) as info:
        prepare(cfg)
    assert needle in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_external_tokenizer_dir_is_used_as_is(tiny_data, tmp_path):
    cfg = load_config("tiny", [*SMALL, f"data.tokenizer={tiny_data / 'tokenizer'}", f"data.out={tmp_path / 'x'}"]).data
    out = prepare(cfg)
    assert read_manifest(out)["tokenizer_hash"] == read_manifest(tiny_data)["tokenizer_hash"]
    assert read_manifest(out)["vocab_size"] == 512  # the given tokenizer's, not data.vocab_size
