"""MLflow runs -> the paper's tables and figures.

    runs = load_runs("sqlite:///mlflow.db", sweep="table10_alpha")
    table = paper_table(runs)                 # one row per configuration, Average, Δ% with 95% CIs
    print(to_markdown(table))
    fig_delta_vs_param(runs, "alpha", "out/alpha")   # writes out/alpha.png and out/alpha.svg
    build_report(runs, "report/", title="Table 10: α")
"""

from analysis.figures import (fig_checkpoints, fig_compute, fig_delta_vs_bytes, fig_delta_vs_k, fig_delta_vs_p,
                              fig_delta_vs_param, fig_delta_vs_student, fig_reliability, fig_sizes, reliability_table,
                              save_figure)
from analysis.render import format_delta, to_csv, to_html, to_latex, to_markdown
from analysis.report import build_report
from analysis.runs import (checkpoint_curves, load_runs, load_sweep_runs, metric_history, no_runs_message,
                           reliability_bins, select_sweep)
from analysis.stats import delta_ci, mean_ci, t975
from analysis.tables import (config_labels, paper_table, percent_task_columns, run_averages, summarize,
                             sweep_summary)

__all__ = [
    "build_report", "checkpoint_curves", "config_labels", "delta_ci", "fig_checkpoints", "fig_compute",
    "fig_delta_vs_bytes", "fig_delta_vs_k", "fig_delta_vs_p", "fig_delta_vs_param", "fig_delta_vs_student",
    "fig_reliability", "fig_sizes",
    "format_delta", "load_runs", "load_sweep_runs", "mean_ci", "metric_history", "no_runs_message", "paper_table",
    "percent_task_columns", "reliability_bins", "reliability_table", "run_averages", "save_figure", "select_sweep", "summarize", "sweep_summary", "t975", "to_csv", "to_html", "to_latex", "to_markdown",
]
