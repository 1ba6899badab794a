"""rANS (range asymmetric numeral systems) with one categorical model per symbol, compiled by numba.

The `ctxans` store encoding codes every symbol under the model of its own context. A coder whose
call takes one model and a run of symbols (constriction's, which the first ctxans used) makes the
decoder sort each stream's symbols by context and call once per (sequence, context) group: on the
tiny teacher's store that bookkeeping, not the coding, made decoding 2.2x slower than egsqrt's.
Here the model index travels with each symbol, so a stream decodes in token order in one compiled
loop over a batch of sequences (each sequence its own coder state: random access by sequence).

The coder is the classic 64-bit-state, 32-bit-word rANS (F. Giesen's rans64): state x in
[2^31, 2^63); a symbol s of frequency f_s and cumulative frequency c_s (sum 2^PROB_BITS) encodes as
x -> (x // f_s) << PROB_BITS + x % f_s + c_s, after first emitting x's low 32 bits when
x >= 2^(63 - PROB_BITS) · f_s; decoding inverts it, reading a word when x falls below 2^31.
The encoder starts from x = 2^31 and ends by writing x's two words; the decoder checks that it
ends exactly there, with every word read: a cheap end-of-stream check that catches most damage.
Words are little-endian uint32, the first word the decoder reads first.

Models are integer frequency tables built from 8-bit log-counts by exact integer arithmetic
(`frequencies`), so every machine rebuilds bit-identical tables from a shard's bytes. A symbol is
found from the state's low PROB_BITS bits by a coarse table (the symbol at each of 256 evenly spaced
slots) and a short forward scan.
"""

from __future__ import annotations

import numpy as np
from numba import njit

PROB_BITS = 15
TOTAL = 1 << PROB_BITS
STATE_LOW = 1 << 31
COARSE_BITS = 8  # coarse symbol lookup: 2^8 buckets of the 2^PROB_BITS slots per model
# 2^(r/8) · 2^16 for r = 0..7, rounded: log-count q >= 1 weighs FRAC[(q-1) % 8] << ((q-1) // 8); integers, so no
# platform's exp2 rounding can make two machines build different tables
FRAC = np.array([65536, 71468, 77936, 84990, 92682, 101070, 110218, 120194], np.uint64)


