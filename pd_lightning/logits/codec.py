"""Bit-level encodings of top-p-k entries, vectorised in numpy (no Python loop over tokens).

A batch of S sequences × P positions becomes four per-token columns plus one byte payload:

- `counts` [S·P] uint8/uint16: kept entries per token;
- `params` [S·P] uint8: per-token code parameters (compressed encoding only);
- `stats`  [S·P, 2 + G] float16: full-distribution entropy (nats), logit std and, for each of the
  store's G `power_exponents` a, log Σ_v q_v^a (WTTM's full-vocabulary weight; G = 0 by default);
- `mass`   [S·P] uint16: kept mass Q = Σ_kept q as round(-log Q · 4096) (compressed encoding only);
- `chunks` [S·C + 1] uint64: byte offsets of each sequence's C byte-aligned payload chunks.

Encodings (name, version). Version 2 (this one) and version 1 share every bit of the layout; a v2
store's entries come from the exact top-p-k cut (`processing` module docstring) and may carry power
sums. v1 stores made at p = 1 dropped entries on confident tokens and are refused at open
(`store.load_manifest`); v1 stores at p < 1 read as before.


`egsqrt` v1 (default, compressed). Per token the kept ids are sorted ascending and their gaps
`g_0 = id_0, g_j = id_j - id_{j-1} - 1` are Exp-Golomb coded; values are quantised in the
square-root domain of the support-renormalised probability r = q / Q (q = exp(logprob),
Q = Σ_kept q): `level = round(sqrt(r) / δ)` (δ = `value_step`), decoded as `sqrt(r') = level·δ`
(level 0 -> δ/4, so no kept entry decodes to probability 0), hence `|sqrt(r) - sqrt(r')| <= δ/2`
for every entry; logprob' = log r' + log Q'. Levels are Exp-Golomb coded in id order; the
descending order is restored at decode by a stable sort on the decoded values (ties by id). The
sqrt domain spends precision where KL feels it: KL(r || r') ≈ ½ Var_r(Δlog r) with
Δlog r ≈ 2 ε / sqrt(r), ε ~ U(-δ/2, δ/2), so the expected KL of a token with K kept entries is
≈ K δ² / 6 whatever the values (renormalising by Q keeps flat, low-mass tokens as exact as
peaked ones).
Exp-Golomb of order m codes x as: n = floor(log2(x + 2^m)) - m in unary (n ones, a zero), then the
low n + m bits of x + 2^m; m is chosen per token (gaps 0..17, values 0..7) as the cheapest of four
orders around log2 of the token's mean, stored as `params = m_gap | m_val << 5`. Unary and fixed-width parts sit in separate chunks
(sequence chunk order: gap-unary, gap-bits, value-unary, value-bits) so decoding needs only
cumsum/gather: unary lengths come from the positions of zero bits, field positions from a cumsum.
Chunks are padded to whole bytes with 1 bits (so padding never reads as a unary terminator).

`ctxans` (encoding version 2, `logits.encoding=ctxans`, model format 2 in the manifest): the same
quantised symbols as egsqrt (so the same decoded entries, bit for bit), entropy-coded by an rANS
coder (`rans`) under a context model and support clusters fitted per shard; see the `ctxans` module.
Its writer holds `ctxans.Symbols` per shard (`ctxans.symbolize` makes them) and codes the whole shard
at once (`ctxans.encode_shard`).

`fixed` v1 (plain). Entries in descending order; ids as ⌈log2 V⌉-bit fields, values as 16-bit
`level = round(-logprob · 1024)` (|error| <= 2^-11 nats for logprob >= -64). Chunks: ids, values.

Sampled stores (`logits.sampling=sample`, the manifest's `sampling`): every entry also carries its
draw count c >= 1 (a token's counts sum to the store's `samples`), coded exactly as c - 1: order-0
Exp-Golomb in egsqrt (two more chunks, draw-unary and draw-bits, after the value chunks; most tail ids
are drawn once: 1 bit), an 8-bit field in fixed (one more chunk). The entries are the token's distinct
drawn ids with their τ=1 log-probabilities, coded as any kept entries are; decoding checks Σ c.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import numpy as np
import torch

from pd_lightning.config import STORE_ENCODINGS as ENCODINGS  # noqa: F401  (logits.encoding's choices, declared there)
from pd_lightning.logits.processing import SparseLogits

ENCODING_VERSION = 2
CTXANS_MODEL_FORMAT = 2  # ctxans' model format (the manifest's encoding.model_format); `ctxans` codes it
READABLE_VERSIONS = (1, 2)
DEFAULT_VALUE_STEP = 1.0 / 384  # expected KL ≈ K δ² / 6 ≈ 5e-5 nats at K = 45 kept entries
FIXED_VALUE_SCALE = 1024.0
MASS_SCALE = 4096.0
MAX_GAP_ORDER = 17
MAX_VALUE_ORDER = 7
MAX_FIELD_BITS = 56  # the 8-byte read window holds 64 - 7 bits past any start bit
DRAW_BITS = 8  # fixed: a draw count - 1 (logits.samples <= 255)


def check_draws(draws: np.ndarray, counts: np.ndarray, samples: int, error: type) -> None:
    """Every kept entry of a sampled store was drawn at least once and each token's draws sum to `samples`."""
    if draws.size and draws.min() < 1:
        raise error("a sampled entry has a draw count below 1")
    sums = np.add.reduceat(draws, _excl_cumsum(counts)[:-1]) if draws.size else np.zeros(0, np.int64)
    if len(counts) and (len(sums) != len(counts) or np.any(sums != samples)):
        raise error(f"a token's draw counts do not sum to the store's samples={samples}")


