"""Sweeps: one YAML per paper experiment, run as a plain Optuna study with an MLflow run per trial.

Exactly once per configuration x seed, also with many workers on many machines; a killed worker's
trial is re-run, a killed sweep continues, every failure is recorded. One module per idea:

    spec      the sweep file: Row, Task, SweepSpec, load_sweep (every mistake refused in one line)
    cache     shared prerequisites (token shards, teachers, logit stores), content-addressed, built once
    study     the Optuna study: storage, claims under the study lock, task states, heartbeats
    space     the study's parameters: every trial's full design-space coordinates, one distribution per key
    locks     the file and study locks
    machine   local cores, GPUs and pid namespace
    trial     one task: train, evaluate, read back the objective; the val/loss curve as intermediate values
    records   the MLflow parent run and failure records (kept in the study until MLflow takes them)
    outages   what a server outage is and the one-line error that stops the sweep
    runner    the worker loop and the coordinator (`pdl sweep run`)
    status    the status table and the progress line
    __main__  the worker process the coordinator starts
"""

from pd_lightning.sweep.cache import build_prerequisites, find_store, reference_teacher, with_prerequisites
from pd_lightning.sweep.machine import gpu_groups, process_namespace, usable_cores, visible_gpus
from pd_lightning.sweep.outages import ServerUnreachable
from pd_lightning.sweep.runner import run_sweep, worker
from pd_lightning.sweep.space import PAPER_KNOBS, DesignSpace, design_space
from pd_lightning.sweep.spec import (Row, SweepError, SweepSpec, Task, check_points, load_sweep, objective_metrics,
                                     point_label, resolve_sweep_path, shipped_sweeps)
from pd_lightning.sweep.status import status_table
from pd_lightning.sweep.study import Place, create_study, load_study_for_status, resolve_place, task_states

__all__ = [
    "PAPER_KNOBS", "DesignSpace", "Place", "Row", "ServerUnreachable", "SweepError", "SweepSpec", "Task",
    "build_prerequisites", "check_points", "create_study", "design_space", "find_store", "gpu_groups",
    "load_study_for_status", "load_sweep", "objective_metrics", "point_label", "process_namespace",
    "reference_teacher", "resolve_place", "resolve_sweep_path", "run_sweep", "shipped_sweeps", "status_table",
    "task_states", "usable_cores", "visible_gpus", "with_prerequisites", "worker",
]
