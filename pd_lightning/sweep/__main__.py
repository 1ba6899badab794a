"""A sweep worker: `python -m pd_lightning.sweep worker SWEEP --storage URL --out DIR --cache DIR`.

`pdl sweep run` starts these (one per `--workers`); each claims and runs trials until none is left.
A worker that stops because a server does not answer writes the one-line error last (`pdl: error: ...`)
and exits with ServerUnreachable.exit_code, which its coordinator reports.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from pd_lightning.errors import UserError

log = logging.getLogger("pd_lightning.sweep.worker")


def main(argv: list[str]) -> int:
    """Run one worker; returns its exit code (0, or the UserError's)."""
    parser = argparse.ArgumentParser(prog="pd_lightning.sweep")
    parser.add_argument("command", choices=["worker"])
    parser.add_argument("sweep")
    parser.add_argument("--scale")
    parser.add_argument("--storage", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--cache", required=True)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (the coordinator's share of the cores)")
    parser.add_argument("--retry-failed", action="store_true")
    parser.add_argument("--reuse-runs", action="store_true")
    parser.add_argument("--tracking-uri", help="the MLflow store of every run (the coordinator's --tracking-uri)")
    parser.add_argument("--register", metavar="NAME", help="registered model every student becomes a version of")
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from pd_lightning import logs
    from pd_lightning.sweep.runner import OUTAGE_PREFIX, worker
    from pd_lightning.sweep.spec import load_sweep
    from pd_lightning.sweep.study import Place

    logs.quiet_libraries()
    logs.setup()
    try:
        spec = load_sweep(args.sweep, args.scale, tracking_uri=args.tracking_uri)
        place = Place(Path(args.out), Path(args.cache), args.storage, args.reuse_runs, args.register)
        ran = worker(spec, place, retry_failed=args.retry_failed)
    except UserError as exc:
        print(f"{OUTAGE_PREFIX}{exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    log.info("sweep: worker %d done after %d trial(s)", os.getpid(), ran)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