class CorruptChunk(ValueError):
    """A payload chunk does not decode to the structure the columns promise."""


def index_bits(vocab_size: int) -> int:
    """⌈log2 V⌉, the fixed width of an id field."""
    return max(1, math.ceil(math.log2(vocab_size)))


def chunks_per_sequence(encoding: str, sampled: bool = False) -> int:
    """Number of byte-aligned payload chunks each sequence owns (a sampled store adds its draw counts')."""
    if encoding == "egsqrt":
        return 6 if sampled else 4
    return 3 if sampled else 2


def sections(encoding: str) -> list[str]:
    """A shard's sections, in file order (`store` module docstring)."""
    if encoding == "ctxans":
        return ["model", "seq_entries", "chunks", "payload"]
    if encoding == "egsqrt":
        return ["counts", "params", "mass", "stats", "chunks", "payload"]
    return ["counts", "stats", "chunks", "payload"]


@dataclass
class EncodedBatch:
    """Columns and payload of S whole sequences (see module docstring)."""

    counts: np.ndarray
    params: np.ndarray | None
    mass: np.ndarray | None
    stats: np.ndarray
    chunk_sizes: np.ndarray  # [S·C] bytes of each chunk
    payload: np.ndarray  # uint8
    num_entries: int


# ----------------------------------------------------------------------------- bit helpers


def _excl_cumsum(x: np.ndarray) -> np.ndarray:
    out = np.zeros(len(x) + 1, dtype=np.int64)
    np.cumsum(x, out=out[1:])
    return out


def _floor_log2(x: np.ndarray) -> np.ndarray:
    """floor(log2 x) for integers x >= 1, exact (frexp, not a float log)."""
    return np.frexp(x.astype(np.float64))[1].astype(np.int64) - 1


def _best_orders(x: np.ndarray, token_starts: np.ndarray, counts: np.ndarray, max_order: int) -> np.ndarray:
    """Per token (segment of x), the Exp-Golomb order with the fewest total bits among 4 candidates.

    The best order is close to log2 of the token's mean value, so only floor(log2(mean + 1)) - 2 .. + 1
    (clipped to [0, max_order]) are tried -- 4 columns instead of max_order + 1.
    """
    if x.size == 0:
        return np.zeros(len(counts), np.int64)
    mean = np.add.reduceat(x, token_starts) // counts
    cand = np.clip(_floor_log2(mean + 1)[:, None] + np.arange(-2, 2), 0, max_order)  # [T, 4]
    cost = np.add.reduceat(_eg_cost_per(x[:, None], np.repeat(cand, counts, axis=0)), token_starts, axis=0)
    return cand[np.arange(len(counts)), np.argmin(cost, axis=1)]


def _eg_cost_per(x: np.ndarray, orders: np.ndarray) -> np.ndarray:
    """Bits of order-m Exp-Golomb, elementwise: 2·floor(log2(x + 2^m)) - m + 1."""
    return 2 * _floor_log2(x + (np.int64(1) << orders)) - orders + 1


