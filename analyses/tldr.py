"""Seed 004, section 3.3 and appendix C: the TL;DR summarization comparisons under nine losses.

`run_tldr` splits the comparisons by post (no post is in both training and evaluation), then
trains each of the nine losses of the paper's Figure 2 from the same model on the same training
pairs through `dynamics.runs.train.train`, with the same evaluation pairs as probes, into
``out/<loss>/``; ``out/config.json`` is the index (settings, split, one entry per loss) and
``out/records.parquet`` holds every run's probe records (the ``loss`` column tells them apart),
``out/train_records.parquet`` every run's in-run rows (the training pairs of every step, measured on
the training backward itself: `dynamics.core.inrun`).
`claims` reads those files back and states whether each of the issue's six claims held;
`write_figures` draws Fig. 1, the 3×3 grid (Fig. 2), the cosine per loss (Fig. 7), a what-if
summary and a Fig. 4b-style token-cosine heatmap of one TL;DR pair.

Nothing is tuned to make a claim hold: `analyses.presets.TLDR` were fixed before the first run, from the
measured cost of a step on 2 CPU cores (see the comment there), not from any result.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import pandas as pd

from analyses.presets import TLDR, TLDR_COMMON, TLDR_DPO_EXTRA
from dynamics.tools.plots import STYLE, plot_cosine, plot_logprobs, plot_token_heatmap, plot_whatif
from analyses.sentiment import load_token_gram, save_with_config
from dynamics.errors import InputError
from dynamics.runs.rundir import RunDir, move_aside, out_dir_state, read_config, read_table, to_jsonable

ROOT = Path(__file__).resolve().parents[1]

# The paper's nine losses in its Figure 2 order, with the appendix C.3 hyper-parameters (the
# registry's defaults are exactly those: DPO β 0.1; NLL weight λ 1 for CPO, RRHF, SLiC-HF;
# SLiC δ 1; SimPO γ 0.5 (β 2); R-DPO α 0.2; DPOP λ 50). IPO is `ipo_avg`, the length-averaged
# IPO that TRL's DPOTrainer computes: the paper plots IPO's log-probs length-normalized.
LOSSES = ("cpo", "dpo", "dpop", "ipo_avg", "rdpo", "rrhf", "sppo", "simpo", "slic")
LABELS = {"cpo": "CPO", "dpo": "DPO", "dpop": "DPOP", "ipo_avg": "IPO", "rdpo": "R-DPO", "rrhf": "RRHF",
          "sppo": "SPPO", "simpo": "SimPO", "slic": "SLiC-HF"}
NORMALIZED = ("simpo", "ipo_avg")        # plotted as log π(y|x)/|y|, as in the paper
FIG1 = ("cpo", "dpo")                    # Fig. 1: a loss with a chosen-NLL term and plain DPO (fixed beforehand)
CHOSEN_TERM = ("cpo", "dpop", "rrhf", "slic")
COS_LARGE = 0.5                          # claim 5: "positive and large" means a mean cosine above this
LONG_CHARS = 130                         # the heatmap pair: both summaries at least this long (≈30+ tokens)

MAX_CHARS = 170                          # summaries longer than this are left out (cost; ≈ 40 tokens)
FIGURES = ("fig1", "fig2", "fig7", "whatif", "heatmap")


# --------------------------------------------------------------------------- data


def load_comparisons(data: str | Path | None):
    """The comparisons: a file in the OpenAI comparisons format (`dynamics.inputs.data.load_tldr`), a
    pairs file, ``hf:NAME[:SPLIT]`` / ``CarperAI/openai_summarize_comparisons`` (network), or None:
    ``../shared/data/tldr/batch13.json``."""
    from dynamics.inputs import data as data_mod

    if data is None:
        data = data_mod.default_tldr_path(ROOT)
        if data is None:
            raise InputError("no TL;DR data: ../shared/data/tldr is absent; pass --data FILE (OpenAI comparisons "
                             "JSON lines) or --data hf:CarperAI/openai_summarize_comparisons")
    data = str(data)
    if data.startswith("hf:") or data == "CarperAI/openai_summarize_comparisons":
        name, _, split = data.removeprefix("hf:").partition(":")
        return data_mod.load_hf_dataset(name, split or "train", on_invalid="skip", prompt="prompt",
                                        chosen="chosen", rejected="rejected")
    path = data_mod.check_data_file(data)
    first = path.read_text(encoding="utf-8").lstrip()[:2000]
    if path.suffix.lower() in (".json", ".jsonl") and '"summaries"' in first:
        return data_mod.load_tldr(path)
    return data_mod.load_pairs(path, on_invalid="skip")


def _post(pair) -> str:
    """The post a pair belongs to: its post id, else its prompt (the same post gives the same prompt)."""
    return str(pair.metadata.get("post_id") or pair.prompt)


def split_by_post(pairs, *, n_train: int, n_probe: int, seed: int, max_chars: int = MAX_CHARS):
    """(train, eval): ``n_probe`` evaluation pairs, one per post, and up to ``n_train`` training
    pairs from the other posts, so that no post is on both sides.

    Pairs whose summaries are longer than ``max_chars`` are left out. The first evaluation pair is
    one whose summaries both have at least `LONG_CHARS` characters (the token heatmap's pair).
    Deterministic from ``seed``.
    """
    pairs = [p for p in pairs if max(len(p.chosen), len(p.rejected)) <= max_chars]
    by_post: dict[str, list] = {}
    for p in pairs:
        by_post.setdefault(_post(p), []).append(p)
    posts = sorted(by_post)
    random.Random(seed).shuffle(posts)
    long_first = sorted(posts, key=lambda q: min(len(by_post[q][0].chosen), len(by_post[q][0].rejected)) < LONG_CHARS)
    eval_posts = long_first[:n_probe]
    if len(eval_posts) < n_probe:
        raise InputError(f"{len(posts)} posts (summaries ≤ {max_chars} characters) cannot give {n_probe} evaluation pairs")
    held = set(eval_posts)
    train = [p for q in posts if q not in held for p in by_post[q]][:n_train]
    if len(train) < n_train:
        raise InputError(f"only {len(train)} training pairs (summaries ≤ {max_chars} characters) on posts outside "
                         f"the evaluation set; fewer than n_train={n_train}")
    return train, [by_post[q][0] for q in eval_posts]


# --------------------------------------------------------------------------- runs


def resolve_settings(setting: str = "default", overrides: dict | None = None, lora_r: int | None = None) -> dict:
    """The run settings: `analyses.presets.TLDR[setting]` over `TLDR_COMMON`, then ``overrides``,
    then ``lora_r``."""
    if setting not in TLDR:
        raise InputError(f"unknown setting {setting!r}; known: {', '.join(TLDR)}")
    s = {**TLDR_COMMON, **TLDR[setting], **(overrides or {})}
    if lora_r is not None:
        s["lora_r"] = lora_r
    return s


def _complete(run_dir: Path, steps: int) -> bool:
    f = run_dir / "train.parquet"
    return f.is_file() and int(pd.read_parquet(f)["step"].max()) >= steps and (run_dir / "records.parquet").is_file()


def run_tldr(out: str | Path, *, setting: str = "default", model: str = "smollm2-135m",
             data: str | Path | None = None, losses: tuple[str, ...] = LOSSES, seed: int = 0,
             lora_r: int | None = None, overrides: dict | None = None, resume: bool = False,
             overwrite: bool = False, progress: bool = True) -> dict[str, RunDir]:
    """Train every loss of ``losses`` into ``out/<loss>/`` on the same post-split pairs; returns
    {loss: RunDir}.

    ``setting``: quick, default or full (`analyses.presets.TLDR`); ``overrides``: settings replacing those (tests
    use tiny ones). ``resume``: continue an interrupted experiment with the same settings: finished
    losses are kept, a loss with a checkpoint resumes from it, one without starts again (its partial
    run moved aside). ``overwrite``: move an existing experiment in ``out`` aside first.
    Everything is validated before anything is written.
    """
    from dynamics.core.losses import get_loss
    from dynamics.runs.train import TrainConfig, train

    for name in losses:
        get_loss(name)
    if resume and overwrite:
        raise InputError("resume and overwrite exclude each other")
    out = Path(out)
    settings = resolve_settings(setting, overrides, lora_r)
    n_train, n_probe = settings.pop("n_train"), settings["n_probe"]
    settings.setdefault("save_every", settings["eval_every"])
    pairs = load_comparisons(data)
    train_pairs, eval_pairs = split_by_post(pairs, n_train=n_train, n_probe=n_probe, seed=seed)
    config = dict(experiment="seed 004, section 3.3 / appendix C (TL;DR)", setting=setting, model=model,
                  data=None if data is None else str(data), seed=seed, losses=list(losses),
                  settings={**settings, "n_train": n_train}, dpo_extra=TLDR_DPO_EXTRA, max_chars=MAX_CHARS,
                  split=dict(train_posts=sorted({_post(p) for p in train_pairs}),
                             eval_pairs=[str(p.id) for p in eval_pairs]),
                  runs={name: name for name in losses})
    state = out_dir_state(out)
    if state == "run" and resume:
        old = read_config(out)
        diff = [k for k in ("setting", "model", "data", "seed", "settings", "split") if old.get(k) != config.get(k)]
        if diff:
            raise InputError(f"--resume: {out} was run with other {', '.join(diff)}; resume with the same options, "
                             "or start afresh with --overwrite")
    elif state == "run" and not overwrite:
        raise InputError(f"{out} already holds an experiment; pass --resume to continue it, --overwrite to move it "
                         f"aside to {out.name}.old-<time>, or choose another --out")
    elif state == "run":
        move_aside(out)
    elif resume:
        raise InputError(f"--resume: {out} holds no experiment to resume")
    top = RunDir(out)
    from dynamics.inputs.data import save_pairs
    (out / "data").mkdir(exist_ok=True)
    train_file, eval_file = save_pairs(train_pairs, out / "data" / "train.jsonl"), save_pairs(eval_pairs, out / "data" / "eval.jsonl")
    top.write_config(config, writer="reproduce tldr")

    runs = {}
    for name in losses:
        run_dir = out / name
        extra = TLDR_DPO_EXTRA if name == "dpo" else {}
        kw = dict(out=str(run_dir), model=model, data=str(train_file), eval_data=str(eval_file), data_kind="pairs",
                  loss=name, seed=seed, progress=progress, **{**settings, **extra})
        if _complete(run_dir, settings["steps"]):
            runs[name] = RunDir(run_dir)
            continue
        has_ckpt = (run_dir / "checkpoint" / "state.pt").is_file()
        cfg = TrainConfig.from_flat(**kw, resume=resume and has_ckpt, overwrite=out_dir_state(run_dir) == "run" and not has_ckpt)
        runs[name] = train(cfg)
    combine_records(out, losses)
    return runs


def combine_records(out: str | Path, losses: tuple[str, ...] = LOSSES) -> Path:
    """``out/records.parquet``: the probe records of every loss's run (column ``loss``), and
    ``out/train_records.parquet``: their in-run rows, where the runs have them."""
    out = Path(out)
    for table in ("train_records", "records"):
        frames = [read_table(out / name, table).assign(loss=name) for name in losses
                  if (out / name / f"{table}.parquet").is_file()]
        if frames:
            pd.concat(frames, ignore_index=True).to_parquet(out / f"{table}.parquet", index=False)
        elif table == "records":
            raise InputError(f"{out} holds no loss run with records")
    return out / "records.parquet"


# --------------------------------------------------------------------------- claims


def _change(rec: pd.DataFrame, col: str) -> dict:
    """Mean over evaluation pairs of ``col`` at the first and last recorded step, and the change."""
    per_step = rec.dropna(subset=[col]).groupby("step")[col].mean()
    return dict(first=float(per_step.iloc[0]), last=float(per_step.iloc[-1]),
                change=float(per_step.iloc[-1] - per_step.iloc[0]), last_step=int(per_step.index[-1]))


def per_loss_table(rec: pd.DataFrame, train_rec: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per loss: first/last mean chosen and rejected log-probs (summed and normalized) and
    the mean gradient cosine of the evaluation pairs over the recorded steps (``cos_mean``); with
    ``train_rec`` (in-run rows) also that of the training pairs over every step (``cos_train_mean``,
    NaN where the backward carried no gradient to a response)."""
    train_cos = {} if train_rec is None else train_rec.groupby("loss")["cos_wl"].mean().to_dict()
    rows = []
    for name, g in rec.groupby("loss", sort=False):
        row = dict(loss=name, label=LABELS.get(name, name))
        for col in ("logp_w", "logp_l", "logp_w_norm", "logp_l_norm"):
            c = _change(g, col)
            row.update({f"{col}_first": c["first"], f"{col}_last": c["last"], f"{col}_change": c["change"]})
        row["cos_mean"] = float(g["cos_wl"].mean())
        row["cos_train_mean"] = float(train_cos.get(name, float("nan")))
        rows.append(row)
    return pd.DataFrame(rows)


def sentiment_single_token_cos(path: str | Path | None = None) -> float | None:
    """Mean gradient cosine of the sentiment single-token style (the committed sentiment run), or None."""
    path = Path(path) if path is not None else ROOT / "figures" / "sentiment" / "run" / "records.parquet"
    if not path.is_file():
        return None
    rec = pd.read_parquet(path)
    rec = rec[rec["style"] == "single_token"] if "style" in rec else rec
    return float(rec["cos_wl"].mean()) if len(rec) else None


def claims(out: str | Path, *, sentiment_records: str | Path | None = None) -> dict:
    """The six claims of the TL;DR experiment, each {claim, held, numbers}, from ``out``'s files.

    ``held`` is None where the run lacks what a claim needs (a loss not run, no probes)."""
    out = Path(out)
    rec = read_table(out, "records")
    train_rec = read_table(out, "train_records") if (out / "train_records.parquet").is_file() else None
    table = per_loss_table(rec, train_rec).set_index("loss")
    have = set(table.index)
    ch = lambda n, c: float(table.loc[n, f"{c}_change"])
    res = {}

    def judge(names, test):
        return bool(all(test(n) for n in names)) if set(names) <= have else None

    nums = {n: dict(chosen=ch(n, "logp_w"), rejected=ch(n, "logp_l")) for n in CHOSEN_TERM if n in have}
    res["chosen_term_raises_chosen"] = dict(
        claim="losses with an explicit chosen-likelihood term (CPO, DPOP, RRHF, SLiC-HF) raise the chosen log-prob",
        held=judge(CHOSEN_TERM, lambda n: ch(n, "logp_w") > 0), numbers=nums)
    nums = {n: dict(chosen=ch(n, "logp_w"), rejected=ch(n, "logp_l")) for n in ("dpo", "rdpo") if n in have}
    res["dpo_lowers_both"] = dict(
        claim="DPO and R-DPO lower both log-probs, the rejected more",
        held=judge(("dpo", "rdpo"), lambda n: ch(n, "logp_w") < 0 and ch(n, "logp_l") < ch(n, "logp_w")), numbers=nums)
    nums = {n: dict(chosen_norm=ch(n, "logp_w_norm"), rejected_norm=ch(n, "logp_l_norm")) for n in NORMALIZED if n in have}
    res["simpo_ipo_lower_both_normalized"] = dict(
        claim="SimPO and IPO lower both normalized log-probs",
        held=judge(NORMALIZED, lambda n: ch(n, "logp_w_norm") < 0 and ch(n, "logp_l_norm") < 0), numbers=nums)
    res["sppo_raises_chosen"] = dict(
        claim="SPPO raises the chosen log-prob slightly and lowers the rejected",
        held=judge(("sppo",), lambda n: ch(n, "logp_w") > 0 and ch(n, "logp_l") < 0),
        numbers=dict(chosen=ch("sppo", "logp_w"), rejected=ch("sppo", "logp_l")) if "sppo" in have else {})

    # Fig. 7 of the paper plots the cosine of the pairs being trained on: judged on the in-run rows
    # (every step, every training pair) where the runs have them, else on the evaluation pairs.
    cos_eval = {n: float(table.loc[n, "cos_mean"]) for n in table.index}
    cos_train = {n: float(table.loc[n, "cos_train_mean"]) for n in table.index}
    in_run = train_rec is not None and all(v == v for v in cos_train.values())
    cos = cos_train if in_run else cos_eval
    sent = sentiment_single_token_cos(sentiment_records)
    large = all(v > COS_LARGE for v in cos.values())
    res["cosine_positive_large"] = dict(
        claim=f"cos(∇log π_w, ∇log π_l) is positive and large (mean > {COS_LARGE}) for every loss, and larger "
              "than on the sentiment single-token style",
        held=bool(large and sent is not None and min(cos.values()) > sent) if sent is not None else None,
        numbers=dict(judged_on="training pairs, every step (in-run)" if in_run else "evaluation pairs, recorded steps",
                     mean_cos=cos, mean_cos_evaluation_pairs=cos_eval,
                     mean_cos_training_pairs=cos_train if train_rec is not None else None,
                     sentiment_single_token_mean_cos=sent, all_above_threshold=large))

    probes_file = out / "dpo" / "probes.parquet"
    if probes_file.is_file():
        pr = pd.read_parquet(probes_file)
        first, last = pr["step"].min(), pr["step"].max()
        mean_at = lambda probe, col, s: float(pr[(pr["probe"] == probe) & (pr["step"] == s)][col].mean())
        delta = lambda probe, col="logp": mean_at(probe, col, last) - mean_at(probe, col, first)
        d = dict(argmax_teacher=delta("argmax_teacher"), argmax_mass_chosen=delta("chosen", "argmax_mass"),
                 rejected=delta("rejected"), other_chosen=delta("other_chosen"),
                 chosen_shuffled=delta("chosen_shuffled"), other_shuffled=delta("other_shuffled"),
                 chosen=delta("chosen"), steps=[int(first), int(last)])
        held = (d["argmax_teacher"] > 0 and d["argmax_mass_chosen"] > 0 and d["rejected"] < 0
                and d["other_chosen"] < 0 and d["chosen_shuffled"] < 0 and d["other_shuffled"] < 0)
    else:
        d, held = dict(missing=f"{probes_file} (the DPO run records the probes)"), None
    res["squeezing_under_dpo"] = dict(
        claim="under DPO the teacher-forced argmax response y* and the argmax mass rise while y⁻, another "
              "prompt's summary and shuffled text fall (seed 000's squeezing effect)",
        held=None if held is None else bool(held), numbers=d)
    res["per_loss"] = table.reset_index().to_dict("records")
    return res


def claims_markdown(cl: dict) -> str:
    """``README.md`` for ``figures/tldr``: each claim held / did not hold, and the per-loss table."""
    word = {True: "**held**", False: "**did not hold**", None: "**not evaluated** (missing input)"}
    lines = ["# TL;DR (seed 004 §3.3, appendix C): claims", "",
             "Generated by `dynamics reproduce tldr` from the run named in each figure's JSON sidecar.", ""]
    for key, c in cl.items():
        if key == "per_loss":
            continue
        lines += [f"- {c['claim']}: {word[c['held']]}", f"  - numbers: `{json.dumps(to_jsonable(c['numbers']))}`"]
    lines += ["", "Per loss (log-probs: mean over the evaluation pairs, first → last recorded step; cos: mean over "
              "the evaluation pairs' recorded steps, and over every step's training pairs (in-run)):", "",
              "| loss | chosen | rejected | chosen/\\|y\\| | rejected/\\|y\\| | mean cos (eval) | mean cos (train) |",
              "|---|---|---|---|---|---|---|"]
    for r in cl["per_loss"]:
        f = lambda c: f"{r[c + '_first']:.2f} → {r[c + '_last']:.2f}"
        tc = r.get("cos_train_mean", float("nan"))
        lines.append(f"| {r['label']} | {f('logp_w')} | {f('logp_l')} | {f('logp_w_norm')} | {f('logp_l_norm')} | "
                     f"{r['cos_mean']:.3f} | {'–' if tc != tc else f'{tc:.3f}'} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- figures


def _grid(rec: pd.DataFrame, losses, *, draw, ncols: int = 3):
    import matplotlib.pyplot as plt

    losses = [n for n in losses if n in set(rec["loss"])]
    nrows = -(-len(losses) // ncols)
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(nrows, ncols, figsize=(2.5 * ncols, 2.1 * nrows), squeeze=False)
    for ax, name in zip(axes.flat, losses):
        draw(rec[rec["loss"] == name], ax, name)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    for ax in axes.flat:
        if ax.get_legend() is not None:   # one legend for the grid, above it, clear of every curve
            ax.get_legend().remove()
    for ax in list(axes.flat)[len(losses):]:
        ax.set_visible(False)
    top = 1 - 0.3 / fig.get_figheight() if handles else 1
    fig.tight_layout(rect=(0, 0, 1, top))
    if handles:
        with plt.rc_context(STYLE):
            fig.legend(handles, labels, loc="upper center", ncol=len(labels), frameon=False)
    return fig


def _logprob_panel(g, ax, name):
    plot_logprobs(g, ax, normalized=name in NORMALIZED, title=LABELS.get(name, name))


def make_figure(out: str | Path, name: str):
    """Figure ``name`` (fig1, fig2, fig7, whatif, heatmap) from a `run_tldr` output directory."""
    out = Path(out)
    if name not in FIGURES:
        raise InputError(f"unknown figure {name!r}; known: {', '.join(FIGURES)}")
    if name == "heatmap":
        g = load_token_gram(out / "dpo", "last")
        return plot_token_heatmap(g["cos"], [str(t) for t in g["tokens_w"]], [str(t) for t in g["tokens_l"]],
                                  title=f"DPO, pair {g['pair_id']}, step {int(g['step'])}")
    if name == "whatif":
        return plot_whatif(read_table(out / "dpo", "whatif"), labels=LABELS,
                           title="what-if on the DPO run's gradients")
    rec = read_table(out, "records")
    if name == "fig1":
        return _grid(rec, FIG1, draw=_logprob_panel, ncols=2)
    if name == "fig2":
        return _grid(rec, LOSSES, draw=_logprob_panel)
    # Fig. 7: the training pairs' cosine at every step (in-run rows) and the evaluation pairs' at
    # the recorded steps, one line each (mean ± s.e.m.)
    cos = rec.assign(pairs="evaluation")
    if (out / "train_records.parquet").is_file():
        cos = pd.concat([read_table(out, "train_records").assign(pairs="training (every step)"), cos],
                        ignore_index=True)
    return _grid(cos, LOSSES, draw=lambda g, ax, n: plot_cosine(g, ax, by="pairs", title=LABELS.get(n, n)))


def write_figures(out: str | Path, fig_dir: str | Path) -> list[Path]:
    """Every figure of `FIGURES` from ``out`` into ``fig_dir`` (PNG, PDF, JSON sidecar each), plus
    ``README.md`` (the claims and the per-loss table) and ``claims.json``. A figure whose input the
    run lacks (e.g. no DPO run) is skipped with a line in the README."""
    fig_dir = Path(fig_dir)
    fig_dir.mkdir(parents=True, exist_ok=True)
    paths, missing = [], []
    for name in FIGURES:
        try:
            fig = make_figure(out, name)
        except FileNotFoundError as e:
            missing.append(f"- {name}: not drawn ({e})")
            continue
        paths += save_with_config(fig, fig_dir / name, out)
    cl = claims(out)
    (fig_dir / "README.md").write_text(claims_markdown(cl) + ("\n" + "\n".join(missing) + "\n" if missing else ""))
    (fig_dir / "claims.json").write_text(json.dumps(to_jsonable(cl), indent=2) + "\n")
    return paths + [fig_dir / "README.md", fig_dir / "claims.json"]
