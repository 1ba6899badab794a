"""Logit store: round trip within the stated bounds, resume, multi-rank, corruption, compatibility.

ctxans (`logits.encoding=ctxans`) codes egsqrt's quantised symbols, so its tests compare its decoded
entries with egsqrt's bit for bit, on LLM-like data and on data whose supports recur (the case its
support clusters are for)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pd_lightning.errors import DataError
from pd_lightning.logits import codec, ctxans
from pd_lightning.logits.processing import SparseLogits, narrow, teacher_targets, truncate_top_p_k
from pd_lightning.logits.store import LogitStore, check_compatible, inspect_store, verify_store
from pd_lightning.logits.writer import AsyncShardWriter, LogitStoreWriter

V, P, N = 3000, 16, 11


def llm_like_logits(n_tok: int, vocab: int, seed: int, zipf: bool = True) -> torch.Tensor:
    """Gumbel noise + Zipfian log-popularity, per-token sharpness: peaked and flat tokens, low ids favoured."""
    g = torch.Generator().manual_seed(seed)
    gumbel = -torch.log(-torch.log(torch.rand(n_tok, vocab, generator=g).clamp(1e-12, 1 - 1e-7)))
    base = -1.1 * torch.log(torch.arange(1, vocab + 1, dtype=torch.float32)) if zipf else torch.zeros(vocab)
    sharp = torch.exp(torch.randn(n_tok, 1, generator=g) * 0.5 + math.log(1.8))
    return sharp * (gumbel + base)


def clustered_logits(n_tok: int, vocab: int, seed: int, topics: int = 6) -> torch.Tensor:
    """Supports that recur: each token draws one of a few topics, each preferring its own ids (as a real teacher's
    word-start positions share one support, its mid-word positions another), plus Gumbel noise."""
    g = torch.Generator().manual_seed(seed)
    pref = torch.randn(topics, vocab, generator=g) * 4
    topic = torch.randint(0, topics, (n_tok,), generator=g)
    gumbel = -torch.log(-torch.log(torch.rand(n_tok, vocab, generator=g).clamp(1e-12, 1 - 1e-7)))
    return torch.exp(torch.randn(n_tok, 1, generator=g) * 0.3) * (pref[topic] + gumbel)


def writer(path, encoding="egsqrt", n=N, per_shard=3, rank=0, world=1, **kw) -> LogitStoreWriter:
    args = dict(vocab_size=V, p=0.95, k=40, positions_per_sequence=P, num_sequences=n, sequences_per_shard=per_shard,
                teacher="teachers/tiny", teacher_config_hash="cfg123", tokenizer_hash="tok456", encoding=encoding,
                rank=rank, world_size=world)
    args.update(kw)
    return LogitStoreWriter(path, **args)


@pytest.fixture(scope="module")
def logits() -> torch.Tensor:
    return llm_like_logits(N * P, V, seed=1).reshape(N, P, V)


@pytest.fixture(scope="module")
def sparse(logits) -> SparseLogits:
    return truncate_top_p_k(logits, 0.95, 40)


@pytest.fixture(scope="module")
def clustered() -> SparseLogits:
    """64 sequences (1,024 tokens) whose supports cluster: enough for ctxans to fit clusters."""
    return truncate_top_p_k(clustered_logits(NC * P, V, seed=5), 0.95, 40)


NC = 64  # sequences of the clustered data


def build(path, sparse, encoding="egsqrt", batches=(0, 4, 7, 11), **kw) -> dict:
    w = writer(path, encoding, **kw)
    for a, b in zip(batches[:-1], batches[1:]):
        w.write_sequences(a, sparse.rows(a * P, b * P))
    return w.finalize(meta={"run": "test"})


def by_id(s: SparseLogits) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, logprobs) of each row sorted by id, padding (id V) last."""
    ids = torch.where(torch.isfinite(s.logprobs), s.indices, V)
    ids, order = torch.sort(ids, 1)
    return ids, torch.gather(s.logprobs, 1, order)


