"""The HTML of `dynamics.tools.diagnose`: page, sections, tables and embedded figures.

Nothing here computes a number of the diagnosis: every function takes the tables (DataFrames) and
dicts that `dynamics.tools.diagnose` computed and lays them out, so that the page can change
without touching the analyses and each analysis can be tested without HTML. The page is
self-contained: inline CSS, figures as ``data:image/png`` URIs, no script, no network.

Contents: number formatting (`fmt_num`, `fmt_frac`), the page (`Section`, `Report`), building
blocks (`table_html`, `capped_table`, `para`, `figure_html`, `figures_html`), the figures that
exist only in the report (`plot_step_effects`, `plot_training_pairs`, `plot_screen`,
`token_heatmap`), and one function per section of the report (``*_section``) and of the screening
page (`screen_sections`).
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from dynamics.core.conditions import CASES

__all__ = [
    "CSS", "fmt_num", "fmt_frac", "Section", "Report", "table_html", "capped_table", "para", "figure_html",
    "figures_html", "plot_step_effects", "plot_training_pairs", "plot_screen", "token_heatmap",
    "verdict_section", "drivers_section", "contributions_section", "inrun_section", "tokens_section",
    "whatif_section", "remedies_section", "config_section", "screen_sections",
]

CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,"DejaVu Sans",Helvetica,Arial,sans-serif;font-size:15px;
line-height:1.45;color:#1b1b1b;max-width:1080px;margin:0 auto;padding:0 1.2em 3em;background:#fff}
h1{font-size:1.5em;margin:.8em 0 .3em}h2{font-size:1.25em;border-bottom:2px solid #2166ac;padding-bottom:.15em;
margin-top:1.6em}h3{font-size:1.05em;margin:1.2em 0 .4em}
nav{font-size:.9em;color:#555}nav a{color:#2166ac;text-decoration:none}
table{border-collapse:collapse;margin:.5em 0 1em;font-size:.86em}
th,td{border:1px solid #ccc;padding:.2em .5em;text-align:left;vertical-align:top;font-variant-numeric:tabular-nums}
th{background:#eef3f8}
img{max-width:100%;height:auto;display:block;margin:.6em 0}
.figs{display:flex;flex-wrap:wrap;gap:1em;align-items:flex-start}
ul.conclusions li{margin:.3em 0}.missing{background:#fff4e5;border-left:4px solid #e08e0b;padding:.4em .7em}
.warning{background:#fdecea;border-left:4px solid #b2182b;padding:.4em .7em}
.unreliable{color:#888}.unreliable th{background:#f3f3f3}.unreliable .warning{color:#7a0c15}
.note{color:#555;font-size:.9em}.label{display:inline-block;background:#eef3f8;border-radius:3px;padding:0 .4em;
font-size:.85em}pre{background:#f6f8fa;padding:.8em;overflow-x:auto;font-size:.82em;border:1px solid #ddd}
"""
"""The page's stylesheet (inlined in ``<style>``)."""


# ============================================================================ formatting

def fmt_num(x: Any, digits: int = 4) -> str:
    """``x`` with ``digits`` significant digits; "n/a" for NaN, ``str(x)`` for a non-number; no "-0"."""
    try:
        x = float(x)
    except (TypeError, ValueError):
        return str(x)
    if math.isnan(x):
        return "n/a"
    return f"{x if x != 0 else 0.0:.{digits}g}"


def fmt_frac(k: int, n: int) -> str:
    """``"k/n (p%)"``; ``"k/0"`` when n = 0."""
    return f"{k}/{n} ({100.0 * k / n:.0f}%)" if n else f"{k}/0"


# ============================================================================ the page

@dataclass
class Section:
    """One section of the report: ``id`` (HTML id), ``title``, ``body`` (HTML), ``missing`` (what
    optional input is absent and how to get it), ``figures`` (count)."""

    id: str
    title: str
    body: str
    missing: list[str] = field(default_factory=list)
    figures: int = 0

    def to_html(self) -> str:
        notes = "".join(f'<p class="missing">Missing input: {html.escape(m)}</p>' for m in self.missing)
        return f'<section id="{self.id}">\n<h2>{html.escape(self.title)}</h2>\n{notes}{self.body}\n</section>'