def _build_payload(streams: list[tuple[np.ndarray, np.ndarray]], seq_entry_starts: np.ndarray, n_seq: int) -> tuple[np.ndarray, np.ndarray]:
    """Lay out (width, value) fields as per-sequence, byte-padded chunks; return (payload bytes, chunk bytes [S, C]).

    Every field (unary codes included) is <= 32 bits, so the stream is the row-major selection of
    the low `width` bits of each value's 32-bit big-endian form: one unpackbits, one boolean mask.
    """
    c = len(streams)
    per_seq = np.diff(seq_entry_starts)
    m = int(seq_entry_starts[-1])
    chunk_bits = np.zeros((n_seq, c), np.int64)
    for ci, (w, _) in enumerate(streams):
        if m:
            chunk_bits[:, ci] = np.add.reduceat(w, seq_entry_starts[:-1])
    pad = (-chunk_bits) % 8  # a pad field of 1 bits closes every chunk (possibly 0 wide)
    # final order: sequence-major, then chunk, then entry, then the chunk's pad field
    block = (per_seq + 1)[:, None].repeat(c, 1).ravel()  # fields per (sequence, chunk) block
    block_start = _excl_cumsum(block)[:-1].reshape(n_seq, c)
    seq_of = np.repeat(np.arange(n_seq), per_seq)
    within = np.arange(m) - seq_entry_starts[:-1][seq_of]
    total = int(block.sum())
    width = np.empty(total, np.int64)
    value = np.empty(total, np.int64)
    for ci, (w, x) in enumerate(streams):
        if w.size and w.max() > 32:
            raise ValueError("a code is wider than 32 bits")
        dest = block_start[seq_of, ci] + within
        width[dest], value[dest] = w, x
        pads = block_start[:, ci] + per_seq
        width[pads], value[pads] = pad[:, ci], (np.int64(1) << pad[:, ci]) - 1
    bits32 = np.unpackbits(value.astype(">u4").view(np.uint8)).reshape(total, 32)
    keep = np.arange(32)[None, :] >= (32 - width)[:, None]
    return np.packbits(bits32[keep]), (chunk_bits + pad) // 8


def _read_fields(buf: np.ndarray, pos: np.ndarray, width: np.ndarray) -> np.ndarray:
    """Read `width`-bit MSB-first fields at bit positions pos from buf (padded by >= 8 bytes)."""
    # The big-endian 64-bit word starting at every byte (an unaligned, overlapping view: no copy),
    # so each field costs one 8-byte gather instead of eight 1-byte ones.
    buf = np.ascontiguousarray(buf, dtype=np.uint8)
    at_byte = np.ndarray((len(buf) - 7,), dtype=np.uint64, buffer=buf, strides=(1,))
    words = np.take(at_byte, pos >> 3)
    if sys.byteorder == "little":
        words = words.byteswap()
    words = (words << (pos & 7).astype(np.uint64)) >> np.uint64(1)
    return (words >> (63 - width).astype(np.uint64)).astype(np.int64)


