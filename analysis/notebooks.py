"""The source of the notebooks in notebooks/: `python -m analysis.notebooks [DIR]` (re)writes them.

The notebooks are generated, not edited by hand, so that they are committed without outputs,
stay in step with the analysis API, and a test can check the committed files are what this module
writes. Each one reads one MLflow store (`TRACKING_URI`, from $PDL_TRACKING_URI) and one or more
sweeps, and regenerates its paper tables and figures; a store without those runs prints what to run.
"""

from __future__ import annotations

import sys
from pathlib import Path

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"

_CONFIG = '''import os

TRACKING_URI = os.environ.get("PDL_TRACKING_URI", "sqlite:///mlflow.db")
'''

_SETUP = '''%matplotlib inline
import pandas as pd
from IPython.display import Markdown, display

import analysis
from pd_lightning.errors import UserError


def show(table):
    """Display a paper table as the paper prints it (one decimal, Δ with arrows, ± over seeds)."""
    display(Markdown(analysis.to_markdown(table)))


def table_of(runs, **options):
    """The paper table of `runs`, or None (after saying why) when there are no runs or no table."""
    if runs is None:
        return None
    try:
        return analysis.paper_table(runs, **options)
    except UserError as err:  # e.g. runs not evaluated yet, or two baselines in one group
        print(err)
        return None


def has_delta(table):
    """Whether Δ can be drawn: the table exists and has a baseline (pd.baseline=true) to compare with."""
    if table is None:
        return False
    if table["Δ%"].notna().any():
        return True
    print("no baseline rows (tag pd.baseline=true) in these runs: no Δ to plot")
    return False'''


def _table_cell(runs: str, table: str) -> str:
    return f'''{table} = table_of({runs})
if {table} is not None:
    show({table})'''


# (kind, source) cells after the config and setup cells; "md" = Markdown, "code" = code.
NOTEBOOKS: dict[str, dict] = {
    "overview": {
        "title": "# Overview: every sweep in the store\n\nOne line per sweep (runs, configurations, seeds, its best "
                 "configuration by Δ and whether Δ's 95% interval excludes 0), Table 1, every sweep's paper table, "
                 "and Average against total compute where runs logged cost metrics.",
        "sweeps": {"SWEEP": None},
        "cells": [
            ("code", '''runs = analysis.load_sweep_runs(TRACKING_URI, SWEEP)
if runs is not None:
    display(analysis.sweep_summary(runs))'''),
            ("md", "## Table 1: LLM-LM vs LLM-KD"),
            ("code", '''table1 = table_of(analysis.select_sweep(runs, "table1_lm_vs_kd"))
if table1 is not None:
    show(table1)'''),
            ("md", "## Every sweep's table"),
            ("code", '''if runs is not None:
    for name in dict.fromkeys(runs["pd.sweep"].dropna()):
        display(Markdown(f"### {name}"))
        try:
            show(analysis.paper_table(runs[runs["pd.sweep"] == name]))
        except UserError as err:  # e.g. a sweep whose runs are not evaluated yet
            print(err)'''),
            ("md", "## Average vs total compute (LM-only runs as the reference curve)"),
            ("code", '''fig = analysis.fig_compute(runs) if runs is not None else None
if fig is not None:
    display(fig)
elif runs is not None:
    print("these runs logged no cost metrics (cost.total_flops)")'''),
        ],
    },
    "truncation": {
        "title": "# Logits truncation: top-p-k (Table 8, Figs. 2 and 3)\n\nΔ of the student against the LM-only "
                 "baseline for each truncation of the teacher's distribution; Fig. 2 at fixed k (the paper's k = 100) "
                 "with the store's size per token where logged, Fig. 3 over k for each p swept over several k.",
        "sweeps": {"SWEEP": "table8_top_p_k"},
        "cells": [
            ("code", "runs = analysis.load_sweep_runs(TRACKING_URI, SWEEP)\n" + _table_cell("runs", "table")),
            ("md", "## Fig. 2: Δ vs p"),
            ("code", '''if has_delta(table):
    display(analysis.fig_delta_vs_p(runs))'''),
            ("md", "## Fig. 3: Δ vs k"),
            ("code", '''if has_delta(table):
    display(analysis.fig_delta_vs_k(runs))'''),
        ],
    },
    "temperature": {
        "title": "# Temperature (Tables 2/9 and 3)\n\nFixed temperatures τ (Table 9's scores, Table 2's Δ) and the "
                 "adaptive-temperature methods NormKD, WTTM, AdaKD-SD and AdaKD-H (Table 3).",
        "sweeps": {"SWEEP": "table2_temperature", "SWEEP_ADAPTIVE": "table3_adaptive_temperature"},
        "cells": [
            ("md", "## Tables 2 and 9: fixed τ"),
            ("code", "runs = analysis.load_sweep_runs(TRACKING_URI, SWEEP)\n" + _table_cell("runs", "table")),
            ("code", '''if has_delta(table):
    display(analysis.fig_delta_vs_param(runs, "tau", log_x=True, title="Δ vs τ (Table 2)"))'''),
            ("md", "## Table 3: adaptive temperature"),
            ("code", "adaptive = analysis.load_sweep_runs(TRACKING_URI, SWEEP_ADAPTIVE)\n"
                     + _table_cell("adaptive", "adaptive_table")),
            ("code", '''if has_delta(adaptive_table):
    display(analysis.fig_delta_vs_param(adaptive, "pd.label"))'''),
        ],
    },
    "loss_and_schedules": {
        "title": "# Loss and schedules (Tables 4/10 and 5)\n\nThe mix α of LM and KD loss (Table 10's scores, "
                 "Table 4's Δ), then loss types and α / learning-rate schedules (Table 5).",
        "sweeps": {"SWEEP": "table4_alpha", "SWEEP_SCHEDULES": "table5_loss_schedules"},
        "cells": [
            ("md", "## Tables 4 and 10: α"),
            ("code", "runs = analysis.load_sweep_runs(TRACKING_URI, SWEEP)\n" + _table_cell("runs", "table")),
            ("code", '''if has_delta(table):
    display(analysis.fig_delta_vs_param(runs, "alpha", title="Δ vs α (Table 4)"))'''),
            ("md", "## Table 5: loss types, α and learning-rate schedules"),
            ("code", "schedules = analysis.load_sweep_runs(TRACKING_URI, SWEEP_SCHEDULES)\n"
                     + _table_cell("schedules", "schedules_table")),
            ("code", '''if has_delta(schedules_table):
    display(analysis.fig_delta_vs_param(schedules, "pd.label"))'''),
        ],
    },
    "scaling": {
        "title": "# Scaling (Table 11, Figs. 1, 4 and 5, Tables 12 and 13)\n\nStudent × teacher sizes, each student "
                 "size against its own LM-only baseline; the better configuration PD* per size; checkpoint curves "
                 "of long runs.",
        "sweeps": {"SWEEP": "table11_sizes", "SWEEP_PD_STAR": "table13_pd_star",
                   "SWEEP_CHECKPOINTS": "table12_checkpoints"},
        "cells": [
            ("md", "## Table 11 and Fig. 4: student and teacher sizes"),
            ("code", "runs = analysis.load_sweep_runs(TRACKING_URI, SWEEP)\n" + _table_cell("runs", "table")),
            ("code", '''if has_delta(table):
    display(analysis.fig_delta_vs_student(runs))'''),
            ("md", "## Table 13 and Fig. 1: PD* per student size"),
            ("code", "pd_star = analysis.load_sweep_runs(TRACKING_URI, SWEEP_PD_STAR)\n"
                     + _table_cell("pd_star", "pd_star_table")),
            ("code", '''parts = [r for r in (runs, pd_star) if r is not None]
if parts:
    display(analysis.fig_sizes(pd.concat(parts, ignore_index=True)))'''),
            ("md", "## Table 12 and Fig. 5: checkpoints of long runs"),
            ("code", '''checkpoints = analysis.load_sweep_runs(TRACKING_URI, SWEEP_CHECKPOINTS)
curves = analysis.checkpoint_curves(TRACKING_URI, checkpoints) if checkpoints is not None else None
if curves is not None and not curves.empty:
    display(curves.pivot_table(index="step", columns="label", values="value").round(1))
    display(analysis.fig_checkpoints(curves))
elif checkpoints is not None:
    print("these runs logged eval.average at no checkpoint step")'''),
        ],
    },
    "online": {
        "title": "# Online logits (Table 6)\n\nStudents distilled from logits saved while the teacher itself was "
                 "being pre-trained, against the LM-only baseline.",
        "sweeps": {"SWEEP": "table6_online"},
        "cells": [
            ("code", "runs = analysis.load_sweep_runs(TRACKING_URI, SWEEP)\n" + _table_cell("runs", "table")),
            ("code", '''if has_delta(table):
    display(analysis.fig_delta_vs_param(runs, "pd.label"))'''),
        ],
    },
}