def support_kl(exact: SparseLogits, decoded: SparseLogits) -> torch.Tensor:
    """KL(exact truncated || decoded) per token, both renormalised on the (identical) kept set."""
    ia, la = by_id(exact)
    ib, lb = by_id(decoded)
    assert torch.equal(ia, ib)
    la, lb = torch.log_softmax(la, 1), torch.log_softmax(lb, 1)
    return torch.where(torch.isfinite(la), la.exp() * (la - lb), torch.zeros_like(la)).sum(1)


@pytest.mark.parametrize("encoding", ["ctxans", "egsqrt", "fixed"])
def test_round_trip_within_bounds(tmp_path, sparse, encoding):
    build(tmp_path, sparse, encoding)
    store = LogitStore(tmp_path)
    assert len(store) == N and store.k == 40 and store.manifest["meta"] == {"run": "test"}
    ids = [10, 0, 3, 3, 7]
    got = store.sequences(ids)
    want = SparseLogits.cat([sparse.rows(i * P, (i + 1) * P) for i in ids])
    assert got.indices.shape == (len(ids) * P, 40)
    assert torch.equal(got.counts, want.counts)
    ia, la = by_id(want)
    ib, lb = by_id(got)
    assert torch.equal(ia, ib)  # indices exact
    fin = torch.isfinite(la)
    if encoding == "fixed":
        assert torch.equal(got.indices, want.indices)  # order kept as written
        assert (la[fin] - lb[fin]).abs().max() <= 2**-11 + 1e-6
    else:  # egsqrt and ctxans: the same quantisation
        step = store.manifest["encoding"]["value_step"]
        mass = torch.logsumexp(la, 1, keepdim=True)
        err = (torch.exp((la - mass) / 2) - torch.exp((lb - mass) / 2))[fin].abs().max()
        assert err <= step / 2 * 1.01 + 1e-4  # |sqrt(r) - sqrt(r')| <= δ/2 (+ mass rounding)
        assert support_kl(want, got).mean() <= 1e-4
    # descending rows, -inf / 0 padding
    lp = got.logprobs
    assert torch.all(lp[:, :-1] >= lp[:, 1:])  # -inf >= -inf holds in the padding
    pad = ~torch.isfinite(lp)
    assert torch.equal(pad.sum(1), 40 - got.counts) and torch.all(got.indices[pad] == 0)
    torch.testing.assert_close(got.entropy, want.entropy, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(got.logit_std, want.logit_std, rtol=2e-3, atol=2e-3)
    one = store.sequence(3)
    assert torch.equal(one.indices, got.indices[2 * P : 3 * P])
    # the store feeds teacher_targets: narrower (p, k) and τ from stored entries
    t = teacher_targets(one, 0.9, 20, tau=2.0, store_p=store.p, store_k=store.k)
    torch.testing.assert_close(t.probs.sum(1), torch.ones(P))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.integers(1, 300), p=st.floats(0.1, 1.0), zipf=st.booleans(),
       encoding=st.sampled_from(["egsqrt", "fixed"]))
def test_codec_round_trip_property(seed, k, p, zipf, encoding):
    z = llm_like_logits(3 * 5, 700, seed, zipf)
    s = truncate_top_p_k(z, p, k)
    kk = min(k, 700)
    e = codec.encode(s, 5, 700, kk, encoding, 1 / 384)
    off = codec._excl_cumsum(e.chunk_sizes.astype(np.int64)).astype(np.uint64)
    d = codec.decode(e.counts, e.params, e.mass, e.stats, off, e.payload, np.array([2, 0]), 5, 700, kk, encoding, 1 / 384)
    want = SparseLogits.cat([s.rows(10, 15), s.rows(0, 5)]).pad_to(kk)
    assert torch.equal(d.counts, want.counts)
    ia, la = by_id(want)
    ib, lb = by_id(d)
    assert torch.equal(ia, ib)
    fin = torch.isfinite(la)
    assert torch.equal(fin, torch.isfinite(lb))
    if encoding == "egsqrt":
        mass = torch.logsumexp(la, 1, keepdim=True)
        assert (torch.exp((la - mass) / 2) - torch.exp((lb - mass) / 2))[fin].abs().max() <= 1 / 768 * 1.01 + 1e-4


