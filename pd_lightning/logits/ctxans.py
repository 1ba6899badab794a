"""Encoding `ctxans`: egsqrt's quantised symbols, entropy-coded with a context model fitted per shard.

What is coded is exactly what `egsqrt` keeps (`codec` module docstring), so the two decode to the
same log-probabilities bit for bit and have the same KL: per token the kept-entry count K, the kept
mass `round(-log Q · 4096)`, the float16 stats (entropy, logit std, power sums) and, per entry in
ascending id order, the id and the square-root level `round(sqrt(q / Q) / δ)`. Only the bits change:
every value is split into a symbol and raw bits, and the symbols are coded by an rANS coder
(asymmetric numeral systems; the `rans` module, compiled by numba) under categorical models chosen by
a context, a model per symbol.

Split of an integer x >= 0 with t "top" bits (`split`): x < 2^(t+1) is its own symbol; otherwise, with
n = bit length of x, the symbol is 2^(t+1) + (n - t - 2)·2^t + (the t bits after the leading one) and
the low n - 1 - t bits go raw, unmodelled (they are close to uniform). Id gaps use t = 2, the mass
t = 3; counts (k <= 256) and levels (δ >= 1/510) are their own symbols; a float16 is split into its
high byte (sign, exponent, two mantissa bits: the symbol) and its low byte (raw).

The model of the data. Symbols are coded stream by stream, and a stream's context may use only what
earlier streams decoded, so every stream decodes in one vectorised pass over a batch of sequences:

    stream            symbol                     context candidates (the encoder picks one per shard)
    stat 0 (entropy)  high byte                  none
    stat c >= 1       high byte                  entropy's high byte >> r, r in {8 (none), 4, 3, 2, 0}
    count             K - 1                      the same
    mode              0 or cluster c + 1         none | bucket(K)      (tokens with K >= 8, shards with clusters)
    mass              split(mass, 3)             none | bucket(K) and K = k
    flag              4 candidates' kept bits   the group's first candidate's bucket (>> 0, 1, 2) and its size
    gap               split(gap, 2)              (j·r // n, r in {1, 4, 16}) x (bucket(n) or not), + clustered
    level             level                      (bucket(K) or not) x (bit length of the id or not)

bucket(K) = min(bit length of K, 7). The entropy predicts how many entries a token keeps; the rank j
of an entry among a token's n gap-coded ids predicts its gap (ids are dense where popular ids live);
a token's size and an id's magnitude predict its level (popular, low ids hold more mass).

Support clusters. A real teacher's supports recur: the flat distributions at word starts keep much
the same hundred ids, position after position (on the tiny teacher's store, ids cost 5.2 bits each as
gaps but 1.4 bits against clusters). Per shard the encoder fits a mixture of independent Bernoullis
over the ids (hard EM, at most 32 clusters, on up to 4,096 tokens with K >= 8, evenly spaced); a
cluster's candidates are the ids at least 1/8 of its tokens keep, each with its log-odds bucket.
Every token with K >= 8 then takes the cheaper coding: its mode is 0 (all ids as gaps) or a cluster,
whose candidates each get a kept / not flag, and only its other ("extra") ids are gap-coded, in
contexts of their own. The clusters are kept only where they save more than their table costs. The
flags go four to a symbol (FLAG_GROUP; alphabet 16): a cluster's candidates ordered by descending
bucket (ascending id among equals; the decoder derives the order from the buckets), each run of four
one symbol whose bit b is the kept flag of the run's b-th candidate, so the four are alike and the
first one's bucket is a good context; a quarter of the decode steps of one symbol per flag, and the
joint model of four is, if anything, smaller (0.4% on the tiny teacher's store).

The fit: per shard, per stream and candidate context, the symbol counts of every context; the encoder
keeps the candidate with the fewest bits in all: the data under the coder's frequency tables plus the
table's compressed size. Counts are kept as 8-bit log-counts `1 + round(8·log2 c)` (0 = unseen: the
model is fitted to exactly the symbols it codes, so an unseen symbol gets no probability at all);
`rans.frequencies` turns them into integer frequencies (sum 2^15) by integer arithmetic, so the
decoder rebuilds the same models from the same bytes on any machine.

Shard sections (see `store` for the file layout):

    model        uint8   zlib of: uint32 [magic "PCX2", n streams, (candidate, alphabet, n contexts) per stream,
                         the used context ids], uint8 log-counts [n contexts, alphabet] per stream, then the
                         clusters: uint32 [n clusters, n candidates each, candidate ids (first, then
                         differences)], uint8 candidate buckets
    seq_entries  [S]     uint32 kept entries of each sequence (a cross-check; `verify` sums it)
    chunks       [2S+1]  uint64 byte offsets of each sequence's two payload chunks:
                         ANS words (`rans`: uint32 little-endian) and raw bits (MSB first, padded with 1 bits)

A sequence's symbols go into its own ANS stream in the stream order above, each stream in token
order, so any sequence decodes alone (random access is by sequence, as for egsqrt) and a batch of
sequences decodes each stream in one compiled loop, the model index computed per symbol. Its raw bits
follow the same order: the stats' low bytes, count, mass, gap. A decoded sequence is checked: the ANS
stream must end exactly at the encoder's initial state with every word read, raw fields must fit
their chunk, counts must lie in [1, k] and sum to `seq_entries`, flags must not keep more ids than the
count, ids must lie in [0, V). Format 1 (magic "PCX1": constriction's coder, each stream's symbols
grouped by context; decoding ran at 0.46x egsqrt's speed) is refused with a one-line error naming it.

Speed (bench_store, 16-sequence batches, medians): decoding runs at 0.76x egsqrt's tokens/s on the tiny
teacher's real store and 0.88x on the synthetic V = 151,552 one; encoding (the fit included) at ~0.35x
(bench_generate). Per stream the model index of every symbol comes from vectorised or compiled context functions (`_gap_contexts`, `_level_contexts`,
`_flag_models`), then one `rans` call decodes the stream for the whole batch, the sequences' coders
taking turns; ids are merged and raw fields read by compiled loops (`_merge_ids`, `_join_raw`).

Memory: the writer holds a shard's symbols until the shard is complete (about 6 bytes per entry,
against egsqrt's ~2.4 of finished bits), and coding a shard takes a few times that in temporaries;
at the paper's 4,096 x 4,096-token shards prefer `logits.sequences_per_shard` of a few hundred.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
from numba import njit

import pd_lightning.logits.codec as codec
from pd_lightning.logits import rans

NAME = "ctxans"
MODEL_FORMAT = codec.CTXANS_MODEL_FORMAT  # the manifest's encoding.model_format (format 1 stores lack it)
MODEL_MAGIC = 0x32584350  # "PCX2": symbols coded by `rans`, in token order
OLD_MODEL_MAGIC = 0x31584350  # "PCX1": the first ctxans (constriction's coder, symbols grouped by context)
LOGCOUNT_SCALE = 8.0
GAP_TOP, MASS_TOP, LEVEL_TOP, TOP_MAX = 2, 3, 8, 8
STAT_BITS = 8  # raw low byte of each float16 stat
# support clusters (see the module docstring)
CLUSTER_MIN_K = 8  # tokens keeping at least this many entries may be coded against a cluster
MAX_CLUSTERS = 32
CLUSTER_FIT_TOKENS = 4096  # tokens the clusters are fitted on (evenly spaced over the shard's candidates)
CLUSTER_EM_ITERS = 8
CANDIDATE_MIN_P = 1 / 8  # an id is a cluster's candidate when at least this share of its tokens keep it
BUCKET_STEP = 0.5  # flag contexts: the candidate's log-odds of being kept, in steps of 0.5 nats
N_BUCKETS = 32
FLAG_GROUP = 4  # a clustered token's flags are coded 4 to a symbol (alphabet 16): a quarter of the decode steps
EXTRA_CONTEXT = 1 << 12  # gap contexts of a clustered token's extra ids start here
HI_SHIFTS = (8, 4, 3, 2, 0)  # context candidates from the entropy's high byte (8: none)


# ----------------------------------------------------------------------------- symbols


_BITLEN16 = np.concatenate([[0], np.frexp(np.arange(1, 1 << 16, dtype=np.float64))[1]]).astype(np.int64)


def _bitlen(x: np.ndarray) -> np.ndarray:
    """Bit length of non-negative integers (0 for 0), exact (a 16-bit table: decoding calls it on every entry)."""
    x = np.asarray(x, dtype=np.int64)
    if x.size == 0:
        return np.zeros(0, np.int64)
    if int(x.max()) < 1 << 16:
        return _BITLEN16[x]
    if int(x.max()) < 1 << 32:
        hi = x >> 16
        return np.where(hi > 0, 16 + _BITLEN16[hi], _BITLEN16[x & 0xFFFF])
    return np.where(x > 0, np.frexp(np.maximum(x, 1).astype(np.float64))[1], 0).astype(np.int64)


def split(x: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(symbol, raw width, raw value) of integers x >= 0 with `top` modelled bits after the leading one."""
    x = np.asarray(x, dtype=np.int64)
    d = 1 << (top + 1)
    n = _bitlen(x)
    w = np.where(x >= d, n - 1 - top, 0)
    sym = np.where(x >= d, d + ((n - top - 2) << top) + ((x >> w) & ((1 << top) - 1)), x)
    return sym, w, x & ((np.int64(1) << w) - 1)


