"""`pdl`: the command line. Thin: parse, load + validate the config, call the library.

Bad input exits with code 2 and one line on stderr naming the field, the value and what is allowed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap

from pd_lightning import __version__
from pd_lightning.errors import UserError

CONFIG_HELP = (
    "CONFIG is a YAML file or the name of a packaged config (tiny); any field can be overridden "
    "with section.key=value, e.g. data.train_tokens=5000000 loss.alpha=0.9"
)


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

    p = sub.add_parser("models", help="list the model presets (paper Table 7 + tiny CPU sizes)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `pdl` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
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