def test_compactness_on_llm_like_distribution(tmp_path):
    z = llm_like_logits(8 * 64, 151_552, seed=3)
    s = truncate_top_p_k(z, 0.95, 100)
    w = LogitStoreWriter(tmp_path, vocab_size=151_552, p=0.95, k=100, positions_per_sequence=64, num_sequences=8,
                         sequences_per_shard=8, teacher="t", teacher_config_hash="c", tokenizer_hash="h")
    w.write_sequences(0, s)
    w.finalize()
    info = inspect_store(tmp_path)
    assert info["checksums_ok"] is True
    assert info["bytes_per_entry"] <= 2.5, info
    assert support_kl(s, LogitStore(tmp_path).sequences(range(8))).mean() <= 1e-4


@pytest.mark.parametrize("encoding", ["egsqrt", "ctxans"])
def test_resume_is_byte_identical(tmp_path, sparse, encoding):
    ref, run = tmp_path / "ref", tmp_path / "run"
    build(ref, sparse, encoding)
    w = writer(run, encoding)
    assert w.pending_shards() == [0, 1, 2, 3]
    w.write_sequences(0, sparse.rows(0, 7 * P))  # shards 0, 1 finished; shard 2 half-buffered, then "killed"
    assert sorted(w.finished) == [0, 1]
    (run / "shard-000002.bin.tmp").write_bytes(b"torn half-written shard")
    (run / "shard-000003.bin").write_bytes(b"renamed but sidecar never written")
    (run / "shard-000001.json.tmp").write_bytes(b"{")
    del w
    w = writer(run, encoding)
    assert w.pending_shards() == [2, 3]
    assert not (run / "shard-000002.bin.tmp").exists() and not (run / "shard-000003.bin").exists()
    with pytest.raises(ValueError, match="not pending"):
        w.write_sequences(0, sparse.rows(0, P))
    w.write_sequences(6, sparse.rows(6 * P, 11 * P))
    w.finalize(meta={"run": "test"})
    names = sorted(os.listdir(ref))
    assert names == sorted(os.listdir(run))
    for name in names:
        assert (ref / name).read_bytes() == (run / name).read_bytes(), name


@pytest.mark.parametrize("encoding", ["egsqrt", "ctxans"])
def test_multi_rank_equals_single_rank(tmp_path, sparse, encoding):
    ref, run = tmp_path / "ref", tmp_path / "run"
    build(ref, sparse, encoding)
    ranks = [writer(run, encoding, rank=r, world=2) for r in range(2)]
    assert ranks[0].pending_shards() == [0, 2] and ranks[1].pending_shards() == [1, 3]
    assert ranks[0].write_sequences(0, sparse.rows(0, 3 * P)) == [0]
    with pytest.raises(DataError, match=r"shards \[1, 2, 3\] are not written yet"):
        ranks[0].finalize()
    for r, w in enumerate(ranks):
        for s in w.pending_shards():
            rng = w.shard_range(s)
            with AsyncShardWriter(w) as aw:
                aw.submit(rng.start, sparse.rows(rng.start * P, rng.stop * P))
    ranks[0].finalize(meta={"run": "test"})
    for name in sorted(os.listdir(ref)):
        assert (ref / name).read_bytes() == (run / name).read_bytes(), name


def test_async_writer_truncates_dense_logits(tmp_path, logits, sparse):
    w = writer(tmp_path)
    with AsyncShardWriter(w, max_pending=1) as aw:
        for a in range(0, N, 2):
            aw.submit(a, logits[a : a + 2])
    w.finalize(meta={"run": "test"})
    build(tmp_path / "ref", sparse)
    assert (tmp_path / "shard-000003.bin").read_bytes() == (tmp_path / "ref" / "shard-000003.bin").read_bytes()
    w2 = writer(tmp_path / "err")
    aw = AsyncShardWriter(w2)
    aw.submit(N, sparse.rows(0, P))  # out of range: the error surfaces in the caller's thread
    with pytest.raises(ValueError, match="outside"):
        aw.close()


