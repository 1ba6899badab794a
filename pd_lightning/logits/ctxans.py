"""Encoding `ctxans`: egsqrt's quantised symbols, entropy-coded with a context model fitted per shard.

What is coded is exactly what `egsqrt` keeps (`codec` module docstring), so the two decode to the
same log-probabilities bit for bit and have the same KL: per token the kept-entry count K, the kept
mass `round(-log Q · 4096)`, the float16 stats (entropy, logit std, power sums) and, per entry in
ascending id order, the id and the square-root level `round(sqrt(q / Q) / δ)`. Only the bits change:
every value is split into a symbol and raw bits, and the symbols are coded with `constriction`'s ANS
coder (asymmetric numeral systems, Rust) under categorical models chosen by a context.

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
    flag              kept or not, per candidate the candidate's bucketed log-odds of being kept (>> 0, 1, 2)
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
contexts of their own. The clusters are kept only where they save more than their table costs.

The fit: per shard, per stream and candidate context, the symbol counts of every context; the encoder
keeps the candidate with the fewest bits in all: the data under the quantised counts, the table's
compressed size, and GROUP_BITS = 16 bits for each (sequence, context) group, the decode call it
costs (a speed-for-size rate: a context only stays when it saves that much). Counts are kept as 8-bit
log-counts `1 + round(8·log2 c)` (0 = unseen; constriction gives unseen symbols its smallest
probability); the decoder rebuilds the same models from the same bytes.

Shard sections (see `store` for the file layout):

    model        uint8   zlib of: uint32 [magic, n streams, (candidate, alphabet, n contexts) per stream,
                         the used context ids], uint8 log-counts [n contexts, alphabet] per stream, then the
                         clusters: uint32 [n clusters, n candidates each, candidate ids (first, then
                         differences)], uint8 candidate buckets
    seq_entries  [S]     uint32 kept entries of each sequence (a cross-check; `verify` sums it)
    chunks       [2S+1]  uint64 byte offsets of each sequence's two payload chunks:
                         ANS words (uint32 little-endian) and raw bits (MSB first, padded with 1 bits)

A sequence's symbols go into its own ANS stream in the stream order above (then context, then token
order within a context), so any sequence decodes alone: random access is by sequence, as for egsqrt.
Its raw bits follow the same order: the stats' low bytes, count, mass, gap. A decoded sequence is
checked: the ANS stream must end exactly empty, raw fields must fit their chunk, counts must lie in
[1, k] and sum to `seq_entries`, flags must not keep more ids than the count, ids must lie in [0, V).

Memory: the writer holds a shard's symbols until the shard is complete (about 6 bytes per entry,
against egsqrt's ~2.4 of finished bits), and coding a shard takes a few times that in temporaries;
at the paper's 4,096 x 4,096-token shards prefer `logits.sequences_per_shard` of a few hundred.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

import pd_lightning.logits.codec as codec

NAME = "ctxans"
MODEL_MAGIC = 0x31584350  # "PCX1"
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
EXTRA_CONTEXT = 1 << 12  # gap contexts of a clustered token's extra ids start here
# The fit charges each (sequence, context) group of symbols this many bits beside the data: one decode call
# per group costs about as much time as decoding a dozen symbols, so a context only pays for itself when
# it saves that much space; a speed-for-size exchange rate (decode time matters, for the training loader)
GROUP_BITS = 16
HI_SHIFTS = (8, 4, 3, 2, 0)  # context candidates from the entropy's high byte (8: none)


def _ans():
    """constriction's ANS coder and categorical model (imported on first use)."""
    import constriction

    return constriction.stream.stack.AnsCoder, constriction.stream.model.Categorical


# ----------------------------------------------------------------------------- symbols


def _bitlen(x: np.ndarray) -> np.ndarray:
    """Bit length of non-negative integers (0 for 0), exact."""
    x = np.asarray(x, dtype=np.int64)
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
                ("mass", alphabet(65535, MASS_TOP), 2), ("flag", 2, 3),
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


def _gap_context(j: np.ndarray, kk: np.ndarray, cand: int) -> np.ndarray:
    res = (1, 4, 16)[cand % 3]
    frac = (j * res) // kk
    return frac * 8 + _k_bucket(kk) if cand >= 3 else frac