_HOW = ("The store is `TRACKING_URI` below (from `$PDL_TRACKING_URI`); runs come from `pdl sweep run "
        "sweeps/<name>.yaml`. To try the notebooks with the paper's own printed numbers instead: "
        "`python -m analysis.paper_data sqlite:///$PWD/paper.db`, then `PDL_TRACKING_URI=sqlite:///$PWD/paper.db`; see "
        "notebooks/README.md.")


def _literal(value: str | None) -> str:
    return "None  # every sweep in the store" if value is None else f'"{value}"'


def build(name: str):
    """The notebook `name` as an nbformat node (no outputs, stable cell ids)."""
    import nbformat.v4 as v4

    spec = NOTEBOOKS[name]
    config = _CONFIG + "".join(f"{var} = {_literal(value)}\n" for var, value in spec["sweeps"].items())
    cells = [("md", spec["title"] + "\n\n" + _HOW), ("code", config.rstrip("\n")), ("code", _SETUP), *spec["cells"]]
    nb = v4.new_notebook()
    nb.metadata = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                   "language_info": {"name": "python"}}
    for i, (kind, source) in enumerate(cells):
        cell = v4.new_markdown_cell(source) if kind == "md" else v4.new_code_cell(source)
        cell.id = f"{name}-{i}"
        nb.cells.append(cell)
    return nb


def render(name: str) -> str:
    """The notebook file's text, exactly as committed."""
    import nbformat

    return nbformat.writes(build(name)) + "\n"


def write_all(directory: Path = NOTEBOOK_DIR) -> list[Path]:
    """Write every notebook into `directory`; returns the paths."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in NOTEBOOKS:
        path = directory / f"{name}.ipynb"
        path.write_text(render(name), encoding="utf-8")
        paths.append(path)
    return paths


if __name__ == "__main__":
    for written in write_all(Path(sys.argv[1]) if len(sys.argv) > 1 else NOTEBOOK_DIR):
        print(written)
