"""The claims the findings re-test: the paper's directional ones (C1-C10) and two of ours (C11, C12).

Each claim is a list of *contrasts* of one sweep's configurations, each a signed sum of configuration
means compared seed by seed (every configuration of a sweep trains seed s from the same init and data
order, so the seeds pair): "A beats B" is A − B, "the gain grows with size" is
(PD − LM)_large − (PD − LM)_small. A contrast's `test` says what the claim expects of it:

    gt   greater than 0 (A beats B)           lt   less than 0 (A is worse than B)
    eq   equal within ± the margin            ge   equal or better (not worse by more than the margin)
    le   equal or worse (not better by more than the margin)

`paper` is the same contrast on the paper's printed Averages (analysis.paper_data), where it has the
rows; None for our own claims. Labels are the sweeps' row labels (sweeps/*.yaml); `group` names a
group of a grouped sweep (Table 11, 13: one LM baseline per student size).
"""

from __future__ import annotations

from dataclasses import dataclass

from analysis.paper_data import CHECKPOINT_AVERAGES

TESTS = ("gt", "lt", "eq", "ge", "le")


@dataclass(frozen=True)
class Term:
    label: str
    weight: float = 1.0
    group: str = ""


@dataclass(frozen=True)
class Contrast:
    """One comparison: Σ weight · mean(label) over `terms`, and what the claim expects of it."""

    name: str
    terms: tuple[Term, ...]
    test: str
    paper: float | None = None  # the same contrast on the paper's printed Averages (points)
    step: int | None = None  # a checkpoint's step (Table 12): the scores logged at that step


@dataclass(frozen=True)
class Claim:
    key: str
    sweep: str
    text: str
    contrasts: tuple[Contrast, ...]
    source: str = "the paper"
    storage: bool = False  # also report how the targets' bytes per token fall (Table 8)
    note: str = ""


def diff(a: str, b: str, test: str, paper: float | None = None, *, group: str = "", name: str | None = None,
         step: int | None = None) -> Contrast:
    """A − B."""
    return Contrast(name or f"{a} − {b}", (Term(a, 1.0, group), Term(b, -1.0, group)), test, paper, step)


def gain_difference(a: tuple[str, str], b: tuple[str, str], baseline: str, test: str, paper: float | None = None,
                    name: str = "") -> Contrast:
    """(a − baseline in a's group) − (b − baseline in b's group): a gain compared across groups."""
    (label_a, group_a), (label_b, group_b) = a, b
    return Contrast(name, (Term(label_a, 1.0, group_a), Term(baseline, -1.0, group_a),
                           Term(label_b, -1.0, group_b), Term(baseline, 1.0, group_b)), test, paper)


def _size(preset: str) -> str:
    return f"model.preset={preset}"


_TAUS = ("0.05", "0.1", "0.2", "0.5", "1.0", "2.0")
_T2_PAPER = {"0.05": 38.3, "0.1": 38.5, "0.2": 38.7, "0.5": 38.7, "1.0": 38.3, "2.0": 38.7, "5.0": 37.7}
_SCHEDULES = ("LLM-NLL", "Linear Inc", "Linear Dec", "Period", "1-α+WSD-LR", "WSD-α+Cos-LR", "WSD-β+WSD-LR")
_T5_PAPER = {"LLM-NLL": 38.3, "Linear Inc": 38.1, "Linear Dec": 39.2, "Period": 38.0, "1-α+WSD-LR": 39.6,
             "WSD-α+Cos-LR": 38.6, "WSD-β+WSD-LR": 38.1, "WSD-α+WSD-LR": 40.7}
