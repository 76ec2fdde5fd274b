"""Learning dynamics on the real model (seed 000): SFT, then DPO, with the probe set recorded.

`run_llm_squeezing` trains SmolLM2-135M (offline) on the built-in sentiment statements with
`dynamics.runs.train` and ``probes=True``: every ``eval_every`` steps the log-probs of y⁺, y⁻, y*,
the greedy decode, another prompt's response, shuffled and non-human text, plus the argmax
mass and entropy, go to ``probes.parquet``. `plot_probe_curves` draws them EMA-smoothed as in
the paper; `squeezing_summary` gives the numbers the note quotes.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from dynamics.tools.plots import CHOSEN, REJECTED, STYLE, save_figure, step_axis

PROBE_COLORS = {"chosen": CHOSEN, "rejected": REJECTED, "argmax_teacher": "#1b7837", "greedy": "#762a83",
                "other_chosen": "#e08214", "held_out_chosen": "#8c510a", "chosen_shuffled": "#878787",
                "other_shuffled": "#4d4d4d"}


def run_llm_squeezing(out: str | Path, *, quick: bool = True, model: str = "smollm2-135m", seed: int = 0):
    """SFT then DPO with probes recorded; returns the run directory (`dynamics.runs.rundir.RunDir`)."""
    from dynamics.runs.train import TrainConfig, train

    from analyses.presets import SQUEEZING_LLM, SQUEEZING_LLM_COMMON

    cfg = TrainConfig.from_flat(out=str(out), model=model, seed=seed, progress=True, **SQUEEZING_LLM_COMMON,
                                **SQUEEZING_LLM["quick" if quick else "full"])
    return train(cfg)


def ema(x: pd.Series, alpha: float = 0.5) -> pd.Series:
    """Exponential moving average over consecutive recorded steps (the paper's smoothing)."""
    return x.ewm(alpha=alpha, adjust=False).mean()


def plot_probe_curves(probes: pd.DataFrame, axes=None, *, alpha: float = 0.5, title: str | None = None):
    """Left: mean log-prob of each probe response over steps (EMA); right: argmax mass and
    Σ log π(y*) on the chosen prompt, teacher-forced on y⁺ (the squeezing signature)."""
    with plt.rc_context(STYLE):
        if axes is None:
            fig, axes = plt.subplots(1, 2, figsize=(6.8, 2.6))
        fig = axes[0].figure
        mean = probes.groupby(["probe", "step"]).logp.mean().reset_index()
        for name, g in mean.groupby("probe"):
            axes[0].plot(g.step, ema(g.logp, alpha), label=name, color=PROBE_COLORS.get(name), lw=1.3)
        step_axis(axes[0])
        axes[0].set_ylabel(r"$\log\pi(y|x)$ (EMA)")
        axes[0].legend(frameon=False, fontsize=6, ncol=2)
        ch = probes[probes.probe == "chosen"].groupby("step")[["argmax_mass", "argmax_logp"]].mean()
        axes[1].plot(ch.index, ema(ch.argmax_mass, alpha), color="#1b7837", label="argmax mass")
        step_axis(axes[1])
        axes[1].set_ylabel("mean argmax probability")
        ax2 = axes[1].twinx()
        ax2.plot(ch.index, ema(ch.argmax_logp, alpha), color="0.4", ls="--", label=r"$\sum_t\log\pi(y^*_t)$")
        ax2.set_ylabel(r"$\sum_t \log\pi(y^*_t)$")
        ax2.spines["right"].set_visible(True)
        lines = axes[1].get_lines() + ax2.get_lines()                            # one legend for both y axes
        ax2.legend(lines, [ln.get_label() for ln in lines], frameon=False, fontsize=6)
        if title:
            fig.suptitle(title, fontsize=9)
        fig.tight_layout()
    return fig


def squeezing_summary(probes: pd.DataFrame) -> pd.DataFrame:
    """First vs last recorded step, mean over probe pairs: log-prob of every probe and, on the
    chosen prompt, argmax mass, Σ log π(y*) and entropy."""
    first, last = probes.step.min(), probes.step.max()
    rows = []
    for name, g in probes.groupby("probe"):
        a, b = g[g.step == first], g[g.step == last]
        rows.append(dict(probe=name, logp_first=a.logp.mean(), logp_last=b.logp.mean(),
                         argmax_mass_first=a.argmax_mass.mean(), argmax_mass_last=b.argmax_mass.mean(),
                         argmax_logp_first=a.argmax_logp.mean(), argmax_logp_last=b.argmax_logp.mean(),
                         entropy_first=a.entropy.mean(), entropy_last=b.entropy.mean()))
    return pd.DataFrame(rows)


def reproduce_squeezing(out: str | Path, *, quick: bool = True, llm: bool = True) -> list[Path]:
    """Toy + digits (seconds) and, with ``llm``, the SmolLM2 probe curves; returns written files."""
    from analyses.squeezing import reproduce_toy_and_digits

    out = Path(out)
    paths = reproduce_toy_and_digits(out, quick=quick)
    if llm:
        run = run_llm_squeezing(out / "smollm2_run", quick=quick)
        probes = run.table("probes")
        paths += save_figure(plot_probe_curves(probes, title="SmolLM2-135M: SFT then DPO"), out / "llm_probes")
        summary = squeezing_summary(probes)
        summary.to_csv(out / "llm_probes_summary.csv", index=False)
        paths.append(out / "llm_probes_summary.csv")
    return paths