@dataclass
class Report:
    """The diagnosis of one run: ``title``, ``sections`` (in page order), ``verdict`` (the
    `dynamics.tools.diagnose.verdict` dict). `to_html` renders the self-contained page."""

    title: str
    sections: list[Section]
    verdict: dict = field(default_factory=dict)

    @property
    def ids(self) -> list[str]:
        return [s.id for s in self.sections]

    def section(self, id: str) -> Section:
        for s in self.sections:
            if s.id == id:
                return s
        raise KeyError(f"no section {id!r}; sections: {self.ids}")

    def to_html(self) -> str:
        toc = " · ".join(f'<a href="#{s.id}">{html.escape(s.title)}</a>' for s in self.sections)
        body = "\n".join(s.to_html() for s in self.sections)
        return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
                f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
                f"<title>{html.escape(self.title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
                f"<header><h1>{html.escape(self.title)}</h1>\n<nav>{toc}</nav></header>\n{body}\n</body>\n</html>\n")


# ============================================================================ building blocks

def table_html(df: pd.DataFrame, index: bool = False) -> str:
    """``df`` as an HTML table: escaped, numbers by `fmt_num`, NaN as "–", "_" in headers as spaces."""
    df = df.rename(columns=lambda c: str(c).replace("_", " "))                   # headers may wrap
    return df.to_html(index=index, escape=True, border=0, na_rep="–",
                      float_format=lambda x: fmt_num(x), classes="tbl")


def capped_table(df: pd.DataFrame, rows: int = 40) -> str:
    """`table_html` of ``df``, or of its first and last ``rows // 2`` rows with a note when longer."""
    if len(df) <= rows:
        return table_html(df)
    half = rows // 2
    return (para(f"{len(df)} rows; the first and last {half} are shown (the full table is computed by the "
                 "function named in this section).", "note") + table_html(pd.concat([df.head(half), df.tail(half)])))


def para(text: str, cls: str | None = None) -> str:
    """``<p>`` of the escaped ``text`` (with a CSS class)."""
    attr = f' class="{cls}"' if cls else ""
    return f"<p{attr}>{html.escape(text)}</p>"


def _ul(items: Sequence[str]) -> str:
    return '<ul class="conclusions">' + "".join(f"<li>{html.escape(c)}</li>" for c in items) + "</ul>"


def figure_html(make: Callable[[], Any], alt: str) -> tuple[str, int]:
    """``(html, 1)``: the Figure from ``make()`` as an embedded PNG; on failure a visible note, 0."""
    from dynamics.tools.plots import STYLE
    import matplotlib.pyplot as plt

    try:
        fig = make()
        buf = io.BytesIO()
        with plt.rc_context(STYLE):
            fig.savefig(buf, format="png", dpi=110)
        plt.close(fig)
    except Exception as e:  # a figure must never cost the report; say what went wrong
        plt.close("all")
        return para(f"Figure '{alt}' could not be drawn: {type(e).__name__}: {e}", "missing"), 0
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img src="{uri}" alt="{html.escape(alt)}">', 1


def figures_html(items: list[tuple[Callable[[], Any], str]], enabled: bool) -> tuple[str, int]:
    """A row of `figure_html` figures and their count (nothing when not ``enabled``)."""
    if not enabled or not items:
        return "", 0
    parts = [figure_html(make, alt) for make, alt in items]
    return '<div class="figs">' + "".join(h for h, _ in parts) + "</div>", sum(k for _, k in parts)


# ============================================================================ figures