def test_resume_refuses_other_settings(tmp_path, sparse):
    w = writer(tmp_path)
    w.write_sequences(0, sparse.rows(0, 3 * P))
    with pytest.raises(DataError, match="p=0.95.*p=0.9"):
        writer(tmp_path, p=0.9)
    with pytest.raises(DataError, match="tokenizer_hash"):
        writer(tmp_path, tokenizer_hash="other")


def flip_bit(path: Path, byte: int, bit: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[byte] ^= 1 << bit
    path.write_bytes(bytes(data))


def test_truncated_shard_refused_on_open_and_by_verify(tmp_path, sparse):
    build(tmp_path, sparse)
    shard = tmp_path / "shard-000001.bin"
    data = shard.read_bytes()
    shard.write_bytes(data[:-5])
    with pytest.raises(DataError, match="shard-000001.bin"):
        LogitStore(tmp_path)
    with pytest.raises(DataError, match="shard-000001.bin"):
        verify_store(tmp_path)
    shard.unlink()
    with pytest.raises(DataError, match="shard-000001.bin.*missing"):
        LogitStore(tmp_path)


@pytest.mark.parametrize("encoding", ["egsqrt", "ctxans"])
def test_every_bit_flip_detected(tmp_path, sparse, encoding):
    build(tmp_path, sparse, encoding)
    verify_store(tmp_path, deep=True)
    shard = tmp_path / "shard-000002.bin"
    clean = shard.read_bytes()
    rng = np.random.default_rng(0)
    # header, columns and payload: every single flip must be caught, and the shard named
    for byte in [0, 9, 20, 100, len(clean) - 1] + rng.integers(0, len(clean), 12).tolist():
        flip_bit(shard, int(byte), int(rng.integers(0, 8)))
        with pytest.raises(DataError, match="shard-000002.bin"):
            verify_store(tmp_path)
        assert inspect_store(tmp_path)["bad_shard"] == "shard-000002.bin"
        shard.write_bytes(clean)
    assert verify_store(tmp_path)["checksums_ok"] is True


@pytest.mark.parametrize("encoding", ["ctxans", "egsqrt", "fixed"])
def test_reader_fails_only_with_data_error_on_random_flips(tmp_path, sparse, encoding):
    build(tmp_path, sparse, encoding)
    shard = tmp_path / "shard-000001.bin"
    clean = shard.read_bytes()
    rng = np.random.default_rng(1)
    for _ in range(60):
        data = bytearray(clean)
        for i in rng.integers(0, len(data), 3):
            data[int(i)] ^= 1 << int(rng.integers(0, 8))
        shard.write_bytes(bytes(data))
        try:  # without checksums a flip may decode silently, but must never crash another way
            LogitStore(tmp_path).sequences(range(3, 6))
        except DataError as e:
            assert "shard-000001.bin" in str(e)
        with pytest.raises(DataError, match="shard-000001.bin"):
            LogitStore(tmp_path, verify_checksums=True).sequences(range(3, 6))


def test_header_corruption_refused_on_access(tmp_path, sparse):
    build(tmp_path, sparse)
    shard = tmp_path / "shard-000000.bin"
    data = bytearray(shard.read_bytes())
    i = data.index(b'"num_sequences": 3')
    data[i + len('"num_sequences": ')] = ord("4")  # same size, wrong structure
    shard.write_bytes(bytes(data))
    store = LogitStore(tmp_path)  # sizes agree: open succeeds lazily
    with pytest.raises(DataError, match="shard-000000.bin.*num_sequences"):
        store.sequence(0)
    assert LogitStore(tmp_path).sequence(5).counts.shape == (P,)  # other shards still readable
    with pytest.raises(DataError, match="checksum"):
        LogitStore(tmp_path, verify_checksums=True).sequence(1)


def test_missing_or_broken_manifest(tmp_path, sparse):
    w = writer(tmp_path)
    w.write_sequences(0, sparse.rows(0, 3 * P))
    with pytest.raises(DataError, match="manifest.json is missing.*resume"):
        LogitStore(tmp_path)
    with pytest.raises(DataError, match="not written yet"):
        w.finalize()
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        LogitStore(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "x"}))
    with pytest.raises(DataError, match="lacks fields"):
        LogitStore(tmp_path)


