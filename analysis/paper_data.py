"""The paper's printed numbers (arXiv 2410.16215), and a writer that logs them as MLflow runs.

Use: to check the analysis against the paper (tests), and to try the notebooks without running any
sweep: `python -m analysis.paper_data sqlite:///paper.db` logs every table below as a finished
"sweep" (single seed, tag `pd.source=paper`, scale `paper`), following the tag contract of real
sweep runs. These are the paper's results as printed — one decimal, one run per row — never
results of this project. Like the lab's own runs they are logged as fractions (lm-eval's unit, tag
`eval.unit=fraction`); `analysis.load_runs` reads them back in the paper's percent.

Per-task scores are in the paper's column order (TASKS). `delta` is the Δ% the paper prints for
a row (Tables 1-6), None where it prints none.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass, field

TASKS = ["hellaswag", "winogrande", "piqa", "mmlu", "kbqa", "c3", "ceval", "gsm8k"]
TOKENS_PER_STEP = 2048 * 4096  # batch × sequence of the paper's runs (≈ 8.4M tokens a step)

# Coordinates of the paper's "vanilla" PD run and of its LM-only baseline (§3.1).
VANILLA = {"kind": "kd", "p": "0.95", "k": "100", "tau": "1.0", "method": "none", "loss": "nll", "alpha": "1.0",
           "alpha_schedule": "constant", "lr_schedule": "cosine", "student": "1.9B", "teacher": "GLM-4-9B",
           "logits_mode": "offline", "seed": "0"}
LM = VANILLA | {"kind": "lm", "alpha": "0.0", "teacher": "", "logits_mode": ""}


@dataclass(frozen=True)
class Row:
    """One printed row: its label, design coordinates, task scores, printed Average and Δ%."""

    label: str
    scores: tuple[float, ...]
    average: float
    delta: float | None = None
    coords: dict[str, str] = field(default_factory=dict)
    baseline: bool = False
    group: str = ""


LLM_LM = (53.3, 54.8, 72.9, 28.0, 3.6, 54.7, 25.9, 8.6)  # Table 1 / Table 10 α = 0 / Table 11 1.9B
LLM_KD = (54.2, 55.2, 72.5, 27.8, 3.5, 55.8, 26.7, 10.8)  # Table 1 / vanilla PD in every later table


def _base(label: str = "LLM-LM") -> Row:
    return Row(label, LLM_LM, 37.7, None, LM, baseline=True)


def _kd(label: str, scores: tuple[float, ...], average: float, delta: float | None = None, **coords: str) -> Row:
    return Row(label, scores, average, delta, VANILLA | coords)


TABLES: dict[str, list[Row]] = {
    "table1_lm_vs_kd": [_base(), _kd("LLM-KD", LLM_KD, 38.3, 1.6)],
    # Table 9's scores with Table 2's Δ.
    "table2_temperature": [
        _base(),
        _kd("τ = 0.05", (53.1, 57.0, 72.0, 29.2, 3.4, 55.8, 26.8, 9.2), 38.3, 1.6, tau="0.05"),
        _kd("τ = 0.1", (52.6, 54.2, 72.6, 28.6, 2.6, 56.1, 30.6, 10.8), 38.5, 2.1, tau="0.1"),
        _kd("τ = 0.2", (53.5, 56.9, 73.2, 27.8, 3.6, 56.2, 27.3, 10.8), 38.7, 2.5, tau="0.2"),
        _kd("τ = 0.5", (54.7, 57.0, 74.2, 28.2, 3.9, 56.1, 26.0, 9.8), 38.7, 2.7, tau="0.5"),
        _kd("τ = 1.0", LLM_KD, 38.3, 1.6, tau="1.0"),
        _kd("τ = 2.0", (54.1, 56.7, 73.2, 27.8, 3.7, 56.2, 27.0, 10.5), 38.7, 2.5, tau="2.0"),
        _kd("τ = 5.0", (52.5, 55.8, 72.8, 23.5, 3.3, 56.2, 27.9, 9.6), 37.7, -0.1, tau="5.0"),
        _kd("τ = 10.0", (52.1, 57.1, 73.0, 27.3, 3.3, 53.9, 30.2, 8.0), 38.1, 1.0, tau="10.0"),
    ],
    "table3_adaptive_temperature": [
        _base(),
        _kd("NormKD", (51.2, 54.1, 71.0, 26.6, 3.2, 54.6, 29.0, 8.0), 37.2, -1.3, method="normkd"),
        _kd("WTTM", (51.4, 56.2, 72.9, 26.7, 3.6, 55.1, 27.3, 9.2), 37.8, 0.2, method="wttm"),
        _kd("AdaKD-SD", (54.7, 54.5, 73.0, 25.7, 3.7, 56.1, 25.9, 11.8), 38.2, 1.2, method="adakd_sd"),
        _kd("AdaKD-H", (54.7, 57.7, 73.4, 25.6, 3.7, 57.0, 27.0, 10.9), 38.8, 2.8, method="adakd_h"),
    ],
    # Table 10's scores with Table 4's Δ.
    "table4_alpha": [
        _base("α = 0"),
        _kd("α = 0.1", (53.4, 56.0, 72.9, 26.4, 3.2, 55.8, 24.1, 9.6), 37.7, 0.1, alpha="0.1"),
        _kd("α = 0.5", (53.8, 54.4, 72.6, 26.9, 3.4, 55.9, 29.8, 9.6), 38.3, 1.5, alpha="0.5"),
        _kd("α = 0.6", (53.7, 55.7, 73.4, 27.8, 3.4, 54.4, 28.8, 8.6), 38.3, 1.4, alpha="0.6"),
        _kd("α = 0.7", (53.6, 56.6, 73.4, 28.5, 3.8, 55.0, 29.6, 10.1), 38.8, 2.9, alpha="0.7"),
        _kd("α = 0.8", (54.3, 56.6, 72.4, 28.2, 3.8, 55.5, 26.6, 10.5), 38.5, 2.0, alpha="0.8"),
        _kd("α = 0.9", (55.1, 57.4, 73.0, 29.6, 3.5, 57.2, 25.6, 11.1), 39.1, 3.6, alpha="0.9"),
        _kd("α = 0.95", (53.4, 57.1, 72.1, 28.7, 3.4, 56.4, 28.4, 9.7), 38.7, 2.5, alpha="0.95"),
        _kd("α = 1.0", LLM_KD, 38.3, 1.6, alpha="1.0"),
    ],
    "table5_loss_schedules": [
        _base(),
        Row("0-α+WSD-LR", (54.1, 55.1, 73.1, 27.5, 3.8, 55.6, 27.5, 8.5), 38.2, 1.2, LM | {"lr_schedule": "wsd"}),
        _kd("LLM-NLL", LLM_KD, 38.3, 1.6, loss="nll"),
        _kd("LLM-KLD", (55.3, 56.7, 73.5, 26.7, 3.6, 56.7, 25.4, 11.5), 38.7, 2.6, loss="kld"),
        _kd("LLM-MSE", (44.6, 55.0, 69.6, 25.2, 2.8, 52.2, 25.6, 3.9), 34.9, -7.6, loss="mse"),
        _kd("Linear Inc", (53.6, 55.2, 73.1, 25.9, 3.4, 56.4, 28.9, 8.5), 38.1, 1.1, alpha_schedule="linear_inc"),
        _kd("Linear Dec", (53.4, 56.6, 72.9, 29.6, 3.6, 56.0, 30.5, 11.4), 39.2, 4.1, alpha_schedule="linear_dec"),
        _kd("Period", (52.9, 55.0, 72.3, 28.4, 3.4, 55.1, 27.9, 9.4), 38.0, 0.9, alpha_schedule="period"),
        _kd("1-α+WSD-LR", (56.1, 57.2, 73.6, 27.0, 3.8, 58.3, 29.1, 11.6), 39.6, 5.0, lr_schedule="wsd"),
        _kd("WSD-α+Cos-LR", (54.0, 55.4, 72.7, 25.1, 3.7, 57.6, 29.4, 10.6), 38.6, 2.3, alpha_schedule="wsd_alpha"),
        _kd("WSD-β+WSD-LR", (53.1, 55.2, 73.7, 27.5, 3.6, 55.7, 25.0, 11.2), 38.1, 1.1, alpha_schedule="wsd_beta",
            lr_schedule="wsd"),
        _kd("WSD-α+WSD-LR", (56.4, 57.7, 73.6, 31.8, 2.6, 57.6, 33.8, 12.5), 40.7, 8.0, alpha_schedule="wsd_alpha",
            lr_schedule="wsd"),
    ],
    "table6_online": [
        _base(),
        _kd("LLM-Online-100B-L", (30.1, 53.0, 62.1, 24.5, 0.7, 40.2, 25.9, 2.4), 29.8, -20.9, logits_mode="online_store"),
        _kd("LLM-Online-100B", (49.5, 54.2, 70.5, 25.2, 3.0, 54.2, 25.5, 8.0), 36.3, -3.9, logits_mode="online_store"),
        _kd("LLM-Online-100B*", (52.9, 55.4, 72.3, 26.6, 3.6, 57.0, 25.4, 10.0), 37.9, 0.5, logits_mode="online_store",
            alpha="0.1"),
    ],
    "table8_top_p_k": [_base()] + [
        _kd(f"top-{p}-{k}", s, a, p=p, k=k) for p, k, s, a in [
            ("0.5", "100", (54.2, 55.8, 72.9, 27.1, 3.6, 56.3, 28.1, 9.8), 38.5),
            ("0.6", "100", (55.2, 55.0, 73.7, 27.2, 2.0, 56.6, 25.9, 11.0), 38.3),
            ("0.7", "100", (54.4, 57.5, 72.7, 27.8, 2.9, 56.7, 27.0, 9.4), 38.5),
            ("0.8", "100", (54.4, 56.7, 72.5, 27.0, 3.5, 56.0, 26.2, 10.6), 38.4),
            ("0.85", "100", (54.6, 53.7, 73.6, 26.2, 3.4, 56.5, 26.8, 10.8), 38.2),
            ("0.9", "100", (53.7, 54.9, 72.7, 27.9, 3.5, 55.5, 28.2, 9.2), 38.2),
            ("0.95", "1", (52.4, 55.6, 72.6, 27.1, 3.6, 56.6, 28.2, 11.4), 38.4),
            ("0.95", "3", (53.3, 56.6, 72.7, 27.9, 2.3, 55.9, 25.8, 10.5), 38.1),
            ("0.95", "5", (53.8, 55.7, 73.0, 28.5, 3.6, 56.4, 29.0, 9.7), 38.7),
            ("0.95", "10", (54.4, 54.2, 72.9, 28.8, 4.0, 56.0, 27.3, 10.7), 38.5),
            ("0.95", "20", (53.8, 56.2, 73.9, 26.3, 2.8, 57.4, 24.2, 10.6), 38.2),
            ("0.95", "50", (54.0, 54.1, 72.9, 33.2, 3.9, 55.9, 31.5, 11.2), 39.6),
            ("0.95", "100", LLM_KD, 38.3),
        ]
    ],
}

# Table 11: one LM baseline per student size (a group each), students distilled from two teachers.
_T11 = {
    "330M": ((37.4, 54.1, 67.4, 24.0, 2.0, 47.3, 26.2, 2.3, 32.6), (37.7, 51.8, 68.8, 23.5, 1.8, 45.8, 25.2, 2.1, 32.1),
             (37.1, 51.5, 67.4, 24.2, 2.0, 45.2, 24.5, 1.4, 31.6)),
    "670M": ((42.3, 51.9, 68.6, 26.7, 2.3, 48.9, 24.8, 3.0, 33.6), (43.4, 50.9, 69.4, 25.7, 2.4, 49.4, 26.2, 3.1, 33.8),
             (43.0, 51.5, 69.5, 27.0, 2.2, 50.2, 26.4, 3.9, 34.2)),
    "1.9B": (LLM_LM + (37.7,), LLM_KD + (38.3,), (53.7, 57.9, 73.4, 26.2, 3.4, 54.6, 26.3, 8.0, 37.9)),
    "3.8B": ((59.0, 57.8, 75.4, 34.5, 4.6, 57.8, 33.4, 13.7, 42.0), (61.4, 60.2, 75.6, 39.1, 5.0, 61.0, 39.5, 17.1, 44.9),
             (60.8, 57.6, 75.0, 33.9, 2.7, 60.8, 38.0, 14.7, 42.9)),
    "6.8B": ((63.0, 59.9, 75.5, 36.7, 4.6, 61.8, 37.1, 20.9, 44.9), (66.0, 62.3, 76.3, 41.2, 5.7, 64.4, 43.0, 25.5, 48.0),
             (66.2, 62.3, 76.6, 41.4, 5.1, 63.7, 41.4, 22.7, 47.4)),
}
# Table 13: the better configuration PD*. Its settings are not in the paper's reachable text; the coordinates
# below follow a secondary source (AI-made summaries of its appendix A.6, as sweeps/table13_pd_star.yaml),
# used only as tags.
_T13 = {"1.9B": (56.9, 59.1, 73.9, 29.8, 3.7, 59.0, 35.2, 12.4, 41.2),
        "3.8B": (62.4, 61.2, 76.0, 38.1, 5.0, 62.8, 38.5, 21.5, 45.7),
        "6.8B": (67.4, 65.1, 76.6, 44.3, 5.6, 67.1, 44.7, 27.4, 49.8)}
PD_STAR = {"k": "50", "tau": "2.0", "loss": "kld", "alpha": "0.9", "alpha_schedule": "wsd_alpha", "lr_schedule": "wsd"}


def _group(size: str) -> str:
    return f"model.preset={size}"


TABLES["table11_sizes"] = [
    row for size, (lm, t9, t32) in _T11.items() for row in (
        Row("LM", lm[:8], lm[8], None, LM | {"student": size}, baseline=True, group=_group(size)),
        Row("GLM-4-9B", t9[:8], t9[8], None, VANILLA | {"student": size}, group=_group(size)),
        Row("GLM-4-32B", t32[:8], t32[8], None, VANILLA | {"student": size, "teacher": "GLM-4-32B"}, group=_group(size)),
    )
]
TABLES["table13_pd_star"] = [
    row for size, star in _T13.items() for row in (
        Row("LM", _T11[size][0][:8], _T11[size][0][8], None, LM | {"student": size}, baseline=True, group=_group(size)),
        Row("PD*", star[:8], star[8], None, VANILLA | PD_STAR | {"student": size}, group=_group(size)),
    )
]

# Table 12: checkpoints every 10,000 steps of 500B-token runs; the final row is the last checkpoint.
CHECKPOINT_STEPS = (10_000, 20_000, 30_000, 40_000, 50_000, 59_604)
CHECKPOINTS: dict[tuple[str, str], list[tuple[float, ...]]] = {
    ("1.9B", "lm"): [(52.3, 55.4, 72.1, 27.8, 3.4, 56.3, 26.4, 8.0), (56.4, 57.6, 74.0, 31.9, 4.0, 58.2, 31.2, 10.3),
                     (58.5, 58.6, 74.5, 33.6, 4.2, 59.4, 38.0, 12.3), (59.8, 57.6, 74.8, 35.7, 4.3, 60.4, 36.9, 14.5),
                     (60.6, 58.0, 75.8, 37.8, 4.6, 62.0, 40.3, 14.9), (61.1, 58.8, 75.4, 37.7, 4.5, 60.9, 39.7, 15.7)],
    ("1.9B", "kd"): [(53.8, 57.1, 73.0, 26.0, 3.1, 56.3, 25.9, 10.7), (58.1, 58.7, 74.3, 31.4, 3.7, 59.6, 31.5, 14.5),
                     (60.0, 59.1, 74.6, 34.4, 4.6, 60.0, 35.8, 18.0), (60.9, 60.0, 74.9, 35.1, 4.9, 61.7, 38.0, 19.0),
                     (61.8, 59.9, 75.4, 38.5, 4.3, 61.9, 41.4, 20.6), (61.9, 60.3, 75.5, 38.9, 4.6, 61.8, 40.3, 19.4)],
    ("3.8B", "lm"): [(58.6, 59.9, 74.4, 33.1, 4.7, 60.2, 36.8, 12.8), (63.5, 61.3, 75.6, 41.0, 4.4, 63.2, 42.3, 20.5),
                     (65.7, 63.6, 76.1, 42.8, 2.8, 65.1, 47.3, 23.7), (67.1, 63.2, 76.6, 45.2, 1.3, 65.8, 46.1, 25.8),
                     (68.0, 64.2, 76.7, 46.0, 4.5, 66.9, 48.0, 28.5), (68.3, 63.1, 77.3, 46.9, 2.3, 66.7, 47.8, 29.3)],
    ("3.8B", "kd"): [(60.8, 61.5, 75.6, 31.7, 4.8, 61.0, 36.6, 19.0), (65.3, 63.1, 76.3, 41.6, 5.7, 64.0, 44.8, 26.5),
                     (67.2, 65.2, 76.4, 47.0, 6.2, 66.4, 47.5, 30.9), (68.3, 65.4, 76.7, 49.4, 6.9, 67.1, 50.2, 35.0),
                     (69.1, 67.4, 77.3, 51.3, 6.7, 68.5, 50.9, 36.5), (69.5, 66.5, 77.7, 52.4, 6.8, 68.5, 52.3, 36.2)],
}

# Table 12's printed Average column (the paper's rounding of its eight scores' mean), per curve and checkpoint
CHECKPOINT_AVERAGES: dict[tuple[str, str], tuple[float, ...]] = {
    ("1.9B", "lm"): (37.7, 40.5, 42.4, 43.0, 44.2, 44.2), ("1.9B", "kd"): (38.2, 41.5, 43.3, 44.3, 45.5, 45.4),
    ("3.8B", "lm"): (42.6, 46.5, 48.4, 48.9, 50.3, 50.2), ("3.8B", "kd"): (43.9, 48.4, 50.9, 52.4, 53.5, 53.7),
}


def tags_for(sweep: str, row: Row, trial: int, parent_id: str | None) -> dict[str, str]:
    """The tags a sweep child run of this row carries (the contract analysis relies on)."""
    from pd_lightning.tracking import EVAL_UNIT, EVAL_UNIT_TAG

    tags = {f"pd.{k}": v for k, v in row.coords.items()}
    tags[EVAL_UNIT_TAG] = EVAL_UNIT
    tags["pd.config_hash"] = hashlib.sha256(json.dumps(row.coords, sort_keys=True).encode()).hexdigest()[:16]
    tags |= {"pd.sweep": sweep, "pd.scale": "paper", "pd.study": sweep, "pd.trial": str(trial), "pd.label": row.label,
             "pd.point": f"{row.group}/{row.label}" if row.group else row.label,
             "pd.baseline": "true" if row.baseline else "false", "pd.group": row.group, "pd.source": "paper"}
    if parent_id:
        tags["mlflow.parentRunId"] = parent_id
    return tags


def _log(client, experiment_id: str, run_name: str, tags: dict[str, str], metrics: list[tuple[str, float, int]],
         start_ms: int) -> str:
    """Create one finished run with tags and (key, value, step) metrics in a single batch."""
    from mlflow.entities import Metric

    run = client.create_run(experiment_id, start_time=start_ms, tags=tags, run_name=run_name)
    rid = run.info.run_id
    client.log_batch(rid, metrics=[Metric(k, float(v), start_ms, step) for k, v, step in metrics])
    client.set_terminated(rid, "FINISHED", end_time=start_ms + 1)
    return rid


def _score_metrics(scores: tuple[float, ...], step: int = 0) -> list[tuple[str, float, int]]:
    """A printed row's scores (percent) as the lab logs them: fractions, plus their mean as eval.average."""
    metrics = [(f"eval.{t}", s / 100.0, step) for t, s in zip(TASKS, scores)]
    return metrics + [("eval.average", sum(scores) / len(scores) / 100.0, step)]