def _level_context(ids: np.ndarray, kk: np.ndarray, cand: int) -> np.ndarray:
    ctx = np.zeros(len(ids), np.int64)
    if cand & 1:
        ctx = ctx + _k_bucket(kk)
    if cand & 2:
        ctx = ctx + 8 * _bitlen(ids)
    return ctx


def _entry_index(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per entry: its token's row and its position j within the token."""
    cnt = counts.astype(np.int64)
    starts = codec._excl_cumsum(cnt)
    tok = np.repeat(np.arange(len(cnt)), cnt)
    return tok, np.arange(int(starts[-1])) - starts[:-1][tok]


# ----------------------------------------------------------------------------- the fitted model


def _quantise_counts(c: np.ndarray) -> np.ndarray:
    q = np.rint(LOGCOUNT_SCALE * np.log2(np.maximum(c, 1))).astype(np.int64) + 1
    return np.where(c > 0, np.minimum(q, 255), 0).astype(np.uint8)


def _dequantise(q: np.ndarray) -> np.ndarray:
    """Log-counts back to (relative) probabilities, float64."""
    return np.where(q > 0, np.exp2((q.astype(np.float64) - 1) / LOGCOUNT_SCALE), 0.0)


class StreamModel:
    """One stream's fitted model: the chosen context candidate and a categorical model per used context."""

    def __init__(self, name: str, size: int, cand: int, ctx_ids: np.ndarray, table: np.ndarray):
        self.name, self.alphabet, self.cand = name, size, cand
        self.ctx_ids, self.table = ctx_ids.astype(np.int64), table
        lookup_size = int(self.ctx_ids.max(initial=-1)) + 2
        self.lookup = np.full(lookup_size, -1, np.int64)  # context id -> used index (-1: never seen)
        self.lookup[self.ctx_ids] = np.arange(len(self.ctx_ids))
        self._models = None

    def models(self) -> list:
        if self._models is None:
            _, categorical = _ans()
            probs = _dequantise(self.table)
            self._models = [categorical(row / row.sum(), perfect=False) for row in probs]
        return self._models

    def used(self, ctx: np.ndarray) -> np.ndarray:
        """Used-context index of each context id; CorruptChunk for a context the encoder never saw."""
        try:
            idx = self.lookup[ctx]
        except IndexError:
            raise codec.CorruptChunk(f"stream {self.name}: a context the shard's model does not have") from None
        if idx.size and idx.min() < 0:
            raise codec.CorruptChunk(f"stream {self.name}: a context the shard's model does not have")
        return idx


class Clusters:
    """The shard's support clusters: per cluster, its candidate ids (ascending) and each one's flag context."""

    def __init__(self, ids: list[np.ndarray], buckets: list[np.ndarray]):
        self.n = len(ids)
        self.sizes = np.array([len(x) for x in ids], np.int64)
        self.offsets = codec._excl_cumsum(self.sizes)
        self.ids = np.concatenate(ids).astype(np.int64) if ids else np.zeros(0, np.int64)
        self.buckets = np.concatenate(buckets).astype(np.int64) if buckets else np.zeros(0, np.int64)

    def slots(self, modes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For tokens coded against clusters (mode c >= 1 is cluster c - 1): the flat candidate slots, token after
        token, and how many each token has."""
        lengths = self.sizes[modes - 1]
        starts = codec._excl_cumsum(lengths)
        return np.repeat(self.offsets[modes - 1] - starts[:-1], lengths) + np.arange(int(starts[-1])), lengths

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


def _stable_group_order(major: np.ndarray, minor: np.ndarray) -> np.ndarray:
    """The stable argsort of (major, minor) pairs of small non-negative integers: two 16-bit radix passes
    where both fit 16 bits, else one sort of the combined key."""
    if major.size and major.max() < 1 << 16 and minor.max() < 1 << 16:
        by_minor = np.argsort(minor.astype(np.uint16), kind="stable")
        return by_minor[np.argsort(major[by_minor].astype(np.uint16), kind="stable")]
    return np.argsort(major * (int(minor.max(initial=0)) + 1) + minor, kind="stable")


def _fit_stream(name: str, size: int, candidates: list[np.ndarray], sym: np.ndarray, seq_of: np.ndarray) -> StreamModel:
    """The candidate context with the fewest bits: the data under the quantised counts, the compressed table
    and GROUP_BITS per (sequence, context) group."""
    best = None
    for cand, ctx in enumerate(candidates):
        ids, inv = _dense_unique(ctx)
        counts = np.bincount(inv * size + sym, minlength=len(ids) * size).reshape(len(ids), size)
        table = _quantise_counts(counts)
        p = _dequantise(table)
        logp = np.log2(np.where(counts > 0, p, 1.0) / p.sum(axis=1, keepdims=True))
        groups = int(np.count_nonzero(np.bincount(seq_of * max(len(ids), 1) + inv))) if len(ids) else 0
        bits = (-(counts * logp).sum() + 8 * len(zlib.compress(table.tobytes() + ids.astype("<u4").tobytes(), 9))
                + GROUP_BITS * groups)
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


def _fit_clusters(cnt: np.ndarray, ids: np.ndarray, gaps: np.ndarray, j: np.ndarray, kk: np.ndarray,
                  vocab_size: int) -> tuple[Clusters, np.ndarray]:
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
    plain = _gap_bits(gaps[e_idx], _gap_context(j[e_idx], kk[e_idx], 5), cnt[cand_tok])
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
    flags: np.ndarray  # flat flags of clustered tokens over their cluster's candidates
    flag_ctx: np.ndarray
    flag_tok: np.ndarray


def _plan(clusters: Clusters, modes: np.ndarray, cnt: np.ndarray, ids: np.ndarray, tok: np.ndarray, vocab_size: int) -> _Plan:
    ct = np.flatnonzero(modes > 0)
    member = np.zeros(len(ids), bool)
    if len(ct) == 0:
        z = np.zeros(0, np.int64)
        return _Plan(modes, member, z, z, z)
    slots, lengths = clusters.slots(modes[ct])
    cand_tok = np.repeat(ct, lengths)
    keys = tok * vocab_size + ids  # ascending: tokens in order, ids ascending within each
    want = cand_tok * vocab_size + clusters.ids[slots]
    at = np.minimum(np.searchsorted(keys, want), len(keys) - 1)
    hit = keys[at] == want
    member[at[hit]] = True
    return _Plan(modes, member, hit.astype(np.int64), clusters.buckets[slots], cand_tok)


def _gap_layout(cnt: np.ndarray, tok: np.ndarray, member: np.ndarray, modes: np.ndarray) -> tuple:
    """The gap-coded entries (not covered by flags): their token, position j among them, their token's count of
    them, and whether that token is clustered."""
    coded = ~member
    g_tok = tok[coded]
    n_g = np.bincount(g_tok, minlength=len(cnt))
    g_j = np.arange(len(g_tok)) - codec._excl_cumsum(n_g)[:-1][g_tok]
    return coded, g_tok, g_j, n_g[g_tok], modes[g_tok] > 0


def _gap_ctx(g_j: np.ndarray, g_n: np.ndarray, g_cl: np.ndarray, cand: int) -> np.ndarray:
    return _gap_context(g_j, g_n, cand) + EXTRA_CONTEXT * g_cl


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
    tok, j = _entry_index(cnt)
    kk = cnt[tok]
    ids = s.ids.astype(np.int64)
    all_tok = np.arange(len(cnt))
    clusters, modes = _fit_clusters(cnt, ids, _gaps_of(ids, tok), j, kk, layout.vocab_size)
    plan = _plan(clusters, modes, cnt, ids, tok, layout.vocab_size)
    coded, g_tok, g_j, g_n, g_cl = _gap_layout(cnt, tok, plan.member, modes)
    no_raw = lambda n: (np.zeros(n, np.int64), np.zeros(n, np.int64))  # noqa: E731
    out: dict = {"stat0": (stats[:, 0] >> 8, [np.zeros(len(cnt), np.int64)], np.full(len(cnt), STAT_BITS), stats[:, 0] & 255, all_tok)}
    for c in range(1, layout.n_stats):
        out[f"stat{c}"] = (stats[:, c] >> 8, [_hi_context(e_hi, r) for r in range(len(HI_SHIFTS))], np.full(len(cnt), STAT_BITS),
                           stats[:, c] & 255, all_tok)
    out["count"] = (*split_ctx(cnt - 1, layout.count_top, [_hi_context(e_hi, r) for r in range(len(HI_SHIFTS))]), all_tok)
    mt = _mode_tokens(cnt, clusters)
    out["mode"] = (modes[mt], [_mode_context(cnt[mt], c) for c in range(2)], *no_raw(len(mt)), mt)
    out["mass"] = (*split_ctx(s.mass.astype(np.int64), MASS_TOP, [_mass_context(cnt, layout.k, c) for c in range(2)]), all_tok)
    out["flag"] = (plan.flags, [plan.flag_ctx >> r for r in range(3)], *no_raw(len(plan.flags)), plan.flag_tok)
    out["gap"] = (*split_ctx(_gaps_of(ids[coded], g_tok), GAP_TOP, [_gap_ctx(g_j, g_n, g_cl, c) for c in range(6)]), g_tok)
    out["level"] = (*split_ctx(s.levels.astype(np.int64), layout.level_top, [_level_context(ids, kk, c) for c in range(4)]), tok)
    return out, clusters


def _mode_tokens(cnt: np.ndarray, clusters: Clusters) -> np.ndarray:
    """Tokens that code a mode symbol: those with >= CLUSTER_MIN_K entries, when the shard has clusters."""
    return np.flatnonzero(cnt >= CLUSTER_MIN_K) if clusters.n else np.zeros(0, np.int64)


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
    model = ShardModel(layout, [_fit_stream(name, size, streams[name][1], streams[name][0], streams[name][4] // positions)
                                for name, size, _ in layout.streams()], clusters)
    cnt = s.counts.astype(np.int64)
    # every symbol's (sequence, global model index): coding order is sequence, then model index, then token order
    seq_parts, key_parts, sym_parts, w_parts, raw_parts, raw_key = [], [], [], [], [], []
    offset = 0
    n_streams = len(layout.streams())
    for si, (name, _, _) in enumerate(layout.streams()):
        sym, ctxs, w, raw, tok_of = streams[name]
        sm = model.streams[name]
        seq_of = tok_of // positions
        seq_parts.append(seq_of)
        key_parts.append(offset + sm.used(ctxs[sm.cand]))
        sym_parts.append(sym)
        w_parts.append(w)
        raw_parts.append(raw)
        raw_key.append(seq_of * n_streams + si)
        offset += len(sm.ctx_ids)
    n_models = max(offset, 1)
    seq_all, model_all = np.concatenate(seq_parts), np.concatenate(key_parts)
    key = seq_all * n_models + model_all
    order = _stable_group_order(seq_all, model_all)
    sym_sorted = np.concatenate(sym_parts)[order].astype(np.int32)
    group_sizes = np.bincount(key, minlength=n_seq * n_models).reshape(n_seq, n_models)
    models = [m for name in model.order for m in model.streams[name].models()]
    coder_cls, _ = _ans()
    ans_chunks = []
    bounds = codec._excl_cumsum(group_sizes.ravel())
    for q in range(n_seq):
        coder = coder_cls()
        for g in np.flatnonzero(group_sizes[q])[::-1].tolist():  # a stack: the last group is pushed first
            a, b = bounds[q * n_models + g], bounds[q * n_models + g + 1]
            coder.encode_reverse(sym_sorted[a:b], models[g])
        ans_chunks.append(coder.get_compressed().astype("<u4").view(np.uint8))
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


def _decode_stream(coders: list, sm: StreamModel, seq_of: np.ndarray, ctx: np.ndarray) -> np.ndarray:
    """Symbols of one stream for a batch of sequences: each sequence's groups in context order, one call per group."""
    n, nu = len(coders), len(sm.ctx_ids)
    if seq_of.size == 0:
        return np.zeros(0, np.int64)
    models = sm.models()
    if nu == 1:  # one context: the groups are the sequences, already in order
        sizes = np.bincount(seq_of, minlength=n)
        return np.concatenate([coders[q].decode(models[0], m) for q, m in enumerate(sizes.tolist()) if m]).astype(np.int64)
    key = seq_of * nu + sm.used(ctx)
    # a stable radix sort where the key fits 16 bits (the common case: a batch of sequences x a few contexts)
    order = np.argsort(key.astype(np.uint16) if n * nu <= 1 << 16 else key, kind="stable")
    sizes = np.bincount(key, minlength=n * nu)
    nz = np.flatnonzero(sizes)
    pieces = [coders[f // nu].decode(models[f % nu], m) for f, m in zip(nz.tolist(), sizes[nz].tolist())]
    out = np.empty(len(key), np.int64)
    out[order] = np.concatenate(pieces)
    return out


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

    def fields(self, widths: np.ndarray, per_seq: np.ndarray) -> np.ndarray:
        """Fields of the given widths, per_seq[i] of them belonging to sequence i (in order)."""
        out = np.zeros(len(widths), np.int64)
        if widths.size == 0:
            return out
        cum = codec._excl_cumsum(widths)
        first = codec._excl_cumsum(per_seq)
        start = self.pos - cum[first[:-1]]
        self.pos += cum[first[1:]] - cum[first[:-1]]
        if np.any(self.pos > self.end):
            raise codec.CorruptChunk("raw fields run past the end of their chunk")
        if widths.max() > codec.MAX_FIELD_BITS:
            raise codec.CorruptChunk("raw field wider than any valid code")
        pos = np.repeat(start, per_seq) + cum[:-1]
        some = np.flatnonzero(widths)
        if 2 * len(some) >= len(widths):  # a width-0 field reads as 0: reading all is cheaper than selecting
            return codec._read_fields(self.buf, pos, widths)
        out[some] = codec._read_fields(self.buf, pos[some], widths[some])
        return out


class _Split:
    """Lookup tables of `split` for one `top`: raw width and leading bits of every symbol."""

    def __init__(self, size: int, top: int):
        sym = np.arange(size, dtype=np.int64)
        self.width = raw_width(sym, top)
        d = 1 << (top + 1)
        self.lead = np.where(sym >= d, (1 << top) | ((sym - d) & ((1 << top) - 1)), sym)
        self.any_raw = bool(self.width.any())

    def join(self, sym: np.ndarray, raws: "_RawReader", per_seq: np.ndarray) -> np.ndarray:
        if not self.any_raw:
            return sym
        w = self.width[sym]
        return (self.lead[sym] << w) | raws.fields(w, per_seq)


def decode_arrays(model: ShardModel, seq_entries: np.ndarray, chunk_offsets: np.ndarray, payload: np.ndarray,
                  seqs: np.ndarray, positions: int, vocab_size: int, k: int, value_step: float):
    """Decode local sequences `seqs` of one shard; the same tuple as `codec.decode_arrays`."""
    coder_cls, _ = _ans()
    layout, st, clusters = model.layout, model.streams, model.clusters
    seqs = np.asarray(seqs, dtype=np.int64)
    n = len(seqs)
    n_tok = n * positions
    coders = []
    for q in seqs.tolist():
        a, b = int(chunk_offsets[2 * q]), int(chunk_offsets[2 * q + 1])
        if (b - a) % 4:
            raise codec.CorruptChunk("an ANS chunk is not a whole number of 32-bit words")
        try:
            coders.append(coder_cls(np.frombuffer(np.asarray(payload[a:b]).tobytes(), "<u4").astype(np.uint32)))
        except ValueError as e:  # constriction's word check ("never ends in a zero word")
            raise codec.CorruptChunk(f"ANS chunk: {e}") from None
    raws = _RawReader(payload, chunk_offsets, seqs)
    tok_seq = np.repeat(np.arange(n), positions)
    per_tok = np.full(n, positions, np.int64)
    # stats' high bytes (entropy first: it is the context of the others and of the count), then the count
    hi = np.empty((n_tok, layout.n_stats), np.int64)
    hi[:, 0] = _decode_stream(coders, st["stat0"], tok_seq, None)
    e_hi = hi[:, 0]
    for c in range(1, layout.n_stats):
        sm = st[f"stat{c}"]
        hi[:, c] = _decode_stream(coders, sm, tok_seq, _hi_context(e_hi, sm.cand))
    cnt_sym = _decode_stream(coders, st["count"], tok_seq, _hi_context(e_hi, st["count"].cand))
    lo = raws.bytes(positions * layout.n_stats).reshape(n, layout.n_stats, positions).transpose(0, 2, 1)
    stats = (hi << 8) | lo.reshape(n_tok, layout.n_stats)
    cnt = _split_table(st["count"].alphabet, layout.count_top).join(cnt_sym, raws, per_tok) + 1
    if cnt.size and (cnt.min() < 1 or cnt.max() > k):
        raise codec.CorruptChunk(f"a kept-entry count lies outside [1, {k}]")
    per_entry = cnt.reshape(n, positions).sum(1)
    if not np.array_equal(per_entry, seq_entries[seqs].astype(np.int64)):
        raise codec.CorruptChunk("decoded counts do not sum to the sequence's entry count")
    modes = np.zeros(n_tok, np.int64)
    mt = _mode_tokens(cnt, clusters)
    if len(mt):
        modes[mt] = _decode_stream(coders, st["mode"], tok_seq[mt], _mode_context(cnt[mt], st["mode"].cand))
        if modes.max() > clusters.n:
            raise codec.CorruptChunk("a token names a cluster the shard's model does not have")
    mass_sym = _decode_stream(coders, st["mass"], tok_seq, _mass_context(cnt, k, st["mass"].cand))
    # clustered tokens: a flag per candidate of their cluster; the rest of their ids, and every id of the
    # other tokens, are gap-coded
    ct = np.flatnonzero(modes)
    n_gap = cnt.copy()
    if len(ct):
        slots, lengths = clusters.slots(modes[ct])
        flag_tok = np.repeat(ct, lengths)
        flags = _decode_stream(coders, st["flag"], tok_seq[flag_tok], clusters.buckets[slots] >> st["flag"].cand).astype(bool)
        member_tok, member_ids = flag_tok[flags], clusters.ids[slots[flags]]
        n_gap[ct] -= np.bincount(member_tok, minlength=n_tok)[ct]
        if n_gap.min() < 0:
            raise codec.CorruptChunk("a token's flags keep more ids than its count")
    g_tok, g_j = _entry_index(n_gap)
    g_per_seq = n_gap.reshape(n, positions).sum(1)
    gap_sym = _decode_stream(coders, st["gap"], tok_seq[g_tok], _gap_ctx(g_j, n_gap[g_tok], modes[g_tok] > 0, st["gap"].cand))
    mass = _split_table(st["mass"].alphabet, MASS_TOP).join(mass_sym, raws, per_tok)
    gaps = _split_table(st["gap"].alphabet, GAP_TOP).join(gap_sym, raws, g_per_seq)
    # ids = per-token cumsum of (gap + 1) - 1
    cs = np.cumsum(gaps + 1)
    ids = cs - np.repeat(np.concatenate([[0], cs])[codec._excl_cumsum(n_gap)[:-1]], n_gap) - 1
    if len(ct):  # merge each clustered token's flagged and gap-coded ids into one ascending list
        all_tok = np.concatenate([g_tok, member_tok])
        all_ids = np.concatenate([ids, member_ids])
        order = _stable_group_order(all_tok, all_ids)
        ids, sorted_tok = all_ids[order], all_tok[order]
        if np.any((ids[1:] <= ids[:-1]) & (sorted_tok[1:] == sorted_tok[:-1])):
            raise codec.CorruptChunk("a clustered token's extra id repeats a flagged one")
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise codec.CorruptChunk(f"a decoded id lies outside [0, {vocab_size})")
    tok, _ = _entry_index(cnt)
    kk = cnt[tok]
    lev_sym = _decode_stream(coders, st["level"], tok_seq[tok], _level_context(ids, kk, st["level"].cand))
    levels = _split_table(st["level"].alphabet, layout.level_top).join(lev_sym, raws, per_entry)
    if not all(c.is_empty() for c in coders):
        raise codec.CorruptChunk("an ANS stream holds more symbols than its counts say")
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
