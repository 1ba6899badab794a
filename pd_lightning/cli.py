"""`pdl`: the command line. Thin: parse, load + validate the config, call the library.

Bad input exits with code 2 and one line on stderr naming the field, the value and what is allowed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import textwrap

from pd_lightning import __version__, logs
from pd_lightning.errors import UserError

CONFIG_HELP = (
    "CONFIG is a YAML file or the name of a packaged config (tiny); any field can be overridden "
    "with section.key=value, e.g. data.train_tokens=5000000 loss.alpha=0.9"
)
TRACKING_URI_HELP = ("MLflow tracking URI of the runs, over tracking.tracking_uri and ./mlflow.yaml (default: their "
                     "tracking_uri, else sqlite:///mlflow.db), e.g. sqlite:///runs/mlflow.db or http://127.0.0.1:5000")


def _split_config_args(items: list[str]) -> tuple[str | None, list[str]]:
    """First argument without '=' is the config file; the rest are overrides."""
    config, overrides = None, []
    for item in items:
        if "=" not in item and config is None and not overrides:
            config = item
        else:
            overrides.append(item)
    return config, overrides


def _load(args: argparse.Namespace):
    from pd_lightning.config import load_config

    config, overrides = _split_config_args(args.config_and_overrides)
    return load_config(config, overrides)


def cmd_config_show(args: argparse.Namespace) -> None:
    from pd_lightning.config import to_yaml

    print(to_yaml(_load(args)), end="")


def cmd_data_prepare(args: argparse.Namespace) -> None:
    from pd_lightning.data.prepare import prepare

    prepare(_load(args).data)


def cmd_teacher_train(args: argparse.Namespace) -> None:
    from pd_lightning.train import train_teacher

    cfg = _load(args)
    if cfg.teacher.path:
        raise UserError(f"teacher.path={cfg.teacher.path!r} is set, so there is no teacher to train; unset it "
                        "(teacher.path=null) to pre-train teacher.preset")
    train_teacher(cfg)


def _add_tracking_uri(parser: argparse.ArgumentParser, what: str = "") -> None:
    parser.add_argument("--tracking-uri", default=None, metavar="URI", help=TRACKING_URI_HELP + what)


def _add_register(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--register", metavar="NAME", default=None, help=(
        f"also register {what} as a new version of the MLflow registered model NAME (created if missing; a "
        "student already registered there is not registered twice). Every run logs its student as an MLflow "
        "logged model anyway (the experiment's Models tab; mlflow.pyfunc.load_model): the weights, tokenizer and "
        "config of trainer.out/model, stored once in the MLflow artifact store — a few MB at tiny scale, several "
        "GB per student at the paper's; a version only references those files."))


def _with_tracking_uri(cfg, uri: str | None):
    """`cfg` with `--tracking-uri` as its tracking.tracking_uri; unchanged when the URI names the store it records
    to anyway (a run's identity includes the tracking section: a run started without the flag resumes with it)."""
    if uri is None:
        return cfg
    from pd_lightning.config import same_tracking_store
    from pd_lightning.tracking import tracking_settings

    if not same_tracking_store(uri, tracking_settings(cfg)["tracking_uri"]):
        cfg.tracking.tracking_uri = uri
        tracking_settings(cfg)  # a malformed URI: one line naming the field, before any compute
    return cfg


def cmd_train(args: argparse.Namespace) -> None:
    from pd_lightning.train import train

    train(_with_tracking_uri(_load(args), args.tracking_uri), register=args.register)


def cmd_eval(args: argparse.Namespace) -> dict:
    """`pdl eval`: evaluate, print, write; missing datasets -> UserError (exit 2) after the rest ran."""
    from pathlib import Path

    from pd_lightning.errors import ConfigError
    from pd_lightning.evaluation import evaluate, resolve_heldout_args

    limit = args.limit
    if limit is not None and limit >= 1:
        if limit != int(limit):
            raise ConfigError(f"--limit={limit!r} must be a whole number of items or a fraction below 1")
        limit = int(limit)
    data, teacher = resolve_heldout_args(args.model_dir, args.heldout, args.teacher)
    result = evaluate(args.model_dir, suite=args.suite, tasks=args.tasks, batch_size=args.batch_size,
                      device=args.device, limit=limit, run_id=args.run_id, tracking_uri=args.tracking_uri,
                      corpus_seed=args.corpus_seed, max_length=args.max_length, num_fewshot=args.num_fewshot,
                      heldout_data=data, heldout_teacher=teacher, heldout_sequences=args.heldout_sequences,
                      ece_bins=args.ece_bins)
    if args.output:
        from lm_eval.utils import handle_non_serializable

        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, default=handle_non_serializable, ensure_ascii=False),
                       encoding="utf-8")
    if args.json:
        keys = ("model_dir", "suite", "backend", "max_length", "tasks", "average", "failed", "heldout",
                "heldout_sources")
        print(json.dumps({k: result[k] for k in keys}, indent=2))
    else:
        print(_eval_table(result))
    if result["failed"]:
        raise UserError(f"{len(result['failed'])} task(s) could not run: " + "; ".join(result["failed"].values()))
    return result