def _eg_split(x: np.ndarray, order: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exp-Golomb parts of x with per-value order m: (n for unary, field width n+m, field value)."""
    xp = x + (np.int64(1) << order)
    nbits = _floor_log2(xp)  # = n + m
    return nbits - order, nbits, xp


# ----------------------------------------------------------------------------- encode


def _token_entries(sparse: SparseLogits, by_id: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Flat kept (ids, logprobs), token-major; by_id sorts each token's entries by id. Also log Q per token."""
    counts, ids, lps, log_mass, _ = token_entries(sparse, by_id)
    return counts, ids, lps, log_mass


def token_entries(sparse: SparseLogits, by_id: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                                                               np.ndarray | None]:
    """`_token_entries` plus the flat draw counts of a sampled store (None for top-p-k), in the same order."""
    counts = sparse.counts.cpu().numpy().astype(np.int64)
    mask = np.arange(sparse.width)[None, :] < counts[:, None]
    ids = sparse.indices.cpu().numpy().astype(np.int64, copy=False)
    lps = sparse.logprobs.detach().cpu().float().numpy()
    draws = None if sparse.draws is None else sparse.draws.cpu().numpy().astype(np.int64)
    lp64 = np.where(mask, lps, -np.inf).astype(np.float64)
    top = lp64.max(1, keepdims=True, initial=-np.inf)
    top = np.where(np.isfinite(top), top, 0.0)
    log_mass = (top[:, 0] + np.log(np.exp(lp64 - top).sum(1))) if len(counts) else np.zeros(0)
    if by_id:
        order = np.argsort(np.where(mask, ids, np.iinfo(np.int64).max), axis=1, kind="stable")
        ids, lps = np.take_along_axis(ids, order, 1), np.take_along_axis(lps, order, 1)
        draws = None if draws is None else np.take_along_axis(draws, order, 1)
    return counts, ids[mask], lps[mask], log_mass, None if draws is None else draws[mask]


def stats_columns(sparse: SparseLogits) -> np.ndarray:
    """[T, 2 + G] float16: entropy, logit std, then the power sums."""
    cols = [sparse.entropy.cpu().float().numpy(), sparse.logit_std.cpu().float().numpy()]
    if sparse.power_exponents:
        cols += list(sparse.log_power_sums.cpu().float().numpy().T)
    return np.stack(cols, 1).astype(np.float16)


def quantise_sqrt(lps: np.ndarray, lq: np.ndarray, counts: np.ndarray, value_step: float) -> tuple[np.ndarray, np.ndarray]:
    """egsqrt's quantisation: (mass [T] uint16 = round(-log Q · 4096), levels [M] = round(sqrt(q / Q) / δ))."""
    mass = np.clip(np.rint(-lq * MASS_SCALE), 0, 65535).astype(np.uint16)
    r = lps.astype(np.float64) - np.repeat(lq, counts)
    levels = np.rint(np.exp(r / 2) / value_step).astype(np.int64)
    return mass, np.clip(levels, 0, int(1.0 / value_step) + 1)


def encode(sparse: SparseLogits, positions: int, vocab_size: int, k: int, encoding: str, value_step: float) -> EncodedBatch:
    """Encode S = len(sparse) / positions whole sequences (rows in sequence-major order), egsqrt or fixed.

    `ctxans` is not coded per batch: its entropy coder fits a model to the whole shard, so the store's
    writer quantises a batch with `ctxans.symbolize` and codes the shard with `ctxans.encode_shard`
    (ctxans builds on this module's helpers, this module knows nothing of it).
    """
    if encoding not in ("egsqrt", "fixed"):
        raise ValueError(f"encoding={encoding!r}: codec.encode codes egsqrt and fixed; ctxans goes through ctxans.symbolize")
    n_tok = len(sparse)
    if n_tok % positions:
        raise ValueError(f"{n_tok} token rows is not a whole number of sequences of {positions} positions")
    n_seq = n_tok // positions
    counts, ids, lps, lq, draws = token_entries(sparse, by_id=encoding == "egsqrt")
    if counts.min(initial=1) < 1 or counts.max(initial=1) > k:
        raise ValueError(f"kept-entry counts must lie in [1, {k}]")
    if draws is not None:
        check_draws(draws, counts, sparse.samples, ValueError)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"ids must lie in [0, {vocab_size})")
    stats = stats_columns(sparse)
    count_dtype = np.uint8 if k < 256 else np.uint16
    tok_starts = _excl_cumsum(counts)
    seq_entry_starts = tok_starts[::positions]  # [S+1]
    m = len(ids)
    if encoding == "egsqrt":
        gaps = ids.copy()
        gaps[1:] -= ids[:-1] + 1
        gaps[tok_starts[:-1]] = ids[tok_starts[:-1]]
        mass, levels = quantise_sqrt(lps, lq, counts, value_step)
        m_gap = _best_orders(gaps, tok_starts[:-1], counts, MAX_GAP_ORDER)
        m_val = _best_orders(levels, tok_starts[:-1], counts, MAX_VALUE_ORDER)
        params = (m_gap | (m_val << 5)).astype(np.uint8)
        streams = []
        for x, mo in ((gaps, m_gap), (levels, m_val)):
            n, w, xp = _eg_split(x, np.repeat(mo, counts))
            streams.append((n + 1, (np.int64(2) << n) - 2))  # unary: n ones, then a zero
            streams.append((w, xp))
        if draws is not None:  # draw count - 1, order-0 Exp-Golomb
            n, w, xp = _eg_split(draws - 1, np.zeros(m, np.int64))
            streams += [(n + 1, (np.int64(2) << n) - 2), (w, xp)]
    elif encoding == "fixed":
        params = mass = None
        levels = np.clip(np.rint(-lps.astype(np.float64) * FIXED_VALUE_SCALE), 0, 65535).astype(np.int64)
        streams = [(np.full(m, index_bits(vocab_size), np.int64), ids), (np.full(m, 16, np.int64), levels)]
        if draws is not None:
            streams.append((np.full(m, DRAW_BITS, np.int64), draws - 1))
    else:
        raise ValueError(f"unknown encoding {encoding!r}")
    payload, chunk_bytes = _build_payload(streams, seq_entry_starts, n_seq)
    return EncodedBatch(counts.astype(count_dtype), params, mass, stats, chunk_bytes.ravel().astype(np.uint64), payload, m)