def test_check_compatible(tmp_path, sparse):
    manifest = build(tmp_path, sparse)
    check_compatible(manifest, V, "tok456")
    with pytest.raises(DataError, match="vocab_size=3000.*vocab_size=32000"):
        check_compatible(manifest, 32000, "tok456")
    with pytest.raises(DataError, match="tokenizer_hash='tok456'.*tokenizer_hash='zzz'"):
        check_compatible(manifest, V, "zzz")


def test_store_serves_narrower_truncations(tmp_path, sparse):
    build(tmp_path, sparse, "fixed")
    store = LogitStore(tmp_path)
    got = narrow(store.sequences(range(N)), 0.8, 10, store_p=0.95, store_k=40)
    direct = narrow(sparse, 0.8, 10, store_p=0.95, store_k=40)
    # decoded values differ by <= 2^-11 nats: counts agree except within that of the p boundary
    assert (got.counts != direct.counts).float().mean() < 0.02


def test_writer_rejects_bad_settings(tmp_path):
    from pd_lightning.errors import ConfigError

    for kw, field in ((dict(encoding="zstd"), "logits.encoding='zstd'"), (dict(p=0.0), "logits.p=0.0"),
                      (dict(k=0), "logits.k=0"), (dict(value_step=1e-9), "logits.value_step"),
                      (dict(rank=2, world=2), "rank=2")):
        with pytest.raises(ConfigError, match=field):
            writer(tmp_path / "w", **kw)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 40))
def test_read_fields_matches_a_bit_by_bit_reader(seed, n_bytes):
    """The unaligned 8-byte gather reads the same MSB-first fields as reading bits one at a time,
    at every bit offset up to the buffer's last byte (the 8 padding bytes are zeros)."""
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, n_bytes, dtype=np.uint8)
    buf = np.concatenate([data, np.zeros(8, np.uint8)])
    bits = np.unpackbits(data)
    width = rng.integers(1, codec.MAX_FIELD_BITS + 1, 50)
    pos = rng.integers(0, len(bits), 50)
    expected = [int("".join(map(str, np.concatenate([bits, np.zeros(64, np.uint8)])[p:p + w])), 2)
                for p, w in zip(pos, width)]
    assert codec._read_fields(buf, pos.astype(np.int64), width.astype(np.int64)).tolist() == expected


def test_opening_a_store_keeps_freed_memory_on_glibc():
    import platform

    from pd_lightning.logits.store import keep_freed_memory_for_reuse

    applied = keep_freed_memory_for_reuse()
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc" and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        assert applied


def test_power_sums_round_trip_and_serve_wttm(tmp_path, logits):
    """A store asked for power sums keeps log Σ q^a per token (fp16) and serves WTTM's full-vocabulary weight."""
    exps = (0.25, 0.5)
    s = truncate_top_p_k(logits, 0.95, 40, power_exponents=exps)
    build(tmp_path, s, power_exponents=exps)
    store = LogitStore(tmp_path)
    assert store.power_exponents == exps and store.manifest["power_exponents"] == list(exps)
    got = store.sequences(range(N))
    assert got.power_exponents == exps
    z = logits.reshape(-1, V).double()
    for j, a in enumerate(exps):
        ref = torch.logsumexp(a * torch.log_softmax(z, -1), -1)
        np.testing.assert_allclose(got.log_power_sums[:, j].double().numpy(), ref.numpy(), rtol=1e-3, atol=1e-3)
    t = teacher_targets(got, 0.9, 20, method="wttm", store_p=0.95, store_k=40, gamma=0.5)
    u = (torch.softmax(z, -1) ** 0.5).sum(-1)
    np.testing.assert_allclose(t.token_weights.double().numpy(), u.numpy(), rtol=2e-3)
    assert inspect_store(tmp_path)["power_exponents"] == list(exps)
    # the stats column grows by one float16 per exponent, nothing else changes
    plain = build(tmp_path / "plain", truncate_top_p_k(logits, 0.95, 40))
    assert store.manifest["total_bytes"] - plain["total_bytes"] == pytest.approx(N * P * 2 * len(exps), abs=8 * 4)
    with pytest.raises(ValueError, match="power sums"):
        writer(tmp_path / "other").write_sequences(0, s.rows(0, P))


