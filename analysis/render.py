"""Paper tables as Markdown, LaTeX (booktabs), HTML and CSV, printed like the paper: one decimal,
Δ with ↑/↓ arrows ("↑ 1.6%", "↓ 7.6%"), "±" for 95% intervals over seeds, "*" where Δ's interval
excludes zero."""

from __future__ import annotations

import html
import math
from pathlib import Path

import pandas as pd

from analysis.tables import (AVERAGE, AVERAGE_CI, DELTA, DELTA_CI, DELTA_PER_COMPUTE, DELTA_SIG, EXTRA_LABELS, PFLOPS,
                             STORE_GB, column_unit, extra_columns, is_finite, task_columns)
from pd_lightning.errors import ConfigError

SIG_MARK = "*"
FOOTNOTES = {
    "auto": ("± is the 95% t-interval over seeds (rows or baselines with fewer than 3 seeds pool the seed variance "
             "over the table's configurations); * marks a Δ whose 95% interval excludes 0 (delta method)."),
    "pooled": ("± is the 95% t-interval over seeds, with the seed variance pooled over the table's configurations; "
               "* marks a Δ whose 95% interval excludes 0 (delta method)."),
    "welch": ("± is the 95% t-interval over seeds; * marks a Δ whose 95% interval excludes 0 "
              "(delta method, Welch degrees of freedom)."),
}
FOOTNOTE = FOOTNOTES["welch"]
EXTRA_FOOTNOTE = ("Beside the paper's columns, means over seeds: held-out loss (nats/token), top-1 accuracy, ECE "
                  "(top-1 confidence vs accuracy, 15 equal-mass bins), full-vocabulary Brier score, top-1 agreement "
                  "with and KL(T‖S) from the teacher (nats/token), on the held-out stream; copying accuracy on "
                  "random and natural repeated spans (chance 25%), synth_facts 5-shot and its gain over 0-shot (points).")


UNITS_NOTE = ("Units (the line under the header): task scores and Average in % (accuracy); Δ is the percent change of "
              "the Average relative to the LM-only baseline of the same group, 100·(Average / Average_LM − 1).")
COMPUTE_NOTE = ("PFLOPs: total compute in 1e15 FLOPs, the teacher's share included; store GB: logit-store bytes "
                "read (1e9 bytes); Δ per 10% extra compute: Δ (% vs LM-only) divided by the extra total FLOPs over "
                "the LM-only baseline in units of 10%, i.e. Δ% per +10% FLOPs.")


def footnote(table: pd.DataFrame) -> str:
    """The interval footnote for the method the table was computed with (and what the extra columns are)."""
    text = FOOTNOTES.get(table.attrs.get("ci", "welch"), FOOTNOTE) if _needs_interval_note(table) else ""
    if extra_columns(table):
        text = f"{text} {EXTRA_FOOTNOTE}".strip()
    return text


def units_note(table: pd.DataFrame) -> str:
    """What the units line means where it is not obvious: Δ relative to the baseline, the cost columns."""
    return UNITS_NOTE + (" " + COMPUTE_NOTE if DELTA_PER_COMPUTE in table else "")


def _join_labels(labels: list[str]) -> str:
    return labels[0] if len(labels) == 1 else ", ".join(labels[:-1]) + " and " + labels[-1]


def identical_notes(table: pd.DataFrame) -> list[str]:
    """One sentence per set of rows whose results are exactly equal (`table.attrs["identical"]`, set by
    `paper_table`), naming the rows and the reason when it is known."""
    notes = []
    for item in table.attrs.get("identical", []) or []:
        labels = [str(lab) for lab in item["labels"]]
        where = f" (group {item['group']})" if item.get("group") else ""
        text = f"{_join_labels(labels)}{where} have identical results (every score equal over the same seeds)"
        notes.append(f"{text}: {item['reason']}." if item.get("reason") else f"{text}.")
    return notes


def notes(table: pd.DataFrame) -> list[str]:
    """The paragraphs printed under a table: intervals and extra columns, units, identical rows."""
    first = footnote(table) if _needs_footnote(table) else ""
    return [n for n in (first, units_note(table), *identical_notes(table)) if n]


