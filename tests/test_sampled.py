"""Sampled teacher targets (logits.sampling=sample): the estimator is unbiased, top-p-k's is not, and the
sampled store works through the real writer, reader, generator, verify and `pdl train`.

The statistical tests use fixed seeds, so they are deterministic; their false-alarm rate ALPHA is the chance
that a correct implementation fails on the chosen seed set (a χ² or z threshold at 1 - ALPHA).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from pd_lightning.cli import main
from pd_lightning.config import load_config
from pd_lightning.errors import ConfigError
from pd_lightning.logits import codec
from pd_lightning.logits.processing import (sample_teacher, sample_uniforms, sampled_targets, teacher_targets,
                                            truncate_top_p_k)
from pd_lightning.logits.store import LogitStore, load_manifest
from pd_lightning.logits.writer import LogitStoreWriter
from pd_lightning.losses import distillation_loss

from conftest import TINY_DATA

ALPHA = 1e-4  # false-alarm rate of every statistical test below
V = 48  # a vocabulary small enough that every id's gradient component can be tested


def _teacher_and_student(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Zipf-like teacher logits (a peaked head and a long tail, as an LM's) and an unrelated student."""
    g = torch.Generator().manual_seed(seed)
    ranks = torch.randperm(V, generator=g).double()
    teacher = -1.1 * torch.log1p(ranks) + 0.3 * torch.randn(V, generator=g, dtype=torch.float64)
    student = 0.8 * torch.randn(V, generator=g, dtype=torch.float64)
    return teacher.float(), student