def frequencies(logcounts: np.ndarray) -> np.ndarray:
    """uint8 log-counts [n, A] (0 = symbol unseen, q >= 1: count ~ 2^((q-1)/8)) -> uint32 frequencies summing to
    2^PROB_BITS per row, every seen symbol >= 1, unseen symbols 0. Rows must have a seen symbol."""
    q = np.asarray(logcounts).astype(np.int64)
    seen = q > 0
    qm = np.maximum(q - 1, 0)
    w = np.where(seen, FRAC[qm & 7] << (qm >> 3).astype(np.uint64), 0).astype(np.uint64)  # < 2^48
    n_seen = seen.sum(1, keepdims=True).astype(np.uint64)
    spare = np.uint64(TOTAL) - n_seen  # each seen symbol gets 1, the rest is shared by weight
    freq = np.where(seen, 1 + (w * spare) // w.sum(1, keepdims=True), 0).astype(np.uint64)  # w·spare < 2^63
    rows = np.arange(len(q))
    freq[rows, w.argmax(1)] += np.uint64(TOTAL) - freq.sum(1)  # rounding remainder to the likeliest symbol
    return freq.astype(np.uint32)


class Tables:
    """Every model of a shard, flat: cumulative frequencies (A + 1 per model) and the coarse symbol lookup."""

    def __init__(self, freqs: list[np.ndarray]):
        """freqs: per stream, its uint32 [n contexts, alphabet] frequency table; models are numbered stream after
        stream, context after context (`first[i]`: the first model of stream i)."""
        rows = [f for f in freqs for f in f]
        sizes = np.array([len(r) + 1 for r in rows], np.int64)
        self.first = np.cumsum([0] + [len(f) for f in freqs])[:-1]
        self.offset = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        cum = [np.concatenate([[0], np.cumsum(r, dtype=np.int64)]) for r in rows]
        # int32 / int16: small tables stay in cache (a shard has a few hundred models)
        self.cum = np.concatenate(cum).astype(np.int32) if cum else np.zeros(1, np.int32)
        self.coarse = np.zeros(max(len(rows), 1) << COARSE_BITS, np.int16)
        starts = np.arange(1 << COARSE_BITS, dtype=np.int64) << (PROB_BITS - COARSE_BITS)
        for m, c in enumerate(cum):  # the symbol whose slot range holds each bucket's first slot
            self.coarse[m << COARSE_BITS : (m + 1) << COARSE_BITS] = np.searchsorted(c, starts, side="right") - 1


@njit(cache=True, nogil=True)
def _encode(sym, model, bounds, cum, offset, out, out_start):
    """Symbols of sequence q are sym[bounds[q]:bounds[q+1]] (decoding order) under models `model`; its words go to
    out[:out_start[q+1]], right-aligned (returns each sequence's first word)."""
    n_seq = bounds.size - 1
    first = np.empty(n_seq, np.int64)
    for q in range(n_seq):
        x = np.uint64(STATE_LOW)
        pos = out_start[q + 1]
        for i in range(bounds[q + 1] - 1, bounds[q] - 1, -1):  # rANS codes backwards: the decoder reads forwards
            o = offset[model[i]] + sym[i]
            c = np.uint64(cum[o])
            f = np.uint64(cum[o + 1]) - c
            if x >= (np.uint64(1) << np.uint64(63 - PROB_BITS)) * f:
                pos -= 1
                out[pos] = np.uint32(x & np.uint64(0xFFFFFFFF))
                x >>= np.uint64(32)
            x = ((x // f) << np.uint64(PROB_BITS)) + x % f + c
        out[pos - 1] = np.uint32(x >> np.uint64(32))
        out[pos - 2] = np.uint32(x & np.uint64(0xFFFFFFFF))
        first[q] = pos - 2
    return first


@njit(cache=True, nogil=True)
def _decode(payload, ptr, end, state, bounds, model, cum, offset, coarse, out):
    """Symbols bounds[q]:bounds[q+1] from coder q, symbol i under model[i]; returns 1 if a coder runs out of words,
    else 0. ptr, end: each coder's byte position and chunk end in payload; state: its state (0: not started).
    The coders take turns, one symbol each: their state updates are independent, so the CPU overlaps them
    (on the tiny teacher's flags 4.2 instead of 7.3 ns a symbol; levels, cache-bound, gain little). One loop, no helper function: numba's call, even
    inlined, made a symbol 3-6x slower."""
    n_seq = bounds.size - 1
    nxt = bounds[:-1].copy()
    left = bounds[-1] - bounds[0]
    while left > 0:
        for q in range(n_seq):
            i = nxt[q]
            if i >= bounds[q + 1]:
                continue
            nxt[q] = i + 1
            left -= 1
            m = model[i]
            x = state[q]
            if x == 0:  # first use: the two words the encoder ended with
                p = ptr[q]
                if p + 8 > end[q]:
                    return 1
                for b in range(8):
                    x |= np.uint64(payload[p + b]) << np.uint64(8 * b)
                ptr[q] = p + 8
            slot = np.int64(x & np.uint64(TOTAL - 1))
            o = offset[m]
            s = np.int64(coarse[(m << COARSE_BITS) + (slot >> (PROB_BITS - COARSE_BITS))])
            while cum[o + s + 1] <= slot:
                s += 1
            c = np.int64(cum[o + s])
            x = np.uint64(cum[o + s + 1] - c) * (x >> np.uint64(PROB_BITS)) + np.uint64(slot - c)
            if x < np.uint64(STATE_LOW):
                p = ptr[q]
                if p + 4 > end[q]:
                    return 1
                x = (x << np.uint64(32)) | (np.uint64(payload[p]) | (np.uint64(payload[p + 1]) << np.uint64(8))
                                            | (np.uint64(payload[p + 2]) << np.uint64(16))
                                            | (np.uint64(payload[p + 3]) << np.uint64(24)))
                ptr[q] = p + 4
            state[q] = x
            out[i] = s
    return 0


def encode(sym: np.ndarray, model: np.ndarray, bounds: np.ndarray, tables: Tables) -> list[np.ndarray]:
    """Per sequence q, its symbols sym[bounds[q]:bounds[q+1]] (in decoding order) under global model indices
    `model` -> its uint32 words (what `Decoder` reads)."""
    bounds = np.asarray(bounds, np.int64)
    out_start = bounds + 2 * np.arange(len(bounds), dtype=np.int64)  # at most one word per symbol, plus two
    out = np.zeros(int(out_start[-1]), np.uint32)
    first = _encode(np.ascontiguousarray(sym, np.int64), np.ascontiguousarray(model, np.int64), bounds, tables.cum,
                    tables.offset, out, out_start)
    return [out[first[q] : out_start[q + 1]] for q in range(len(bounds) - 1)]


class Decoder:
    """The coders of a batch of sequences, each reading its own chunk of the payload (uint8)."""

    def __init__(self, payload: np.ndarray, starts: np.ndarray, ends: np.ndarray, tables: Tables):
        self.payload = np.asarray(payload).reshape(-1)
        self.ptr, self.end = np.asarray(starts, np.int64).copy(), np.asarray(ends, np.int64)
        self.state = np.zeros(len(self.ptr), np.uint64)
        self.tables = tables

    def decode(self, per_seq: np.ndarray, model: np.ndarray) -> np.ndarray:
        """per_seq[q] symbols from coder q, the coders' runs one after another, symbol i under global model model[i];
        ValueError when a chunk runs out."""
        out = np.empty(len(model), np.int64)
        bounds = np.concatenate([[0], np.cumsum(per_seq)]).astype(np.int64)
        if len(model) and _decode(self.payload, self.ptr, self.end, self.state, bounds,
                                  np.ascontiguousarray(model, np.int64), self.tables.cum, self.tables.offset,
                                  self.tables.coarse, out):
            raise ValueError("an ANS chunk ends before its symbols do")
        return out

    def finished(self) -> bool:
        """Every coder back at the encoder's initial state with its whole chunk read (a coder never used has not
        read its two final words, so it is not finished: every sequence codes at least one symbol)."""
        return bool(np.all(self.state == STATE_LOW) and np.array_equal(self.ptr, self.end))