def _check_table(table: pd.DataFrame) -> None:
    if not isinstance(table, pd.DataFrame) or not {"group", "label", AVERAGE}.issubset(table.columns):
        raise ConfigError("table must be a DataFrame returned by analysis.paper_table (columns group, label, Average)")


def format_delta(value: float, ci95: float = math.nan, excludes_zero: bool = False) -> str:
    """Δ% like the paper, "↑ 1.6%" / "↓ 7.6%" / "0.0%", plus " ± 0.9" and the mark when known."""
    if not is_finite(value):
        return ""
    rounded = round(float(value), 1)
    text = "0.0%" if rounded == 0 else f"{'↑' if rounded > 0 else '↓'} {abs(rounded):.1f}%"
    if is_finite(ci95):
        text += f" ± {float(ci95):.1f}"
    return text + (SIG_MARK if excludes_zero else "")


def _number(value: object, digits: int = 1) -> str:
    return f"{float(value):.{digits}f}" if is_finite(value) else "–"  # type: ignore[arg-type]


def _average(row: pd.Series) -> str:
    text = _number(row[AVERAGE])
    if is_finite(row.get(AVERAGE_CI)) and row.get("n", 1) > 1:
        text += f" ± {float(row[AVERAGE_CI]):.1f}"
    return text


def _cost_cells(row: pd.Series, cols: list[str]) -> list[str]:
    fmt = {PFLOPS: lambda v: f"{float(v):.3g}", STORE_GB: lambda v: f"{float(v):.2f}",
           DELTA_PER_COMPUTE: lambda v: f"{float(v):+.2f}"}
    return [fmt[c](row[c]) if is_finite(row[c]) else "–" for c in cols]


def _units(header: list[str]) -> list[str]:
    """The units line under the header: one unit per column (the label column says "unit")."""
    keys = {"Average": AVERAGE, "Δ": DELTA}
    return ["unit"] + [column_unit(keys.get(h, h)) for h in header[1:]]


def _layout(table: pd.DataFrame) -> tuple[list[str], list[tuple[str, object]]]:
    """Header cells and body items: ("group", name) header rows and ("row", [cells]) rows."""
    _check_table(table)
    tasks = task_columns(table)
    extra = extra_columns(table)
    cost = [c for c in (PFLOPS, STORE_GB, DELTA_PER_COMPUTE) if c in table]
    show_n = "n" in table and (table["n"] > 1).any()
    show_delta = DELTA in table and table[DELTA].notna().any()
    header = ["", *tasks, "Average"] + (["Δ"] if show_delta else []) + (["n"] if show_n else []) + extra + cost
    groups = list(dict.fromkeys(table["group"]))
    show_groups = any(str(g) for g in groups)
    items: list[tuple[str, object]] = []
    for group in groups:
        if show_groups:
            items.append(("group", str(group)))
        for _, row in table[table["group"] == group].iterrows():
            cells = [str(row["label"]), *[_number(row[t]) for t in tasks], _average(row)]
            if show_delta:
                cells.append(format_delta(row[DELTA], row.get(DELTA_CI, math.nan) if row.get("n", 1) > 1 else math.nan,
                                          bool(row.get(DELTA_SIG, False))))
            if show_n:
                cells.append(str(int(row["n"])))
            cells += [_number(row[c], EXTRA_LABELS[c]) for c in extra]
            items.append(("row", cells + _cost_cells(row, cost)))
    return header, items


def _needs_interval_note(table: pd.DataFrame) -> bool:
    return "n" in table and (table["n"] > 1).any()


def _needs_footnote(table: pd.DataFrame) -> bool:
    return _needs_interval_note(table) or bool(extra_columns(table))