_T8_ROWS = {"top-0.5-100": 38.5, "top-0.6-100": 38.3, "top-0.7-100": 38.5, "top-0.8-100": 38.4, "top-0.85-100": 38.2,
            "top-0.9-100": 38.2, "top-0.95-1": 38.4, "top-0.95-3": 38.1, "top-0.95-5": 38.7, "top-0.95-10": 38.5,
            "top-0.95-20": 38.2, "top-0.95-50": 39.6, "top-1.0-1": None, "top-1.0-10": None, "top-1.0-50": None,
            "top-1.0-100": None}
_CHECKPOINT_STEPS = (250, 500, 750, 1000, 1250)  # tiny-scale Table 12: exports every 250 of 1,500 steps


def _t12_paper() -> tuple[float, ...]:
    """Table 12's 1.9B KD − LM at each of its six checkpoints, on its printed Average column."""
    kd, lm = CHECKPOINT_AVERAGES[("1.9B", "kd")], CHECKPOINT_AVERAGES[("1.9B", "lm")]
    return tuple(round(a - b, 2) for a, b in zip(kd, lm))


CLAIMS: tuple[Claim, ...] = (
    Claim("C1", "table1_lm_vs_kd", "Vanilla PD beats LM-only (Table 1).",
          (diff("LLM-KD", "LLM-LM", "gt", 38.3 - 37.7),)),
    Claim("C2", "table2_temperature", "Every τ ≤ 2 helps; τ = 5 gives no gain (Tables 2 / 9).",
          tuple(diff(f"τ = {t}", "LLM-LM", "gt", _T2_PAPER[t] - 37.7) for t in _TAUS)
          + (diff("τ = 5.0", "LLM-LM", "le", _T2_PAPER["5.0"] - 37.7),)),
    Claim("C3", "table3_adaptive_temperature", "AdaKD-H is the best adaptive temperature; NormKD falls below "
          "LM-only (Table 3).",
          (diff("AdaKD-H", "NormKD", "gt", 38.8 - 37.2), diff("AdaKD-H", "WTTM", "gt", 38.8 - 37.8),
           diff("AdaKD-H", "AdaKD-SD", "gt", 38.8 - 38.2), diff("NormKD", "LLM-LM", "lt", 37.2 - 37.7))),
    Claim("C4", "table4_alpha", "The gain rises with α up to about 0.9; α = 0.9 beats α = 1; α = 0.1 gives about "
          "no gain (Tables 4 / 10).",
          (diff("α = 0.9", "α = 0.5", "gt", 39.1 - 38.3), diff("α = 0.9", "α = 1.0", "gt", 39.1 - 38.3),
           diff("α = 0.1", "α = 0", "eq", 37.7 - 37.7))),
    Claim("C5", "table5_loss_schedules", "MSE is the worst loss and below LM-only; NLL ≈ KLD; Linear Dec beats "
          "Linear Inc; WSD-α + WSD-LR is the best schedule; WSD-LR alone helps the LM baseline (Table 5).",
          (diff("LLM-MSE", "LLM-LM", "lt", 34.9 - 37.7), diff("LLM-MSE", "LLM-NLL", "lt", 34.9 - 38.3),
           diff("LLM-MSE", "LLM-KLD", "lt", 34.9 - 38.7), diff("LLM-NLL", "LLM-KLD", "eq", 38.3 - 38.7),
           diff("Linear Dec", "Linear Inc", "gt", 39.2 - 38.1))
          + tuple(diff("WSD-α+WSD-LR", s, "gt", _T5_PAPER["WSD-α+WSD-LR"] - _T5_PAPER[s]) for s in _SCHEDULES)
          + (diff("0-α+WSD-LR", "LLM-LM", "gt", 38.2 - 37.7),),
          note="With a fixed offline teacher NLL and KLD differ by the teacher's entropy, a constant: equal gradients, "
               "so the lab's two rows must agree to the last digit."),
    Claim("C6", "table6_online", "Logits from early teacher training hurt; late-window logits with a small α are "
          "about LM-only or slightly better; offline beats online (Table 6).",
          (diff("Online early window (0-50%)", "LLM-LM", "lt", 29.8 - 37.7),
           diff("Online late window α = 0.1", "LLM-LM", "ge", 37.9 - 37.7),
           diff("Offline (final teacher)", "Online late window (50-100%)", "gt", 38.3 - 36.3))),
    Claim("C7", "table8_top_p_k", "p and k matter little for quality, while storage falls steeply with them "
          "(Table 8, Figures 2-3).",
          tuple(diff(row, "top-0.95-100", "eq", None if paper is None else paper - 38.3) for row, paper in _T8_ROWS.items()),
          storage=True),
    Claim("C8", "table11_sizes", "Larger students gain more; the smallest may not gain; a larger teacher is not "
          "necessarily better (Table 11, Figure 4).",
          (gain_difference(("teacher=tiny-5m", _size("tiny-5m")), ("teacher=tiny-5m", _size("tiny-1m")),
                           "Baseline LM loss", "gt", (48.0 - 44.9) - (32.1 - 32.6),
                           "gain of tiny-5m − gain of tiny-1m (tiny-5m teacher; paper: 6.8B vs 330M, GLM-4-9B)"),
           gain_difference(("teacher=tiny-20m", _size("tiny-5m")), ("teacher=tiny-20m", _size("tiny-1m")),
                           "Baseline LM loss", "gt", (47.4 - 44.9) - (31.6 - 32.6),
                           "gain of tiny-5m − gain of tiny-1m (tiny-20m teacher; paper: 6.8B vs 330M, GLM-4-32B)"),
           diff("teacher=tiny-5m", "Baseline LM loss", "le", 32.1 - 32.6, group=_size("tiny-1m"),
                name="gain of the smallest student, tiny-1m (tiny-5m teacher; paper: 330M, GLM-4-9B)"),
           diff("teacher=tiny-20m", "teacher=tiny-5m", "le", 47.4 - 48.0, group=_size("tiny-5m"),
                name="tiny-20m teacher − tiny-5m teacher, largest student (paper: GLM-4-32B − GLM-4-9B at 6.8B)"))),
    Claim("C9", "table12_checkpoints", "PD's advantage persists over training (Table 12, Figure 5).",
          tuple(diff("KD Loss", "LM Loss", "gt", paper, group=_size("tiny-1m"), step=step,
                     name=f"KD − LM at step {step}")
                for step, paper in zip(_CHECKPOINT_STEPS + (1500,), _t12_paper())),
          note="The teacher must stay ahead of a student trained this long, as the paper's does: the sweep trains "
               "it 3,000 steps. A 600-step teacher (held-out loss 1.130) was overtaken by the LM-only student near "
               "step 1,000 (sweeps/table12_checkpoints.yaml)."),
    Claim("C10", "table13_pd_star", "PD* beats vanilla PD at every student size (Table 13, Figure 1).",
          tuple(diff("PD*", "Vanilla PD", "gt", paper, group=_size(size), name=f"PD* − vanilla PD, {size}")
                # paper: PD* (Table 13) − vanilla PD at 1.9B (Table 1) and at 6.8B (Table 11, GLM-4-9B teacher)
                for size, paper in (("tiny-1m", 41.2 - 38.3), ("tiny-5m", 49.8 - 48.0)))),
    Claim("C11", "iso_compute", "At equal total compute, the teacher's FLOPs counted, PD still beats LM-only.",
          (diff("Vanilla PD", "LLM-LM", "gt"), diff("WSD-α+WSD-LR", "LLM-LM", "gt")), source="ours"),
    Claim("C12", "sampled_vs_topk", "At about equal bytes per token, sampled targets (N draws) beat top-p-k targets "
          "(the claim of Random Sampling KD, arXiv 2503.16870).",
          tuple(diff(f"sampled-{n}", f"top-0.95-{k}", "gt") for n, k in ((8, 5), (12, 10), (32, 20), (64, 50))),
          source="ours", storage=True),
)