def raw_width(sym: np.ndarray, top: int) -> np.ndarray:
    """Raw width a symbol of `split` implies."""
    d = 1 << (top + 1)
    return np.where(sym >= d, ((sym - d) >> top) + 1, 0)


def join(sym: np.ndarray, raw: np.ndarray, top: int) -> np.ndarray:
    """Inverse of `split`."""
    d = 1 << (top + 1)
    w = raw_width(sym, top)
    lead = (1 << top) | ((sym - d) & ((1 << top) - 1))
    return np.where(sym >= d, (lead << w) | raw, sym)


def alphabet(max_value: int, top: int) -> int:
    """Number of symbols `split` makes of values in [0, max_value]."""
    return int(split(np.array([max_value]), top)[0][0]) + 1


def direct_top(max_value: int) -> int:
    """The `top` that makes every value in [0, max_value] its own symbol, at most TOP_MAX (alphabet <= 2^(TOP_MAX+1))."""
    return min(TOP_MAX, max(0, int(_bitlen(np.array([max(max_value, 1)]))[0]) - 1))


@dataclass
class Symbols:
    """Quantised content of whole sequences, before entropy coding (the writer holds these per shard)."""

    counts: np.ndarray  # [T] uint16/uint32, kept entries per token
    mass: np.ndarray  # [T] uint16
    stats: np.ndarray  # [T, C] uint16, the float16 stats' bits
    ids: np.ndarray  # [M] uint32, ascending within each token
    levels: np.ndarray  # [M] uint16, in id order
    num_sequences: int

    @property
    def num_entries(self) -> int:
        return int(self.ids.size)

    @staticmethod
    def cat(parts: list["Symbols"]) -> "Symbols":
        """Concatenate along sequences."""
        return Symbols(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("counts", "mass", "stats", "ids", "levels")),
                       sum(p.num_sequences for p in parts))