# ----------------------------------------------------------------------------- decode


def _gather_chunks(payload: np.ndarray, offsets: np.ndarray, chunk_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate the given chunks (+8 zero bytes); return (buffer, start bit of each chunk)."""
    starts = offsets[chunk_ids].astype(np.int64)
    lens = offsets[chunk_ids + 1].astype(np.int64) - starts
    cum = _excl_cumsum(lens)
    idx = np.repeat(starts - cum[:-1], lens) + np.arange(cum[-1], dtype=np.int64)
    buf = np.concatenate([np.asarray(payload[idx]), np.zeros(8, np.uint8)])
    return buf, cum * 8


def _decode_unary(buf: np.ndarray, chunk_bits: np.ndarray, per_chunk: np.ndarray) -> np.ndarray:
    """Unary values (ones then a zero); per_chunk[i] values expected in chunk i."""
    zeros = np.flatnonzero(np.unpackbits(buf[:-8]) == 0)
    found = np.diff(np.searchsorted(zeros, chunk_bits))
    if not np.array_equal(found, per_chunk):
        raise CorruptChunk("unary stream holds a different number of codes than the counts say")
    prev = np.empty_like(zeros)
    prev[1:] = zeros[:-1]
    firsts = _excl_cumsum(per_chunk)[:-1][per_chunk > 0]
    prev[firsts] = chunk_bits[:-1][per_chunk > 0] - 1
    return zeros - prev - 1


def _decode_fields(buf: np.ndarray, chunk_bits: np.ndarray, per_chunk: np.ndarray, width: np.ndarray) -> np.ndarray:
    if width.size and width.max() > MAX_FIELD_BITS:
        raise CorruptChunk("field wider than any valid code")
    cum = _excl_cumsum(width)
    chunk_of = np.repeat(np.arange(len(per_chunk)), per_chunk)
    first = _excl_cumsum(per_chunk)[:-1]
    pos = chunk_bits[:-1][chunk_of] + cum[:-1] - cum[first][chunk_of]
    used = np.add.reduceat(width, first[per_chunk > 0]) if width.size else np.zeros(0, np.int64)
    if np.any(used > np.diff(chunk_bits)[per_chunk > 0]):
        raise CorruptChunk("fields run past the end of their chunk")
    return _read_fields(buf, pos, width)


def decode_arrays(
    counts: np.ndarray,
    params: np.ndarray | None,
    mass: np.ndarray | None,
    stats: np.ndarray,
    chunk_offsets: np.ndarray,
    payload: np.ndarray,
    seqs: np.ndarray,
    positions: int,
    vocab_size: int,
    k: int,
    encoding: str,
    value_step: float,
    samples: int = 0,
) -> tuple[np.ndarray, ...]:
    """Decode local sequences `seqs` of one shard: (ids [n·P, k], logprobs [n·P, k] descending, counts, entropy, std,
    power sums [n·P, G] or None, draws [n·P, k] int32 or None); `samples` > 0 for a sampled store."""
    seqs = np.asarray(seqs, dtype=np.int64)
    rows = (seqs[:, None] * positions + np.arange(positions)).ravel()
    cnt = counts[rows].astype(np.int64)
    if cnt.size and (cnt.min() < 1 or cnt.max() > k):
        raise CorruptChunk(f"a kept-entry count lies outside [1, {k}]")
    per_seq = cnt.reshape(len(seqs), positions).sum(1)
    c = chunks_per_sequence(encoding, samples > 0)
    tok_starts = _excl_cumsum(cnt)
    bufs = [_gather_chunks(payload, chunk_offsets, seqs * c + ci) for ci in range(c)]
    m = int(tok_starts[-1])
    draws = None
    if encoding == "egsqrt":
        prm = params[rows].astype(np.int64)
        values = []
        for ci, orders in ((0, prm & 31), (2, prm >> 5)):
            mo = np.repeat(orders, cnt)
            n = _decode_unary(bufs[ci][0], bufs[ci][1], per_seq)
            xp = _decode_fields(bufs[ci + 1][0], bufs[ci + 1][1], per_seq, n + mo)
            values.append(((np.int64(1) << (n + mo)) | xp) - (np.int64(1) << mo))
        gaps, levels = values
        if samples:
            n = _decode_unary(bufs[4][0], bufs[4][1], per_seq)
            # order 0: the n-bit field holds the low bits of x + 1 = c (its leading 1 is implied)
            draws = (np.int64(1) << n) | _decode_fields(bufs[5][0], bufs[5][1], per_seq, n)
            check_draws(draws, cnt, samples, CorruptChunk)
        # ids = per-token cumsum of (gap + 1) - 1
        cs = np.cumsum(gaps + 1)
        base = np.repeat(np.concatenate([[0], cs])[tok_starts[:-1]], cnt)
        ids = cs - base - 1
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            raise CorruptChunk(f"a decoded id lies outside [0, {vocab_size})")
        return assemble(ids, levels, mass[rows], cnt, stats[rows], k, value_step, draws)
    ib = index_bits(vocab_size)
    ids = _decode_fields(bufs[0][0], bufs[0][1], per_seq, np.full(m, ib, np.int64))
    lev = _decode_fields(bufs[1][0], bufs[1][1], per_seq, np.full(m, 16, np.int64))
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise CorruptChunk(f"a decoded id lies outside [0, {vocab_size})")
    if samples:
        draws = _decode_fields(bufs[2][0], bufs[2][1], per_seq, np.full(m, DRAW_BITS, np.int64)) + 1
        check_draws(draws, cnt, samples, CorruptChunk)
    return _padded(ids, (-lev / FIXED_VALUE_SCALE).astype(np.float32), cnt, stats[rows], k, draws)


def assemble(ids: np.ndarray, levels: np.ndarray, mass: np.ndarray, cnt: np.ndarray, stats: np.ndarray, k: int,
             value_step: float, draws: np.ndarray | None = None) -> tuple:
    """Square-root levels in id order (egsqrt's and ctxans' symbols) -> the `decode_arrays` tuple, rows descending."""
    order = _descending_order(cnt, levels, int(1.0 / value_step) + 1)
    ids, levels = ids[order], levels[order]
    u = np.where(levels == 0, value_step / 4, levels * value_step)
    lq = -np.repeat(mass.astype(np.float64), cnt) / MASS_SCALE
    return _padded(ids, (2.0 * np.log(u) + lq).astype(np.float32), cnt, stats, k,
                   None if draws is None else draws[order])


def _descending_order(cnt: np.ndarray, levels: np.ndarray, max_level: int) -> np.ndarray:
    """Entries of each token by descending level, ties by their (ascending id) order: a stable sort by (token, -level).

    Two stable 16-bit radix sorts (level, then token) where the batch has at most 65,536 tokens, else
    one stable sort of the combined 64-bit key; both give the same permutation.
    """
    n_tok = len(cnt)
    if n_tok <= 1 << 16 and max_level < 1 << 16:
        by_level = np.argsort((max_level - levels).astype(np.uint16), kind="stable")
        tok = np.repeat(np.arange(n_tok, dtype=np.uint16) if n_tok else np.zeros(0, np.uint16), cnt)
        return by_level[np.argsort(tok[by_level], kind="stable")]
    tok = np.repeat(np.arange(n_tok, dtype=np.int64), cnt)
    return np.argsort(tok * (max_level + 1) - levels, kind="stable")


def _padded(ids: np.ndarray, lps: np.ndarray, cnt: np.ndarray, stats: np.ndarray, k: int,
            draws: np.ndarray | None = None) -> tuple:
    n_tok = len(cnt)
    kept = np.arange(k) < cnt[:, None]  # row-major, as the entries are: token-major, then column
    idx_pad = np.zeros((n_tok, k), np.int64)
    lp_pad = np.full((n_tok, k), -np.inf, np.float32)
    idx_pad[kept] = ids
    lp_pad[kept] = lps
    draw_pad = None
    if draws is not None:
        draw_pad = np.zeros((n_tok, k), np.int32)
        draw_pad[kept] = draws
    st = stats.astype(np.float32)
    sums = st[:, 2:].copy() if st.shape[1] > 2 else None
    return idx_pad, lp_pad, cnt, st[:, 0].copy(), st[:, 1].copy(), sums, draw_pad


def decode(*args: object, power_exponents: tuple[float, ...] = (), **kwargs: object) -> SparseLogits:
    """`decode_arrays` wrapped as SparseLogits (torch tensors sharing the numpy memory)."""
    *arrays, sums, draws = decode_arrays(*args, **kwargs)
    return SparseLogits(*(torch.from_numpy(a) for a in arrays), None if sums is None else torch.from_numpy(sums),
                        tuple(power_exponents), None if draws is None else torch.from_numpy(draws),
                        int(kwargs.get("samples", 0)))