def to_markdown(table: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (group names as bold rows), with a footnote when seeds > 1."""
    header, items = _layout(table)

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    out = [line(header), "|" + "|".join([":--"] + ["--:"] * (len(header) - 1)) + "|",
           line([f"*{u}*" for u in _units(header)])]
    for kind, content in items:
        if kind == "group":
            out.append(line([f"**{content}**"] + [""] * (len(header) - 1)))
        else:
            out.append(line(content))  # type: ignore[arg-type]
    text = "\n".join(out) + "\n"
    return text + "".join(f"\n{n}\n" for n in notes(table))


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
# Symbols the paper's tables use, as math so that a plain pdflatex document compiles.
_LATEX_SYMBOLS = {"α": r"$\alpha$", "β": r"$\beta$", "τ": r"$\tau$", "Δ": r"$\Delta$", "±": r"$\pm$",
                  "↑": r"$\uparrow$", "↓": r"$\downarrow$", "–": "--", "≥": r"$\geq$", "≤": r"$\leq$",
                  "‖": r"$\|$", "−": "$-$", "·": r"$\cdot$"}


def latex_escape(text: str) -> str:
    """Escape LaTeX specials and write the paper's Greek letters and arrows as math."""
    return "".join(_LATEX_SPECIAL.get(ch, _LATEX_SYMBOLS.get(ch, ch)) for ch in str(text))


def to_latex(table: pd.DataFrame, caption: str | None = None) -> str:
    """A booktabs tabular (\\toprule, \\midrule, \\bottomrule); groups as \\multicolumn header rows."""
    header, items = _layout(table)
    ncol = len(header)
    out = []
    if caption:
        out += [r"\begin{table}[t]", r"\centering", rf"\caption{{{latex_escape(caption)}}}"]
    out += [rf"\begin{{tabular}}{{l{'r' * (ncol - 1)}}}", r"\toprule",
            " & ".join(latex_escape(h) for h in header) + r" \\",
            " & ".join(r"\textit{" + latex_escape(u) + "}" for u in _units(header)) + r" \\", r"\midrule"]
    first = True
    for kind, content in items:
        if kind == "group":
            if not first:
                out.append(r"\midrule")
            out.append(rf"\multicolumn{{{ncol}}}{{l}}{{\textit{{{latex_escape(str(content))}}}}} \\")
        else:
            out.append(" & ".join(latex_escape(c) for c in content) + r" \\")  # type: ignore[union-attr]
        first = False
    out += [r"\bottomrule", r"\end{tabular}"]
    for note in notes(table):
        out.append(r"\\[2pt]{\footnotesize " + latex_escape(note) + "}")
    if caption:
        out.append(r"\end{table}")
    return "\n".join(out) + "\n"


def to_html(table: pd.DataFrame) -> str:
    """An HTML <table class="paper-table"> (Δ cells carry class "up" or "down"; groups span the row)."""
    header, items = _layout(table)
    esc = html.escape
    out = ['<table class="paper-table">', "<thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>",
           '<tr class="units">' + "".join(f"<th>{esc(u)}</th>" for u in _units(header)) + "</tr></thead>", "<tbody>"]
    delta_at = header.index("Δ") if "Δ" in header else -1
    for kind, content in items:
        if kind == "group":
            out.append(f'<tr class="group"><td colspan="{len(header)}">{esc(str(content))}</td></tr>')
            continue
        cells = []
        for i, c in enumerate(content):  # type: ignore[arg-type]
            cls = ""
            if i == delta_at and c:
                cls = ' class="up"' if c.startswith("↑") else ' class="down"' if c.startswith("↓") else ""
            tag = "th" if i == 0 else "td"
            cells.append(f"<{tag}{cls}>{esc(c)}</{tag}>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    if _needs_footnote(table):
        out.append(f'<p class="footnote">{esc(footnote(table))}</p>')
    out.append(f'<p class="footnote units">{esc(units_note(table))}</p>')
    out += [f'<p class="note identical">{esc(n)}</p>' for n in identical_notes(table)]
    return "\n".join(out) + "\n"


def to_csv(table: pd.DataFrame, path: str | Path) -> Path:
    """The table's numbers (unformatted, full precision) as CSV; returns the path written."""
    _check_table(table)
    path = Path(path)
    table.to_csv(path, index=False, encoding="utf-8")
    return path