def _eval_table(result: dict) -> str:
    """A plain-text table of the scores, the average, the failures and the held-out and in-context metrics."""
    from pd_lightning.tracking import FEWSHOT_PAIRS, fewshot_gains

    rows = [("task", "metric", "shots", "n", "value", "stderr")]
    for name, s in result["tasks"].items():
        rows.append((name, s["metric"] + (" (%)" if s["percent"] else ""), str(s["num_fewshot"]), str(s["samples"]),
                     f"{s['value']:.2f}", "" if s["stderr"] is None else f"{s['stderr']:.2f}"))
    for name in result["failed"]:
        rows.append((name, "-", "-", "-", "failed", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    avg = result["average"]
    lines.append(f"average (accuracy tasks, %): {'-' if avg is None else f'{avg:.2f}'}")
    for key, gain in fewshot_gains(result).items():
        pairs = ", ".join(f"{few} - {zero}" for few, zero in FEWSHOT_PAIRS.items())
        lines.append(f"{key} ({pairs}): {gain:+.2f} points")
    if result.get("heldout"):
        lines += ["", _heldout_block(result["heldout"], result["heldout_sources"])]
    return "\n".join(lines)


def _heldout_block(heldout: dict, sources: dict) -> str:
    """The held-out token metrics as `name  value` lines under a header naming the data and the teacher."""
    from pd_lightning.metrics import HeldoutMetrics

    m = HeldoutMetrics(**heldout)
    rows = [("eval.heldout.loss", f"{m.loss:.4f}", "nats/token"), ("eval.heldout.top1_acc", f"{100 * m.top1_acc:.2f}", "%"),
            ("eval.heldout.ece", f"{m.ece:.4f}", f"top-1, {len(m.bins)} equal-mass bins"),
            ("eval.heldout.brier", f"{m.brier:.4f}", "full vocabulary")]
    if m.teacher_kl is not None:
        rows += [("eval.heldout.teacher_top1_agree", f"{100 * m.teacher_top1_agree:.2f}", "%"),
                 ("eval.heldout.teacher_kl", f"{m.teacher_kl:.4f}", "nats/token, KL(teacher || model)")]
    widths = [max(len(r[i]) for r in rows) for i in range(2)]
    head = f"held-out token metrics ({m.tokens:,} tokens of {sources.get('data')}; teacher {sources.get('teacher') or 'none'}):"
    return "\n".join([head] + [f"  {a.ljust(widths[0])}  {b.rjust(widths[1])}  {c}" for a, b, c in rows])


def _add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `pdl eval` (defaults from the config's `eval` section)."""
    from pd_lightning.config import EvalConfig
    from pd_lightning.evaluation.suites import available_suites

    d = EvalConfig()
    parser.add_argument("model_dir", help="an exported HF model dir (model + tokenizer)")
    parser.add_argument("--suite", default=d.suite,
                        help=f"task suite: {', '.join(available_suites())} (default {d.suite}) or a suite YAML file")
    parser.add_argument("--tasks", default=d.tasks,
                        help="comma-separated lm-eval task names; overrides --suite (e.g. synth_facts,hellaswag)")
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--device", default=d.device, help="cpu, cuda, cuda:0, ... (default cpu)")
    parser.add_argument("--limit", type=float, default=d.limit,
                        help="items per task (a fraction if < 1); for smoke tests, scores are then noisier")
    parser.add_argument("--num-fewshot", type=int, default=None, help="override every task's shot count")
    parser.add_argument("--max-length", type=int, default=None,
                        help="context window in tokens (default: the seq_len the export was trained at if "
                             "recorded, else the model's max_position_embeddings)")
    parser.add_argument("--corpus-seed", type=int, default=0, help="world of the built-in corpus for the local tasks")
    parser.add_argument("--run-id", default=None, help="MLflow run to log eval.* metrics and the results JSON to (and to the run's logged "
                        "student too, when model_dir is the dir that student was logged from)")
    parser.add_argument("--tracking-uri", default=None, metavar="URI",
                        help="MLflow tracking URI of --run-id (default: tracking_uri of ./mlflow.yaml, else "
                             "sqlite:///mlflow.db)")
    parser.add_argument("--output", default=None, help="also write the result (scores + raw lm-eval JSON) here")
    parser.add_argument("--json", action="store_true", help="print the scores as JSON instead of a table")
    parser.add_argument("--heldout", default="auto",
                        help="held-out token metrics (loss, top-1 acc, ECE, Brier; pd_lightning.metrics) on this "
                             "prepared data dir's held-out shards; auto (default): the data dir the export's info "
                             "file names, skipped if it has none; none: skip")
    parser.add_argument("--teacher", default="auto",
                        help="teacher HF dir run beside the model on the held-out stream for top-1 agreement and "
                             "KL(teacher || student); auto (default): the teacher the run measured against or its "
                             "store's teacher, if present; none: skip")
    parser.add_argument("--heldout-sequences", type=int, default=256, help="held-out sequences to score (default 256)")
    parser.add_argument("--ece-bins", type=int, default=15, help="equal-mass bins of the ECE (default 15)")


def cmd_logits_generate(args: argparse.Namespace) -> None:
    from pd_lightning.logits.generate import generate_store

    generate_store(_load(args))


def _store_summary_lines(info: dict) -> list[str]:
    meta = info.get("meta") or {}
    checks = {True: "ok", False: f"BAD ({info.get('bad_shard')})", None: "not checked"}[info["checksums_ok"]]
    lines = [
        f"store          {info['path']}",
        f"teacher        {info['teacher']}",
        (f"sampling       {info['sampling']['samples']} draws per position from the tau=1 teacher (seed "
         f"{info['sampling']['seed']}): distinct ids with their draw counts, unbiased targets"
         if info["sampling"]["method"] == "sample" else
         f"truncation     top-{info['p']}-{info['k']} (every p' <= p, k' <= k and any tau derive from it)"),
        f"vocab size     {info['vocab_size']:,}   tokenizer {info['tokenizer_hash']}",
        f"tokens         {info['tokens']:,} in {info['sequences']:,} sequences x {info['positions_per_sequence']} positions",
        f"entries/token  {info['mean_entries_per_token']:.2f}",
        f"bytes          {info['bytes']:,} ({info['bytes_per_token']:.2f} bytes/token, {info['bytes_per_entry']:.3f} bytes/entry)",
        f"encoding       {info['encoding'].get('name', info['encoding']) if isinstance(info['encoding'], dict) else info['encoding']}",
        f"shards         {info['shards']}   checksums {checks}",
    ]
    lines.append(f"per 1e9 tokens {info['bytes_per_billion_tokens'] / 1e9:,.2f} GB")
    if info.get("generation_flops"):
        n = meta.get("teacher_non_embedding_params")
        teacher = f", {n / 1e6:.2f}M non-embedding params" if n else ""
        secs = info.get("generation_seconds")
        wall = f", {secs:,.1f} s on {info.get('generation_device')}" if secs is not None else ", wall time not recorded"
        lines.append(f"generation     {info['generation_flops']:.3e} teacher FLOPs{teacher}{wall}")
    return lines


def cmd_logits_inspect(args: argparse.Namespace) -> None:
    from pd_lightning.logits.store import inspect_store

    info = inspect_store(args.store, checksums=not args.no_checksums)
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
    else:
        print("\n".join(_store_summary_lines(info)))
    if info["checksums_ok"] is False:
        raise UserError(f"logit store shard {info['bad_shard']} fails its checksum; run `pdl logits verify {args.store}`")


def cmd_logits_verify(args: argparse.Namespace) -> None:
    from pd_lightning.logits.store import verify_store

    info = verify_store(args.store, deep=args.deep)
    print(f"ok: {info['shards']} shards, {info['tokens']:,} tokens, checksums and structure verified"
          + (", every sequence decoded" if args.deep else ""))


def cmd_models(args: argparse.Namespace) -> None:
    from pd_lightning.models import preset_table

    rows = preset_table()
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'preset':<9} {'hidden':>6} {'FFN':>6} {'layers':>6} {'heads':>5} {'groups':>6} {'tied':>5} "
          f"{'params':>14}  at vocab")
    for r in rows:
        print(f"{r['name']:<9} {r['hidden']:>6} {r['ffn']:>6} {r['layers']:>6} {r['heads']:>5} {r['query_groups']:>6} "
              f"{str(r['tied_embeddings']).lower():>5} {r['params']:>14,}  {r['reference_vocab']:,}")


def _sweep_and_place(args: argparse.Namespace):
    from pd_lightning.sweep import load_sweep, resolve_place

    spec = load_sweep(args.sweep, args.scale, tracking_uri=getattr(args, "tracking_uri", None))
    return spec, resolve_place(spec, out=args.out, cache=args.cache, storage=args.storage,
                               reuse_runs=getattr(args, "reuse_runs", False), register=getattr(args, "register", None))


class SweepIncomplete(UserError):
    """Some trials failed (each with its error recorded); the rest of the sweep ran. Exit code 1."""

    exit_code = 1


def cmd_sweep_run(args: argparse.Namespace) -> None:
    from pd_lightning.sweep import run_sweep

    spec, place = _sweep_and_place(args)
    problems = run_sweep(spec, place, workers=args.workers, retry_failed=args.retry_failed, threads=args.threads)
    if problems:
        raise SweepIncomplete(f"sweep {spec.name} [{spec.scale}]: {problems} trial(s) failed or did not finish; see the "
                        f"table above and {place.out / 'logs'}; fix and re-run (add --retry-failed to redo failures)")


def cmd_sweep_status(args: argparse.Namespace) -> None:
    from pd_lightning.sweep import load_study_for_status, status_table

    spec, place = _sweep_and_place(args)
    study = load_study_for_status(spec, place)
    if study is None:
        print(f"sweep {spec.name} [{spec.scale}] has not been run with storage {place.storage} "
              f"({len(spec.tasks())} trials to run: `pdl sweep run {args.sweep}`)")
        return
    print(status_table(study, spec))


def cmd_sweep_validate(args: argparse.Namespace) -> None:
    from pd_lightning.sweep import check_points, design_space, load_sweep

    scales = [args.scale] if args.scale else (load_sweep(args.sweep).scales or [None])
    for scale in scales:
        spec = load_sweep(args.sweep, scale)
        bad = check_points(spec)
        if bad:
            label, message = next(iter(bad.items()))
            raise UserError(f"sweep {spec.name} [{spec.scale}]: configuration {label!r} is invalid: {message}")
        space = design_space(spec)  # every trial's Optuna parameters must be storable in one distribution per key
        varied = [k for k, d in space.distributions.items() if not d.single()]
        p, k = spec.loosest_truncation()
        search = f" + {spec.search['trials']} {spec.search['sampler']} trials" if spec.search else ""
        stores = spec.sampled_stores()
        one_seed = len({seed for _, seed in stores}) == 1
        sampled = (" + sampled stores N = " + ", ".join(str(n) if one_seed else f"{n} (seed {seed})" for n, seed in stores)
                   if stores else "")
        print(f"ok: {spec.name} [{spec.scale}]: {len(spec.tasks())} trials{search}, seeds {spec.seeds}, "
              f"store top-{p}-{k}{sampled}, objective {spec.direction} {spec.objective_metric}; "
              f"{len(space.distributions)} parameters per trial, varied: {', '.join(varied) or 'none'}")


def cmd_report(args: argparse.Namespace) -> None:
    import analysis
    from pd_lightning.report import report_sweep
    from pd_lightning.sweep import load_sweep

    index, table = report_sweep(load_sweep(args.sweep, args.scale, tracking_uri=args.tracking_uri), args.out)
    print(analysis.to_markdown(table))
    print(f"\nreport: {index}")


def cmd_findings(args: argparse.Namespace) -> None:
    from analysis.findings import export_all, write_findings

    if args.tracking_uris:
        exported = export_all(args.tracking_uris, args.runs, scale=args.scale)
        print(f"findings: exported {len(exported)} sweep(s) to {args.runs}: {', '.join(exported) or 'none'}")
    print(f"findings: {write_findings(args.runs, args.out)}")


def cmd_quickstart(args: argparse.Namespace) -> None:
    from pd_lightning.quickstart import quickstart

    quickstart(args.out, workers=args.workers, scale=args.scale, tracking_uri=args.tracking_uri)


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config_and_overrides", nargs="*", metavar="CONFIG [key=value ...]", help=CONFIG_HELP)


def build_parser() -> argparse.ArgumentParser:
    """The `pdl` argument parser with every subcommand and its examples."""
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="pdl",
        formatter_class=fmt,
        description="pd-lightning: pre-training distillation of LLMs — corpus, teacher, top-p-k logit store, "
                    "distillation runs, sweeps, paper-style tables.",
        epilog=textwrap.dedent("""\
            examples:
              pdl data prepare tiny                     # built-in corpus -> BPE -> packed token shards
              pdl teacher train tiny                    # pre-train the tiny teacher on those shards
              pdl logits generate tiny                  # its top-0.95-100 logits into a compact store
              pdl logits inspect runs/tiny/logits       # entries/token, bytes/token, checksums
              pdl config show tiny loss.alpha=0.9       # print the resolved config
              pdl models                                # the model presets and their sizes
            """),
    )
    parser.add_argument("--version", action="version", version=f"pd-lightning {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("config", help="inspect configs")
    config_sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    show = config_sub.add_parser("show", help="print the resolved, validated config as YAML", formatter_class=fmt,
                                 epilog="example:\n  pdl config show tiny optim.lr_schedule=wsd")
    _add_config_args(show)
    show.set_defaults(func=cmd_config_show)

    p = sub.add_parser("data", help="prepare corpora into packed token shards")
    data_sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    prep = data_sub.add_parser(
        "prepare", formatter_class=fmt,
        help="tokenize + pack documents into memory-mapped token shards with a manifest",
        description="Tokenize the configured corpus (data.source) and pack it into fixed-length sequences "
                    "(data.seq_len) in data.out. Trains a byte-level BPE (data.vocab_size) unless data.tokenizer "
                    "names an HF tokenizer dir. Deterministic; re-running a finished output is a no-op.",
        epilog=textwrap.dedent("""\
            examples:
              pdl data prepare tiny
              pdl data prepare tiny data.train_tokens=20000000 data.out=runs/data20m
              pdl data prepare my.yaml data.source=jsonl data.path=corpus/*.jsonl data.tokenizer=teacher_dir
            """),
    )
    _add_config_args(prep)
    prep.set_defaults(func=cmd_data_prepare)

    p = sub.add_parser("teacher", help="pre-train a teacher")
    teacher_sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    tt = teacher_sub.add_parser(
        "train", formatter_class=fmt,
        help="pre-train teacher.preset on prepared shards and save an HF model dir",
        description="Pre-train a causal LM of preset teacher.preset on the shards in data.out (run `pdl data "
                    "prepare` first) for teacher.max_steps steps and save it with its tokenizer to teacher.out, "
                    "loadable by AutoModelForCausalLM.from_pretrained. Reports the held-out loss before and after.",
        epilog=textwrap.dedent("""\
            examples:
              pdl teacher train tiny
              pdl teacher train tiny teacher.preset=tiny-20m teacher.max_steps=3000 teacher.out=runs/teacher20m
            """),
    )
    _add_config_args(tt)
    tt.set_defaults(func=cmd_teacher_train)

    p = sub.add_parser("logits", help="teacher logits: generate, inspect and verify a top-p-k logit store")
    logits_sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    gen = logits_sub.add_parser(
        "generate", formatter_class=fmt,
        help="run the teacher over the token shards and write its top-p-k logits into a store (resumable)",
        description="One teacher forward pass over the train shards of data.out; keeps the top-logits.store_p-"
                    "logits.store_k entries of every position as tau=1 log-probabilities in a compact, checksummed "
                    "store at logits.store. The teacher is teacher.path, or teacher.out when teacher.path is unset. "
                    "With logits.sampling=sample it keeps instead the distinct ids of logits.samples draws per "
                    "position from the tau=1 teacher with their counts (unbiased targets; seeded by "
                    "logits.sample_seed). Kill it at any time and re-run: it resumes from the last whole shard. "
                    "Under torchrun every rank writes its own shards.",
        epilog=textwrap.dedent("""\
            examples:
              pdl logits generate tiny
              pdl logits generate tiny logits.store_p=1.0 logits.store_k=200 logits.store=runs/logits-p1-k200
              pdl logits generate tiny logits.sampling=sample logits.samples=32 logits.store=runs/logits-n32
              torchrun --nproc-per-node 8 -m pd_lightning.cli logits generate paper.yaml teacher.path=/models/glm-4-9b
            """),
    )
    _add_config_args(gen)
    gen.set_defaults(func=cmd_logits_generate)
    ins = logits_sub.add_parser("inspect", help="store statistics: tokens, entries/token, bytes/token, p, k, teacher",
                                formatter_class=fmt, epilog="examples:\n  pdl logits inspect runs/tiny/logits\n"
                                                           "  pdl logits inspect runs/tiny/logits --json")
    ins.add_argument("store", metavar="STORE", help="a logit store directory")
    ins.add_argument("--json", action="store_true", help="print one JSON object")
    ins.add_argument("--no-checksums", action="store_true", help="skip hashing the shards (instant on huge stores)")
    ins.set_defaults(func=cmd_logits_inspect)
    ver = logits_sub.add_parser("verify", help="check every shard's checksum and structure; names the first bad shard",
                                formatter_class=fmt, epilog="example:\n  pdl logits verify runs/tiny/logits --deep")
    ver.add_argument("store", metavar="STORE", help="a logit store directory")
    ver.add_argument("--deep", action="store_true", help="also decode every sequence")
    ver.set_defaults(func=cmd_logits_verify)

    tr = sub.add_parser(
        "train", formatter_class=fmt,
        help="one training run: LM-only (loss.alpha=0) or distilled from the logit store; tracked in MLflow",
        description="Train model.preset on data.out with L = (1-alpha) L_lm + alpha L_kd, the KD targets derived from "
                    "logits.store at logits.p/k/tau/method. Logs params, design-space tags, the code's git commit, metrics "
                    "and the exported student (trainer.out/model, an HF dir) as the run's MLflow logged model (a "
                    "pyfunc: mlflow.pyfunc.load_model) to MLflow (mlflow.yaml: sqlite:///mlflow.db by default). "
                    "Checkpoints every trainer.checkpoint_every_n_steps; the same command after a kill resumes.",
        epilog=textwrap.dedent("""\
            examples:
              pdl train tiny loss.alpha=0 trainer.out=runs/tiny/lm            # the LM-only baseline
              pdl train tiny loss.alpha=0.9 trainer.out=runs/tiny/pd          # vanilla PD at alpha 0.9
              pdl train tiny loss.alpha_schedule=wsd_alpha optim.lr_schedule=wsd trainer.out=runs/tiny/wsd
              pdl train paper.yaml model.preset=1.9B trainer.strategy=fsdp trainer.precision=bf16-mixed trainer.devices=8
              pdl train tiny loss.alpha=0.9 --tracking-uri http://127.0.0.1:5000   # record to a tracking server
              pdl train tiny loss.alpha=0.9 trainer.out=runs/tiny/pd --register tiny-students   # + a model version
            """),
    )
    _add_config_args(tr)
    _add_tracking_uri(tr, "; naming the store the config already records to changes nothing (a run started "
                          "without it resumes with it). Put it before CONFIG or after the overrides.")
    _add_register(tr, "the student")
    tr.set_defaults(func=cmd_train)

    ev = sub.add_parser(
        "eval", formatter_class=fmt,
        help="score an exported model with lm-evaluation-harness (suite local|paper, or --tasks)",
        description="Run lm-eval's own hf model on an exported HF dir over a suite (local: offline tasks from the "
                    "built-in corpus; paper: the paper's benchmarks, which need their datasets cached) and, with "
                    "--run-id, log eval.<task>, eval.<task>.stderr, eval.average and the raw results to that MLflow run.",
        epilog=textwrap.dedent("""\
            examples:
              pdl eval runs/tiny/pd/model
              pdl eval runs/tiny/pd/model --run-id 0123abcd... --suite local
              pdl eval runs/tiny/pd/model --tasks synth_facts,synth_arithmetic --limit 200
            """),
    )
    _add_eval_arguments(ev)
    ev.set_defaults(func=cmd_eval)

    p = sub.add_parser("sweep", help="run a sweep file (one per paper table) as an Optuna study with MLflow runs")
    sweep_sub = p.add_subparsers(dest="sweep_command", required=True, metavar="{run,status,validate}")

    from pd_lightning.sweep.spec import shipped_sweeps

    shipped = ", ".join(shipped_sweeps()) or "none in this install"

    def sweep_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("sweep", metavar="SWEEP", help=f"a sweep file, or the name of a shipped sweep ({shipped})")
        sp.add_argument("--scale", help="a scale the file defines (tiny: CPU minutes; paper: GPU cluster); "
                                        "default: the file's default_scale or tiny")
        sp.add_argument("--storage", help="Optuna storage URL shared by all workers (default: sqlite optuna.db "
                                          "beside the MLflow sqlite store; postgresql://user@host/db for many machines)")
        sp.add_argument("--out", help="the sweep's own dir (default runs/sweeps/NAME/SCALE)")
        sp.add_argument("--cache", help="shared prerequisites: shards, teachers, stores (default runs/cache)")

    sr = sweep_sub.add_parser(
        "run", formatter_class=fmt, help="run or continue a sweep with N local worker processes",
        description="Run every configuration x seed of the sweep once (grid/rows), or a TPE search, as trials of "
                    "one Optuna study; each trial trains and evaluates one student as an MLflow child run under the "
                    "sweep's parent run. Shared prerequisites (shards, teacher, logit store at the loosest p/k) are "
                    "built once into the cache. Re-running the same command after any interruption continues where it "
                    "stopped and never redoes a finished trial; trials of killed workers are re-run.",
        epilog=textwrap.dedent("""\
            examples:
              pdl sweep run quickstart --workers 2                     # a shipped sweep, by name
              pdl sweep run table4_alpha --scale tiny --tracking-uri sqlite:///runs/mlflow.db
              pdl sweep run my_sweep.yaml                              # your own file
              pdl sweep run table4_alpha --reuse-runs                  # copy rows another sweep already ran
              pdl sweep run quickstart --register quickstart-students  # every student a registered model version
              pdl sweep run table8_top_p_k --scale paper --storage postgresql://pdl@db-host/pdl   # on every machine
            browse: mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1
                    optuna-dashboard sqlite:///optuna.db --host 127.0.0.1
            The study's trials carry every configuration's full design-space coordinates as parameters (the
            same keys in every trial), the seed as the user attr `seed`, and val/loss as intermediate values.
        """))
    sweep_args(sr)
    _add_tracking_uri(sr, "; the default --storage sits beside a sqlite store")
    sr.add_argument("--workers", type=int, default=1, help="worker processes on this machine (default 1); on a GPU "
                    "machine each gets its own trainer.devices GPUs")
    sr.add_argument("--threads", type=int, help="torch threads per worker (default: cores / workers)")
    sr.add_argument("--retry-failed", action="store_true", help="also re-run trials that failed with an error")
    sr.add_argument("--reuse-runs", action="store_true", help="a trial whose configuration (seed included) already "
                    "ran to the end in another experiment of the same MLflow store, from the same cache, gets a copy "
                    "of that run (params, tags, metric histories, tag pd.reused_from) instead of training again")
    _add_register(sr, "every trial's student (a reused run's: its source's)")
    sr.set_defaults(func=cmd_sweep_run)
    ss = sweep_sub.add_parser(
        "status", formatter_class=fmt, help="table of the sweep's trials: state, objective, MLflow run or error",
        description="Show every configuration x seed of the sweep with its trial state (complete, running, waiting, "
                    "failed with its error, crashed, pending), objective value and MLflow run id.",
        epilog=textwrap.dedent("""\
            examples:
              pdl sweep status quickstart
              pdl sweep status table8_top_p_k --scale paper --storage postgresql://pdl@db-host/pdl
        """))
    sweep_args(ss)
    _add_tracking_uri(ss, "; it places the default --storage (optuna.db beside a sqlite store)")
    ss.set_defaults(func=cmd_sweep_status)
    sv = sweep_sub.add_parser(
        "validate", formatter_class=fmt, help="check a sweep file and every configuration it expands to",
        description="Validate the sweep file and resolve every configuration x seed at each scale (or --scale), "
                    "and the Optuna parameters every trial will carry, without running anything; exit 2 naming the "
                    "first invalid field.",
        epilog=textwrap.dedent("""\
            examples:
              pdl sweep validate table5_loss_schedules
              pdl sweep validate sweeps/table11_sizes.yaml --scale paper
        """))
    sweep_args(sv)
    sv.set_defaults(func=cmd_sweep_validate)

    p = sub.add_parser(
        "report", formatter_class=fmt, help="a sweep's paper-style table and figures as index.html (and in MLflow)",
        description="Load the sweep's finished runs from MLflow and write the paper's table (task scores, Average, "
                    "Δ% against the LM-only baseline, 95% intervals over seeds) as Markdown, CSV, LaTeX and HTML, "
                    "the figures that fit the sweep (PNG + SVG) and index.html; also logged to the sweep's parent run.",
        epilog=textwrap.dedent("""\
            examples:
              pdl report quickstart
              pdl report table8_top_p_k --out reports/table8
              pdl report table4_alpha --tracking-uri http://127.0.0.1:5000
        """))
    p.add_argument("sweep", metavar="SWEEP", help=f"a sweep file, or the name of a shipped sweep ({shipped})")
    p.add_argument("--scale", help="the scale whose runs to report (default: the file's default, else tiny)")
    p.add_argument("--out", help="report dir (default runs/sweeps/NAME/SCALE/report)")
    _add_tracking_uri(p)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "findings", formatter_class=fmt, help="re-test the paper's claims on the sweeps' runs: docs/findings.md",
        description="Every claim of analysis/claims.py (the paper's C1-C10, our C11-C12) as contrasts of one sweep's "
                    "configurations, paired by seed, with 95% intervals on the local-suite Average and the held-out "
                    "loss, and a verdict (replicated / contradicted / unresolved) from the intervals. With "
                    "--tracking-uri the sweeps' finished runs are first exported to --runs (runs.csv, checkpoints.csv, "
                    "sweep.json per sweep); the report is always built from those files, so the committed results "
                    "regenerate it byte for byte.",
        epilog=textwrap.dedent("""\
            examples:
              pdl findings                                              # from the committed results/tiny
              pdl findings --tracking-uri sqlite:///runs/mlflow.db      # export the store's sweeps, then report
              pdl findings --runs results/tiny --out docs/findings.md
        """))
    p.add_argument("--runs", default="results/tiny", metavar="DIR",
                   help="the exported results: one folder per sweep (default results/tiny)")
    p.add_argument("--out", default="docs/findings.md", metavar="FILE",
                   help="the report (default docs/findings.md; figures go to findings/ beside it)")
    p.add_argument("--tracking-uri", action="append", metavar="URI", dest="tracking_uris",
                   help="MLflow store(s) to export the sweeps from first (repeatable: a sweep is taken from the first "
                        "store that has it); without it the report reads --runs only")
    p.add_argument("--scale", default="tiny", help="the sweeps' scale to export (default tiny)")
    p.set_defaults(func=cmd_findings)

    p = sub.add_parser(
        "quickstart", formatter_class=fmt, help="the whole lab on one CPU: teacher, logits, LM vs PD sweep, report",
        description="Built-in corpus -> tokenizer -> tiny teacher -> one logit store -> the quickstart sweep (LM "
                    "baseline, vanilla PD, alpha 0.9, WSD-alpha + WSD-LR, KLD; two seeds each) -> local lm-eval suite "
                    "-> report. Prints the paper-style table, the report path and the MLflow UI command. Re-running "
                    "reuses everything finished.",
        epilog=textwrap.dedent("""\
            examples:
              pdl quickstart
              pdl quickstart --out /tmp/pdl-qs --workers 2
              pdl quickstart --tracking-uri http://127.0.0.1:5000     # runs to a tracking server, the rest in ./pdl-quickstart
        """))
    p.add_argument("--out", default="pdl-quickstart", help="directory for everything (default ./pdl-quickstart)")
    p.add_argument("--workers", type=int, help="trial worker processes (default: 2 on a machine with 2+ cores)")
    p.add_argument("--scale", default="tiny", help="tiny (the default, ~13 min on 2 cores) or smoke (~3 min: checks "
                                                    "an install; too small for PD to beat LM)")
    _add_tracking_uri(p, " (default here: DIR/mlflow.db; a relative sqlite path is relative to this directory)")
    p.set_defaults(func=cmd_quickstart)

    p = sub.add_parser("models", help="list the model presets (paper Table 7 + tiny CPU sizes)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `pdl` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logs.quiet_libraries()
    logs.setup(logging.WARNING if getattr(args, "json", False) else logging.INFO)
    try:
        args.func(args)
    except UserError as exc:
        print(f"pdl: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("pdl: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
