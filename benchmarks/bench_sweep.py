"""Sweep benchmark: wall time of one sweep's trials with 1 worker (the naive baseline) and with N workers.

Three runs share one prerequisite cache built first (shards, teacher, logit store), so the figures
are the trials alone: training + evaluation of every configuration x seed, process start-up and
the study's bookkeeping included. Each run gets a fresh working dir (its own MLflow and Optuna
sqlite stores):
  1 worker            `pdl sweep run` default: one worker using every core (torch intra-op threads)
  1 worker, 1 thread  one worker on one core (`--threads 1`)
  N workers           `--workers N`: cores / N threads each
Target on a 2-core machine: speed-up >= 1.6 with 2 workers.

`speedup_bound` = N x (1 worker) / (1 worker, 1 thread): the most N workers could gain over the
default single worker if N single-thread workers scaled perfectly (no contention, no tail) — when the
single worker already turns its second core into speed, this bound is what limits the ratio.

Prints progress lines, then one JSON object as the last line:
  python benchmarks/bench_sweep.py                       # the quickstart sweep at tiny scale
  python benchmarks/bench_sweep.py --scale smoke --workers 2
  python benchmarks/bench_sweep.py --cache runs/cache    # reuse prerequisites already built there
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(sweep: Path, scale: str, workers: int, cwd: Path, cache: Path, threads: int | None = None) -> float:
    """Wall seconds of `pdl sweep run` in `cwd`; raises if the sweep does not finish cleanly."""
    cwd.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pd_lightning.cli", "sweep", "run", str(sweep), "--scale", scale,
           "--workers", str(workers), "--cache", str(cache)] + (["--threads", str(threads)] if threads else [])
    started = time.perf_counter()
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"bench_sweep: {' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", default=str(ROOT / "sweeps" / "quickstart.yaml"))
    parser.add_argument("--scale", default="tiny")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--dir", help="work dir (default: a temp dir, removed at the end)")
    parser.add_argument("--cache", help="prerequisite cache to use (default: one inside the work dir)")
    parser.add_argument("--skip-single-thread", action="store_true", help="leave out the 1 worker, 1 thread run")
    args = parser.parse_args()

    from pd_lightning.sweep import build_prerequisites, load_sweep, resolve_place

    spec = load_sweep(args.sweep, args.scale)
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        root = Path(args.dir or tmp)
        cache = Path(args.cache).resolve() if args.cache else root / "cache"
        started = time.perf_counter()
        cwd = os.getcwd()
        os.chdir(root)
        try:  # prerequisites once, outside the timed runs
            build_prerequisites(spec, resolve_place(spec, out=str(root / "prereq"), cache=str(cache), storage=None))
        finally:
            os.chdir(cwd)
        prereq_s = time.perf_counter() - started
        print(f"bench_sweep: prerequisites {prereq_s:.0f}s; {len(spec.tasks())} trials", flush=True)
        sweep, n = Path(args.sweep).resolve(), args.workers
        one = run(sweep, args.scale, 1, root / "one", cache)
        print(f"bench_sweep: 1 worker {one:.0f}s", flush=True)
        many = run(sweep, args.scale, n, root / "many", cache)
        print(f"bench_sweep: {n} workers {many:.0f}s", flush=True)
        single = None if args.skip_single_thread else run(sweep, args.scale, 1, root / "single", cache, threads=1)
        if single:
            print(f"bench_sweep: 1 worker, 1 thread {single:.0f}s", flush=True)
    figures = {
        "benchmark": "sweep", "sweep": spec.name, "scale": spec.scale, "trials": len(spec.tasks()),
        "cpu_count": os.cpu_count(), "prerequisites_s": round(prereq_s, 1), "wall_1_worker_s": round(one, 1),
        f"wall_{n}_workers_s": round(many, 1), "speedup": round(one / many, 3),
        "target_speedup": 1.6 if n == 2 else None,
    }
    if single:
        figures.update({"wall_1_worker_1_thread_s": round(single, 1),
                        "speedup_vs_1_thread_worker": round(single / many, 3),
                        "speedup_bound": round(n * one / single, 3),
                        "parallel_efficiency": round(single / many / n, 3)})
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