def _build_v1(path: Path, sparse: SparseLogits, monkeypatch, **kw) -> None:
    """A store as the previous version wrote it: encoding v1 in every header, no power_exponents setting."""
    with monkeypatch.context() as m:
        m.setattr(codec, "ENCODING_VERSION", 1)
        build(path, sparse, **kw)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest.pop("power_exponents")
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_v1_stores_at_p_1_are_refused_and_at_p_below_1_still_read(tmp_path, logits, sparse, monkeypatch):
    _build_v1(tmp_path / "p095", sparse, monkeypatch)
    old = LogitStore(tmp_path / "p095").sequences(range(N))
    assert torch.equal(old.counts, sparse.counts) and old.power_exponents == ()
    _build_v1(tmp_path / "p1", truncate_top_p_k(logits, 1.0, 40), monkeypatch, p=1.0)
    with pytest.raises(DataError, match=r"made at p=1 by an earlier version.*pdl logits generate"):
        LogitStore(tmp_path / "p1")
    build(tmp_path / "p1v2", truncate_top_p_k(logits, 1.0, 40), p=1.0)
    assert int(LogitStore(tmp_path / "p1v2").sequences(range(N)).counts.min()) == 40


# ----------------------------------------------------------------------------- ctxans


def build_all(path, sparse, encoding, n, per_shard, step=5, **kw) -> dict:
    """A store of n sequences written `step` sequences at a time."""
    w = writer(path, encoding, n=n, per_shard=per_shard, **kw)
    for a in range(0, n, step):
        w.write_sequences(a, sparse.rows(a * P, min(a + step, n) * P))
    return w.finalize(meta={"run": "test"})


def assert_same_entries(a: SparseLogits, b: SparseLogits) -> None:
    for x, y in zip(a._tensors(), b._tensors()):
        assert torch.equal(x, y)
    assert (a.log_power_sums is None) == (b.log_power_sums is None)
    if a.log_power_sums is not None:
        assert torch.equal(a.log_power_sums, b.log_power_sums)