def _kd_gradient(student: torch.Tensor, indices: torch.Tensor, probs: torch.Tensor, kind: str = "nll",
                 log_target: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row gradient of the real loss (α = 1) wrt the student logits [M, V], and the per-row KD values [M].

    The loss is the mean over M rows, so row m's own gradient is M times its share of the total."""
    m = indices.shape[0]
    z = student.expand(m, V).clone().requires_grad_(True)
    out = distillation_loss(z, torch.zeros(m, dtype=torch.long), indices, probs, alpha=1.0, kind=kind,
                            teacher_log_target=log_target)
    out.loss.backward()
    with torch.no_grad():  # per-row values, from the same distance the loss sums
        logp = torch.log_softmax(student, -1)[indices]
        on = probs > 0
        value = -(probs * torch.where(on, logp, 0.0)).sum(-1)
        if kind == "kld":
            value = value + (probs * torch.where(on, log_target, 0.0)).sum(-1)
    return z.grad * m, value


def _pearson(mean_grad: torch.Tensor, dense_grad: torch.Tensor, p: torch.Tensor, draws: int) -> tuple[float, float]:
    """Pearson's X² of the mean gradient against the dense one, cells with draws·p < 5 merged; (X², threshold).

    With t = c/N the gradient is s - t, so ḡ - g* = p - t̄ and draws·Σ (ḡ - g*)²/p is χ² with (cells - 1) degrees
    of freedom under the null (pooled counts are multinomial)."""
    diff, p = (mean_grad - dense_grad).double(), p.double()
    small = draws * p < 5
    d = torch.cat([diff[~small], diff[small].sum().reshape(1)]) if small.any() else diff
    q = torch.cat([p[~small], p[small].sum().reshape(1)]) if small.any() else p
    x2 = float(draws * (d * d / q).sum())
    return x2, float(stats.chi2.ppf(1 - ALPHA, len(q) - 1))


@pytest.mark.parametrize("samples", [8, 50])
def test_sampled_gradient_is_unbiased_and_top_k_is_not(samples):
    teacher, student = _teacher_and_student()
    rows = 2000  # M sequences of one position each: M·N = 16,000 / 100,000 draws
    p = torch.softmax(teacher.double(), -1)
    dense, _ = _kd_gradient(student, torch.arange(V)[None], p[None].float())
    u = torch.from_numpy(sample_uniforms(7, range(rows), 1, samples))
    sampled = sample_teacher(teacher.expand(rows, V), u)
    t = sampled_targets(sampled)
    grad, _ = _kd_gradient(student, sampled.indices, t.probs)
    x2, limit = _pearson(grad.mean(0), dense[0], p, rows * samples)
    assert x2 < limit, (x2, limit)
    # per id too: |z| below the Bonferroni bound for V tests
    se = (p * (1 - p) / (rows * samples)).sqrt()
    z = (grad.mean(0).double() - dense[0].double()) / se
    assert z.abs().max() < stats.norm.ppf(1 - ALPHA / (2 * V)), z.abs().max()

    # The negative control on the same rows: top-k (k = N distinct ids at most, as the sampled store keeps)
    # renormalised moves the tail's mass onto the head. Its gradient is the same on every row, so the "mean
    # over draws" has no noise and the bias stands out against the sampled estimator's Monte-Carlo error.
    k = max(2, int(sampled.counts.float().mean().round()))
    top = teacher_targets(truncate_top_p_k(teacher[None], 1.0, k), 1.0, k, store_p=1.0, store_k=k)
    top_grad, _ = _kd_gradient(student, top.indices, top.probs)
    x2_top, _ = _pearson(top_grad[0], dense[0], p, rows * samples)
    assert x2_top > 10 * limit, (x2_top, limit, k)


def test_sampled_kl_value_is_unbiased_with_the_stored_log_probabilities_and_biased_without():
    teacher, student = _teacher_and_student(1)
    rows, samples = 4000, 12
    p = torch.softmax(teacher.double(), -1)
    kl = float((p * (p.log() - torch.log_softmax(student, -1))).sum())
    sampled = sample_teacher(teacher.expand(rows, V), torch.from_numpy(sample_uniforms(3, range(rows), 1, samples)))
    t = sampled_targets(sampled)
    _, value = _kd_gradient(student, sampled.indices, t.probs, kind="kld", log_target=t.log_target)
    z = (value.mean() - kl) / (value.std() / math.sqrt(rows))
    assert abs(float(z)) < stats.norm.ppf(1 - ALPHA / 2), (float(value.mean()), kl)
    # Σ t log(t / s), the plug-in form the top-p-k kld uses, is far off on sampled targets
    _, plug_in = _kd_gradient(student, sampled.indices, t.probs, kind="kld", log_target=t.probs.clamp_min(1e-30).log())
    assert float(plug_in.mean()) - kl > 0.3, (float(plug_in.mean()), kl)


def test_exact_importance_weights_at_tau_are_unbiased_and_self_normalised_ones_are_consistent_but_biased():
    """τ = 1.25 from a τ = 1 store: exact weights (with the store's power sum at 1/τ) estimate p_τ without bias;
    self-normalised ones have an O(1/N) bias that a large sample finds at N = 4."""
    teacher, _ = _teacher_and_student(2)
    tau, rows = 1.25, 20000
    p_tau = torch.softmax(teacher.double() / tau, -1)
    w = p_tau / torch.softmax(teacher.double(), -1)  # importance weights p_τ / p

    def mean_target(samples: int, estimator: str) -> torch.Tensor:
        u = torch.from_numpy(sample_uniforms(11, range(rows), 1, samples))
        s = sample_teacher(teacher.expand(rows, V), u, power_exponents=(1 / tau,))
        t = sampled_targets(s, tau, estimator)
        return torch.zeros(rows, V, dtype=torch.float64).scatter_add_(1, s.indices, t.probs.double()).mean(0)

    def max_z(mean: torch.Tensor, samples: int) -> float:
        var = p_tau * w - p_tau**2  # one draw's variance of the weighted indicator
        return float(((mean - p_tau) / (var / (rows * samples)).sqrt()).abs().max())

    bound = stats.norm.ppf(1 - ALPHA / (2 * V))
    assert max_z(mean_target(8, "exact"), 8) < bound
    assert max_z(mean_target(4, "self_normalised"), 4) > bound  # the bias is measurable ...
    assert max_z(mean_target(64, "self_normalised"), 64) < max_z(mean_target(4, "self_normalised"), 4)  # ... and shrinks


def test_draws_are_a_function_of_seed_sequence_and_position_only():
    teacher, _ = _teacher_and_student()
    z = teacher.expand(30, V)
    whole = sample_teacher(z, torch.from_numpy(sample_uniforms(5, range(3), 10, 16)))
    # the same sequences one at a time, in other chunks: the same draws
    parts = [sample_teacher(z[:10], torch.from_numpy(sample_uniforms(5, [i], 10, 16)), chunk_tokens=3) for i in range(3)]
    for i, part in enumerate(parts):
        rows = whole.rows(10 * i, 10 * i + 10)
        assert torch.equal(rows.indices, part.indices) and torch.equal(rows.draws, part.draws)
    assert (whole.draws.sum(-1) == 16).all() and (whole.counts == (whole.draws > 0).sum(-1)).all()
    other = sample_teacher(z, torch.from_numpy(sample_uniforms(6, range(3), 10, 16)))
    assert not torch.equal(other.draws, whole.draws)


def test_an_id_of_probability_zero_is_never_drawn():
    z = torch.full((4, 40), -math.inf)
    z[:, 5], z[:, 17], z[:, 39] = 0.0, -3.0, -30.0  # the last column carries ~1e-13 of the mass
    s = sample_teacher(z, torch.from_numpy(np.full((4, 32), 1 - 2.0**-53)))  # the largest uniform below 1
    kept = s.indices[s.draws > 0]
    assert set(kept.tolist()) <= {5, 17, 39}
    s = sample_teacher(z, torch.from_numpy(sample_uniforms(0, range(4), 1, 32)))
    assert set(s.indices[s.draws > 0].tolist()) <= {5, 17, 39}


@pytest.mark.parametrize("encoding", ["egsqrt", "fixed"])
def test_sampled_store_round_trips_ids_and_draws_exactly(encoding, tmp_path):
    positions, n_seq, samples = 7, 10, 32
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(n_seq * positions, 700, generator=g)
    sparse = sample_teacher(logits, torch.from_numpy(sample_uniforms(1, range(n_seq), positions, samples)))
    sampling = {"method": "sample", "samples": samples, "seed": 1, "proposal_tau": 1.0}
    w = LogitStoreWriter(tmp_path / "s", vocab_size=700, p=1.0, k=samples, positions_per_sequence=positions,
                         num_sequences=n_seq, sequences_per_shard=4, teacher="t", teacher_config_hash="h",
                         tokenizer_hash="tok", encoding=encoding, sampling=sampling)
    w.write_sequences(0, sparse)
    w.finalize()
    store = LogitStore(tmp_path / "s")
    assert store.samples == samples and load_manifest(tmp_path / "s")["sampling"] == sampling
    got = store.sequences(range(n_seq))
    for r in range(len(got)):
        n = int(sparse.counts[r])
        want = dict(zip(sparse.indices[r, :n].tolist(), sparse.draws[r, :n].tolist()))
        assert dict(zip(got.indices[r, :n].tolist(), got.draws[r, :n].tolist())) == want
    # log-probabilities within the encoding's error (fixed: 2^-11 nats; egsqrt: its sqrt-domain bound)
    ref = {(r, int(i)): float(v) for r in range(len(sparse)) for i, v in zip(sparse.indices[r], sparse.logprobs[r]) if v > -1e30}
    err = max(abs(float(got.logprobs[r, j]) - ref[(r, int(got.indices[r, j]))])
              for r in range(len(got)) for j in range(int(got.counts[r])))
    assert err < (2.0**-11 + 1e-6 if encoding == "fixed" else 2.0), err
    assert main(["logits", "verify", str(tmp_path / "s"), "--deep"]) == 0


def test_a_draw_count_that_does_not_sum_to_the_samples_is_corruption():
    positions, samples = 3, 16
    sparse = sample_teacher(torch.randn(6, 300), torch.from_numpy(sample_uniforms(0, range(2), positions, samples)))
    e = codec.encode(sparse, positions, 300, samples, "egsqrt", 1 / 384)
    off = codec._excl_cumsum(e.chunk_sizes.astype(np.int64)).astype(np.uint64)
    payload = e.payload.copy()
    draw_bits_chunk = 5  # sequence 0's draw-bits chunk (gap-u, gap-b, value-u, value-b, draw-u, draw-b)
    start, stop = int(off[draw_bits_chunk]), int(off[draw_bits_chunk + 1])
    assert stop > start
    payload[start] ^= 0x80
    with pytest.raises(codec.CorruptChunk):
        codec.decode_arrays(e.counts, e.params, e.mass, e.stats, off, payload, np.array([0]), positions, 300, samples,
                            "egsqrt", 1 / 384, samples)


def test_sampled_store_is_refused_where_it_is_not_defined():
    for bad, field in [(["loss.kind=mse"], "loss.kind"), (["logits.method=wttm"], "logits.method"),
                       (["logits.encoding=ctxans"], "logits.encoding"), (["logits.mode=cotrain"], "logits.mode"),
                       (["logits.method=adakd_h"], "logits.sampled_tau")]:
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            load_config("tiny", ["logits.sampling=sample", *bad])


def test_generate_inspect_verify_and_train_on_a_sampled_store(tiny_teacher, small_data, tmp_path, capsys):
    """`pdl logits generate` with sampling=sample on the tiny teacher: the kept ids carry the teacher's
    log-probabilities and the draws sum to N, `inspect` and `verify --deep` read it, `pdl train` on it runs
    with kld; another batch size changes no byte (the draws are keyed by sequence, not by batch)."""
    common = ["tiny", *TINY_DATA, "data.seq_len=32", f"data.out={small_data}", f"teacher.out={tiny_teacher}",
              "logits.sampling=sample", "logits.samples=24", "logits.sequences_per_shard=500"]
    store = tmp_path / "sampled"
    assert main(["logits", "generate", *common, f"logits.store={store}", "logits.batch_size=32"]) == 0
    other = tmp_path / "sampled-b7"
    assert main(["logits", "generate", *common, f"logits.store={other}", "logits.batch_size=7"]) == 0
    for f in sorted(store.glob("shard-*.bin")):
        assert f.read_bytes() == (other / f.name).read_bytes(), f.name
    capsys.readouterr()
    assert main(["logits", "inspect", str(store), "--json"]) == 0
    assert '"method": "sample"' in capsys.readouterr().out
    assert main(["logits", "verify", str(store), "--deep"]) == 0

    from pd_lightning.data.shards import TokenShards
    from pd_lightning.models import load_causal_lm

    got = LogitStore(store).sequences([0, 1, 2, 3])
    ids = torch.from_numpy(TokenShards(small_data, "train").batch([0, 1, 2, 3]))
    with torch.no_grad():
        logits = load_causal_lm(tiny_teacher)(input_ids=ids).logits[:, :-1].reshape(len(got), -1)
    logq = torch.log_softmax(logits.double(), -1)
    # every kept id's stored log-probability is the teacher's (within egsqrt's quantisation)
    kept = got.draws > 0
    diff = (got.logprobs.double() - logq.gather(1, got.indices))[kept]
    assert float(diff.abs().median()) < 0.01
    assert (got.draws.sum(-1) == 24).all()

    out = tmp_path / "student"
    args = ["tiny", *TINY_DATA, "data.seq_len=32", f"data.out={small_data}", f"teacher.out={tiny_teacher}",
            f"logits.store={store}", "logits.sampling=sample", "logits.samples=24", "loss.kind=kld",
            "trainer.max_steps=6", "trainer.val_every_n_steps=3", "trainer.batch_size=8", "trainer.num_workers=0",
            f"trainer.out={out}", f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "eval.heldout_teacher=none"]
    assert main(["train", *args]) == 0
    # a config that reads the sampled store as top-p-k is refused in one line, exit 2
    assert main(["train", *args[:-3], "logits.sampling=topk", f"trainer.out={tmp_path / 'bad'}",
                 f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"]) == 2
    assert "logits.sampling" in capsys.readouterr().err


def test_sweep_runs_both_target_families_and_reports_delta_against_bytes(tmp_path):
    """A sweep with an LM-only row, a top-p-k row and a sampled row: every trial completes, each distilled run
    logs the bytes its targets need, and `pdl report` draws Δ against bytes per token for both families."""
    from mlflow.tracking import MlflowClient

    from test_sweep import pdl, write_sweep

    path = write_sweep(tmp_path, "families", baseline={"label": "LM", "set": {"loss.alpha": 0.0}},
                       rows=[{"label": "top-0.95-5", "set": {"logits.p": 0.95, "logits.k": 5}},
                             {"label": "sampled-8", "set": {"logits.sampling": "sample", "logits.samples": 8}}],
                       set={"loss.alpha": 1.0}, seeds=[0])
    result = pdl("sweep", "run", str(path), "--workers", "2", "--cache", str(tmp_path / "cache"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = [r for r in client.search_runs([client.get_experiment_by_name("families").experiment_id])
            if r.data.tags.get("pd.role") != "sweep"]
    by_label = {r.data.tags["pd.label"]: r for r in runs}
    assert set(by_label) == {"LM", "top-0.95-5", "sampled-8"}
    sampled, top = by_label["sampled-8"], by_label["top-0.95-5"]
    assert sampled.data.tags["pd.sampling"] == "sample" and sampled.data.tags["pd.p"] == ""
    # the sampled run's target bytes are its store's; the top-p-k run's a top-0.95-5 store's, not its top-0.95-100 store's
    assert sampled.data.metrics["store.target_bytes_per_token"] == pytest.approx(sampled.data.metrics["store.bytes_per_token"])
    assert top.data.metrics["store.target_bytes_per_token"] < 0.5 * top.data.metrics["store.bytes_per_token"]
    assert top.data.metrics["store.target_entries_per_token"] <= 5
    report = pdl("report", str(path), "--out", str(tmp_path / "report"), cwd=tmp_path)
    assert report.returncode == 0, report.stderr[-3000:]
    assert "fig_delta_vs_bytes.png" in (tmp_path / "report" / "index.html").read_text()
    assert (tmp_path / "report" / "fig_delta_vs_bytes.png").is_file()
