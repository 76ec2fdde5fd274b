"""Figures from run directories: each function reads a tidy DataFrame, never recomputes.

One style for every figure (`STYLE`, `CHOSEN`, `REJECTED`), sized for a paper column. Every
plotting function takes an optional matplotlib ``ax`` and returns the ``Figure``;
`save_figure` writes PNG and PDF side by side.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display is needed or assumed
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

CHOSEN = "#2166ac"    # blue: y_w
REJECTED = "#b2182b"  # red: y_l
STYLE = {
    "font.size": 9, "axes.titlesize": 9, "axes.labelsize": 9, "legend.fontsize": 8,
    "xtick.labelsize": 8, "ytick.labelsize": 8, "axes.spines.top": False, "axes.spines.right": False,
    "figure.dpi": 150, "savefig.bbox": "tight", "pdf.fonttype": 42,
}


def new_axes(ax, size=(3.4, 2.4)):
    """``(figure, ax)``: ``ax``'s own figure, or a new figure of ``size`` inches in `STYLE`."""
    if ax is not None:
        return ax.figure, ax
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=size)
    return fig, ax


def step_axis(ax) -> None:
    """Label ``ax``'s x axis "step" and tick it at whole steps only (optimizer steps are integers)."""
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _band(ax, df: pd.DataFrame, col: str, color: str, label: str) -> None:
    """Mean over pairs per step, with a ±1 standard-error band."""
    g = df.groupby("step")[col]
    mean, sem = g.mean(), g.sem().fillna(0.0)
    ax.plot(mean.index, mean.values, color=color, label=label, lw=1.5)
    ax.fill_between(mean.index, mean - sem, mean + sem, color=color, alpha=0.2, lw=0)


def plot_logprobs(records: pd.DataFrame, ax=None, *, normalized: bool = False, title: str | None = None):
    """Chosen and rejected log-probs of the probe pairs over training steps.

    ``records``: rows with ``step``, ``logp_w``, ``logp_l`` (and ``*_norm`` when ``normalized``).
    Draws the mean over pairs with a standard-error band. Returns the Figure.
    """
    with plt.rc_context(STYLE):
        fig, ax = new_axes(ax)
        sfx = "_norm" if normalized else ""
        _band(ax, records, f"logp_w{sfx}", CHOSEN, "chosen $y_w$")
        _band(ax, records, f"logp_l{sfx}", REJECTED, "rejected $y_l$")
        step_axis(ax)
        ax.set_ylabel(r"$\log\pi(y|x)/|y|$" if normalized else r"$\log\pi(y|x)$")
        if title:
            ax.set_title(title)
        ax.legend(frameon=False)
    return fig


