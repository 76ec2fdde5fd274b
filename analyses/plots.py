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


def _axes(ax, size=(3.4, 2.4)):
    if ax is not None:
        return ax.figure, ax
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=size)
    return fig, ax


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
        fig, ax = _axes(ax)
        sfx = "_norm" if normalized else ""
        _band(ax, records, f"logp_w{sfx}", CHOSEN, "chosen $y_w$")
        _band(ax, records, f"logp_l{sfx}", REJECTED, "rejected $y_l$")
        ax.set_xlabel("step")
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