@pytest.mark.parametrize("data", ["llm_like", "clustered"])
def test_ctxans_decodes_egsqrts_entries_bit_for_bit_in_fewer_bytes(tmp_path, sparse, clustered, data):
    """ctxans codes egsqrt's symbols losslessly: the same decoded entries, so the same KL; and fewer bytes."""
    s, n = (sparse, N) if data == "llm_like" else (clustered, NC)
    m_new = build_all(tmp_path / "ctxans", s, "ctxans", n, per_shard=n // 2 + 1)
    m_old = build_all(tmp_path / "egsqrt", s, "egsqrt", n, per_shard=n // 2 + 1)
    new, old = LogitStore(tmp_path / "ctxans"), LogitStore(tmp_path / "egsqrt")
    ids = np.random.default_rng(0).permutation(n)
    assert_same_entries(new.sequences(ids), old.sequences(ids))
    assert m_new["encoding"]["name"] == "ctxans" and m_new["encoding"]["value_step"] == m_old["encoding"]["value_step"]
    clusters = [new._shard(i).model.clusters.n for i in range(len(m_new["shards"]))]
    ratio = m_new["total_bytes"] / m_old["total_bytes"]
    if data == "clustered":  # recurring supports: flags against fitted clusters (without them: 0.90 here)
        assert min(clusters) >= 2 and ratio < 0.85, (clusters, ratio)
    else:  # 88 tokens a shard: too few to fit clusters; the context model alone still beats Exp-Golomb
        assert max(clusters) == 0 and ratio < 0.95, (clusters, ratio)
    assert verify_store(tmp_path / "ctxans", deep=True)["checksums_ok"] is True


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.integers(1, 300), p=st.floats(0.1, 1.0),
       data=st.sampled_from(["zipf", "uniform", "clustered"]), n_seq=st.sampled_from([3, 64]),
       exps=st.sampled_from([(), (0.5,), (0.25, 2.0)]))
def test_ctxans_codec_matches_egsqrt_property(seed, k, p, data, n_seq, exps):
    """Any top-p-k cut, vocabulary use and power sums: ctxans decodes what egsqrt decodes, for any subset of sequences."""
    vocab, positions = 700, 5
    z = (clustered_logits(n_seq * positions, vocab, seed) if data == "clustered"
         else llm_like_logits(n_seq * positions, vocab, seed, zipf=data == "zipf"))
    s = truncate_top_p_k(z, p, k, power_exponents=exps)
    kk = min(k, vocab)
    enc = ctxans.encode_shard(ctxans.symbolize(s, positions, vocab, kk, 1 / 384), positions, vocab, kk, 1 / 384)
    model = ctxans.ShardModel.from_bytes(enc.model, ctxans.model_layout(kk, vocab, 1 / 384, 2 + len(exps)))
    off = codec._excl_cumsum(enc.chunk_sizes.astype(np.int64)).astype(np.uint64)
    eg = codec.encode(s, positions, vocab, kk, "egsqrt", 1 / 384)
    eoff = codec._excl_cumsum(eg.chunk_sizes.astype(np.int64)).astype(np.uint64)
    seqs = np.random.default_rng(seed).choice(n_seq, size=min(n_seq, 7), replace=False)
    got = ctxans.decode_arrays(model, enc.seq_entries, off, enc.payload, seqs, positions, vocab, kk, 1 / 384)
    want = codec.decode_arrays(eg.counts, eg.params, eg.mass, eg.stats, eoff, eg.payload, seqs, positions, vocab, kk,
                               "egsqrt", 1 / 384)
    for a, b in zip(got, want):
        assert (a is None and b is None) or np.array_equal(a, b)


def test_ctxans_with_clusters_resumes_byte_identical_and_ranks_agree(tmp_path, clustered):
    ref, run, ranks = tmp_path / "ref", tmp_path / "run", tmp_path / "ranks"
    build_all(ref, clustered, "ctxans", NC, per_shard=32, step=7)
    assert all(LogitStore(ref)._shard(i).model.clusters.n > 0 for i in range(2))
    w = writer(run, "ctxans", n=NC, per_shard=32)
    w.write_sequences(0, clustered.rows(0, 40 * P))  # shard 0 written, shard 1 part-buffered, then "killed"
    del w
    w = writer(run, "ctxans", n=NC, per_shard=32)
    assert w.pending_shards() == [1]
    w.write_sequences(32, clustered.rows(32 * P, NC * P))
    w.finalize(meta={"run": "test"})
    for r in range(2):
        wr = writer(ranks, "ctxans", n=NC, per_shard=32, rank=r, world=2)
        with AsyncShardWriter(wr) as aw:
            for s_ in wr.pending_shards():
                rng = wr.shard_range(s_)
                aw.submit(rng.start, clustered.rows(rng.start * P, rng.stop * P))
    wr.finalize(meta={"run": "test"})
    for name in sorted(os.listdir(ref)):
        assert (ref / name).read_bytes() == (run / name).read_bytes() == (ranks / name).read_bytes(), name


def test_ctxans_corruption_detected_and_only_data_errors(tmp_path, clustered):
    """Flips anywhere (model section with its clusters, offsets, ANS words, raw bits) fail as DataError naming the
    shard, never another way; with checksums every flip is refused."""
    build_all(tmp_path, clustered, "ctxans", NC, per_shard=32)
    shard = tmp_path / "shard-000001.bin"
    clean = shard.read_bytes()
    header = json.loads(clean[12 : 12 + int(np.frombuffer(clean[8:12], "<u4")[0])])
    m_off, m_len = header["sections"]["model"]
    rng = np.random.default_rng(3)
    spots = list(rng.integers(m_off, m_off + m_len, 15)) + list(rng.integers(0, len(clean), 45))
    for byte in spots:
        data = bytearray(clean)
        data[int(byte)] ^= 1 << int(rng.integers(0, 8))
        shard.write_bytes(bytes(data))
        try:
            LogitStore(tmp_path).sequences(range(32, 40))
        except DataError as e:
            assert "shard-000001.bin" in str(e)
        with pytest.raises(DataError, match="shard-000001.bin"):
            LogitStore(tmp_path, verify_checksums=True).sequences(range(32, 40))
        with pytest.raises(DataError, match="shard-000001.bin"):
            verify_store(tmp_path)
    shard.write_bytes(clean)
    assert verify_store(tmp_path, deep=True)["checksums_ok"] is True


def test_default_encoding_is_egsqrt_and_ctxans_reads_the_same_entries(tmp_path, sparse, monkeypatch):
    w = LogitStoreWriter(tmp_path / "default", vocab_size=V, p=0.95, k=40, positions_per_sequence=P, num_sequences=N,
                         sequences_per_shard=4, teacher="t", teacher_config_hash="c", tokenizer_hash="h")
    w.write_sequences(0, sparse)
    assert w.finalize()["encoding"]["name"] == "egsqrt"  # ctxans decodes at about half its speed: opt-in
    w = LogitStoreWriter(tmp_path / "new", vocab_size=V, p=0.95, k=40, positions_per_sequence=P, num_sequences=N,
                         sequences_per_shard=4, teacher="t", teacher_config_hash="c", tokenizer_hash="h",
                         encoding="ctxans")
    w.write_sequences(0, sparse)
    assert w.finalize()["encoding"]["name"] == "ctxans"
    assert inspect_store(tmp_path / "new")["encoding"]["name"] == "ctxans"
    new = LogitStore(tmp_path / "new").sequences(range(N))
    build(tmp_path / "eg", sparse, "egsqrt")
    _build_v1(tmp_path / "v1", sparse, monkeypatch)  # a store of the version before power sums and exact cuts
    for old in ("eg", "v1"):
        assert_same_entries(LogitStore(tmp_path / old).sequences(range(N)), new)


def test_ctxans_format_1_stores_refused_in_one_line(tmp_path, sparse):
    """A ctxans store of the first format (constriction's coder; its manifest has no model_format) is refused at
    open with an error naming the format and the fix, and a model section with format 1's magic likewise."""
    build(tmp_path / "old", sparse, "ctxans")
    manifest = json.loads((tmp_path / "old" / "manifest.json").read_text())
    assert manifest["encoding"]["model_format"] == ctxans.MODEL_FORMAT == 2
    # the other encodings' manifests are as before (a store resumes only with identical settings)
    for encoding, keys in (("egsqrt", {"name", "version", "index_bits", "value_step"}),
                           ("fixed", {"name", "version", "index_bits", "value_scale"})):
        assert set(build(tmp_path / encoding, sparse, encoding)["encoding"]) == keys
    manifest["encoding"].pop("model_format")
    (tmp_path / "old" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"ctxans format 1 .* reads format 2; delete it and run `pdl logits generate`") as e:
        LogitStore(tmp_path / "old")
    assert "\n" not in str(e.value)
    import zlib

    old_head = np.asarray([ctxans.OLD_MODEL_MAGIC, 0], "<u4").tobytes() + bytes(200)
    layout = ctxans.model_layout(40, V, 1 / 64, 2)
    with pytest.raises(codec.CorruptChunk, match="PCX1"):
        ctxans.ShardModel.from_bytes(np.frombuffer(zlib.compress(old_head), np.uint8), layout)


def test_egsqrt_stores_never_import_the_ctxans_coder(tmp_path, sparse):
    """numba (55 MiB resident, the ctxans coder's compiler) is imported only where a ctxans store is read or
    written: generation's memory bound and a loader worker's footprint stay as they were for egsqrt."""
    import subprocess
    import sys

    build(tmp_path / "eg", sparse, "egsqrt")
    build(tmp_path / "cx", sparse, "ctxans")
    code = ("import sys; from pd_lightning.logits.store import LogitStore, verify_store; "
            "from pd_lightning.logits.writer import LogitStoreWriter; "
            f"LogitStore({str(tmp_path / 'eg')!r}).sequences(range(3)); verify_store({str(tmp_path / 'eg')!r}); "
            "print('numba' in sys.modules, end=' '); "
            f"LogitStore({str(tmp_path / 'cx')!r}).sequences(range(3)); print('numba' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "True"]
