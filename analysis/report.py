"""A sweep's report: index.html with the paper table and figures, plus table.md/.csv/.tex and PNG/SVG.

The report is written into a temporary sibling directory and renamed into place at the end, so an
error (a figure that cannot be drawn, a full disk) leaves no half-written report behind and any
previous report at `out_dir` untouched.
"""

from __future__ import annotations

import base64
import html
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd

from analysis import figures as F
from analysis.render import to_csv, to_html, to_latex, to_markdown
from analysis.tables import DELTA, paper_table
from pd_lightning.errors import ConfigError

FIGURE_NAMES = ["sizes", "delta_vs_p", "delta_vs_k", "delta_vs_student", "delta_vs_bytes", "compute", "param:<column>"]
_SWEPT_NUMERIC = ["alpha", "p", "k", "tau"]
_TITLES = {"sizes": "Average by student size (Fig. 1)", "delta_vs_p": "Δ vs p (Fig. 2)", "delta_vs_k": "Δ vs k (Fig. 3)",
           "delta_vs_student": "Δ vs student size (Fig. 4)", "compute": "Average vs total compute",
           "delta_vs_bytes": "Δ vs bytes per token of the targets (top-p-k and sampled)"}
_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
.table-wrap{overflow-x:auto;max-width:100%;margin:1em 0}
table.paper-table{border-collapse:collapse;font-size:14px;margin:0 0 .5em 0}
.paper-table th,.paper-table td{padding:4px 8px;text-align:right;border-bottom:1px solid #ddd;white-space:nowrap}
.paper-table tr.units th{font-weight:normal;font-style:italic;font-size:12px;color:#555}
.paper-table thead th{border-bottom:2px solid #222}.paper-table tbody th{text-align:left;font-weight:normal}
.paper-table tr.group td{text-align:left;font-style:italic;background:#f4f4f4}
td.up{color:#1a7f37}td.down{color:#cf222e}.footnote{font-size:12px;color:#555;white-space:normal}
.note.identical{font-size:13px;background:#fff8c5;border-left:3px solid #d4a72c;padding:4px 8px}
figure{margin:1.5em 0}figure img{max-width:100%}figcaption{font-size:13px;color:#444}"""


def _distinct(runs: pd.DataFrame, col: str) -> int:
    """How many values a column takes among the non-baseline runs."""
    if col not in runs:
        return 0
    return int(runs.loc[F._kd_runs(runs), col].dropna().nunique())


def _is_swept(runs: pd.DataFrame, table: pd.DataFrame, col: str) -> bool:
    """A numeric parameter worth a Δ-vs-it plot: ≥ 3 values, and (α, τ) about one per configuration —
    Table 5's rows differ in schedules while α only takes 0 and 1, which would make a meaningless line."""
    n = _distinct(runs, col)
    if n < 3:
        return False
    configs = int((~table["baseline"]).sum())
    return col in ("p", "k") or n * 2 >= configs


def auto_figures(runs: pd.DataFrame, table: pd.DataFrame) -> list[str]:
    """Figures that make sense for these runs: Δ vs each swept numeric parameter (α, p, k, τ), Δ
    per configuration, the size figures when students differ, the compute figure when cost exists."""
    names: list[str] = []
    has_delta = DELTA in table and table[DELTA].notna().any()
    if has_delta:
        for col in _SWEPT_NUMERIC:
            if _is_swept(runs, table, col):
                names.append({"p": "delta_vs_p", "k": "delta_vs_k"}.get(col, f"param:{col}"))
        if (~table["baseline"]).sum() > 1:
            names.append("param:pd.label")
        if F.has_target_families(runs):
            names.append("delta_vs_bytes")
    if "pd.student" in runs and runs["pd.student"].dropna().nunique() > 1:
        names.append("sizes")
        if has_delta:
            names.append("delta_vs_student")
    if F.has_cost(runs):
        names.append("compute")
    return names


def _figure_function(name: str, baseline: str | None, group_by) -> Callable[[pd.DataFrame, Path], object]:
    """The figure drawer for a report figure name."""
    if name.startswith("param:"):
        col = name.removeprefix("param:")
        return lambda runs, out: F.fig_delta_vs_param(runs, col, out, baseline=baseline, group_by=group_by)
    drawers: dict[str, Callable[[pd.DataFrame, Path], object]] = {
        "sizes": lambda runs, out: F.fig_sizes(runs, out, baseline=baseline, best=True),
        "delta_vs_p": lambda runs, out: F.fig_delta_vs_p(runs, out, baseline=baseline),
        "delta_vs_k": lambda runs, out: F.fig_delta_vs_k(runs, out, baseline=baseline),
        "delta_vs_student": lambda runs, out: F.fig_delta_vs_student(runs, out, baseline=baseline, group_by=group_by),
        "delta_vs_bytes": lambda runs, out: F.fig_delta_vs_bytes(runs, out, baseline=baseline, group_by=group_by),
        "compute": lambda runs, out: F.fig_compute(runs, out),
    }
    if name not in drawers:
        raise ConfigError(f"figures: {name!r} is not a report figure; expected one of {', '.join(FIGURE_NAMES)}")
    return drawers[name]


def _file_stem(name: str) -> str:
    return "fig_" + "".join(ch if ch.isalnum() else "_" for ch in name.removeprefix("param:"))


def _caption(name: str) -> str:
    if name.startswith("param:"):
        col = name.removeprefix("param:")
        return "Δ per configuration" if col == "pd.label" else f"Δ vs {F.PARAM_NAMES.get(col, col)}"
    return _TITLES[name]


def _data_uri(png: Path) -> str:
    """A PNG as a base64 `data:` URI, so the page shows its figures where relative links do not resolve
    (MLflow's artifact HTML preview)."""
    return "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode("ascii")


def _page(title: str, description: str, table_html: str, figs: list[tuple[str, str]], folder: Path) -> str:
    """The self-contained index.html: inline CSS, figures inlined as PNG data URIs (read from `folder`),
    the table in a horizontally scrollable wrapper, links to the table files and the PNG/SVG files beside it."""
    esc = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{esc(title)}</title>",
             f"<style>{_CSS}</style></head><body>", f"<h1>{esc(title)}</h1>"]
    if description:
        parts += [f"<p>{esc(p)}</p>" for p in description.split("\n\n") if p.strip()]
    parts += ["<h2>Table</h2>", f'<div class="table-wrap">\n{table_html}</div>',
              '<p>Download: <a href="table.md">table.md</a> · <a href="table.csv">table.csv</a> · '
              '<a href="table.tex">table.tex</a></p>']
    if figs:
        parts.append("<h2>Figures</h2>")
    for stem, caption in figs:
        parts.append(f'<figure><img src="{_data_uri(folder / (stem + ".png"))}" alt="{esc(caption)}">'
                     f'<figcaption>{esc(caption)} (<a href="{stem}.png">PNG</a> · <a href="{stem}.svg">SVG</a>)'
                     '</figcaption></figure>')
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _check_out_dir(out_dir: Path) -> None:
    """Refuse to replace a non-empty directory that is not a previous report (it may be the user's)."""
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / "index.html").is_file())):
        raise ConfigError(f"out_dir={str(out_dir)!r} exists and is not a previous report; choose an empty or new directory")


def _swap_into_place(tmp: Path, out_dir: Path) -> None:
    """Move the finished report to out_dir, replacing a previous report only once the new one is whole."""
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        old.rmdir()
        out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out_dir)


def build_report(runs: pd.DataFrame, out_dir: str | Path, *, title: str, description: str = "",
                 baseline: str | None = None, group_by: str | Sequence[str] | None = None,
                 figures: Sequence[str] | None = None, rows: Sequence[str] | None = None,
                 curves: pd.DataFrame | None = None, extra: str | Sequence[str] | None = "auto",
                 reliability: pd.DataFrame | None = None) -> Path:
    """Write a report of `runs` into `out_dir` and return the path of its index.html.

    Files: index.html (title, description, the paper table, links, figures inlined as PNG data URIs with
    links to the files beside it, so it renders inside MLflow's artifact preview), table.md, table.csv, table.tex, and fig_<name>.png/.svg per figure. `figures`: names
    from FIGURE_NAMES ("param:<column>" for Δ vs any run column); default: `auto_figures`.
    `baseline`, `group_by`, `rows`: as in `paper_table` (which is computed with cost columns when
    the runs carry cost metrics). `curves`: `checkpoint_curves(...)` of runs scored at several
    checkpoints; with at least two steps it adds Fig. 5 (score vs consumed tokens).
    `extra`: the beyond-accuracy columns beside the paper's (`paper_table`'s `extra`; default: every
    one the runs logged). `reliability`: `reliability_bins(...)` of the runs; when it has bins, a
    reliability diagram per configuration (held-out top-1 calibration) is added.
    """
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    table = paper_table(runs, baseline, rows=rows, group_by=group_by, cost=F.has_cost(runs), extra=extra)
    names = list(figures) if figures is not None else auto_figures(runs, table)
    drawers = [(name, _figure_function(name, baseline, group_by)) for name in names]  # validate names first
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        (tmp / "table.md").write_text(to_markdown(table), encoding="utf-8")
        to_csv(table, tmp / "table.csv")
        (tmp / "table.tex").write_text(to_latex(table, caption=title), encoding="utf-8")
        drawn = []
        for name, draw in drawers:
            stem = _file_stem(name)
            if draw(runs, tmp / stem) is not None:  # fig_compute gives None without cost metrics
                drawn.append((stem, _caption(name)))
        if curves is not None and not curves.empty and curves["step"].nunique() >= 2:
            F.fig_checkpoints(curves, tmp / "fig_checkpoints")
            drawn.append(("fig_checkpoints", "Average vs consumed tokens, from intermediate checkpoints (Fig. 5)"))
        if reliability is not None and not reliability.empty:
            order = {label: i for i, label in enumerate(table["label"])}  # panels in the table's row order
            reliability = reliability[reliability["label"].isin(order)]
            reliability = reliability.sort_values("label", key=lambda c: c.map(order), kind="stable")
            if not reliability.empty:
                F.fig_reliability(reliability, tmp / "fig_reliability")
                drawn.append(("fig_reliability", "Reliability diagram per configuration: held-out next-token accuracy "
                                                 "vs top-1 confidence, 15 equal-mass bins, mean over seeds (diagonal: "
                                                 "calibrated)"))
        (tmp / "index.html").write_text(_page(title, description, to_html(table), drawn, tmp), encoding="utf-8")
        _swap_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir / "index.html"
