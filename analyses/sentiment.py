"""Seed 004, section 4.2: DPO on the sentiment task with three response styles.

`run_sentiment` writes the data: for each style (single token, short suffix, long suffix) one
`dynamics.runs.train` run (SFT on prompt + correct response, then DPO) into ``out/<style>/``, the
settings in ``out/config.json`` and every run's records in ``out/records.parquet`` with a
``style`` column. `claims` reads those files back and computes the numbers behind the four
claims of section 4.2; `write_figures` draws Figures 3, 4a and 4b (PNG + PDF + a JSON sidecar
with the run configuration) and `claims_markdown` states whether each claim held.

Nothing is tuned to make a claim hold: the settings are fixed in `analyses.presets.SENTIMENT` before any run.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from analyses.presets import SENTIMENT, SENTIMENT_COMMON
from dynamics.tools.plots import plot_cosine, plot_fig3, plot_token_heatmap, save_figure
from dynamics.runs.rundir import RunDir, read_table, to_jsonable

ROOT = Path(__file__).resolve().parents[1]
STYLE_ORDER = ("single_token", "short_suffix", "long_suffix")
BUILTIN = "builtin"  # `data=BUILTIN`: the built-in statements even when the tweets CSV is present
AUTO = "auto"
SHARED_COS_MIN = 0.5  # claim 4: "high positive" cosine of the shared tokens means above this

FIGURES = ("fig3", "fig4a", "fig4b")


def resolve_data(data: str | Path | None) -> str | None:
    """``data`` if given; else the shared tweets CSV when present; else None (built-in statements)."""
    from dynamics.inputs.data import default_tweets_path

    if data == BUILTIN:
        return None
    if data is not None:
        return str(data)
    tweets = default_tweets_path(ROOT)
    return str(tweets) if tweets is not None else None


def resolve_eval_data(data: str | None, eval_data: str | Path | None = AUTO) -> str | None:
    """Where the evaluation (probe) pairs come from: ``eval_data`` if given; for ``"auto"``, the
    ``test.csv`` beside a tweets ``train.csv`` when present; else None (split off the training data)."""
    if eval_data != AUTO:
        return None if eval_data is None else str(eval_data)
    if data is not None and Path(data).name == "train.csv":
        test = Path(data).with_name("test.csv")
        if test.is_file():
            return str(test)
    return None


def run_sentiment(out: str | Path, *, quick: bool = True, model: str = "smollm2-135m",
                  styles: tuple[str, ...] = STYLE_ORDER, data: str | Path | None = None,
                  eval_data: str | Path | None = AUTO, loss: str = "dpo", seed: int = 0,
                  overrides: dict | None = None, progress: bool = True,
                  overwrite: bool = False) -> dict[str, RunDir]:
    """SFT then ``loss`` for each style into ``out/<style>/``; returns {style: RunDir}.

    ``overrides``: `TrainConfig` fields replacing the quick/full settings (tests use tiny ones).
    ``data``: a tweets CSV or pairs file; None: the shared tweets CSV when present, else the
    built-in statements; ``"builtin"``: always the built-in statements.
    ``eval_data``: file of the held-out evaluation pairs; ``"auto"``: the tweets ``test.csv``
    beside ``train.csv`` when present, else ``n_probe`` pairs split off the training data.
    ``overwrite``: ``out`` holds an earlier experiment: move it aside (``out.old-<time>``) instead
    of refusing. Every configuration is validated before anything is written or moved.
    """
    from dynamics.inputs.data import STYLES
    from dynamics.errors import InputError
    from dynamics.runs.rundir import move_aside, out_dir_state
    from dynamics.runs.train import TrainConfig, train

    unknown = [s for s in styles if s not in STYLES]
    if unknown:
        raise ValueError(f"unknown style(s) {unknown}; known: {', '.join(STYLES)}")
    out = Path(out)
    settings = {**SENTIMENT["quick" if quick else "full"], **SENTIMENT_COMMON, **(overrides or {})}
    data = resolve_data(data)
    config = dict(experiment="seed 004, section 4.2 (sentiment)", quick=quick, model=model, styles=list(styles),
                  data=data, eval_data=resolve_eval_data(data, eval_data), loss=loss, seed=seed, settings=settings)
    cfgs = {style: TrainConfig.from_flat(out=str(out / style), model=model, data=data, eval_data=config["eval_data"],
                               data_kind="sentiment", style=style, loss=loss, seed=seed, progress=progress,
                               **settings) for style in styles}  # validates every run before writing
    if out_dir_state(out) == "run":
        if not overwrite:
            raise InputError(f"{out} already holds an experiment; pass --overwrite to move it aside to "
                             f"{out.name}.old-<time>, or choose another --out")
        move_aside(out)
    RunDir(out).write_config(config, writer="reproduce sentiment")
    runs, frames = {}, []
    for style, cfg in cfgs.items():
        runs[style] = train(cfg)
        frames.append(read_table(runs[style].path, "records").assign(style=style))
    pd.concat(frames, ignore_index=True).to_parquet(out / "records.parquet", index=False)
    return runs


# --------------------------------------------------------------------------- token Grams


def token_gram_files(run_dir: str | Path) -> list[Path]:
    """The token-Gram npz files of a run (or of ``run_dir/long_suffix``), ordered by step."""
    run_dir = Path(run_dir)
    for d in (run_dir / "token_grams", run_dir / "long_suffix" / "token_grams"):
        files = sorted(d.glob("step*.npz")) if d.is_dir() else []
        if files:
            return files
    raise FileNotFoundError(f"no token_grams/step*.npz under {run_dir} or {run_dir / 'long_suffix'}")


def load_token_gram(run_dir: str | Path, which: str = "last") -> dict:
    """The first probe pair's token Gram at the first or last saved step, as a dict of arrays."""
    if which not in ("first", "last"):
        raise ValueError(f"unknown which {which!r}; known: first, last")
    files = token_gram_files(run_dir)
    pair = files[0].stem.split("_", 1)[1]
    files = [f for f in files if f.stem.split("_", 1)[1] == pair]
    with np.load(files[0 if which == "first" else -1]) as z:
        return {k: z[k] for k in z.files}