def symbolize(sparse, positions: int, vocab_size: int, k: int, value_step: float) -> Symbols:
    """egsqrt's quantisation of whole sequences (rows sequence-major): the symbols `encode_shard` codes."""
    n_tok = len(sparse)
    if n_tok % positions:
        raise ValueError(f"{n_tok} token rows is not a whole number of sequences of {positions} positions")
    counts, ids, lps, lq = codec._token_entries(sparse, by_id=True)
    if counts.min(initial=1) < 1 or counts.max(initial=1) > k:
        raise ValueError(f"kept-entry counts must lie in [1, {k}]")
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"ids must lie in [0, {vocab_size})")
    mass, levels = codec.quantise_sqrt(lps, lq, counts, value_step)
    stats = codec.stats_columns(sparse)
    return Symbols(counts.astype(np.uint32), mass.astype(np.uint16), stats.view(np.uint16).reshape(n_tok, -1).copy(),
                   ids.astype(np.uint32), levels.astype(np.uint16), n_tok // positions)


# ----------------------------------------------------------------------------- streams and contexts


@dataclass(frozen=True)
class Layout:
    """Alphabets and split parameters, a pure function of the store's settings."""

    k: int
    vocab_size: int
    max_level: int
    n_stats: int

    @property
    def count_top(self) -> int:
        return direct_top(self.k - 1)

    @property
    def level_top(self) -> int:
        return min(LEVEL_TOP, direct_top(self.max_level))

    def streams(self) -> list[tuple[str, int, int]]:
        """(name, alphabet, number of context candidates) in coding order."""
        out = [("stat0", 256, 1)] + [(f"stat{c}", 256, len(HI_SHIFTS)) for c in range(1, self.n_stats)]
        out += [("count", alphabet(max(self.k - 1, 1), self.count_top), len(HI_SHIFTS)), ("mode", MAX_CLUSTERS + 1, 2),
                ("mass", alphabet(65535, MASS_TOP), 2), ("flag", 1 << FLAG_GROUP, 3),
                ("gap", alphabet(self.vocab_size - 1, GAP_TOP), 6), ("level", alphabet(self.max_level, self.level_top), 4)]
        return out


def _k_bucket(counts: np.ndarray) -> np.ndarray:
    return np.minimum(_bitlen(counts), 7)


def _hi_context(e_hi: np.ndarray, cand: int) -> np.ndarray:
    return e_hi >> HI_SHIFTS[cand]


def _mass_context(counts: np.ndarray, k: int, cand: int) -> np.ndarray:
    if cand == 0:
        return np.zeros(len(counts), np.int64)
    return _k_bucket(counts) + 8 * (counts == k)


@njit(cache=True, nogil=True)
def _bitlen_one(x):
    """Bit length of 0 <= x < 2^32 (the 16-bit table of `_bitlen`)."""
    return _BITLEN16[x] if x < 65536 else 16 + _BITLEN16[x >> 16]


@njit(cache=True, nogil=True)
def _gap_contexts(n_gap, clustered, cand, out):
    """Gap context of each gap-coded id (token t's n_gap[t] of them consecutive, at ranks j = 0..n-1): j·r // n for
    r = 1, 4, 16 (cand % 3), times 8 plus bucket(n) if cand >= 3, plus EXTRA_CONTEXT for a clustered token's extra
    ids."""
    res = 1 if cand % 3 == 0 else (4 if cand % 3 == 1 else 16)
    e = 0
    for t in range(n_gap.size):
        n = n_gap[t]
        kb = min(_bitlen_one(n), 7)
        for j in range(n):
            ctx = (j * res) // n
            if cand >= 3:
                ctx = ctx * 8 + kb
            out[e] = ctx + EXTRA_CONTEXT * clustered[t]
            e += 1


def _gap_context(n_gap: np.ndarray, clustered: np.ndarray, cand: int) -> np.ndarray:
    """Context of each gap (see `_gap_contexts`); n_gap, clustered: per token."""
    out = np.empty(int(n_gap.sum()), np.int64)
    _gap_contexts(np.ascontiguousarray(n_gap, np.int64), np.ascontiguousarray(clustered, np.int64), cand, out)
    return out


@njit(cache=True, nogil=True)
def _level_contexts(ids, cnt, cand, out):
    """Level context of each entry (tokens' entries consecutive, cnt[t] of token t): bucket(K) if cand & 1, plus
    8 · bit length of the id if cand & 2."""
    e = 0
    for t in range(cnt.size):
        kb = 0
        if cand & 1:
            kb = min(_bitlen_one(cnt[t]), 7)
        for _ in range(cnt[t]):
            ctx = kb
            if cand & 2:
                ctx += 8 * _bitlen_one(ids[e])
            out[e] = ctx
            e += 1


@njit(cache=True, nogil=True)
def _to_models(ctx, lookup, first):
    """In place: context ids -> global model indices first + lookup[ctx] (lookup: -1 for a context the model lacks);
    returns 1 if one is missing, else 0."""
    for i in range(ctx.size):
        c = ctx[i]
        if c < 0 or c >= lookup.size or lookup[c] < 0:
            return 1
        ctx[i] = first + lookup[c]
    return 0


def _level_context(ids: np.ndarray, cnt: np.ndarray, cand: int) -> np.ndarray:
    """Context of each entry's level (see `_level_contexts`); cnt: entries per token."""
    out = np.empty(len(ids), np.int64)
    _level_contexts(np.ascontiguousarray(ids, np.int64), np.ascontiguousarray(cnt, np.int64), cand, out)
    return out


# ----------------------------------------------------------------------------- the fitted model


def _quantise_counts(c: np.ndarray) -> np.ndarray:
    q = np.rint(LOGCOUNT_SCALE * np.log2(np.maximum(c, 1))).astype(np.int64) + 1
    return np.where(c > 0, np.minimum(q, 255), 0).astype(np.uint8)


class StreamModel:
    """One stream's fitted model: the chosen context candidate and a categorical model per used context."""

    def __init__(self, name: str, size: int, cand: int, ctx_ids: np.ndarray, table: np.ndarray):
        self.name, self.alphabet, self.cand = name, size, cand
        self.ctx_ids, self.table = ctx_ids.astype(np.int64), table
        lookup_size = int(self.ctx_ids.max(initial=-1)) + 2
        self.lookup = np.full(lookup_size, -1, np.int64)  # context id -> used index (-1: never seen)
        self.lookup[self.ctx_ids] = np.arange(len(self.ctx_ids))

    def frequencies(self) -> np.ndarray:
        """The coder's integer frequency table [n contexts, alphabet] (`rans.frequencies` of the log-counts)."""
        return rans.frequencies(self.table)


class Clusters:
    """The shard's support clusters: per cluster, its candidate ids (ascending) and each one's flag context."""

    def __init__(self, ids: list[np.ndarray], buckets: list[np.ndarray]):
        self.n = len(ids)
        self.sizes = np.array([len(x) for x in ids], np.int64)
        self.offsets = codec._excl_cumsum(self.sizes)
        self.ids = np.concatenate(ids).astype(np.int64) if ids else np.zeros(0, np.int64)
        self.buckets = np.concatenate(buckets).astype(np.int64) if buckets else np.zeros(0, np.int64)
        # flag groups: each cluster's candidates by descending bucket (ascending id among equals), FLAG_GROUP at a time,
        # so a group's flags are alike and its first candidate's bucket is its context
        self.code_slot = (np.concatenate([o + np.argsort(-b, kind="stable") for o, b in zip(self.offsets[:-1], buckets)])
                          if ids else np.zeros(0, np.int64)).astype(np.int64)
        self.n_groups = -(-self.sizes // FLAG_GROUP)
        self.group_offsets = codec._excl_cumsum(self.n_groups)
        rank = _ranges(np.zeros(self.n, np.int64), self.n_groups) * FLAG_GROUP  # each group's first code rank
        cluster_of = np.repeat(np.arange(self.n), self.n_groups)
        self.group_len = np.minimum(FLAG_GROUP, self.sizes[cluster_of] - rank)
        self.group_bucket = self.buckets[self.code_slot[self.offsets[:-1][cluster_of] + rank]] if self.n else np.zeros(0, np.int64)

    def slots(self, modes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For tokens coded against clusters (mode c >= 1 is cluster c - 1): their candidate slots in code order (id
        order: `code_slot` of them), token after token, and how many each token has."""
        lengths = self.sizes[modes - 1]
        return _ranges(self.offsets[modes - 1], lengths), lengths

    def groups(self, modes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The same for flag groups: the flat group indices, token after token, and how many each token has."""
        lengths = self.n_groups[modes - 1]
        return _ranges(self.group_offsets[modes - 1], lengths), lengths

    def to_bytes(self) -> bytes:
        deltas = self.ids.copy()
        inner = self.offsets[:-1][self.sizes > 0]
        deltas[1:] -= self.ids[:-1]
        deltas[inner] = self.ids[inner]  # each cluster's first id as is, then differences
        return (np.asarray([self.n, *self.sizes.tolist()], "<u4").tobytes() + deltas.astype("<u4").tobytes()
                + self.buckets.astype(np.uint8).tobytes())

    @staticmethod
    def from_bytes(blob: bytes, vocab_size: int) -> "Clusters":
        if len(blob) < 4:
            raise codec.CorruptChunk("model section lacks its clusters")
        n = int(np.frombuffer(blob[:4], "<u4")[0])
        if n > MAX_CLUSTERS or len(blob) < 4 * (n + 1):
            raise codec.CorruptChunk("model section has a bad cluster count")
        sizes = np.frombuffer(blob[4 : 4 * (n + 1)], "<u4").astype(np.int64)
        total = int(sizes.sum())
        if len(blob) != 4 * (n + 1) + 5 * total or (n and sizes.min() < 1):
            raise codec.CorruptChunk("model section's clusters do not fit their sizes")
        deltas = np.frombuffer(blob[4 * (n + 1) : 4 * (n + 1) + 4 * total], "<u4").astype(np.int64)
        buckets = np.frombuffer(blob[4 * (n + 1) + 4 * total :], np.uint8).astype(np.int64)
        offsets = codec._excl_cumsum(sizes)
        ids = [np.cumsum(deltas[offsets[c] : offsets[c + 1]]) for c in range(n)]
        for x in ids:
            if x[-1] >= vocab_size or (len(x) > 1 and np.diff(x).min() < 1):
                raise codec.CorruptChunk("a cluster's candidate ids are out of range or not ascending")
        if buckets.size and buckets.max() >= N_BUCKETS:
            raise codec.CorruptChunk("a cluster's flag context is out of range")
        return Clusters(ids, [buckets[offsets[c] : offsets[c + 1]] for c in range(n)])


class ShardModel:
    """Every stream's model and the support clusters of one shard; `to_bytes` / `from_bytes` are the `model` section."""

    def __init__(self, layout: Layout, streams: list[StreamModel], clusters: Clusters):
        self.layout, self.streams, self.clusters = layout, {s.name: s for s in streams}, clusters
        self.order = [s.name for s in streams]
        self.tables = rans.Tables([s.frequencies() for s in streams])
        self.first_model = dict(zip(self.order, self.tables.first.tolist()))  # stream -> its first global model index
        self._flag_models = None

    def flag_models(self) -> np.ndarray:
        """Global model index of each flag group's symbol (every group of a kept cluster is coded)."""
        if self._flag_models is None:
            sm = self.streams["flag"]
            cl = self.clusters
            self._flag_models = (self.model_of("flag", _flag_context(cl.group_bucket, cl.group_len, sm.cand)) if cl.n
                                 else np.zeros(0, np.int64))
        return self._flag_models

    def model_of(self, name: str, ctx: np.ndarray, in_place: bool = False) -> np.ndarray:
        """Global model index of each symbol of stream `name` with context ids `ctx` (int64; overwritten if in_place);
        CorruptChunk for a context the shard's model does not have."""
        out = ctx if in_place else np.array(ctx, np.int64)
        if _to_models(out, self.streams[name].lookup, self.first_model[name]):
            raise codec.CorruptChunk(f"stream {name}: a context the shard's model does not have")
        return out

    def to_bytes(self) -> np.ndarray:
        head = [MODEL_MAGIC, len(self.order)]
        for name in self.order:
            s = self.streams[name]
            head += [s.cand, s.alphabet, len(s.ctx_ids)]
        for name in self.order:
            head += self.streams[name].ctx_ids.tolist()
        blob = (np.asarray(head, "<u4").tobytes() + b"".join(self.streams[n].table.tobytes() for n in self.order)
                + self.clusters.to_bytes())
        return np.frombuffer(zlib.compress(blob, 9), np.uint8)

    @staticmethod
    def from_bytes(data: np.ndarray, layout: Layout) -> "ShardModel":
        """Parse a `model` section; CorruptChunk if it does not fit the store's layout."""
        try:
            blob = zlib.decompress(bytes(data))
        except zlib.error:
            raise codec.CorruptChunk("model section does not decompress") from None
        expect = layout.streams()
        n_head = 2 + 3 * len(expect)
        if len(blob) < 4 * n_head:
            raise codec.CorruptChunk("model section is too short")
        head = np.frombuffer(blob[: 4 * n_head], "<u4").astype(np.int64)
        if head[0] == OLD_MODEL_MAGIC:
            raise codec.CorruptChunk("model section is ctxans format 1 (PCX1, an earlier pd-lightning's): this version "
                                     "reads format 2 only; regenerate the store (pdl logits generate)")
        if head[0] != MODEL_MAGIC or head[1] != len(expect):
            raise codec.CorruptChunk("model section has a bad magic number or stream count")
        pos, streams, specs = 4 * n_head, [], head[2:].reshape(-1, 3)
        n_ctx_total = int(specs[:, 2].sum())
        if len(blob) < pos + 4 * n_ctx_total:
            raise codec.CorruptChunk("model section is too short")
        ids = np.frombuffer(blob[pos : pos + 4 * n_ctx_total], "<u4").astype(np.int64)
        pos += 4 * n_ctx_total
        first = 0
        for (name, size, n_cand), (cand, asize, n_ctx) in zip(expect, specs.tolist()):
            if asize != size or not 0 <= cand < n_cand or n_ctx > 1 << 16:
                raise codec.CorruptChunk(f"model of stream {name} does not fit the store's layout")
            nbytes = n_ctx * size
            table = np.frombuffer(blob[pos : pos + nbytes], np.uint8).reshape(n_ctx, size)
            if table.shape[0] != n_ctx or (n_ctx and table.max(axis=1).min() == 0):
                raise codec.CorruptChunk(f"model of stream {name} is truncated or has an empty row")
            ctx_ids = ids[first : first + n_ctx]
            if n_ctx and (np.any(np.diff(ctx_ids) <= 0) or ctx_ids[-1] > 1 << 16):
                raise codec.CorruptChunk(f"model of stream {name} has unordered context ids")
            streams.append(StreamModel(name, size, cand, ctx_ids, table))
            pos += nbytes
            first += n_ctx
        return ShardModel(layout, streams, Clusters.from_bytes(blob[pos:], layout.vocab_size))


def _dense_unique(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """np.unique(x, return_inverse=True) for small non-negative integers, by counting instead of sorting."""
    if x.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    present = np.bincount(x) > 0
    ids = np.flatnonzero(present)
    remap = np.cumsum(present) - 1
    return ids, remap[x]


def _fit_stream(name: str, size: int, candidates: list[np.ndarray], sym: np.ndarray) -> StreamModel:
    """The candidate context with the fewest bits: the data under the coder's frequency tables, plus the
    compressed table."""
    best = None
    for cand, ctx in enumerate(candidates):
        ids, inv = _dense_unique(ctx)
        counts = np.bincount(inv * size + sym, minlength=len(ids) * size).reshape(len(ids), size)
        table = _quantise_counts(counts)
        freq = rans.frequencies(table) if len(ids) else np.ones((0, size))
        logp = np.log2(np.maximum(freq, 1) / rans.TOTAL)
        bits = -(counts * logp).sum() + 8 * len(zlib.compress(table.tobytes() + ids.astype("<u4").tobytes(), 9))
        if best is None or bits < best[0]:
            best = (bits, StreamModel(name, size, cand, ids, table))
    return best[1]


# ----------------------------------------------------------------------------- support clusters


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of arange(start, start + length) for each pair."""
    cum = codec._excl_cumsum(lengths)
    return np.repeat(starts - cum[:-1], lengths) + np.arange(int(cum[-1]))


def _per_token_sum(values: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Sums of consecutive runs of `lengths` rows (rows of zero-length runs sum to 0)."""
    out = np.zeros((len(lengths),) + values.shape[1:], values.dtype)
    nz = lengths > 0
    if nz.any():
        out[nz] = np.add.reduceat(values, codec._excl_cumsum(lengths)[:-1][nz], axis=0)
    return out


def _bucket(p: np.ndarray) -> np.ndarray:
    logit = np.log(p) - np.log1p(-p)
    return np.clip(np.floor((logit - np.log(CANDIDATE_MIN_P / (1 - CANDIDATE_MIN_P))) / BUCKET_STEP), 0, N_BUCKETS - 1).astype(np.int64)


def _bucket_p(b: np.ndarray) -> np.ndarray:
    lo = np.log(CANDIDATE_MIN_P / (1 - CANDIDATE_MIN_P))
    return 1.0 / (1.0 + np.exp(-(lo + (b + 0.5) * BUCKET_STEP)))


def _gap_bits(gaps: np.ndarray, ctx: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Per token, the bits its gaps cost under a gap model fitted to them (the plain coding's cost)."""
    sym, w, _ = split(gaps, GAP_TOP)
    key = ctx * 256 + sym
    c, cc = np.bincount(key), np.bincount(ctx)
    return _per_token_sum(np.log2(cc[ctx] / c[key]) + w, lengths)


def _fit_clusters(cnt: np.ndarray, ids: np.ndarray, gaps: np.ndarray, vocab_size: int) -> tuple[Clusters, np.ndarray]:
    """Clusters of the shard's supports, and each token's mode (0: plain gaps, c: cluster c - 1).

    A hard-EM mixture of independent Bernoullis over the ids (each cluster: the share of its tokens keeping
    each id), fitted on up to CLUSTER_FIT_TOKENS of the tokens with >= CLUSTER_MIN_K entries; every such
    token then takes the cheapest coding (plain gaps, or flags against a cluster's candidates plus its
    extra ids), and the clusters are kept only where they save more than their table costs.
    """
    modes = np.zeros(len(cnt), np.int64)
    none = Clusters([], [])
    cand_tok = np.flatnonzero(cnt >= CLUSTER_MIN_K)
    if len(cand_tok) < 256:
        return none, modes
    starts = codec._excl_cumsum(cnt)
    sample = cand_tok[np.linspace(0, len(cand_tok) - 1, min(len(cand_tok), CLUSTER_FIT_TOKENS)).astype(np.int64)]
    s_len = cnt[sample]
    s_ids = ids[_ranges(starts[sample], s_len)]
    s_tok = np.repeat(np.arange(len(sample)), s_len)
    n_cl = int(min(MAX_CLUSTERS, max(1, len(sample) // 128)))
    # cheap gate: a cluster needs ids its tokens keep often, so some id must be common overall (random
    # supports, as of an untrained teacher, skip the fit)
    if np.bincount(s_ids, minlength=vocab_size).max() < 2 * CANDIDATE_MIN_P / n_cl * len(sample):
        return none, modes
    assign = np.arange(len(sample)) % n_cl
    for _ in range(CLUSTER_EM_ITERS):
        n_c = np.bincount(assign, minlength=n_cl)
        n_ci = np.bincount(assign[s_tok] * vocab_size + s_ids, minlength=n_cl * vocab_size).reshape(n_cl, vocab_size)
        prob = (n_ci + 0.5) / (n_c[:, None] + 1.0)
        weight = (np.log(prob) - np.log1p(-prob)).astype(np.float32)
        score = _per_token_sum(weight.T[s_ids], s_len) + np.log1p(-prob).sum(1).astype(np.float32)
        new = score.argmax(1)
        if np.array_equal(new, assign):
            break
        assign = new
    n_c = np.bincount(assign, minlength=n_cl)
    n_ci = np.bincount(assign[s_tok] * vocab_size + s_ids, minlength=n_cl * vocab_size).reshape(n_cl, vocab_size)
    prob = n_ci / np.maximum(n_c[:, None], 1)
    # every candidate token's cost in each coding: flags (bucketed probabilities) + extra ids ~ log2 V bits each
    keep = prob >= CANDIDATE_MIN_P
    bp = _bucket_p(_bucket(np.clip(prob, CANDIDATE_MIN_P, 1 - 1e-6)))
    extra_bits = float(np.log2(vocab_size)) + 2.0
    delta = np.where(keep, np.log2((1 - bp) / bp), extra_bits).astype(np.float32)  # kept id: flag 1 instead of 0
    base = np.where(keep, -np.log2(1 - bp), 0.0).sum(1) + np.log2(n_cl + 1)
    e_idx = _ranges(starts[cand_tok], cnt[cand_tok])
    plain = _gap_bits(gaps[e_idx], _gap_context(cnt[cand_tok], np.zeros(len(cand_tok), np.int64), 5), cnt[cand_tok])
    best = np.empty(len(cand_tok), np.int64)
    best_cost = np.empty(len(cand_tok), np.float64)
    block = max(1, (1 << 21) // max(n_cl, 1) // max(int(cnt[cand_tok].mean()), 1))
    for a in range(0, len(cand_tok), block):  # bounded memory: a block of tokens at a time
        t = cand_tok[a : a + block]
        cost = _per_token_sum(delta.T[ids[_ranges(starts[t], cnt[t])]], cnt[t]) + base
        best[a : a + block] = cost.argmin(1)
        best_cost[a : a + block] = cost.min(1)
    use = best_cost < plain
    table_bits = 8 * (5 * keep[np.unique(best[use])].sum() + 4)
    if (plain - best_cost)[use].sum() <= table_bits:
        return none, modes
    used = np.unique(best[use])
    renumber = np.full(n_cl, -1, np.int64)
    renumber[used] = np.arange(len(used))
    modes[cand_tok[use]] = renumber[best[use]] + 1
    cl_ids = [np.flatnonzero(keep[c]) for c in used]
    clusters = Clusters(cl_ids, [_bucket(np.clip(prob[c, x], CANDIDATE_MIN_P, 1 - 1e-6)) for c, x in zip(used, cl_ids)])
    return clusters, modes


# ----------------------------------------------------------------------------- per-stream values


@dataclass
class _Plan:
    """How each token's ids are coded: its mode, and which entries the clusters' flags cover."""

    modes: np.ndarray  # [T]
    member: np.ndarray  # [M] bool, entry covered by a flag
    flags: np.ndarray  # clustered tokens' flag-group symbols (FLAG_GROUP kept bits each), token after token
    flag_bucket: np.ndarray
    flag_len: np.ndarray
    flag_tok: np.ndarray


def _plan(clusters: Clusters, modes: np.ndarray, cnt: np.ndarray, ids: np.ndarray, tok: np.ndarray, vocab_size: int) -> _Plan:
    ct = np.flatnonzero(modes > 0)
    member = np.zeros(len(ids), bool)
    if len(ct) == 0:
        z = np.zeros(0, np.int64)
        return _Plan(modes, member, z, z, z, z)
    pos, lengths = clusters.slots(modes[ct])
    cand_tok = np.repeat(ct, lengths)
    keys = tok * vocab_size + ids  # ascending: tokens in order, ids ascending within each
    want = cand_tok * vocab_size + clusters.ids[clusters.code_slot[pos]]
    at = np.minimum(np.searchsorted(keys, want), len(keys) - 1)
    hit = keys[at] == want
    member[at[hit]] = True
    # rank r of each candidate in its token's code order: bit r % G of the token's group r // G
    rank = pos - np.repeat(clusters.offsets[modes[ct] - 1], lengths)
    groups, n_groups = clusters.groups(modes[ct])
    row = np.repeat(codec._excl_cumsum(n_groups)[:-1], lengths) + rank // FLAG_GROUP
    sym = np.bincount(row, weights=hit << (rank % FLAG_GROUP), minlength=len(groups)).astype(np.int64)
    return _Plan(modes, member, sym, clusters.group_bucket[groups], clusters.group_len[groups], np.repeat(ct, n_groups))


def _gap_layout(cnt: np.ndarray, tok: np.ndarray, member: np.ndarray) -> tuple:
    """The gap-coded entries (not covered by flags): which they are, their token, and how many each token has."""
    coded = ~member
    g_tok = tok[coded]
    return coded, g_tok, np.bincount(g_tok, minlength=len(cnt))


def _gaps_of(ids: np.ndarray, g_tok: np.ndarray) -> np.ndarray:
    gaps = ids.copy()
    if len(ids):
        gaps[1:] -= ids[:-1] + 1
        first = np.flatnonzero(np.concatenate([[True], g_tok[1:] != g_tok[:-1]]))
        gaps[first] = ids[first]
    return gaps


def _stream_symbols(s: Symbols, layout: Layout) -> tuple[dict, Clusters]:
    """name -> (symbols, context of each candidate, raw widths, raw values, token of each symbol), in coding order."""
    cnt = s.counts.astype(np.int64)
    stats = s.stats.astype(np.int64)
    e_hi = stats[:, 0] >> 8
    tok = np.repeat(np.arange(len(cnt)), cnt)
    ids = s.ids.astype(np.int64)
    all_tok = np.arange(len(cnt))
    clusters, modes = _fit_clusters(cnt, ids, _gaps_of(ids, tok), layout.vocab_size)
    plan = _plan(clusters, modes, cnt, ids, tok, layout.vocab_size)
    coded, g_tok, n_g = _gap_layout(cnt, tok, plan.member)
    no_raw = lambda n: (np.zeros(n, np.int64), np.zeros(n, np.int64))  # noqa: E731
    out: dict = {"stat0": (stats[:, 0] >> 8, [np.zeros(len(cnt), np.int64)], np.full(len(cnt), STAT_BITS), stats[:, 0] & 255, all_tok)}
    for c in range(1, layout.n_stats):
        out[f"stat{c}"] = (stats[:, c] >> 8, [_hi_context(e_hi, r) for r in range(len(HI_SHIFTS))], np.full(len(cnt), STAT_BITS),
                           stats[:, c] & 255, all_tok)
    out["count"] = (*split_ctx(cnt - 1, layout.count_top, [_hi_context(e_hi, r) for r in range(len(HI_SHIFTS))]), all_tok)
    mt = _mode_tokens(cnt, clusters)
    out["mode"] = (modes[mt], [_mode_context(cnt[mt], c) for c in range(2)], *no_raw(len(mt)), mt)
    out["mass"] = (*split_ctx(s.mass.astype(np.int64), MASS_TOP, [_mass_context(cnt, layout.k, c) for c in range(2)]), all_tok)
    out["flag"] = (plan.flags, [_flag_context(plan.flag_bucket, plan.flag_len, r) for r in range(3)],
                   *no_raw(len(plan.flags)), plan.flag_tok)
    out["gap"] = (*split_ctx(_gaps_of(ids[coded], g_tok), GAP_TOP, [_gap_context(n_g, modes > 0, c) for c in range(6)]), g_tok)
    out["level"] = (*split_ctx(s.levels.astype(np.int64), layout.level_top, [_level_context(ids, cnt, c) for c in range(4)]), tok)
    return out, clusters


def _mode_tokens(cnt: np.ndarray, clusters: Clusters) -> np.ndarray:
    """Tokens that code a mode symbol: those with >= CLUSTER_MIN_K entries, when the shard has clusters."""
    return np.flatnonzero(cnt >= CLUSTER_MIN_K) if clusters.n else np.zeros(0, np.int64)


def _flag_context(bucket: np.ndarray, length: np.ndarray, cand: int) -> np.ndarray:
    """A flag group's context: its first (likeliest) candidate's bucket >> cand, and how many candidates it has."""
    return ((bucket >> cand) << 2) | (length - 1)


def _mode_context(cnt: np.ndarray, cand: int) -> np.ndarray:
    return _k_bucket(cnt) if cand else np.zeros(len(cnt), np.int64)


def split_ctx(x: np.ndarray, top: int, ctxs: list[np.ndarray]):
    """`split` of x, with the contexts of its symbols."""
    sym, w, raw = split(x, top)
    return sym, ctxs, w, raw


# ----------------------------------------------------------------------------- encode


@dataclass
class EncodedShard:
    """A shard's sections (uint8 model, uint32 seq_entries, chunk byte sizes [S·2]) and its payload."""

    model: np.ndarray
    seq_entries: np.ndarray
    chunk_sizes: np.ndarray
    payload: np.ndarray
    num_entries: int


def encode_shard(s: Symbols, positions: int, vocab_size: int, k: int, value_step: float) -> EncodedShard:
    """Fit the shard's model and code every sequence into its own ANS stream and raw-bit chunk."""
    layout = Layout(k, vocab_size, max_level(value_step), s.stats.shape[1])
    n_seq = s.num_sequences
    streams, clusters = _stream_symbols(s, layout)
    model = ShardModel(layout, [_fit_stream(name, size, streams[name][1], streams[name][0])
                                for name, size, _ in layout.streams()], clusters)
    cnt = s.counts.astype(np.int64)
    # coding order within a sequence: stream after stream, each in token order (a stable sort by sequence keeps it)
    seq_parts, model_parts, sym_parts, w_parts, raw_parts, raw_key = [], [], [], [], [], []
    n_streams = len(layout.streams())
    for si, (name, _, _) in enumerate(layout.streams()):
        sym, ctxs, w, raw, tok_of = streams[name]
        seq_of = tok_of // positions
        seq_parts.append(seq_of)
        model_parts.append(model.model_of(name, ctxs[model.streams[name].cand]))
        sym_parts.append(sym)
        w_parts.append(w)
        raw_parts.append(raw)
        raw_key.append(seq_of * n_streams + si)
    seq_all = np.concatenate(seq_parts)
    order = np.argsort(seq_all, kind="stable")
    bounds = np.searchsorted(seq_all[order], np.arange(n_seq + 1))
    ans_chunks = [w.view(np.uint8) for w in rans.encode(np.concatenate(sym_parts)[order],
                                                        np.concatenate(model_parts)[order], bounds, model.tables)]
    # raw bits: sequence-major, stream order, token order (a stable sort by sequence keeps the rest)
    rk = np.concatenate(raw_key)
    raw_order = np.argsort(rk, kind="stable")
    widths = np.concatenate(w_parts)[raw_order]
    values = np.concatenate(raw_parts)[raw_order]
    fields_per_seq = np.bincount(rk // n_streams, minlength=n_seq)
    keep = widths > 0
    kept_per_seq = np.bincount(np.repeat(np.arange(n_seq), fields_per_seq)[keep], minlength=n_seq)
    raw_payload, raw_bytes = codec._build_payload([(widths[keep], values[keep])], codec._excl_cumsum(kept_per_seq), n_seq)
    # interleave per sequence: ANS words, then raw bits
    ans_sizes = np.array([len(c) for c in ans_chunks], np.int64)
    raw_sizes = raw_bytes[:, 0].astype(np.int64)
    raw_starts = codec._excl_cumsum(raw_sizes)
    pieces = []
    for q in range(n_seq):
        pieces.append(ans_chunks[q])
        pieces.append(raw_payload[raw_starts[q] : raw_starts[q + 1]])
    payload = np.concatenate(pieces) if pieces else np.zeros(0, np.uint8)
    seq_entries = cnt.reshape(n_seq, positions).sum(1)
    return EncodedShard(model.to_bytes(), seq_entries.astype(np.uint32), np.stack([ans_sizes, raw_sizes], 1).ravel().astype(np.uint64),
                        payload, s.num_entries)


def max_level(value_step: float) -> int:
    """The largest level egsqrt's quantisation makes at this step."""
    return int(1.0 / value_step) + 1


# ----------------------------------------------------------------------------- decode


def _decode_stream(coders: rans.Decoder, model: ShardModel, name: str, per_seq: np.ndarray, ctx) -> np.ndarray:
    """Symbols of one stream for a batch of sequences (per_seq[q] of sequence q), in token order; ctx: their
    context ids (None: the stream has one context)."""
    if ctx is None:
        ctx = np.zeros(int(per_seq.sum()), np.int64)
    return _coders_decode(coders, name, per_seq, model.model_of(name, ctx))


def _coders_decode(coders: rans.Decoder, name: str, per_seq: np.ndarray, models: np.ndarray) -> np.ndarray:
    """`rans.Decoder.decode`, a chunk that runs out named as the stream's CorruptChunk."""
    try:
        return coders.decode(per_seq, models)
    except ValueError as e:
        raise codec.CorruptChunk(f"stream {name}: {e}") from None


@njit(cache=True, nogil=True)
def _flag_models(ct, cl, positions, group_offsets, n_groups, group_models, per_seq, model_out):
    """Model of every flag group's symbol, and how many each sequence has: clustered token ct[i] (cluster cl[i]) has
    one per group of its cluster."""
    f = 0
    for i in range(ct.size):
        c = cl[i]
        per_seq[ct[i] // positions] += n_groups[c]
        for g in range(group_offsets[c], group_offsets[c] + n_groups[c]):
            model_out[f] = group_models[g]
            f += 1


@njit(cache=True, nogil=True)
def _members(syms, ct, cl, offsets, sizes, group_offsets, n_groups, group_len, code_slot, cl_ids, scratch, n_member, out):
    """The kept candidates' ids (token after token, ascending), each clustered token's count in n_member; returns
    how many in all, or -1 if a group's symbol keeps a candidate past the group's end. Bit b of group g's symbol
    keeps the candidate of code rank FLAG_GROUP·g + b; scratch (zeros, one per candidate of the largest cluster)
    marks them in id order."""
    f, o = 0, 0
    for i in range(ct.size):
        c = cl[i]
        base = offsets[c]
        kept = 0
        for g in range(group_offsets[c], group_offsets[c] + n_groups[c]):
            sym = syms[f]
            f += 1
            if sym >> group_len[g]:
                return -1
            r = base + (g - group_offsets[c]) * FLAG_GROUP
            while sym:
                if sym & 1:
                    scratch[code_slot[r] - base] = 1
                    kept += 1
                sym >>= 1
                r += 1
        start = o
        slot = 0
        while o - start < kept:  # the marked candidates, in id order
            if scratch[slot]:
                scratch[slot] = 0
                out[o] = cl_ids[base + slot]
                o += 1
            slot += 1
        n_member[ct[i]] = kept
    return o


@njit(cache=True, nogil=True)
def _merge_ids(n_gap, gaps, n_member, member_ids, vocab_size, out):
    """Per token, its gap-coded ids (the first id = its gap, then previous + gap + 1) merged with its flagged
    cluster members (ascending) into `out`, ascending. Returns 0, 1 if an id repeats, 2 if one is >= vocab_size."""
    gi, mi, o = 0, 0, 0
    for t in range(n_gap.size):
        g_end, m_end = gi + n_gap[t], mi + n_member[t]
        gid = gaps[gi] if gi < g_end else -1
        last = -1
        while gi < g_end or mi < m_end:
            if gi < g_end and (mi >= m_end or gid < member_ids[mi]):
                v = gid
                gi += 1
                if gi < g_end:
                    gid += gaps[gi] + 1
            else:
                v = member_ids[mi]
                mi += 1
            if v <= last:
                return 1
            if v >= vocab_size:
                return 2
            out[o] = v
            o += 1
            last = v
    return 0


class _RawReader:
    """Reads each sequence's raw-bit chunk front to back, one stream at a time."""

    def __init__(self, payload: np.ndarray, chunk_offsets: np.ndarray, seqs: np.ndarray):
        self.buf, bits = codec._gather_chunks(payload, chunk_offsets, seqs * 2 + 1)
        self.pos, self.end = bits[:-1].copy(), bits[1:]

    def bytes(self, count_per_seq: int) -> np.ndarray:
        """[n, count] whole bytes at each sequence's (byte-aligned) read position."""
        start = self.pos >> 3
        self.pos += 8 * count_per_seq
        if np.any(self.pos > self.end):
            raise codec.CorruptChunk("raw fields run past the end of their chunk")
        return self.buf[start[:, None] + np.arange(count_per_seq)].astype(np.int64)

    def join(self, split: "_Split", sym: np.ndarray, per_seq: np.ndarray) -> np.ndarray:
        """Values of split symbols (per_seq[q] of sequence q, the sequences' runs one after another): each symbol's
        leading bits and its raw low bits, read from its sequence's chunk."""
        if not split.any_raw:
            return sym
        out = np.empty(len(sym), np.int64)
        if _join_raw(sym, np.asarray(per_seq, np.int64), split.width, split.lead, self.buf, self.pos, self.end, out):
            raise codec.CorruptChunk("raw fields run past the end of their chunk")
        return out


@njit(cache=True, nogil=True)
def _join_raw(sym, per_seq, width, lead, buf, pos, end, out):
    """out[i] = lead[s] << w | the next w = width[s] raw bits (MSB first) of its sequence's chunk, s = sym[i] (the
    first per_seq[0] symbols are sequence 0's, ...); pos, end: each chunk's bit position and end (buf ends in 8
    zero bytes). Returns 1 if a chunk runs out, else 0."""
    i = 0
    for q in range(per_seq.size):
        p = pos[q]
        for _ in range(per_seq[q]):
            s = sym[i]
            w = width[s]
            v = lead[s]
            if w:
                if p + w > end[q]:
                    return 1
                b = p >> 3
                acc = np.uint64(0)
                for j in range(8):  # 64 bits from the field's first byte: any field of <= 56 bits lies inside
                    acc = (acc << np.uint64(8)) | np.uint64(buf[b + j])
                v = (v << w) | np.int64((acc << np.uint64(p & 7)) >> np.uint64(64 - w))
                p += w
            out[i] = v
            i += 1
        pos[q] = p
    return 0


class _Split:
    """Lookup tables of `split` for one `top`: raw width and leading bits of every symbol."""

    def __init__(self, size: int, top: int):
        sym = np.arange(size, dtype=np.int64)
        self.width = raw_width(sym, top)
        d = 1 << (top + 1)
        self.lead = np.where(sym >= d, (1 << top) | ((sym - d) & ((1 << top) - 1)), sym)
        self.any_raw = bool(self.width.any())


def decode_arrays(model: ShardModel, seq_entries: np.ndarray, chunk_offsets: np.ndarray, payload: np.ndarray,
                  seqs: np.ndarray, positions: int, vocab_size: int, k: int, value_step: float):
    """Decode local sequences `seqs` of one shard; the same tuple as `codec.decode_arrays`."""
    layout, st, clusters = model.layout, model.streams, model.clusters
    seqs = np.asarray(seqs, dtype=np.int64)
    n = len(seqs)
    n_tok = n * positions
    starts, ends = chunk_offsets[2 * seqs].astype(np.int64), chunk_offsets[2 * seqs + 1].astype(np.int64)
    if np.any((ends - starts) % 4) or np.any(ends < starts + 8) or (n and ends.max() > len(payload)):
        raise codec.CorruptChunk("an ANS chunk is not a whole number (>= 2) of 32-bit words inside the payload")
    coders = rans.Decoder(payload, starts, ends, model.tables)
    raws = _RawReader(payload, chunk_offsets, seqs)
    per_tok = np.full(n, positions, np.int64)  # a token-level stream: `positions` symbols per sequence
    # stats' high bytes (entropy first: it is the context of the others and of the count), then the count
    hi = np.empty((n_tok, layout.n_stats), np.int64)
    hi[:, 0] = _decode_stream(coders, model, "stat0", per_tok, None)
    e_hi = hi[:, 0]
    for c in range(1, layout.n_stats):
        sm = st[f"stat{c}"]
        hi[:, c] = _decode_stream(coders, model, f"stat{c}", per_tok, _hi_context(e_hi, sm.cand))
    cnt_sym = _decode_stream(coders, model, "count", per_tok, _hi_context(e_hi, st["count"].cand))
    lo = raws.bytes(positions * layout.n_stats).reshape(n, layout.n_stats, positions).transpose(0, 2, 1)
    stats = (hi << 8) | lo.reshape(n_tok, layout.n_stats)
    cnt = raws.join(_split_table(st["count"].alphabet, layout.count_top), cnt_sym, per_tok) + 1
    if cnt.size and (cnt.min() < 1 or cnt.max() > k):
        raise codec.CorruptChunk(f"a kept-entry count lies outside [1, {k}]")
    per_entry = cnt.reshape(n, positions).sum(1)
    if not np.array_equal(per_entry, seq_entries[seqs].astype(np.int64)):
        raise codec.CorruptChunk("decoded counts do not sum to the sequence's entry count")
    modes = np.zeros(n_tok, np.int64)
    mt = _mode_tokens(cnt, clusters)
    if len(mt):
        modes[mt] = _decode_stream(coders, model, "mode", np.bincount(mt // positions, minlength=n), _mode_context(cnt[mt], st["mode"].cand))
        if modes.max() > clusters.n:
            raise codec.CorruptChunk("a token names a cluster the shard's model does not have")
    mass_sym = _decode_stream(coders, model, "mass", per_tok, _mass_context(cnt, k, st["mass"].cand))
    # clustered tokens: a flag per candidate of their cluster; the rest of their ids, and every id of the
    # other tokens, are gap-coded
    ct = np.flatnonzero(modes)
    n_gap, n_member = cnt.copy(), np.zeros(n_tok, np.int64)
    member_ids = np.zeros(0, np.int64)
    if len(ct):
        cl = modes[ct] - 1
        n_syms = int(clusters.n_groups[cl].sum())
        flag_per_seq, flag_models = np.zeros(n, np.int64), np.empty(n_syms, np.int64)
        _flag_models(ct, cl, positions, clusters.group_offsets, clusters.n_groups, model.flag_models(), flag_per_seq, flag_models)
        flags = _coders_decode(coders, "flag", flag_per_seq, flag_models)
        member_ids = np.empty(int(clusters.sizes[cl].sum()), np.int64)
        n_members = _members(flags, ct, cl, clusters.offsets, clusters.sizes, clusters.group_offsets, clusters.n_groups,
                             clusters.group_len, clusters.code_slot, clusters.ids, np.zeros(int(clusters.sizes.max()), np.uint8),
                             n_member, member_ids)
        if n_members < 0:
            raise codec.CorruptChunk("a flag group keeps a candidate past its cluster's end")
        member_ids = member_ids[:n_members]
        n_gap -= n_member
        if n_gap.min() < 0:
            raise codec.CorruptChunk("a token's flags keep more ids than its count")
    g_per_seq = n_gap.reshape(n, positions).sum(1)
    gap_models = model.model_of("gap", _gap_context(n_gap, modes > 0, st["gap"].cand), in_place=True)
    gap_sym = _coders_decode(coders, "gap", g_per_seq, gap_models)
    mass = raws.join(_split_table(st["mass"].alphabet, MASS_TOP), mass_sym, per_tok)
    gaps = raws.join(_split_table(st["gap"].alphabet, GAP_TOP), gap_sym, g_per_seq)
    ids = np.empty(int(per_entry.sum()), np.int64)
    err = _merge_ids(n_gap, gaps, n_member, member_ids, vocab_size, ids)
    if err:
        raise codec.CorruptChunk("a clustered token's extra id repeats a flagged one" if err == 1
                                 else f"a decoded id lies outside [0, {vocab_size})")
    lev_models = model.model_of("level", _level_context(ids, cnt, st["level"].cand), in_place=True)
    lev_sym = _coders_decode(coders, "level", per_entry, lev_models)
    levels = raws.join(_split_table(st["level"].alphabet, layout.level_top), lev_sym, per_entry)
    if not coders.finished():
        raise codec.CorruptChunk("an ANS stream does not end where its counts say")
    if levels.size and levels.max() > layout.max_level:
        raise codec.CorruptChunk("a decoded level lies outside the quantiser's range")
    return codec.assemble(ids, levels, mass, cnt, stats.astype(np.uint16).view(np.float16), k, value_step)


_SPLITS: dict[tuple[int, int], _Split] = {}


def _split_table(size: int, top: int) -> _Split:
    key = (size, top)
    if key not in _SPLITS:
        _SPLITS[key] = _Split(size, top)
    return _SPLITS[key]


def model_layout(manifest_k: int, vocab_size: int, value_step: float, n_stats: int) -> Layout:
    """The layout a store's settings imply."""
    return Layout(int(manifest_k), int(vocab_size), max_level(value_step), int(n_stats))


__all__ = ["NAME", "EncodedShard", "Layout", "ShardModel", "Symbols", "decode_arrays", "encode_shard", "join",
           "model_layout", "split", "symbolize"]
