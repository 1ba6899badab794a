"""`pdl findings`: the committed report regenerates from the committed results byte for byte; verdicts follow
their rules; contrasts pair seeds; export -> report round-trips through a real MLflow store."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.claims import CLAIMS, diff, gain_difference
from analysis.findings import (MARGINS, estimate, export_all, load_results, per_run_values, verdict,
                               write_findings)
from analysis.stats import t975

ROOT = Path(__file__).resolve().parents[1]


def test_committed_findings_regenerate_byte_identically(tmp_path):
    """docs/findings.md (and every figure it links) is what `pdl findings --runs results/tiny` writes."""
    out = write_findings(ROOT / "results" / "tiny", tmp_path / "findings.md")
    committed = ROOT / "docs" / "findings.md"
    assert out.read_bytes() == committed.read_bytes(), "docs/findings.md is stale: run `pdl findings --runs results/tiny`"
    linked = sorted(p.name for p in (tmp_path / "findings").glob("*.png"))
    assert linked == sorted(p.name for p in (ROOT / "docs" / "findings").glob("*.png"))


@pytest.mark.parametrize("mean, ci, test, expected", [
    (1.0, 0.5, "gt", "replicated"), (-1.0, 0.5, "gt", "contradicted"), (0.2, 0.5, "gt", "unresolved"),
    (-1.0, 0.5, "lt", "replicated"), (1.0, 0.5, "lt", "contradicted"),
    (0.3, 1.0, "eq", "replicated"),      # within ±2 points
    (3.0, 0.5, "eq", "contradicted"),    # excludes 0 and leaves the margin
    (0.5, 3.0, "eq", "unresolved"),
    (0.6, 0.5, "eq", "replicated"),      # a significant but small difference is still "about equal"
    (-1.0, 0.9, "ge", "replicated"), (-3.0, 0.5, "ge", "contradicted"), (-1.0, 2.0, "ge", "unresolved"),
    (1.0, 0.9, "le", "replicated"), (3.0, 0.5, "le", "contradicted"),
    # an interval that excludes 0 but reaches into the margin does not rule out "about equal" / "about no gain"
    (-7.5, 6.9, "eq", "unresolved"), (7.5, 7.4, "le", "unresolved"), (-2.5, 0.6, "ge", "unresolved"),
    (-2.5, 0.4, "ge", "contradicted"),
    (1.0, math.nan, "gt", "unresolved"),  # one seed: no interval, no verdict
])
def test_verdict_rules(mean, ci, test, expected):
    assert verdict(mean, ci, test, MARGINS["average"]) == expected


def _runs(rows):
    """A runs frame as load_results gives it: one percent task column, held-out metrics, tags."""
    return pd.DataFrame([{"pd.label": label, "pd.group": group, "pd.seed": str(seed), "eval.synth_facts": score,
                          "eval.heldout.loss": loss, "eval.heldout.ece": 0.01} for label, group, seed, score, loss in rows])


def test_a_contrast_pairs_seeds_and_uses_students_t():
    runs = _runs([("A", "", 0, 40.0, 1.20), ("A", "", 1, 44.5, 1.21), ("A", "", 2, 41.5, 1.19),
                  ("B", "", 0, 38.0, 1.25), ("B", "", 1, 42.0, 1.26), ("B", "", 2, 40.0, 1.24)])
    est = estimate(per_run_values(runs), diff("A", "B", "gt"), "average", "gt")
    d = np.array([2.0, 2.5, 1.5])  # seed by seed: pairing removes the seeds' common swing (B alone spans 4 points)
    assert est.n == 3 and est.mean == pytest.approx(2.0)
    assert est.ci95 == pytest.approx(t975(2) * d.std(ddof=1) / math.sqrt(3))
    assert est.verdict == "replicated"
    loss = estimate(per_run_values(runs), diff("A", "B", "gt"), "loss", "lt")
    assert loss.mean == pytest.approx(-0.05) and loss.ci95 == pytest.approx(0.0, abs=1e-12)
    assert loss.verdict == "replicated"
    # a seed only one side has is left out, not paired with another seed
    one_sided = pd.concat([runs, _runs([("A", "", 3, 90.0, 1.0)])])
    assert estimate(per_run_values(one_sided), diff("A", "B", "gt"), "average", "gt").n == 3


def test_a_gain_difference_compares_gains_across_groups():
    runs = _runs([(lab, g, s, score, 1.0) for s in (0, 1, 2) for lab, g, score in
                  [("LM", "small", 30 + s), ("PD", "small", 31 + s), ("LM", "big", 40 + s), ("PD", "big", 45 + s)]])
    c = gain_difference(("PD", "big"), ("PD", "small"), "LM", "gt")
    est = estimate(per_run_values(runs), c, "average", "gt")
    assert est.mean == pytest.approx(4.0) and est.ci95 == 0.0 and est.verdict == "replicated"


def test_every_claim_names_rows_its_sweep_has():
    """The claims' labels are the sweep files' row labels (a typo would read as 'not run' forever)."""
    from pd_lightning.sweep import load_sweep

    for claim in CLAIMS:
        spec = load_sweep(ROOT / "sweeps" / f"{claim.sweep}.yaml", "tiny")
        have = {(t.label, t.group) for t in spec.tasks()}
        for contrast in claim.contrasts:
            for term in contrast.terms:
                assert (term.label, term.group) in have, (claim.key, term)


def test_export_and_report_round_trip_through_a_real_mlflow_store(tmp_path):
    """The paper's printed tables logged as MLflow runs, exported, reported: C1 is the paper's own +0.6."""
    from analysis.paper_data import CHECKPOINTS, log_paper_runs

    uri = f"sqlite:///{tmp_path / 'paper.db'}"
    log_paper_runs(uri, sweeps=["table1_lm_vs_kd", "table5_loss_schedules", "table12_checkpoints"])
    assert export_all([uri], tmp_path / "results", scale="paper") == ["table1_lm_vs_kd", "table5_loss_schedules",
                                                                       "table12_checkpoints"]
    results = load_results(tmp_path / "results")
    runs = results["table1_lm_vs_kd"]["runs"]
    assert sorted(runs["pd.label"]) == ["LLM-KD", "LLM-LM"]
    # checkpoint scores in percent, as printed (MLflow holds fractions; once a bug scaled them twice)
    curves = results["table12_checkpoints"]["checkpoints"]
    first = curves[(curves["key"] == "eval.hellaswag") & (curves["step"] == 10_000)]["value"]
    assert sorted(first.round(6)) == sorted(rows[0][0] for rows in CHECKPOINTS.values())
    text = write_findings(tmp_path / "results", tmp_path / "docs" / "findings.md").read_text()
    c1 = next(line for line in text.splitlines() if line.startswith("| LLM-KD − LLM-LM"))
    assert "| +0.6 | +0.6 (n = 1, no interval) | unresolved |" in c1  # one run per row: no interval, no verdict
    assert "| `table6_online` | not run |" in text
    again = subprocess.run([sys.executable, "-m", "pd_lightning.cli", "findings", "--runs", str(tmp_path / "results"),
                            "--out", str(tmp_path / "again.md")], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "again.md").read_text() == text


def test_findings_refuses_a_missing_results_dir_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pd_lightning.cli", "findings", "--runs", str(tmp_path / "nope")],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "--runs=" in result.stderr and not (tmp_path / "docs").exists()


def test_storage_half_of_c7_is_measured_not_tested():
    from analysis.findings import storage_verdict

    falls = [("top-0.95-1", 4.0), ("top-0.95-10", 20.0), ("top-0.95-100", 90.0), ("top-0.5-100", 30.0)]
    assert storage_verdict(falls) == "replicated"
    assert storage_verdict([("top-0.95-1", 40.0), ("top-0.95-100", 90.0)]) == "contradicted"  # not steep
    assert storage_verdict([("top-0.95-1", 4.0), ("top-0.95-10", 95.0), ("top-0.95-100", 90.0)]) == "contradicted"
    assert storage_verdict([("top-0.95-100", 90.0)]) == "unresolved"