def token_cosines(g: dict) -> dict:
    """Diagonal token cosines of a chosen/rejected Gram: at the first differing token m (``cos[m, m]``)
    and over the shared tokens (the common prefix on the diagonal, the common suffix aligned from
    the end, which is the diagonal when both responses have the same length)."""
    cos, tw, tl = g["cos"], [str(t) for t in g["tokens_w"]], [str(t) for t in g["tokens_l"]]
    m = next((i for i, (a, b) in enumerate(zip(tw, tl)) if a != b), min(len(tw), len(tl)))
    shared = [(i, i) for i in range(m)]
    k = 1
    while k <= min(len(tw), len(tl)) - m - 1 and tw[-k] == tl[-k]:
        shared.append((len(tw) - k, len(tl) - k))
        k += 1
    diff = float(cos[m, m]) if m < min(cos.shape) else float("nan")
    vals = [float(cos[i, j]) for i, j in shared]
    return dict(step=int(g["step"]), pair_id=str(g["pair_id"]), m=m, token_w=tw[m] if m < len(tw) else None,
                token_l=tl[m] if m < len(tl) else None, cos_differing=diff,
                cos_shared_mean=float(np.mean(vals)) if vals else float("nan"), n_shared=len(vals))


# --------------------------------------------------------------------------- claims


def _first_last(records: pd.DataFrame, col: str) -> dict:
    df = records.dropna(subset=[col])
    per_step = df.groupby("step")[col].mean()
    return dict(first=float(per_step.iloc[0]), last=float(per_step.iloc[-1]),
                first_step=int(per_step.index[0]), last_step=int(per_step.index[-1]))


def _per_pair_change(records: pd.DataFrame, col: str) -> pd.Series:
    """``col`` at the last recorded step minus at the first, per pair (pairs present at both)."""
    df = records.dropna(subset=[col])
    first, last = df["step"].min(), df["step"].max()
    at = lambda s: df[df["step"] == s].set_index("pair_id")[col]
    return (at(last) - at(first)).dropna()


def claims(out: str | Path) -> dict:
    """The four claims of seed 004 section 4.2, each {claim, held, numbers}, from ``out``'s files.

    Claims 1 and 2 are judged on the mean over evaluation pairs (what Fig. 3 draws); the numbers
    also give the per-pair median change and the fraction of pairs whose chosen log-prob fell,
    since a few pairs with large drops can move the mean against most pairs."""
    out = Path(out)
    rec = read_table(out, "records")
    styles = [s for s in STYLE_ORDER if s in set(rec["style"])]
    by = {s: rec[rec["style"] == s] for s in styles}
    lp = {s: _first_last(by[s], "logp_w") for s in styles}
    for s, v in lp.items():
        v["change"] = v["last"] - v["first"]
        d = _per_pair_change(by[s], "logp_w")
        v.update(median_pair_change=float(d.median()), frac_pairs_fell=float((d < 0).mean()), n_pairs=len(d))
    res = {}

    rises = {s: lp[s]["change"] > 0 for s in styles}
    res["chosen_rises_only_single_token"] = dict(
        claim="the chosen log-prob rises only in the single-token case (Fig. 3)",
        held=bool(rises.get("single_token", False) and not any(v for s, v in rises.items() if s != "single_token")),
        numbers=lp)

    have = {"short_suffix", "long_suffix"} <= set(styles)
    drop = {s: -lp[s]["change"] for s in ("short_suffix", "long_suffix") if s in lp}
    res["long_suffix_falls_more"] = dict(
        claim="the chosen log-prob falls more with the long suffix than with the short one (Fig. 3)",
        held=bool(have and drop["long_suffix"] > drop["short_suffix"]), numbers=dict(drop=drop))

    cos = {}
    for s in styles:
        c = by[s].dropna(subset=["cos_wl"])
        cos[s] = dict(mean=float(c["cos_wl"].mean()), **_first_last(by[s], "cos_wl")) if len(c) else None
    order = [cos[s]["mean"] for s in STYLE_ORDER if s in cos and cos[s] is not None]
    res["cosine_grows_with_suffix"] = dict(
        claim="the gradient cosine grows with the suffix, single token lowest (Fig. 4a)",
        held=bool(len(order) == 3 and order[0] < order[1] < order[2]), numbers=cos)

    try:
        tc = {w: token_cosines(load_token_gram(out, w)) for w in ("first", "last")}
        held = tc["last"]["cos_differing"] < 0 and tc["last"]["cos_shared_mean"] > SHARED_COS_MIN
    except FileNotFoundError:
        tc, held = None, False
    res["token_cosine_sign"] = dict(
        claim=f"long suffix, last saved step: the differing token has negative gradient cosine with its "
              f"counterpart, shared tokens high positive (mean > {SHARED_COS_MIN}) (Fig. 4b)",
        held=bool(held), numbers=tc)
    return res