def plot_step_effects(records: pd.DataFrame):
    """Per recorded step, the mean one-step chosen change: observed (act_dw), first order of the
    real update (upd_dw) and the pairs' own SGD-form prediction (pred_dw)."""
    from dynamics.tools.plots import CHOSEN, STYLE, new_axes
    import matplotlib.pyplot as plt

    m = records.groupby("step")[["act_dw", "upd_dw", "pred_dw"]].mean().dropna(how="all")
    with plt.rc_context(STYLE):
        fig, ax = new_axes(None, size=(4.2, 2.4))
        x = np.arange(len(m))
        for i, (col, color, label) in enumerate((("act_dw", CHOSEN, "observed Δ"), ("upd_dw", "#67a9cf", "⟨g_w,Δθ⟩"),
                                                 ("pred_dw", "#999999", "own gradient (SGD form)"))):
            ax.bar(x + (i - 1) * 0.27, m[col].fillna(0).to_numpy(), width=0.27, color=color, label=label)
        ax.axhline(0, color="0.4", lw=0.6)
        ax.set_xticks(x, [str(s) for s in m.index], rotation=90 if len(m) > 12 else 0)
        ax.set_xlabel("recorded step")
        ax.set_ylabel(r"mean $\Delta\log\pi_w$ (one step)")
        ax.legend(frameon=False, fontsize=7)
    return fig


def plot_training_pairs(steps: pd.DataFrame):
    """Two panels from `dynamics.tools.diagnose.train_step_table`: the training pairs' cos(g_w, g_l)
    per step (mean, 10–90% band) against the eq. 9 threshold in cosine form (mean), and the share
    of training pairs whose own step is predicted in case 2 (both fall) or lowers the chosen."""
    from dynamics.tools.plots import CHOSEN, REJECTED, STYLE
    import matplotlib.pyplot as plt

    with plt.rc_context(STYLE):
        fig, (a, b) = plt.subplots(1, 2, figsize=(6.8, 2.5))
        x = steps["step"].to_numpy()
        a.fill_between(x, steps["q10_cos_wl"], steps["q90_cos_wl"], color=CHOSEN, alpha=0.2, lw=0,
                       label="10–90% of pairs")
        a.plot(x, steps["mean_cos_wl"], color=CHOSEN, lw=1.5, marker=".", label=r"mean $\cos(g_w,g_l)$")
        a.plot(x, steps["mean_cos_thr_w"], color="0.3", lw=1.0, ls="--", label="eq. 9 threshold (cos)")
        a.set_xlabel("step")
        a.set_ylabel("cosine")
        a.legend(frameon=False, fontsize=7)
        b.plot(x, steps["frac_case2"], color=REJECTED, lw=1.5, marker=".", label="case 2 (both fall)")
        b.plot(x, steps["frac_own_fall"], color="0.3", lw=1.0, ls="--", label="own chosen falls")
        b.set_ylim(-0.03, 1.03)
        b.set_xlabel("step")
        b.set_ylabel("share of training pairs")
        b.legend(frameon=False, fontsize=7)
        fig.tight_layout()
    return fig


