"""The ``dynamics`` command. The only module that reads argv (library code never does).

Sub-commands::

    dynamics losses                      the loss zoo: formulas, defaults, references
    dynamics fetch-model [NAME]          fetch the offline SmolLM2-135M GGUF into the cache
    dynamics data-summary --data D ...   counts, lengths, shared prefix/suffix tokens
    dynamics logprobs --model M ...      chosen/rejected log-probs of every pair -> Parquet
    dynamics train [--loss L ...]        preference training with probe records -> run dir
    dynamics demo [--out DIR]            SFT + DPO on SmolLM2 with the built-in statements
    dynamics plot RUN_DIR                regenerate a run's figures
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

DEMO = dict(model="smollm2-135m", data=None, data_kind="sentiment", style="long_suffix", loss="dpo",
            sft_steps=24, sft_lr=2e-5, steps=40, batch_size=4, lr=5e-6, eval_every=4, n_probe=16,
            optimizer="adamw", seed=0)


def _add_config_args(p: argparse.ArgumentParser, defaults: dict | None = None) -> None:
    """One flag per `TrainConfig` field, help text from the field's metadata."""
    from dynamics.train import TrainConfig

    defaults = defaults or {}
    for f in dataclasses.fields(TrainConfig):
        default = defaults.get(f.name, f.default if f.default is not dataclasses.MISSING else None)
        flag = "--" + f.name.replace("_", "-")
        help_ = f"{f.metadata.get('help', '')} (default: {default})"
        if f.name == "loss_params":
            p.add_argument(flag, type=json.loads, default={}, help="JSON object of loss hyper-parameters, "
                           'e.g. \'{"beta": 0.2}\'')
        elif f.type == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_)
        elif f.name == "loss":
            from dynamics.losses import LOSSES
            p.add_argument(flag, choices=sorted(LOSSES), default=default, help=help_)
        else:  # annotations are strings: "int", "float | None", ...
            typ = {"int": int, "float": float}.get(f.type.split(" | ")[0], str)
            p.add_argument(flag, type=typ, default=default, help=help_)


def _config_from_args(args) -> "TrainConfig":
    from dynamics.train import TrainConfig

    return TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})


def cmd_losses(args) -> int:
    from dynamics.losses import format_loss_table

    print(format_loss_table())
    return 0


def cmd_fetch_model(args) -> int:
    from dynamics.models import SMOLLM2_NAME, fetch_smollm2

    if args.name != SMOLLM2_NAME:
        print(f"only {SMOLLM2_NAME} is fetched offline; other names load from the hub", file=sys.stderr)
        return 2
    print(fetch_smollm2(args.cache_dir))
    return 0


def _load_pairs_for(args):
    from dynamics import data

    if args.kind == "tldr":
        return data.load_tldr(args.data, limit=args.limit)
    if args.kind == "sentiment":
        return data.sentiment_pairs(args.data, args.style, limit=args.limit, seed=args.seed)
    return data.load_pairs(args.data, limit=args.limit)


def cmd_data_summary(args) -> int:
    from dynamics.data import quality_summary

    pairs = _load_pairs_for(args)
    tok = None
    if args.model:
        from dynamics.models import load_model
        _, tok = load_model(args.model)
    summary = quality_summary(pairs, tok)
    summary["n_skipped"] = len(getattr(pairs, "skipped", []))
    print(json.dumps(summary, indent=2))
    return 0


