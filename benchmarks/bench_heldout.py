"""Held-out metrics benchmark (issue 19): what the one-pass held-out metrics add to a quickstart trial.

    python benchmarks/bench_heldout.py                    # ~2 min on a loaded 2-core CPU box (setup ~30 s)
    python benchmarks/bench_heldout.py --reps 3 --workdir /tmp/bh   # keep (and reuse) the dataset

Setup: `prepare` a built-in-corpus dataset at the quickstart's shapes (tiny.yaml: 2,048-token BPE,
sequences of 128, 100k held-out tokens, i.e. 781 held-out sequences of which the pass reads 256),
a tiny-1m student and a tiny-5m teacher (the quickstart's presets) saved as HF dirs. Cost does not
depend on the weights, so both are freshly initialised. One process, `torch.set_num_threads(1)`
(a quickstart worker's share of the 2 cores). Timed, median over `--reps` rounds, order rotated:

    loss_only        the held-out pass before this issue: per batch of 32, the student's forward and
                     the mean cross-entropy (the old `heldout_loss`, inlined here as the baseline)
    metrics          `heldout_metrics(student)`: the same forward plus loss, top-1 accuracy, ECE, Brier
    metrics_teacher  `heldout_metrics(student, teacher=...)`: plus the teacher's forward on the same
                     batches, top-1 agreement and KL(teacher ‖ student)
    teacher_load     `AutoModelForCausalLM.from_pretrained` of the teacher dir (paid once per trial)
    train_step       one LM training step of the quickstart (8 x 128 tokens: forward, backward, AdamW)

`extra_seconds` = metrics_teacher + teacher_load − loss_only: what a trial pays now on top of
before; `extra_vs_trial_proxy` divides it by a proxy of the rest of the trial (500 train steps + the
old held-out pass; validation, export and lm-eval left out, so the true share is smaller). The
quickstart itself logs `cost.heldout_seconds` per run beside `cost.wall_seconds`, the in-situ
figure. `os.getloadavg()` before and after is in the JSON; the last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(1)


@torch.no_grad()
def loss_only(model, root, max_sequences=256, batch_size=32) -> float:
    """The held-out pass as it was before the metrics (pd_lightning.module.heldout_loss at issue 18)."""
    from pd_lightning.data.shards import TokenShards
    from pd_lightning.module import lm_loss

    shards = TokenShards(root, "heldout")
    n = min(len(shards), max_sequences)
    total = count = 0
    for start in range(0, n, batch_size):
        ids = torch.from_numpy(shards.batch(range(start, min(start + batch_size, n))))
        tokens = ids[:, 1:].numel()
        total += lm_loss(model(input_ids=ids).logits, ids).item() * tokens
        count += tokens
    return total / count


def setup(workdir: Path) -> tuple[Path, Path, Path]:
    from transformers import AutoModelForCausalLM  # noqa: F401  (import cost outside the timings)

    from pd_lightning.config import load_config
    from pd_lightning.data.prepare import prepare
    from pd_lightning.data.shards import read_manifest
    from pd_lightning.train import _model_for_data

    data = workdir / "data"
    cfg = load_config("tiny", ["data.train_tokens=100000", "data.heldout_tokens=100000", f"data.out={data}"])
    prepare(cfg.data)
    manifest = read_manifest(data)
    dirs = []
    for preset, name in (("tiny-1m", "student"), ("tiny-5m", "teacher")):
        out = workdir / name
        if not (out / "config.json").is_file():
            _model_for_data(preset, manifest, int(manifest["vocab_size"]), 0).save_pretrained(out)
        dirs.append(out)
    return data, dirs[0], dirs[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-heldout-") as tmp:
        workdir = Path(args.workdir or tmp)
        data, student_dir, teacher_dir = setup(workdir)
        from transformers import AutoModelForCausalLM

        from pd_lightning.config import LossConfig, OptimConfig
        from pd_lightning.data.shards import TokenShards
        from pd_lightning.module import DistillationModule, heldout_metrics

        student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval()
        teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
        train_model = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
        module = DistillationModule(train_model, loss=LossConfig(alpha=0.0), optim=OptimConfig(), max_steps=500)
        optimizer = module.configure_optimizers()["optimizer"]
        batch = {"input_ids": torch.from_numpy(TokenShards(data, "train").batch(range(8)))}

        def train_step() -> None:
            optimizer.zero_grad()
            module.compute_loss(batch, 0.0).loss.backward()
            optimizer.step()

        jobs = {
            "loss_only": lambda: loss_only(student, data),
            "metrics": lambda: heldout_metrics(student, data),
            "metrics_teacher": lambda: heldout_metrics(student, data, teacher=teacher),
            "teacher_load": lambda: AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32),
            "train_step": train_step,
        }
        for job in jobs.values():  # warm-up: first-call allocations, lazy imports
            job()
        times: dict[str, list[float]] = {name: [] for name in jobs}
        names = list(jobs)
        for r in range(args.reps):
            for name in names[r % len(names):] + names[:r % len(names)]:
                started = time.perf_counter()
                jobs[name]()
                times[name].append(time.perf_counter() - started)
        med = {name: statistics.median(v) for name, v in times.items()}
        # the metrics equal the old pass's loss, so the comparison is of like with like
        check = abs(heldout_metrics(student, data).loss - loss_only(student, data))
    extra = med["metrics_teacher"] + med["teacher_load"] - med["loss_only"]
    trial_proxy = 500 * med["train_step"] + med["loss_only"]
    result = {
        "bench": "heldout", "reps": args.reps, "threads": torch.get_num_threads(),
        "heldout_tokens": 256 * 127, **{f"{k}_s": round(v, 4) for k, v in med.items()},
        "metrics_vs_loss_only": round(med["metrics"] / med["loss_only"], 3),
        "metrics_teacher_vs_loss_only": round(med["metrics_teacher"] / med["loss_only"], 3),
        "extra_seconds": round(extra, 3), "trial_proxy_s": round(trial_proxy, 2),
        "extra_vs_trial_proxy": round(extra / trial_proxy, 4), "loss_matches_old_pass": check < 1e-5,
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
