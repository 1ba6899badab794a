"""The rANS coder of the ctxans store encoding: exact integer models, lossless round trips with a model per
symbol and many interleaved sequences, size at the information content, and damaged chunks detected."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pd_lightning.logits import rans


def random_tables(rng: np.random.Generator, alphabets: list[int], n_ctx: int) -> list[np.ndarray]:
    """Log-count tables with unseen symbols (0) and a very skewed spread (q up to 255: counts up to 2^31)."""
    out = []
    for a in alphabets:
        q = rng.integers(0, 256, (n_ctx, a)).astype(np.uint8)
        q[rng.random((n_ctx, a)) < 0.3] = 0
        q[np.arange(n_ctx), rng.integers(0, a, n_ctx)] = rng.integers(1, 256, n_ctx)  # every row has a seen symbol
        out.append(q)
    return out


def test_frequencies_are_exact_integers_proportional_to_the_counts():
    rng = np.random.default_rng(0)
    for q in random_tables(rng, [2, 40, 386, 1000], 30):
        f = rans.frequencies(q).astype(np.int64)
        assert np.all(f.sum(1) == rans.TOTAL)
        assert np.all((f == 0) == (q == 0))  # unseen symbols get nothing, seen ones at least 1
        w = np.where(q > 0, 2.0 ** ((q.astype(np.float64) - 1) / 8), 0.0)
        spare = rans.TOTAL - (q > 0).sum(1, keepdims=True)
        ideal = np.where(q > 0, 1 + w / w.sum(1, keepdims=True) * spare, 0)
        err = np.abs(f - ideal)
        err[np.arange(len(q)), w.argmax(1)] = 0  # the likeliest symbol takes the rounding remainder
        assert np.all(err < 1.0 + ideal * 2.0**-15)  # floor, and 2^(r/8) rounded to 16 bits (relative error < 2^-16)
        assert np.array_equal(rans.frequencies(q[:1]), f[:1])  # a row's table does not depend on the others


def code(rng: np.random.Generator, n_seq: int, per_seq: int, alphabets: list[int], n_ctx: int):
    tabs = [rans.frequencies(q) for q in random_tables(rng, alphabets, n_ctx)]
    tables = rans.Tables(tabs)
    n = n_seq * per_seq
    stream = rng.integers(0, len(alphabets), n)
    model = tables.first[stream] + rng.integers(0, n_ctx, n)
    width = max(alphabets)
    freq = np.concatenate([np.pad(t, ((0, 0), (0, width - t.shape[1]))) for t in tabs])  # global model -> its row
    sym = np.empty(n, np.int64)
    for i in range(n):  # each symbol drawn from its own model
        row = freq[model[i]][: alphabets[stream[i]]].astype(np.float64)
        sym[i] = rng.choice(len(row), p=row / row.sum())
    seq = np.repeat(np.arange(n_seq), per_seq)
    bounds = np.arange(n_seq + 1) * per_seq
    words = rans.encode(sym, model, bounds, tables)
    payload = np.concatenate([w.view(np.uint8) for w in words])
    sizes = np.array([w.nbytes for w in words])
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    info_bits = -sum(np.log2(freq[model[i]][sym[i]] / rans.TOTAL) for i in range(n))
    return tables, sym, model, seq, payload, starts, sizes, info_bits


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n_seq=st.integers(1, 6), per_seq=st.integers(1, 400))
def test_round_trip_with_a_model_per_symbol_in_several_calls(seed, n_seq, per_seq):
    rng = np.random.default_rng(seed)
    tables, sym, model, seq, payload, starts, sizes, info_bits = code(rng, n_seq, per_seq, [2, 7, 256], 5)
    # the decoder takes each sequence's symbols in runs: three calls, each with a different share of every sequence
    cuts = np.sort(rng.integers(0, per_seq + 1, (n_seq, 2)), axis=1)
    edges = np.concatenate([np.zeros((n_seq, 1), np.int64), cuts, np.full((n_seq, 1), per_seq)], axis=1)
    dec = rans.Decoder(payload, starts, starts + sizes, tables)
    out = np.full(len(sym), -1, np.int64)
    for part in range(3):
        idx = np.concatenate([q * per_seq + np.arange(edges[q, part], edges[q, part + 1]) for q in range(n_seq)])
        out[idx] = dec.decode(edges[:, part + 1] - edges[:, part], model[idx])
    assert np.array_equal(out, sym)
    assert dec.finished()
    # size: the information content under the models, plus the two final words and < 1 word of slack per sequence
    assert payload.nbytes * 8 <= info_bits * 1.001 + 96 * n_seq


def test_damaged_chunks_are_detected():
    rng = np.random.default_rng(1)
    tables, sym, model, seq, payload, starts, sizes, _ = code(rng, 2, 300, [2, 256], 3)
    short = rans.Decoder(payload, starts, starts + sizes - 4, tables)  # a word cut off
    try:
        short.decode(np.bincount(seq), model)
        assert not short.finished()
    except ValueError as e:
        assert "ends before its symbols do" in str(e)
    extra = np.concatenate([payload[: sizes[0]], np.frombuffer(b"\x01\x02\x03\x04", np.uint8), payload[sizes[0]:]])
    longer = rans.Decoder(extra, np.array([0, sizes[0] + 4]), np.array([sizes[0] + 4, len(extra)]), tables)
    longer.decode(np.bincount(seq), model)
    assert not longer.finished()  # a word left over (or a garbled symbol) is never a clean end
    few = rans.Decoder(payload, starts, starts + sizes, tables)
    few.decode(np.bincount(seq[:-1], minlength=2), model[:-1])
    assert not few.finished()  # one symbol short


def test_chunk_without_its_final_state_refused():
    tables = rans.Tables([rans.frequencies(np.array([[1, 1]], np.uint8))])
    dec = rans.Decoder(np.zeros(4, np.uint8), np.array([0]), np.array([4]), tables)
    with pytest.raises(ValueError, match="ends before"):
        dec.decode(np.array([1]), np.array([0]))