def cmd_logprobs(args) -> int:
    import pandas as pd
    import torch

    from dynamics.logprobs import pair_logprobs, tokenize_pairs
    from dynamics.models import load_model

    pairs = _load_pairs_for(args)
    model, tok = load_model(args.model, device=args.device)
    tp = tokenize_pairs(tok, pairs, max_length=args.max_length,
                        truncation="prompt_left" if args.max_length else "error")
    rows = []
    with torch.no_grad():
        for lo in range(0, len(tp), args.batch_size):
            sub = tp.subset(range(lo, min(lo + args.batch_size, len(tp))))
            out = pair_logprobs(model, sub)
            for k, pid in enumerate(sub.pair_ids):
                rows.append(dict(pair_id=pid, logp_w=float(out.chosen.logp[k]), logp_l=float(out.rejected.logp[k]),
                                 logp_w_norm=float(out.chosen.logp_norm[k]), logp_l_norm=float(out.rejected.logp_norm[k]),
                                 len_w=int(out.chosen.lengths[k]), len_l=int(out.rejected.lengths[k]),
                                 tokens_w=list(sub.chosen[k].tokens), tokens_l=list(sub.rejected[k].tokens),
                                 token_logps_w=out.chosen.per_sequence()[k].tolist(),
                                 token_logps_l=out.rejected.per_sequence()[k].tolist(),
                                 n_prompt_truncated=sub.chosen[k].n_prompt_truncated))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(args.out, index=False)
    print(f"wrote {len(rows)} pairs to {args.out}")
    return 0


def _plot_run(run_dir: Path) -> list[Path]:
    from analyses.plots import plot_logprobs, save_figure
    from dynamics.record import read_table

    records = read_table(run_dir, "records")
    cfg = json.loads((run_dir / "config.json").read_text())
    title = f"{cfg.get('loss', '')} · {cfg.get('model', '')}"
    paths = save_figure(plot_logprobs(records, title=title), run_dir / "logprobs")
    paths += save_figure(plot_logprobs(records, normalized=True, title=title), run_dir / "logprobs_norm")
    return paths


def cmd_train(args) -> int:
    from dynamics.train import train

    cfg = _config_from_args(args)
    run = train(cfg)
    for p in _plot_run(run.path):
        print(f"wrote {p}")
    return 0


def cmd_demo(args) -> int:
    from dynamics.train import train

    t0 = time.time()
    cfg = _config_from_args(args)
    run = train(cfg)
    paths = _plot_run(run.path)
    rec = run.table("records")
    first, last = rec[rec.step == rec.step.min()], rec[rec.step == rec.step.max()]
    print(f"\nrun directory: {run.path}  ({time.time() - t0:.0f} s)")
    print(f"probe pairs: {rec.pair_id.nunique()}, steps recorded: {sorted(rec.step.unique().tolist())}")
    for name, df in (("first", first), ("last", last)):
        print(f"{name:5s} step {int(df.step.iloc[0]):3d}: chosen log-prob {df.logp_w.mean():8.3f}  "
              f"rejected {df.logp_l.mean():8.3f}  margin {df.margin.mean():7.3f}  reward acc {df.reward_acc.mean():.2f}")
    for p in paths:
        print(f"wrote {p}")
    return 0


def cmd_plot(args) -> int:
    for p in _plot_run(Path(args.run_dir)):
        print(f"wrote {p}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dynamics", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("losses", help="list the loss zoo with formulas and defaults")
    p.set_defaults(func=cmd_losses)

    p = sub.add_parser("fetch-model", help="fetch the offline SmolLM2-135M GGUF into the cache")
    p.add_argument("name", nargs="?", default="smollm2-135m")
    p.add_argument("--cache-dir", default=None, help="default: ~/.cache/dynamics")
    p.set_defaults(func=cmd_fetch_model)

    def data_args(p):
        p.add_argument("--data", default=None, help="data file (default: built-in sentiment statements)")
        p.add_argument("--kind", choices=["sentiment", "tldr", "pairs"], default="sentiment")
        p.add_argument("--style", default="long_suffix", help="sentiment response style")
        p.add_argument("--limit", type=int, default=None)
        p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("data-summary", help="data-quality summary of a pair set")
    data_args(p)
    p.add_argument("--model", default=None, help="tokenizer for token counts (e.g. smollm2-135m)")
    p.set_defaults(func=cmd_data_summary)

    p = sub.add_parser("logprobs", help="chosen/rejected log-probs (sum, normalized, per token) -> Parquet")
    data_args(p)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--out", required=True)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_logprobs)

    p = sub.add_parser("train", help="preference training with any loss; writes a run directory")
    _add_config_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("demo", help="SFT + DPO on SmolLM2-135M with the built-in statements (offline)")
    _add_config_args(p, {**DEMO, "out": "runs/demo"})
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("plot", help="regenerate the figures of a run directory")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_plot)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