def save_figure(fig, stem: str | Path) -> list[Path]:
    """Save ``fig`` as ``stem.png`` and ``stem.pdf``; returns both paths."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    with plt.rc_context(STYLE):
        for p in paths:
            fig.savefig(p)
    plt.close(fig)
    return paths


def plot_cosine(records: pd.DataFrame, ax=None, *, by: str | None = None, title: str | None = None):
    """cos(∇log π_w, ∇log π_l) of the probe pairs over steps (seed 004 Fig. 4a / 7).

    ``by``: a column (e.g. ``style`` or ``loss``) drawing one line per value; mean ± s.e.m.
    """
    with plt.rc_context(STYLE):
        fig, ax = new_axes(ax)
        df = records.dropna(subset=["cos_wl"])
        groups = [(None, df)] if by is None else list(df.groupby(by, sort=False))
        for i, (name, g) in enumerate(groups):
            color = CHOSEN if by is None else plt.get_cmap("tab10")(i)
            _band(ax, g, "cos_wl", color, str(name).replace("_", " ") if name is not None else "cos")
        ax.axhline(0, color="0.6", lw=0.6)
        step_axis(ax)
        ax.set_ylabel(r"$\cos(\nabla\log\pi_w, \nabla\log\pi_l)$")
        if title:
            ax.set_title(title)
        if by is not None:
            ax.legend(frameon=False)
    return fig


def plot_predicted_vs_actual(records: pd.DataFrame, ax=None, *, title: str | None = None):
    """Scatter of the actual one-step Δlog π_w against its first-order prediction from the real
    update, ⟨∇log π_w, Δθ⟩ (``upd_dw``), with the identity line."""
    with plt.rc_context(STYLE):
        fig, ax = new_axes(ax)
        df = records.dropna(subset=["act_dw", "upd_dw"])
        ax.scatter(df.upd_dw, df.act_dw, s=8, color=CHOSEN, alpha=0.7, lw=0, label=r"$y_w$")
        if "act_dl" in df:
            ax.scatter(df.upd_dl, df.act_dl, s=8, color=REJECTED, alpha=0.7, lw=0, label=r"$y_l$")
        lim = [min(df.upd_dw.min(), df.act_dw.min(), 0), max(df.upd_dw.max(), df.act_dw.max(), 0)]
        if "act_dl" in df:
            lim = [min(lim[0], df.upd_dl.min(), df.act_dl.min()), max(lim[1], df.upd_dl.max(), df.act_dl.max())]
        ax.plot(lim, lim, color="0.5", lw=0.8, ls="--")
        ax.set_xlabel(r"predicted $\langle\nabla\log\pi, \Delta\theta\rangle$")
        ax.set_ylabel(r"actual $\Delta\log\pi$")
        if title:
            ax.set_title(title)
        ax.legend(frameon=False)
    return fig


def plot_dynamics_panel(records: pd.DataFrame, title: str | None = None):
    """Two panels: gradient cosine over steps, and predicted vs actual one-step changes."""
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, 2, figsize=(6.8, 2.6))
    plot_cosine(records, axes[0])
    plot_predicted_vs_actual(records, axes[1])
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def plot_fig3(records: pd.DataFrame, axes=None, *, styles: tuple[str, ...] | None = None):
    """Seed 004 Fig. 3: one panel per response style, chosen and rejected log-probs over steps.

    ``records``: rows with ``style``, ``step``, ``logp_w``, ``logp_l`` (mean ± s.e.m. over pairs).
    ``axes``: one Axes per style (default: a new row of panels). Returns the Figure.
    """
    order = ("single_token", "short_suffix", "long_suffix")
    present = list(dict.fromkeys(records["style"]))
    styles = list(styles) if styles else [s for s in order if s in present] + [s for s in present if s not in order]
    with plt.rc_context(STYLE):
        if axes is None:
            fig, axes = plt.subplots(1, len(styles), figsize=(2.4 * len(styles), 2.4), squeeze=False)
            axes = axes[0]
        fig = axes[0].figure
        for i, (style, ax) in enumerate(zip(styles, axes)):
            plot_logprobs(records[records["style"] == style], ax, title=style.replace("_", " "))
            if i:
                ax.get_legend().remove()
                ax.set_ylabel("")
        fig.tight_layout()
    return fig


def plot_token_heatmap(cos, tokens_w, tokens_l, ax=None, *, title: str | None = None):
    """Seed 004 Fig. 4b: token-wise gradient cosine ``cos[t, s]`` between chosen token t (rows)
    and rejected token s (columns), diverging colormap centred at 0 on [-1, 1], with a colorbar."""
    import numpy as np

    cos = np.asarray(cos, dtype=float)
    if cos.shape != (len(tokens_w), len(tokens_l)):
        raise ValueError(f"cos has shape {cos.shape}, tokens give ({len(tokens_w)}, {len(tokens_l)})")
    with plt.rc_context(STYLE):
        fig, ax = new_axes(ax, size=(0.3 * len(tokens_l) + 1.6, 0.3 * len(tokens_w) + 1.0))
        im = ax.imshow(cos, cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
        ax.set_xticks(range(len(tokens_l)), [str(t) for t in tokens_l], rotation=90)
        ax.set_yticks(range(len(tokens_w)), [str(t) for t in tokens_w])
        ax.set_xlabel(r"rejected $y_l$ tokens")
        ax.set_ylabel(r"chosen $y_w$ tokens")
        ax.spines[["top", "right"]].set_visible(True)
        fig.colorbar(im, ax=ax, label="gradient cosine")
        if title:
            ax.set_title(title)
    return fig


def plot_whatif(whatif: pd.DataFrame, ax=None, *, labels: dict | None = None, title: str | None = None):
    """What-if summary: for the same recorded gradients, the share of (step, pair) rows in which each
    loss of the zoo predicts the chosen log-prob to rise (first-order, SGD form), one bar per loss.

    ``whatif``: rows with ``loss`` and ``dlogp_w`` (a run's ``whatif.parquet``). Returns the Figure.
    """
    share = whatif.dropna(subset=["dlogp_w"]).groupby("loss")["dlogp_w"].apply(lambda d: float((d > 0).mean()))
    share = share.sort_values()
    names = [(labels or {}).get(n, n) for n in share.index]
    with plt.rc_context(STYLE):
        fig, ax = new_axes(ax, size=(3.4, 0.22 * len(share) + 0.8))
        ax.barh(names, share.values, color=[CHOSEN if v >= 0.5 else REJECTED for v in share.values])
        ax.axvline(0.5, color="0.6", lw=0.6, ls="--")
        ax.set_xlim(0, 1)
        ax.set_xlabel(r"share of steps $\times$ pairs with predicted $\Delta\log\pi_w > 0$")
        if title:
            ax.set_title(title)
    return fig


RUN_FIGURES = ("logprobs", "logprobs_norm", "dynamics")


def plot_run(run_dir: str | Path, figure: str | None = None) -> list[Path]:
    """Draw a run directory's figures from its ``records`` table into the directory (PNG + PDF):
    ``logprobs``, ``logprobs_norm`` and, when cosines were recorded, ``dynamics``; or only
    ``figure`` (one of `RUN_FIGURES`). Returns the written paths."""
    from dynamics.runs.rundir import RunDir

    if figure is not None and figure not in RUN_FIGURES:
        raise ValueError(f"unknown figure {figure!r}; known: {', '.join(RUN_FIGURES)}")
    run = RunDir(run_dir)
    records, cfg = run.table("records"), run.read_config()
    loss = cfg.get("loss", cfg.get("recorder", {}).get("loss", ""))
    title = f"{loss} · {cfg.get('model', '')}".strip(" ·")
    has_cos = {"cos_wl", "act_dw", "upd_dw"} <= set(records.columns) and records.cos_wl.notna().any()
    makers = dict(logprobs=lambda: plot_logprobs(records, title=title),
                  logprobs_norm=lambda: plot_logprobs(records, normalized=True, title=title),
                  dynamics=(lambda: plot_dynamics_panel(records, title=title)) if has_cos else None)
    if figure == "dynamics" and not has_cos:
        raise ValueError(f"{run_dir}: no recorded gradient cosines, so there is no dynamics figure")
    paths = []
    for name in ([figure] if figure else RUN_FIGURES):
        if makers[name] is not None:
            paths += save_figure(makers[name](), Path(run_dir) / name)
    return paths