def plot_screen(table: pd.DataFrame):
    """Histograms of the screening scores ``ches_norm``, ``cos_wl``, ``pred_dw`` (those present)."""
    import matplotlib.pyplot as plt

    from dynamics.tools.plots import STYLE

    cols = [c for c in ("ches_norm", "cos_wl", "pred_dw") if c in table and table[c].notna().any()]
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, len(cols), figsize=(3.2 * len(cols), 2.4), squeeze=False)
    for ax, c in zip(axes[0], cols):
        ax.hist(table[c].dropna(), bins=min(30, max(5, len(table) // 3)), color="#2166ac")
        ax.set_xlabel(c)
        ax.set_ylabel("pairs")
    fig.tight_layout()
    return fig


def token_heatmap(f: Path, cut: int = 40) -> Callable[[], Any]:
    """A maker of the token-cosine heatmap of ``token_grams`` file ``f`` (first ``cut`` tokens)."""
    def make():
        from dynamics.tools.plots import plot_token_heatmap

        with np.load(f, allow_pickle=False) as z:
            cos, tw, tl = z["cos"], [str(t) for t in z["tokens_w"]], [str(t) for t in z["tokens_l"]]
            step = int(z["step"]) if "step" in z else None
            pid = str(z["pair_id"])
        return plot_token_heatmap(cos[:cut, :cut], tw[:cut], tl[:cut],
                                  title=f"pair {pid}" + (f", step {step}" if step is not None else ""))
    return make


# ============================================================================ the report's sections

def verdict_section(v: dict, iv: pd.DataFrame, cause_table: pd.DataFrame | None, case_table: pd.DataFrame | None,
                    records: pd.DataFrame, *, has_grad: bool, figures: bool) -> Section:
    """Section ``verdict``: the conclusions of `verdict` (``v``), the `intervals` table ``iv``, the
    table of causes of the observed falls, the predicted × observed case table (None: no gradients
    were recorded) and the figures of ``records``."""
    body, missing = [_ul(v["conclusions"])], []
    if len(iv):
        body.append("<h3>Change between recorded steps (means over pairs; intervals())</h3>" + capped_table(iv))
    if cause_table is not None:
        body.append("<h3>Why each observed fall happened</h3>" + table_html(cause_table))
    if case_table is not None:
        body.append("<h3>Cases: predicted by the pair's own gradient (rows) vs observed (columns)</h3>"
                    + table_html(case_table, index=True))
    else:
        missing.append("no recorded gradients (ip_wl, sq_w, thr_w): record with the dynamics recorder "
                       "(`dynamics train`, or DynamicsCallback) so that steps 0, eval_every, ... carry gradients")
    from dynamics.tools.plots import plot_dynamics_panel, plot_logprobs

    items = [(lambda: plot_logprobs(records, title="probe pairs"), "chosen and rejected log-probs")]
    if has_grad:
        items += [(lambda: plot_step_effects(records), "one-step chosen change: observed, real update, own gradient"),
                  (lambda: plot_dynamics_panel(records), "gradient cosine and predicted vs actual")]
    figs, k = figures_html(items, figures)
    body.append(figs)
    return Section("verdict", "1. Verdict: did the chosen log-prob fall, and why?", "\n".join(body), missing, k)


def drivers_section(v: dict, drivers: pd.DataFrame | None, *, has_screen: bool,
                    screen_corr: pd.DataFrame | None = None, screen_error: str | None = None) -> Section:
    """Section ``drivers``: the `drivers` table (None: one recorded step only) and the screening
    correlations (``has_screen``: a screen table exists; ``screen_error``: why they failed)."""
    body, missing = [], []
    if drivers is None:
        body.append(para("Insufficient evidence: one recorded step only, so no pair has a first → last change."))
    elif drivers.empty:
        body.append(para("No pair's chosen log-prob fell from the first to the last recorded step."))
    else:
        body.append(para(f"The {len(drivers)} pairs whose chosen log-prob fell most (step {v['first_step']} → "
                         f"{v['last_step']}); share_of_fall is each pair's part of the summed fall of all "
                         f"{v['pairs_fell']} falling pairs.") + table_html(drivers))
    if not has_screen:
        missing.append("no screen.parquet (pre-training screening: CHES, ches_norm, edit distance): compute it on the probe "
                       "pairs with `dynamics screen ... --out RUN_DIR/screen.parquet` (dynamics.core.screen.screen_pairs)")
    elif screen_error is not None:
        body.append(para(f"Screening correlations not computed: {screen_error}", "missing"))
    elif screen_corr is not None:
        body.append("<h3>Screening scores vs the realized chosen change (Spearman)</h3>"
                    + para("Negative: a higher score went with a larger fall (the score predicted displacement).",
                           "note") + table_html(screen_corr))
    return Section("drivers", "2. The pairs that drive it", "\n".join(body), missing)


CONTRIB_TITLE = "3. Which training pairs moved the probes"
INRUN_TITLE = "4. Training pairs (in-run)"


def contributions_section(split: dict | None, falls: pd.DataFrame | None, contributors: pd.DataFrame | None,
                          pushes: pd.DataFrame | None, *, top_k: int, note: str | None = None) -> Section:
    """Section ``contributions`` (docs/math.md §4.1): ``split`` (`contribution_split`), ``falls``
    (`probe_falls`), ``contributors`` (`fall_contributors`), ``pushes`` (`train_pair_pushes`);
    all None when the run has no contributions.parquet. ``note``: a problem with the table."""
    if split is None:
        missing = [("no usable" if note else "no") + " contributions.parquet (each probe's ⟨g, Δθ⟩ split over the training pairs of the step, "
                   "docs/math.md §4.1): record with `dynamics train --cross` (RecorderConfig(cross=True); "
                   "not available under DynamicsCallback)"]
        body = para(note, "missing") if note else ""
        return Section("contributions", CONTRIB_TITLE, body, missing)
    body = [para("At every recorded step, ⟨g_o, Δθ⟩ of each probe response o is split over the training pairs u "
                 "of the step through the optimizer's linear map U (docs/math.md §4.1): contribution = ⟨g_o, U(G_u)⟩ "
                 "with G_u = c_w g_w,u + c_l g_l,u; k_w, k_l are the cross-Gram entries ⟨g_o, g_w,u⟩, ⟨g_o, g_l,u⟩; "
                 "the residual upd − Σ contributions is momentum of earlier steps, weight decay and rounding. "
                 "Shares are of upd_dw = ⟨g_w, Δθ⟩ of the probe's chosen response at that step; with the residual "
                 "they sum to 1. First order: act_dw − upd_dw is the higher-order remainder.")]
    if note:
        body.append(para(note, "missing"))
    if split["n_falls"] == 0:
        body.append(para(f"No probe pair's chosen log-prob fell (act_dw < 0) at a step with contributions "
                         f"({split['n_probe_steps']} probe pair-steps recorded)."))
    else:
        body.append(_ul(split["sentences"]))
        body.append(f"<h3>The {split['n_falls']} falls of a probe's chosen log-prob (probe_falls(), largest first)</h3>"
                    + capped_table(falls))
        body.append(f"<h3>Top {top_k} training pairs per fall, most negative contribution first "
                    f"(fall_contributors())</h3>" + capped_table(contributors))
    if pushes is not None and len(pushes):
        body.append(f"<h3>Over all recorded steps: the {len(pushes)} training pairs that pushed the probes' chosen "
                    f"log-probs down most (train_pair_pushes(): of those that lowered one at least, most negative "
                    f"net = Σ contributions first; n_down = probe pair-steps it lowered, n_top_fall = falls it was "
                    f"the largest push of)</h3>" + table_html(pushes))
    return Section("contributions", CONTRIB_TITLE, "\n".join(body))


def inrun_section(summary: dict | None, steps: pd.DataFrame | None, cos_dist: pd.DataFrame | None,
                  top: pd.DataFrame | None, missing_entries: pd.DataFrame | None, *, top_k: int,
                  figures: bool, note: str | None = None) -> Section:
    """Section ``inrun``: ``summary`` (`train_summary`), ``steps`` (`train_step_table`), ``cos_dist``
    (`train_cos_distribution`), ``top`` (`train_top_falls`), ``missing_entries`` (`missing_entries`);
    all None when the run has no train_records.parquet."""
    if summary is None:
        missing = [("no usable" if note else "no") + " train_records.parquet (every optimizer step's training pairs, measured on the training backward): "
                   "record with `dynamics train --in-run` (RecorderConfig(in_run=True); DynamicsCallback with "
                   "in_run=True under TRL's DPOTrainer); --in-run-update adds ⟨g, Δθ⟩ of the real update"]
        return Section("inrun", INRUN_TITLE, para(note, "missing") if note else "", missing)
    body = [para("The pairs the update is made of (unlike the held-out probe pairs above), at every optimizer step, "
                 "from the training backward itself: each training pair's own SGD-form step (docs/math.md §3) "
                 "with the step's η, its predicted case (Table 1) and cos(g_w, g_l) against the eq. 9 threshold in "
                 "cosine form, cos_thr_w = thr_w/(‖g_w‖‖g_l‖): above it (below it when d_l < 0) the pair's own "
                 "gradient lowers its chosen log-prob.")]
    if note:
        body.append(para(note, "missing"))
    body.append(_ul(summary["sentences"]))
    legend = "; ".join(f"case {c}: {CASES[c]}" for c in CASES)
    body.append("<h3>Per step (train_step_table()): shares of the training pairs with a predicted case</h3>"
                + para(legend, "note") + capped_table(steps))
    if cos_dist is not None and len(cos_dist):
        body.append("<h3>cos(g_w, g_l) against the eq. 9 threshold, all training pair-steps "
                    "(train_cos_distribution())</h3>" + table_html(cos_dist, index=True))
    if top is not None and len(top):
        body.append(f"<h3>The {len(top)} training pair-steps whose own step lowers the chosen log-prob most "
                    f"(train_top_falls(), top {top_k})</h3>" + table_html(top))
    else:
        body.append(para("No training pair's own SGD-form step lowers its chosen log-prob (pred_dw ≥ 0 everywhere)."))
    if missing_entries is not None and len(missing_entries):
        body.append("<h3>Missing entries (NaN) and why (missing_entries())</h3>" + table_html(missing_entries))
    else:
        body.append(para("No missing entries: every training pair-step has its inner products.", "note"))
    figs, k = figures_html([(lambda: plot_training_pairs(steps), "training pairs: cosine and case 2 over steps")],
                           figures and steps is not None and len(steps) > 0)
    body.append(figs)
    return Section("inrun", INRUN_TITLE, "\n".join(body), figures=k)


def tokens_section(segments: pd.DataFrame | None, grams: Sequence[tuple[str, int, Path]], *,
                   attributions: tuple[pd.DataFrame, pd.DataFrame] | None, figures: bool) -> Section:
    """Section ``tokens``: `token_segments` (None: no token_decomp.parquet), the latest token Gram of
    up to three pairs ``(pair_id, step, file)``, and ``attributions`` = (`attribution_reliability`,
    `top_attributions`) or None. A (pair, target) whose integration did not converge is shown greyed
    under a warning, its ranking not presented as reliable."""
    body, missing, k = [], [], 0
    if segments is None:
        missing.append("no token_decomp.parquet (Theorem 3 before/at/after decomposition): record with "
                       "--token-pairs 1 (RecorderConfig(token_pairs=1)), the default of `dynamics train`")
    else:
        body.append(para("Predicted one-step change of each response's tokens (the pair's own SGD-form step, "
                         "first order), summed before / at / after the first differing token m. Theorem 3 (toy "
                         "model) predicts for the chosen response before ≈ 0, at ≥ 0, after ≤ 0 (token_segments()).")
                    + capped_table(segments))
    if not grams:
        missing.append("no token_grams/*.npz (token gradient cosines): record with --token-pairs 1")
    else:
        items = [(token_heatmap(f), f"token gradient cosine, pair {pid}, step {step}") for pid, step, f in grams]
        figs, k = figures_html(items, figures)
        body.append(para("Token-wise gradient cosine cos(g_w^t, g_l^s) at the last recorded step (seed 004 Fig. 4b); "
                         "responses longer than 40 tokens are cut to their first 40.", "note") + figs)
    if attributions is None:
        missing.append("no attributions.parquet (integrated-gradients token attributions): compute them with "
                       "`dynamics attribute ... --out RUN_DIR/attributions.parquet`")
    else:
        body.append(_attributions_html(*attributions))
    return Section("tokens", "5. Token level (Theorem 3)", "\n".join(body), missing, k)


def _attributions_html(rel: pd.DataFrame, top: pd.DataFrame) -> str:
    keys = [c for c in ("pair_id", "target") if c in rel]
    out = ["<h3>Token attributions (attributions.parquet): convergence of the integration</h3>",
           para("Integrated gradients satisfy Σ attributions = f(x) − f(baseline) (gap) up to captum's convergence "
                "delta δ; a (pair, target) with |δ| > 0.1·|gap| has not converged: its ranking is not reliable "
                "(raise --n-steps of `dynamics attribute`).", "note"),
           table_html(rel[[*keys, "n_tokens", "delta", "gap", "ratio", "status"]])]
    if (rel["status"] == "unchecked").any():
        out.append(para("Convergence not checked for the rows marked 'unchecked': the table has no delta/gap "
                        "columns (written before `dynamics attribute` stored them); rerun `dynamics attribute`.",
                        "missing"))
    cols = [c for c in ("pair_id", "target", "position", "token", "side", "segment", "attribution") if c in top]
    good = rel[rel["status"] != "not converged"]
    if len(good):
        t = top.merge(good[keys], on=keys) if keys else top
        out.append("<h3>Largest token attributions (top 5 per pair and target by |attribution|)</h3>"
                   + table_html(t[cols]))
    for r in rel[rel["status"] == "not converged"].itertuples():
        sel = np.ones(len(top), bool)
        for c in keys:
            sel &= (top[c] == getattr(r, c)).to_numpy()
        name = ", ".join(f"{'pair' if c == 'pair_id' else c} {getattr(r, c)}" for c in keys)
        out.append('<div class="unreliable">' + para(f"{name}: {r.note}; the token ranking below is NOT reliable.",
                                                        "warning") + table_html(top[sel][cols]) + "</div>")
    return "\n".join(out)


def whatif_section(summary: pd.DataFrame | None, whatif: pd.DataFrame | None, *, figures: bool) -> Section:
    """Section ``whatif``: `whatif_summary` with a "run's loss" column (None: no whatif.parquet)."""
    title = "6. What-if: other losses, same gradients"
    if summary is None:
        return Section("whatif", title, "", ["no whatif.parquet (the same gradients under every loss of the zoo): "
                                             "record with --whatif (RecorderConfig(whatif=True), the default)"])
    good = summary[summary["frac_rise"] >= 0.5]["loss"].tolist()
    body = [para("First-order prediction (SGD form, each pair's own gradient): for the recorded ⟨g_w,g_l⟩, ‖g_w‖², "
                 "‖g_l‖² and each loss's (d_w, d_l) at its default hyper-parameters (the run's own "
                 "hyper-parameters are in the records, not here), the share of pair-steps whose chosen "
                 "log-prob would rise."),
            para("Losses that raise the chosen log-prob in at least half of the pair-steps: "
                 + (", ".join(good) if good else "none") + "."),
            table_html(summary)]
    from dynamics.tools.plots import plot_whatif

    figs, k = figures_html([(lambda: plot_whatif(whatif), "what-if over the loss zoo")], figures)
    body.append(figs)
    return Section("whatif", title, "\n".join(body), figures=k)


def remedies_section(rm: pd.DataFrame | None, *, loss: str, loss_params: Mapping, caution: str | None = None,
                     error: str | None = None) -> Section:
    """Section ``remedies``: the `remedies` table (None with ``error`` when it could not be computed,
    None without: no recorded gradients); ``caution``: a warning that most of the fall is not the
    pairs' own gradient."""
    title = "7. Nearest changes to the loss (first-order prediction)"
    if error is not None:
        return Section("remedies", title, para(f"Not computed: {error}", "missing"))
    if rm is None:
        return Section("remedies", title, "", ["no recorded gradients (ip_wl, sq_w): the remedies are computed from them"])
    body = [para(f"First-order prediction from the recorded gradients of the run's loss {loss!r} "
                 f"{dict(loss_params)}: the chosen log-prob's SGD-form change is η(d_w‖g_w‖² − d_l⟨g_w,g_l⟩); a "
                 "change of the loss acts through its new (d_w, d_l). needed_* is the smallest total value of the "
                 "parameter above which the change is positive (quantiles over the pair-steps that need more "
                 "than the current value); frac_rise_at_* the share of all pair-steps rising with the parameter "
                 "at that value.")]
    if caution:
        body.append(para(caution, "missing"))
    items = []
    for r in rm[rm["applicable"]].itertuples():
        if r.remedy == "beta":
            text = f"β: {r.note}"
        elif r.n_needing == 0:
            text = (f"{r.parameter}: " + ("not needed: the pair's own gradient already raises the chosen log-prob "
                                          "at every recorded pair-step" if r.frac_rise_now == 1 else
                                          f"no value helps the {100 * (1 - r.frac_rise_now):.0f}% of pair-steps "
                                          "whose chosen log-prob falls") + f" (now {fmt_num(r.current)}).")
        else:
            text = (f"{r.parameter}: now {fmt_num(r.current)}, the chosen log-prob rises in "
                    f"{100 * r.frac_rise_now:.0f}% of pair-steps. Over the {r.n_needing} pair-steps that need more, "
                    f"the threshold has median {fmt_num(r.needed_median)} (then {100 * r.frac_rise_at_median:.0f}% "
                    f"of all pair-steps rise), 90th percentile {fmt_num(r.needed_p90)} "
                    f"({100 * r.frac_rise_at_p90:.0f}%), maximum {fmt_num(r.needed_max)}; "
                    f"{100 * r.frac_unfixable:.0f}% cannot be fixed by it. How: {r.note}.")
        items.append("First-order prediction — " + text)
    body.append(_ul(items))
    shown = ["remedy", "current", "n_applicable", "n_needing", "frac_rise_now", "needed_median", "needed_p90",
             "needed_max", "frac_rise_at_median", "frac_rise_at_p90", "frac_unfixable"]
    body.append(table_html(rm[rm["applicable"]][shown]))
    for r in rm[~rm["applicable"]].itertuples():
        body.append(para(f"{r.parameter}: {r.note}.", "note"))
    return Section("remedies", title, "\n".join(body))


def config_section(config: Mapping, *, version: str, files: pd.DataFrame, notes: Sequence[str]) -> Section:
    """Section ``config``: tool version, writer, the tables with their row counts (``files``), the
    ``notes`` about damaged optional inputs, and config.json."""
    body = [para(x) for x in (f"dynamics version: {version}", f"writer: {config.get('writer', 'unknown')}",
                              f"config version: {config.get('version')}")]
    if config.get("upgraded_from"):
        body.append(para(f"Note: this config.json was written in version {config['upgraded_from']} and upgraded to "
                         f"version {config.get('version')} on reading (recorder settings regrouped); the file itself "
                         "was not changed.", "missing"))
    if len(files):
        body.append("<h3>Tables</h3>" + table_html(files))
    for note in notes:
        body.append(para(note, "missing"))
    body.append("<h3>config.json</h3><pre>" + html.escape(json.dumps(dict(config), indent=2, sort_keys=True,
                                                                    default=str)) + "</pre>")
    return Section("config", "8. Configuration", "\n".join(body))


# ============================================================================ the screening page

def screen_sections(table: pd.DataFrame, quantiles: pd.DataFrame, top: pd.DataFrame, cases: pd.DataFrame,
                    n_top: int) -> list[Section]:
    """The sections ``distribution``, ``at-risk``, ``cases`` of the screening page."""
    figs, n = figures_html([(lambda: plot_screen(table), "distributions of the screening scores")], True)
    return [
        Section("distribution", f"1. Distribution over {len(table)} pairs",
                para("Quantiles of each score (higher ches_norm: likelier displacement of the chosen response; "
                     "cos_wl: cosine of the two responses' gradients at θ₀; pred_dw: predicted one-step change of "
                     "the chosen log-prob from the pair's own gradient).") + table_html(quantiles, index=True)
                + f'<div class="figs">{figs}</div>', figures=n),
        Section("at-risk", f"2. The {n_top} pairs most at risk (highest ches_norm)", table_html(top)),
        Section("cases", "3. Predicted case per pair (first order, the pair's own gradient)",
                table_html(cases.rename(columns={"count": "pairs"}))),
    ]