def log_paper_runs(tracking_uri: str, experiment: str = "paper", sweeps: list[str] | None = None) -> dict[str, int]:
    """Log the paper's tables as sweeps of finished runs into an MLflow store; returns runs per sweep.

    Every sweep gets a parent run (tag pd.role=sweep) and one child run per printed row. Table 12 is
    logged as `table12_checkpoints`: one run per curve, eval.* logged at each checkpoint step and
    `tokens` at the last step.
    """
    from mlflow.tracking import MlflowClient

    from pd_lightning.tracking import ensure_experiment

    client = MlflowClient(tracking_uri=tracking_uri)
    exp_id = ensure_experiment(client, experiment)  # tagged for MLflow's training view
    names = sweeps or [*TABLES, "table12_checkpoints"]
    clock = int(time.time() * 1000)
    counts: dict[str, int] = {}
    for sweep in names:
        clock += 1000
        parent = _log(client, exp_id, sweep, {"pd.role": "sweep", "pd.sweep": sweep, "pd.scale": "paper",
                                              "pd.study": sweep}, [], clock)
        if sweep == "table12_checkpoints":
            counts[sweep] = _log_checkpoints(client, exp_id, parent, clock)
            clock += 100
            continue
        for trial, row in enumerate(TABLES[sweep]):
            clock += 1
            _log(client, exp_id, f"{sweep}/{row.label}", tags_for(sweep, row, trial, parent),
                 _score_metrics(row.scores) + [("tokens", 100e9, 0)], clock)
        counts[sweep] = len(TABLES[sweep])
    return counts


def _log_checkpoints(client, exp_id: str, parent: str, clock: int) -> int:
    for trial, ((size, kind), rows) in enumerate(CHECKPOINTS.items()):
        coords = (LM if kind == "lm" else VANILLA) | {"student": size}
        row = Row(f"{size} {kind.upper()}", rows[-1], 0.0, None, coords, baseline=kind == "lm", group=_group(size))
        metrics = [m for step, s in zip(CHECKPOINT_STEPS, rows) for m in _score_metrics(s, step)]
        metrics.append(("tokens", CHECKPOINT_STEPS[-1] * TOKENS_PER_STEP, CHECKPOINT_STEPS[-1]))
        _log(client, exp_id, f"table12_checkpoints/{row.label}", tags_for("table12_checkpoints", row, trial, parent),
             metrics, clock + trial + 1)
    return len(CHECKPOINTS)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m analysis.paper_data TRACKING_URI   (e.g. sqlite:///paper.db)")
    for name, n in log_paper_runs(sys.argv[1]).items():
        print(f"{name}: {n} runs")