def claims_markdown(cl: dict) -> str:
    """A README section stating, for each claim, whether it held and its numbers."""
    lines = ["# Seed 004, section 4.2: sentiment task", "",
             "Generated by `dynamics reproduce sentiment`; numbers from the run's files.", ""]
    for name, c in cl.items():
        lines.append(f"- **{'held' if c['held'] else 'did not hold'}**: {c['claim']}.")
        nums = c["numbers"]
        if name == "chosen_rises_only_single_token":
            for s, v in nums.items():
                lines.append(f"  - {s}: chosen log-prob {v['first']:.3f} (step {v['first_step']}) → "
                             f"{v['last']:.3f} (step {v['last_step']}), change {v['change']:+.3f}; per pair: "
                             f"median change {v['median_pair_change']:+.3f}, fell for "
                             f"{v['frac_pairs_fell']:.0%} of {v['n_pairs']} pairs")
        elif name == "long_suffix_falls_more":
            lines.append("  - drop of the chosen log-prob: " + ", ".join(f"{s} {v:+.3f}" for s, v in nums["drop"].items()))
        elif name == "cosine_grows_with_suffix":
            for s, v in nums.items():
                lines.append(f"  - {s}: " + ("no cosine recorded" if v is None else
                             f"mean cos {v['mean']:.3f} (first {v['first']:.3f}, last {v['last']:.3f})"))
        elif nums is None:
            lines.append("  - no long-suffix token Grams found")
        else:
            for w, v in nums.items():
                lines.append(f"  - {w} saved step {v['step']} (pair {v['pair_id']}): cos at differing token "
                             f"{v['token_w']!r}/{v['token_l']!r} = {v['cos_differing']:.3f}; mean over "
                             f"{v['n_shared']} shared tokens = {v['cos_shared_mean']:.3f}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- figures


def make_figure(run_dir: str | Path, name: str):
    """Figure ``name`` (fig3, fig4a, fig4b) from a sentiment output dir (fig4b: or any run dir)."""
    run_dir = Path(run_dir)
    if name not in FIGURES:
        raise ValueError(f"unknown figure {name!r}; known: {', '.join(FIGURES)}")
    if name == "fig4b":
        g = load_token_gram(run_dir, "last")
        return plot_token_heatmap(g["cos"], [str(t) for t in g["tokens_w"]], [str(t) for t in g["tokens_l"]],
                                  title=f"pair {g['pair_id']}, step {int(g['step'])}")
    rec = read_table(run_dir, "records")
    if "style" not in rec:
        raise ValueError(f"{run_dir}/records.parquet has no style column; {name} needs the combined "
                         "output of `dynamics reproduce sentiment`")
    return plot_fig3(rec) if name == "fig3" else plot_cosine(rec, by="style")


def save_with_config(fig, stem: Path, run_dir: str | Path) -> list[Path]:
    """`save_figure` plus ``stem.json``: the run configuration the figure was drawn from."""
    paths = save_figure(fig, stem)
    cfg_file = Path(run_dir) / "config.json"
    sidecar = dict(figure=stem.name, source=str(run_dir),
                   config=json.loads(cfg_file.read_text()) if cfg_file.is_file() else None)
    json_path = stem.with_suffix(".json")
    json_path.write_text(json.dumps(to_jsonable(sidecar), indent=2) + "\n")
    return paths + [json_path]


def write_figures(out: str | Path, fig_dir: str | Path) -> list[Path]:
    """Figures 3, 4a, 4b from ``out`` into ``fig_dir`` (PNG, PDF, JSON each), plus ``README.md``
    (the claims) and ``claims.json``."""
    fig_dir = Path(fig_dir)
    fig_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in FIGURES:
        paths += save_with_config(make_figure(out, name), fig_dir / name, out)
    cl = claims(out)
    (fig_dir / "README.md").write_text(claims_markdown(cl))
    (fig_dir / "claims.json").write_text(json.dumps(to_jsonable(cl), indent=2) + "\n")
    return paths + [fig_dir / "README.md", fig_dir / "claims.json"]
