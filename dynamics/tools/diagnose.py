"""Why did my chosen log-prob fall? A one-file HTML report of a run directory.

`diagnose(run_dir)` reads what `dynamics train` or `DynamicsCallback` recorded (``config.json``,
``records.parquet`` and the optional tables) and writes ``RUN_DIR/report.html``: one self-contained
page (inline CSS, figures as ``data:image/png`` URIs, no script, no network) whose every number is
computed by one of the small pure functions below, so that each can be tested on its own.

The mathematics (``docs/math.md`` §2–§4; "eq." numbers are seed 004's). A loss contributes
coefficients ``d_w = ∂(−ℓ)/∂lw``, ``d_l = ∂ℓ/∂ll`` (eq. 8), so one SGD step of size η on one pair
moves θ by ``Δθ = η (d_w g_w − d_l g_l)`` and, to first order (§3, eq. 5)::

    Δlw ≈ pred_dw = η ( d_w ‖g_w‖² − d_l ⟨g_w,g_l⟩ )                               (the pair's own gradient)
    chosen rises  ⇔  ⟨g_w,g_l⟩ ≤ thr_w = (d_w/d_l) ‖g_w‖²   (d_l > 0; flipped if d_l < 0)    (eq. 9)
    rejected falls ⇔ ⟨g_w,g_l⟩ ≤ thr_l = (d_l/d_w) ‖g_l‖²                                    (eq. 10)

The recorded ``thr_w`` is in units of the inner product (as `dynamics.core.conditions.predict`
returns it); in cosine units it is ``thr_w / (‖g_w‖‖g_l‖)`` (column ``cos_thr_w``), and
``cos_wl > cos_thr_w ⇔ ⟨g_w,g_l⟩ > thr_w``. A pair-step is *entangled* when eq. 9 fails: its own
gradient lowers its chosen log-prob although the loss pushes it up (d_w > 0).

Real training is batched and uses an optimizer, so the recorder also stores the exact first-order
effect of the *real* update, ``upd_dw = ⟨g_w, Δθ⟩`` (§4, a jvp), and the actual change ``act_dw``.
Every observed fall (``act_dw < 0``) is attributed (`pair_steps`, column ``cause``) by comparing
the three:

- ``own``: ``upd_dw < 0`` and ``pred_dw < 0`` — the pair's own gradient already predicts the fall
  (gradient entanglement, eq. 9 violated);
- ``others``: ``upd_dw < 0`` but ``pred_dw ≥ 0`` — the pair's own gradient would raise it, the
  rest of the real update (other pairs of the batch, Adam's preconditioning and momentum, weight
  decay) lowers it;
- ``curvature``: ``upd_dw ≥ 0`` yet ``act_dw < 0`` — the first-order effect of the update is a
  rise; the fall is the O(‖Δθ‖²) remainder (a step too large for the linearization);
- ``unknown``: ``upd_dw`` not recorded.

Remedies (`remedies`), first-order predictions from the same recorded gradients. The sign of
``pred_dw`` is that of ``d_w ‖g_w‖² − d_l ⟨g_w,g_l⟩`` (η > 0), so a change of the loss acts only
through its new ``(d_w, d_l)``:

- DPO, R-DPO: ``d_w = d_l = β σ(·) > 0``, so the sign is that of ``‖g_w‖² − ⟨g_w,g_l⟩`` for every β
  (and α); SimPO: ``d_w/d_l = |y_l|/|y_w|`` for every β, γ. No such hyper-parameter can help.
- an added chosen NLL term ``−λ·lw`` adds λ to d_w: the change is positive iff
  ``λ > λ* = (d_l ⟨g_w,g_l⟩ − d_w ‖g_w‖²)/‖g_w‖²`` (`nll_lambda`, clipped at 0); the token-mean
  form ``−λ·lw/|y_w|`` adds λ/|y_w|, so its threshold is ``|y_w|·λ*``;
- DPOP (Pal et al., penalty inside σ): ``d_w = βS(z)(1 + λ[lw < rw])``, ``d_l = βS(z)``, so where
  the chosen log-prob is below the reference ``d_w/d_l = 1 + λ`` and the change is positive iff
  ``λ > ⟨g_w,g_l⟩/‖g_w‖² − 1`` (`dpop_lambda`); where it is not, λ has no effect.

Tests check these thresholds against `dynamics.core.losses.compute_loss` on the modified loss
followed by `dynamics.core.conditions.predict` (the predicted change is 0 at the threshold).

Optional tables, each read when present (a section says what is missing and which flag records it):

- ``train_records.parquet`` (``dynamics train --in-run``, the callback's ``in_run``): the *training*
  pairs of every optimizer step with their own SGD-form step (`train_pair_steps`, `train_step_table`,
  `train_cos_distribution`, `train_top_falls`, `missing_entries`, `train_summary`): whether the pairs
  the update is made of are themselves in the gradient-entanglement case (their own chosen falls);
- ``contributions.parquet`` (``dynamics train --cross``, docs/math.md §4.1): each probe response's
  ⟨g_o, Δθ⟩ split over the training pairs of the step, ``upd = Σ_u contribution + residual``
  (`probe_falls`, `fall_contributors`, `train_pair_pushes`, `contribution_split`): for every fall of
  a probe's chosen log-prob, which training pairs pushed it down, and the split own step / other
  training pairs / residual (momentum, weight decay, rounding) / beyond first order (act − upd);
- ``attributions.parquet`` (``dynamics attribute``): integrated-gradients token attributions, each
  (pair, target) checked for convergence (`attribution_reliability`: |δ| > 0.1·|gap| is not
  converged, its ranking is shown greyed under a warning).

The tables of these optional sections, and the column groups and helpers every table shares, are
in `dynamics.tools.diagnose_tables` (re-exported here). The page itself is laid out by
`dynamics.tools.report_html`: these modules compute, that one renders.
"""
from __future__ import annotations

import importlib.metadata
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from dynamics.core.conditions import CASES
from dynamics.core.losses import LOSSES, resolve_hyper
from dynamics.errors import InputError
from dynamics.runs.rundir import RunDir, atomic_write_bytes, read_config
from dynamics.tools import report_html as H
from dynamics.tools.report_html import Report, Section, fmt_frac, fmt_num
from dynamics.tools.diagnose_tables import (ATTRIBUTION_TOLERANCE, attribution_reliability, contribution_split, eq9,
                                            fall_contributors, missing_entries, prepared_records, probe_falls,
                                            top_attributions, train_cos_distribution, train_pair_pushes,
                                            train_pair_steps, train_step_table, train_summary, train_top_falls)

__all__ = [
    "SECTION_IDS", "SCREEN_SECTION_IDS", "screen_report", "CAUSES", "REMEDY_COLUMNS", "ATTRIBUTION_TOLERANCE",
    "Section", "Report", "RunData", "load_run", "build_report", "diagnose",
    "pair_steps", "pair_changes", "intervals", "falling_ranges", "case_table", "verdict", "drivers",
    "screen_correlations", "token_segments", "whatif_summary", "nll_lambda", "dpop_lambda", "remedies",
    "train_pair_steps", "train_step_table", "train_cos_distribution", "train_top_falls", "missing_entries",
    "train_summary", "probe_falls", "fall_contributors", "train_pair_pushes", "contribution_split",
    "attribution_reliability", "top_attributions",
]

SECTION_IDS = ("verdict", "drivers", "contributions", "inrun", "tokens", "whatif", "remedies", "config")
"""The ``id`` of every section of the report, in page order."""

CAUSES = {
    "own": "the pair's own gradient (gradient entanglement: eq. 9 violated, pred_dw < 0)",
    "others": "the rest of the real update (other pairs of the batch / the optimizer), "
              "not the pair's own gradient (pred_dw ≥ 0 but ⟨g_w,Δθ⟩ < 0)",
    "curvature": "beyond first order (⟨g_w,Δθ⟩ ≥ 0 but the log-prob fell: the step is too large "
                 "for the linearization)",
    "unknown": "⟨g_w,Δθ⟩ was not recorded, so own gradient and rest of the update cannot be told apart",
}
"""Attribution of an observed fall of the chosen log-prob (`pair_steps` column ``cause``)."""
CAUSE_SHORT = {"own": "the pair's own gradient", "others": "the rest of the update", "curvature": "higher order",
               "unknown": "unknown"}

REQUIRED_COLUMNS = ("step", "pair_id", "logp_w", "logp_l")
OPTIONAL_REQUIRED = {"train_records": ("step", "pair_id", "pred_dw", "case_pred"),
                     "contributions": ("step", "pair_id", "response", "train_pair", "contribution"),
                     "attributions": ("pair_id", "token", "attribution")}
"""Columns without which an optional table is not shown (a note says so)."""
BETA_FREE = {"dpo": "β", "rdpo": "β or α", "simpo": "β or γ"}  # d_w/d_l does not depend on these
NLL_LOSSES = ("cpo", "rrhf", "slic", "sft")  # losses with a −λ·lw (or −λ·lw/|y_w|) term of weight lam (sft: 1)


# ============================================================================ loading

@dataclass
class RunData:
    """Everything the report reads from a run directory. Optional tables are None when absent;
    ``notes`` holds problems with optional inputs (e.g. a damaged optional table), ``table_notes``
    the same by table name."""

    path: Path
    config: dict
    records: pd.DataFrame
    whatif: pd.DataFrame | None = None
    token_decomp: pd.DataFrame | None = None
    token_grams: list[Path] = field(default_factory=list)
    screen: pd.DataFrame | None = None
    attributions: pd.DataFrame | None = None
    train: pd.DataFrame | None = None
    train_records: pd.DataFrame | None = None
    contributions: pd.DataFrame | None = None
    notes: list[str] = field(default_factory=list)
    table_notes: dict[str, str] = field(default_factory=dict)

    @property
    def loss(self) -> str:
        return str(self.config.get("loss") or "")

    @property
    def loss_params(self) -> dict:
        return dict(self.config.get("loss_params") or {})


def load_run(run_dir: str | Path) -> RunData:
    """Read and check a run directory; every problem with a required input is an `InputError`
    raised here, before any computation: not a directory, no (or an unreadable, or a newer)
    ``config.json``, no ``records.parquet`` or one without rows or without the columns
    ``step, pair_id, logp_w, logp_l``. Optional tables that are damaged become a note."""
    path = Path(run_dir)
    hint = "pass a run directory written by `dynamics train` or DynamicsCallback"
    if not path.exists():
        raise InputError(f"{path} does not exist; {hint}")
    if not path.is_dir():
        raise InputError(f"{path} is a file, not a run directory; {hint}")
    config = read_config(path)                          # InputError: missing, unreadable, newer version
    run = RunDir(path)
    records = run.table("records")                      # InputError: damaged
    if records.empty:
        raise InputError(f"{path} has no recorded step (records.parquet is missing or empty): the run stopped "
                         f"before its first recording (steps 0, eval_every, ...); nothing to diagnose")
    missing = [c for c in REQUIRED_COLUMNS if c not in records]
    if missing:
        raise InputError(f"{path / 'records.parquet'} lacks the columns {missing}; it was not written by the "
                         f"dynamics recorder")
    data = RunData(path=path, config=config, records=records)
    for name in ("whatif", "token_decomp", "screen", "attributions", "train", "train_records", "contributions"):
        try:
            table = run.table(name)
        except InputError as e:
            data.notes.append(str(e))
            data.table_notes[name] = str(e)
            continue
        lacks = [c for c in OPTIONAL_REQUIRED.get(name, ()) if c not in table]
        if not table.empty and lacks:
            note = f"{path / (name + '.parquet')} lacks the columns {lacks}; it is not shown"
            data.notes.append(note)
            data.table_notes[name] = note
            continue
        setattr(data, name, None if table.empty else table)
    data.token_grams = sorted((path / "token_grams").glob("step*.npz"))
    return data


# ============================================================================ pure analyses

def pair_steps(records: pd.DataFrame) -> pd.DataFrame:
    """The rows of ``records`` with recorded gradients (``ip_wl`` and ``thr_w`` not NaN), one per
    (step, pair), with three added columns:

    - ``entangled`` (bool): eq. 9 fails, the pair's own gradient lowers its chosen log-prob:
      ``⟨g_w,g_l⟩ > thr_w`` when ``d_l ≥ 0`` (thr_w = ±inf when d_l = 0), ``< thr_w`` when ``d_l < 0``;
      equivalently ``d_w‖g_w‖² − d_l⟨g_w,g_l⟩ < 0``;
    - ``cos_thr_w``: eq. 9 in cosine units, ``thr_w/√(‖g_w‖²‖g_l‖²)``;
    - ``cause``: for an observed fall (``act_dw < 0``) one key of `CAUSES`, else ``""``.
    """
    df = prepared_records(records)
    g = df[df["ip_wl"].notna() & df["thr_w"].notna()].reset_index(drop=True)
    g["entangled"], g["cos_thr_w"] = eq9(g)
    act, upd, pred = (g[c].to_numpy(float) for c in ("act_dw", "upd_dw", "pred_dw"))
    fell = act < 0
    g["cause"] = np.select([~fell, np.isnan(upd), upd >= 0, pred < 0], ["", "unknown", "curvature", "own"],
                           default="others")
    return g


def pair_changes(records: pd.DataFrame) -> pd.DataFrame:
    """Per pair (index ``pair_id``) the change from the first to the last recorded step of the
    run: ``logp_w_first, logp_w_last, dlogp_w``, the same for ``logp_l`` and ``margin``. Pairs
    absent at either step are left out."""
    df = prepared_records(records)
    first, last = df["step"].min(), df["step"].max()
    cols = ["logp_w", "logp_l", "margin"]
    a = df[df["step"] == first].set_index("pair_id")[cols]
    b = df[df["step"] == last].set_index("pair_id")[cols]
    common = a.index.intersection(b.index, sort=False)
    out = pd.DataFrame(index=pd.Index(common, name="pair_id"))
    for c in cols:
        out[f"{c}_first"] = a.loc[common, c].to_numpy(float)
        out[f"{c}_last"] = b.loc[common, c].to_numpy(float)
        out[f"d{c}"] = out[f"{c}_last"] - out[f"{c}_first"]
    return out


def intervals(records: pd.DataFrame) -> pd.DataFrame:
    """One row per pair of consecutive recorded steps ``step → next_step``: the mean over pairs of
    the state change ``dlogp_w, dlogp_l, dmargin`` between them (pairs present at both), the number
    of pairs whose chosen log-prob fell (``pairs_fell``), and the means at ``step`` of the one
    optimizer step that follows it: observed ``act_dw``, real-update ``upd_dw`` = ⟨g_w,Δθ⟩ and the
    pair's own SGD-form ``pred_dw``. With ``eval_every = 1`` ``dlogp_w`` equals ``act_dw``."""
    df = prepared_records(records)
    steps = sorted(df["step"].unique())
    rows = []
    for s, t in zip(steps[:-1], steps[1:]):
        a = df[df["step"] == s].set_index("pair_id")
        b = df[df["step"] == t].set_index("pair_id")
        common = a.index.intersection(b.index, sort=False)
        d = {c: (b.loc[common, c] - a.loc[common, c]).astype(float) for c in ("logp_w", "logp_l", "margin")}
        rows.append(dict(step=int(s), next_step=int(t), n_pairs=len(common),
                         dlogp_w=float(d["logp_w"].mean()), dlogp_l=float(d["logp_l"].mean()),
                         dmargin=float(d["margin"].mean()), pairs_fell=int((d["logp_w"] < 0).sum()),
                         act_dw=float(a["act_dw"].mean()), upd_dw=float(a["upd_dw"].mean()),
                         pred_dw=float(a["pred_dw"].mean())))
    cols = ["step", "next_step", "n_pairs", "dlogp_w", "dlogp_l", "dmargin", "pairs_fell", "act_dw", "upd_dw",
            "pred_dw"]
    return pd.DataFrame(rows, columns=cols)


def falling_ranges(iv: pd.DataFrame, column: str = "dlogp_w") -> list[tuple[int, int]]:
    """Maximal runs of consecutive `intervals` rows whose ``column`` is < 0, as ``(first step,
    last step)``: intervals 4→5, 5→6, 6→7, 7→8 falling give ``[(4, 8)]``."""
    out: list[tuple[int, int]] = []
    for r in iv[iv[column] < 0].itertuples():
        if out and out[-1][1] == r.step:
            out[-1] = (out[-1][0], int(r.next_step))
        else:
            out.append((int(r.step), int(r.next_step)))
    return out


def case_table(records: pd.DataFrame) -> pd.DataFrame:
    """Counts of pair-steps by predicted case (rows, ``case_pred``: the pair's own SGD-form step)
    and observed case (columns, ``case_obs``: the actual change), over pair-steps with both;
    every case of `CASES` is a row and a column (zeros included)."""
    df = prepared_records(records).dropna(subset=["case_pred", "case_obs"])
    cases = list(CASES)
    tab = pd.crosstab(df["case_pred"].astype(int), df["case_obs"].astype(int))
    tab = tab.reindex(index=cases, columns=cases, fill_value=0).astype(int)
    tab.index.name, tab.columns.name = "predicted", "observed"
    return tab


_frac, _num = fmt_frac, fmt_num


def _ranges_text(ranges: Sequence[tuple[int, int]]) -> str:
    return ", ".join(f"{a}→{b}" for a, b in ranges)


def verdict(records: pd.DataFrame, *, train_records: pd.DataFrame | None = None,
            contributions: pd.DataFrame | None = None) -> dict:
    """The answer to "did the chosen log-prob fall, where, and why", from ``records`` (and, when
    given, the in-run ``train_records`` and the per-training-pair ``contributions``).

    Returns a dict:

    - ``steps`` (list), ``first_step``, ``last_step``, ``n_pairs``;
    - ``mean_first``, ``mean_last``, ``mean_change`` (mean over pairs of `pair_changes`'s
      ``dlogp_w``), ``falls`` (True/False, None with < 2 steps), ``pairs_fell``;
    - ``falling_ranges``: `falling_ranges` of `intervals` (state change), ``falling_act_steps``:
      steps whose mean one-step ``act_dw`` is < 0;
    - ``n_grad`` (pair-steps with gradients), ``n_entangled`` (eq. 9 violated, `pair_steps`),
      ``frac_entangled``;
    - ``n_fell``: pair-steps with ``act_dw < 0``; ``causes``: ``{cause: count}``, ``cause_share``:
      ``{cause: share of Σ act_dw over the falls}``, ``cause_steps``: ``{cause: [(pair_id, step)]}``,
      ``primary_cause`` (largest share; None without falls);
    - ``margin_first``, ``margin_last``, ``margin_change`` (means over pairs), ``frac_case2_pred``,
      ``frac_case2_obs``, ``n_case4_obs``; ``upd_sign_agrees``: share of pair-steps where
      ``sign(upd_dw) = sign(act_dw)`` (how far first order explains the observed change);
    - ``train``: `train_summary` of ``train_records`` (None without): whether the training pairs
      themselves are in the gradient-entanglement case;
    - ``contrib``: `contribution_split` of ``contributions`` (None without): the probes' falls split
      into own step / other training pairs / residual / beyond first order;
    - ``sufficient`` (bool) and ``conclusions``: sentences with the numbers, the first of them
      saying when the evidence is insufficient.
    """
    df = prepared_records(records)
    steps = [int(s) for s in sorted(df["step"].unique())]
    pc = pair_changes(df)
    iv = intervals(df)
    ps = pair_steps(df)
    v: dict[str, Any] = dict(steps=steps, first_step=steps[0], last_step=steps[-1],
                             n_pairs=int(df["pair_id"].nunique()))
    first, last = df[df["step"] == steps[0]], df[df["step"] == steps[-1]]
    v["mean_first"], v["mean_last"] = float(first["logp_w"].mean()), float(last["logp_w"].mean())
    v["mean_change"] = float(pc["dlogp_w"].mean()) if len(steps) > 1 and len(pc) else float("nan")
    v["falls"] = None if math.isnan(v["mean_change"]) else bool(v["mean_change"] < 0)
    v["pairs_fell"] = int((pc["dlogp_w"] < 0).sum()) if len(steps) > 1 else 0
    v["falling_ranges"] = falling_ranges(iv)
    act_mean = df.dropna(subset=["act_dw"]).groupby("step")["act_dw"].mean()
    v["falling_act_steps"] = [int(s) for s, x in act_mean.items() if x < 0]
    v["n_grad"], v["n_entangled"] = int(len(ps)), int(ps["entangled"].sum())
    v["frac_entangled"] = v["n_entangled"] / v["n_grad"] if v["n_grad"] else float("nan")
    fell = ps[ps["cause"] != ""]
    v["n_fell"] = int(len(fell))
    v["causes"] = {c: int((fell["cause"] == c).sum()) for c in CAUSES}
    total = float(fell["act_dw"].sum())
    v["cause_share"] = {c: (float(fell.loc[fell["cause"] == c, "act_dw"].sum()) / total if total else float("nan"))
                        for c in CAUSES}
    v["cause_steps"] = {c: [(str(r.pair_id), int(r.step)) for r in fell[fell["cause"] == c].itertuples()]
                        for c in CAUSES}
    v["primary_cause"] = max(CAUSES, key=lambda c: v["cause_share"][c]) if v["n_fell"] else None
    v["margin_first"], v["margin_last"] = float(first["margin"].mean()), float(last["margin"].mean())
    v["margin_change"] = float(pc["dmargin"].mean()) if len(steps) > 1 and len(pc) else float("nan")
    both = df.dropna(subset=["case_pred", "case_obs"])
    v["frac_case2_pred"] = float((both["case_pred"] == 2).mean()) if len(both) else float("nan")
    v["frac_case2_obs"] = float((both["case_obs"] == 2).mean()) if len(both) else float("nan")
    v["n_case4_obs"] = int((both["case_obs"] == 4).sum())
    ua = df.dropna(subset=["upd_dw", "act_dw"])
    v["upd_sign_agrees"] = float((np.sign(ua["upd_dw"]) == np.sign(ua["act_dw"])).mean()) if len(ua) else float("nan")
    v["sufficient"] = len(steps) > 1 and v["n_grad"] > 0
    v["train"] = None if train_records is None or train_records.empty else train_summary(train_records)
    v["contrib"] = (None if contributions is None or contributions.empty
                    else contribution_split(contributions, df))
    v["conclusions"] = _conclusions(v, both_n=len(both), has_upd=bool(df["upd_dw"].notna().any()))
    return v


def _conclusions(v: dict, both_n: int, has_upd: bool) -> list[str]:
    out = []
    if len(v["steps"]) < 2:
        out.append(f"Insufficient evidence: only one recorded step (step {v['first_step']}); whether the chosen "
                   f"log-prob falls needs at least two (record more steps, e.g. a smaller --eval-every).")
    elif v["n_grad"] == 0:
        out.append("Insufficient evidence for a cause: no step has recorded gradients (ip_wl, thr_w), so "
                   "entanglement and the real update cannot be examined.")
    if len(v["steps"]) > 1:
        word = "fell" if v["falls"] else "did not fall"
        out.append(f"The mean chosen log-prob {word}: {_num(v['mean_first'])} at step {v['first_step']} → "
                   f"{_num(v['mean_last'])} at step {v['last_step']} (mean change per pair "
                   f"{_num(v['mean_change'])} nats); it fell for {_frac(v['pairs_fell'], v['n_pairs'])} pairs.")
        if v["falling_ranges"]:
            out.append(f"The mean fell over the recorded steps {_ranges_text(v['falling_ranges'])}"
                       + (f"; the one-step change act_dw was negative at steps {v['falling_act_steps']}."
                          if v["falling_act_steps"] else "."))
        out.append(f"The mean log-ratio margin went from {_num(v['margin_first'])} to {_num(v['margin_last'])} "
                   f"(change {_num(v['margin_change'])})"
                   + ("; the margin shrank." if v["margin_change"] < 0 else "."))
    if v["n_grad"]:
        out.append(f"Gradient entanglement: ⟨g_w,g_l⟩ exceeded the eq. 9 threshold thr_w (cos_wl above "
                   f"cos_thr_w) in {_frac(v['n_entangled'], v['n_grad'])} pair-steps, where the pair's own "
                   f"gradient lowers its chosen log-prob.")
    if both_n:
        out.append(f"Both log-probs fell (case 2) in {100 * v['frac_case2_obs']:.0f}% of the {both_n} pair-steps "
                   f"observed, {100 * v['frac_case2_pred']:.0f}% predicted by the pairs' own gradients"
                   + (f"; the margin shrank with w↓ l↑ (case 4) in {v['n_case4_obs']}." if v["n_case4_obs"] else "."))
    if v["n_fell"]:
        parts = [f"{v['causes'][c]} to {CAUSE_SHORT[c]} ({100 * v['cause_share'][c]:.0f}% of the summed fall)"
                 for c in CAUSES if v["causes"][c]]
        out.append(f"Of the {v['n_fell']} pair-steps where the chosen log-prob fell (act_dw < 0): " + "; ".join(parts)
                   + f". Mostly: {CAUSES[v['primary_cause']]}.")
        if v["causes"]["others"] and v["contrib"] is None:
            out.append("Note: the probe pairs of `dynamics train` and of the callback are held out from training, so "
                       "a probe pair's own gradient is never part of the real update: pred_dw says what a step on that "
                       "pair alone would do, and a fall 'from the rest of the update' is the training pairs' update "
                       "reaching the probe through shared parameters. Which training pairs pushed it needs the "
                       "per-training-pair split (`dynamics train --cross`: contributions.parquet).")
        if not has_upd:
            out.append("Insufficient evidence to separate the pair's own gradient from the rest of the update: "
                       "upd_dw = ⟨g_w,Δθ⟩ was not recorded.")
        elif not math.isnan(v["upd_sign_agrees"]):
            out.append(f"First order explains the observed sign: sign(⟨g_w,Δθ⟩) = sign(act_dw) in "
                       f"{100 * v['upd_sign_agrees']:.0f}% of pair-steps.")
    elif v["n_grad"] and has_upd:
        out.append("No recorded optimizer step lowered a chosen log-prob (act_dw ≥ 0 everywhere).")
    if v["contrib"] is not None and v["contrib"]["n_falls"]:
        out += v["contrib"]["sentences"]
        if v["contrib"]["held_out"] and v["n_fell"] and v["causes"]["own"]:
            out.append("Reading the causes above for held-out probe pairs: 'the pair's own gradient' means that a "
                       "step on the probe itself would lower its chosen log-prob too (its gradients are entangled, "
                       "eq. 9); the update that lowered it was made of the training pairs, as split here.")
    if v["train"] is not None:
        t = v["train"]["sentence"]
        out.append("Training pairs (train_records.parquet, every optimizer step): " + t[0].lower() + t[1:])
        if v["train"]["upd_sentence"]:
            out.append(v["train"]["upd_sentence"])
    return out


def drivers(records: pd.DataFrame, k: int = 5, screen: pd.DataFrame | None = None) -> pd.DataFrame:
    """The ``k`` pairs whose chosen log-prob fell most from the first to the last recorded step.

    Columns: ``pair_id``, ``dlogp_w`` (first → last), ``share_of_fall`` (dlogp_w / the sum over all
    falling pairs), ``logp_w_first``, ``logp_w_last``, ``dlogp_l``, ``mean_cos_wl`` (over the pair's
    steps with gradients), ``frac_case2`` (share of the pair's steps observed in case 2),
    ``frac_entangled`` (share violating eq. 9); with ``screen`` (a `dynamics.core.screen.screen_pairs`
    table) also ``ches``, ``ches_norm``, ``edit_distance`` where present. Rising pairs are not listed.
    """
    pc = pair_changes(records)
    fall = pc[pc["dlogp_w"] < 0]
    top = fall.sort_values("dlogp_w", kind="mergesort").head(k)
    ps = pair_steps(records).groupby("pair_id")
    obs = prepared_records(records).dropna(subset=["case_obs"]).groupby("pair_id")["case_obs"]
    out = pd.DataFrame({"pair_id": top.index.astype(str), "dlogp_w": top["dlogp_w"].to_numpy(),
                        "share_of_fall": (top["dlogp_w"] / fall["dlogp_w"].sum()).to_numpy(),
                        "logp_w_first": top["logp_w_first"].to_numpy(), "logp_w_last": top["logp_w_last"].to_numpy(),
                        "dlogp_l": top["dlogp_l"].to_numpy()})
    out["mean_cos_wl"] = out["pair_id"].map(ps["cos_wl"].mean()).astype(float)
    out["frac_case2"] = out["pair_id"].map(obs.apply(lambda c: float((c == 2).mean()))).astype(float)
    out["frac_entangled"] = out["pair_id"].map(ps["entangled"].mean()).astype(float)
    if screen is not None and "pair_id" in screen:
        s = screen.assign(pair_id=screen["pair_id"].astype(str)).drop_duplicates("pair_id").set_index("pair_id")
        for c in ("ches", "ches_norm", "edit_distance"):
            if c in s:
                out[c] = out["pair_id"].map(s[c])
    return out


def screen_correlations(screen: pd.DataFrame, records: pd.DataFrame) -> pd.DataFrame:
    """Spearman correlation of each pre-training screening score present in ``screen`` (of
    `dynamics.core.screen.RANK_SCORES`) with the realized chosen change ``dlogp_w`` of
    `pair_changes` (`dynamics.core.screen.rank_correlation`). Columns ``score``, ``spearman``,
    ``n_pairs``. A score that predicts the fall has a negative correlation."""
    from dynamics.core.screen import RANK_SCORES, rank_correlation  # only when a screen table exists

    realized = pair_changes(records)["dlogp_w"]
    table = screen.assign(pair_id=screen["pair_id"].astype(str))
    scores = [s for s in RANK_SCORES if s in table]
    corr = rank_correlation(table, realized, scores=scores)
    n = len(set(table["pair_id"]) & set(realized.dropna().index))
    return pd.DataFrame({"score": scores, "spearman": [corr[s] for s in scores], "n_pairs": n})


def token_segments(token_decomp: pd.DataFrame) -> pd.DataFrame:
    """Theorem 3 of seed 004 per recorded step: the predicted token changes of ``token_decomp``
    summed before / at / after the first differing token m. Columns ``pair_id, step, response,
    m, before, at, after, total`` (one row per pair, step and response; an absent segment is 0)."""
    df = token_decomp.assign(pair_id=token_decomp["pair_id"].astype(str))
    sums = df.pivot_table(index=["pair_id", "step", "response", "m"], columns="segment", values="pred",
                          aggfunc="sum", fill_value=0.0)
    sums = sums.reindex(columns=["before", "at", "after"], fill_value=0.0)
    sums["total"] = sums.sum(axis=1)
    out = sums.reset_index()
    out.columns.name = None
    return out.sort_values(["pair_id", "step", "response"], kind="mergesort").reset_index(drop=True)


def whatif_summary(whatif: pd.DataFrame) -> pd.DataFrame:
    """Per loss of the zoo (``whatif.parquet``: the same recorded gradients under each loss at its
    default hyper-parameters): ``n`` pair-steps, ``frac_rise`` (share with predicted dlogp_w > 0),
    ``frac_case1``, ``frac_case2``, ``median_dlogp_w``; sorted by ``frac_rise`` descending. A
    first-order, SGD-form prediction on each pair's own gradient."""
    df = whatif.dropna(subset=["dlogp_w"])
    g = df.groupby("loss")
    out = pd.DataFrame({"n": g.size(), "frac_rise": g["dlogp_w"].apply(lambda d: float((d > 0).mean())),
                        "frac_case1": g["case"].apply(lambda c: float((c == 1).mean())),
                        "frac_case2": g["case"].apply(lambda c: float((c == 2).mean())),
                        "median_dlogp_w": g["dlogp_w"].median()})
    out = out.reset_index().sort_values(["frac_rise", "loss"], ascending=[False, True], kind="mergesort")
    return out.reset_index(drop=True)


def _rise(d_w, d_l, ip, sq_w) -> np.ndarray:
    """Whether the SGD-form chosen change η(d_w‖g_w‖² − d_l⟨g_w,g_l⟩) is > 0 (η > 0)."""
    return (np.asarray(d_w) * np.asarray(sq_w) - np.asarray(d_l) * np.asarray(ip)) > 0


def nll_lambda(records: pd.DataFrame) -> pd.Series:
    """Per pair-step (rows of `pair_steps`, same order) the threshold weight of an *added* chosen
    NLL term ``−λ·log π(y_w|x)`` (summed over tokens): it adds λ to d_w, so the SGD-form change
    ``η((d_w + λ)‖g_w‖² − d_l⟨g_w,g_l⟩)`` is positive iff ``λ > λ*``, with

        λ* = max(0, (d_l⟨g_w,g_l⟩ − d_w‖g_w‖²) / ‖g_w‖²) = max(0, d_l·ip_wl/sq_w − d_w).

    NaN where ‖g_w‖² = 0 (no λ changes a zero gradient's effect). For the token-mean form
    ``−λ·log π(y_w|x)/|y_w|`` multiply by ``len_w``."""
    ps = pair_steps(records)
    sq = ps["sq_w"].to_numpy(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        need = (ps["d_l"] * ps["ip_wl"]).to_numpy(float) / sq - ps["d_w"].to_numpy(float)
        lam = np.where(sq > 0, np.maximum(0.0, need), np.nan)
    return pd.Series(lam, index=ps.index, name="lambda_nll")


def dpop_lambda(records: pd.DataFrame) -> pd.Series:
    """Per pair-step (rows of `pair_steps`) the threshold λ of DPOP (Pal et al., penalty inside σ,
    the ``dpop`` loss with ``variant="inside"``) for a DPO-form run (DPO or DPOP): where the chosen
    log-prob is below its reference (``logp_w < ref_w``), ``d_w = βS(z)(1+λ)``, ``d_l = βS(z)`` with
    ``βS(z) > 0``, so the change is positive iff ``(1+λ)‖g_w‖² > ⟨g_w,g_l⟩``, i.e.

        λ > λ* = max(0, ip_wl/sq_w − 1).

    NaN where the penalty is inactive (``logp_w ≥ ref_w``: DPOP = DPO there, λ has no effect) or
    ‖g_w‖² = 0."""
    ps = pair_steps(records)
    sq, ip = ps["sq_w"].to_numpy(float), ps["ip_wl"].to_numpy(float)
    active = (ps["logp_w"] < ps["ref_w"]).to_numpy() & (sq > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        lam = np.where(active, np.maximum(0.0, ip / sq - 1.0), np.nan)
    return pd.Series(lam, index=ps.index, name="lambda_dpop")


REMEDY_COLUMNS = ["remedy", "parameter", "applicable", "current", "n", "n_applicable", "n_needing", "frac_rise_now",
                  "needed_median", "needed_p90", "needed_max", "frac_rise_at_median", "frac_rise_at_p90",
                  "frac_unfixable", "note"]


def remedies(records: pd.DataFrame, loss: str, loss_params: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """The nearest changes to the run's loss that would raise the chosen log-prob, each a
    first-order SGD-form prediction from the recorded ``d_w, d_l, ip_wl, sq_w`` (module docstring).

    One row per remedy (columns `REMEDY_COLUMNS`): ``beta`` (for dpo, rdpo, simpo: no value
    changes the sign), ``nll_sum`` (add / raise ``−λ·lw``, `nll_lambda`), ``nll_mean`` (add / raise
    ``−λ·lw/|y_w|``), ``dpop`` (DPOP's λ, `dpop_lambda`, for dpo and dpop runs). ``current`` is the
    run's value of the parameter (0 if the loss has no such term); ``n`` pair-steps with gradients,
    ``n_applicable`` of them where the parameter acts (a finite threshold), ``n_needing`` where the
    threshold (the smallest total value making the change positive) exceeds ``current``;
    ``needed_median``, ``needed_p90``, ``needed_max``: quantiles of the threshold over those
    ``n_needing`` pair-steps (NaN if none); ``frac_rise_at_*``: the share of all ``n`` pair-steps
    whose change is positive with the parameter at that value (a threshold equal to it gives a zero
    change, which does not count); ``frac_unfixable``: share of pair-steps no value of the
    parameter makes rise. A remedy that does not apply to the loss has ``applicable=False`` and the
    reason in ``note``.
    """
    hp = dict(resolve_hyper(loss, loss_params)) if loss in LOSSES else dict(loss_params or {})
    ps = pair_steps(records)
    n = len(ps)
    d_w, d_l = ps["d_w"].to_numpy(float), ps["d_l"].to_numpy(float)
    ip, sq, nw = ps["ip_wl"].to_numpy(float), ps["sq_w"].to_numpy(float), ps["len_w"].to_numpy(float)
    now = _rise(d_w, d_l, ip, sq)
    rise_now = float(now.mean()) if n else float("nan")
    rows = []

    def row(remedy, parameter, applicable, note, current=float("nan"), needed=None, rise_at=None, unfixable=None):
        r = dict(remedy=remedy, parameter=parameter, applicable=applicable, current=current, n=n,
                 n_applicable=0, n_needing=0, frac_rise_now=rise_now, needed_median=float("nan"),
                 needed_p90=float("nan"), needed_max=float("nan"), frac_rise_at_median=float("nan"), frac_rise_at_p90=float("nan"),
                 frac_unfixable=float("nan") if unfixable is None else unfixable, note=note)
        if needed is not None:
            finite = needed[~np.isnan(needed)]
            vals = finite[finite > current]                                      # pair-steps that need a raise
            r["n_applicable"], r["n_needing"] = int(len(finite)), int(len(vals))
            if len(vals):
                r.update(needed_median=float(np.median(vals)), needed_p90=float(np.quantile(vals, 0.9)),
                         needed_max=float(vals.max()))
                r.update(frac_rise_at_median=float(rise_at(r["needed_median"]).mean()),
                         frac_rise_at_p90=float(rise_at(r["needed_p90"]).mean()))
        rows.append(r)

    # β: d_w/d_l independent of β (and α, γ) for these losses
    if loss in BETA_FREE:
        why = ("d_w = d_l" if loss in ("dpo", "rdpo") else "d_w/d_l = |y_l|/|y_w|")
        stuck = float((~now).mean()) if n else float("nan")
        extra = (f"; ‖g_w‖² < ⟨g_w,g_l⟩ (chosen falls for any β) in {_frac(int((sq < ip).sum()), n)} pair-steps"
                 if loss in ("dpo", "rdpo") else "")
        row("beta", BETA_FREE[loss], True, f"{why} for every {BETA_FREE[loss]}: the sign of the chosen change is "
            f"that of ‖g_w‖²·(d_w/d_l) − ⟨g_w,g_l⟩, which no {BETA_FREE[loss]} changes{extra}.",
            current=float(hp.get("beta", float("nan"))), unfixable=stuck)
    else:
        row("beta", "β", False, f"not derived for {loss!r}: its hyper-parameters change d_w/d_l or the coefficients' "
            "sign (see the NLL and what-if rows)")

    # chosen NLL, summed over tokens: d_w += λ
    lam = nll_lambda(records).to_numpy(float)
    has_sum = loss in NLL_LOSSES and hp.get("nll", "sum") == "sum"
    cur = float(hp.get("lam", 1.0)) if has_sum else 0.0
    cur_mean = float(hp.get("lam", 1.0)) if (loss in NLL_LOSSES and hp.get("nll") == "mean") else (
        1.0 if loss == "orpo" else 0.0)
    unfix = float(np.isnan(lam).mean()) if n else float("nan")
    row("nll_sum", "λ of −λ·log π(y_w|x)", True,
        ("raise λ" if has_sum else "add the term") + ": it adds λ to d_w; threshold λ* = max(0, d_l·ip_wl/sq_w − d_w) "
        "on top of the current value", current=cur, needed=cur + lam,
        rise_at=lambda v: _rise(d_w + (v - cur), d_l, ip, sq), unfixable=unfix)
    row("nll_mean", "λ of −λ·log π(y_w|x)/|y_w|", True,
        ("raise λ" if cur_mean else "add the term") + ": it adds λ/|y_w| to d_w; threshold |y_w|·λ* on top of the "
        "current value", current=cur_mean, needed=cur_mean + lam * nw,
        rise_at=lambda v: _rise(d_w + (v - cur_mean) / nw, d_l, ip, sq), unfixable=unfix)

    # DPOP (inside σ): d_w/d_l = 1 + λ where logp_w < ref_w
    if loss == "dpo" or (loss == "dpop" and hp.get("variant") == "inside"):
        lam_p = dpop_lambda(records).to_numpy(float)
        cur_p = float(hp.get("lam", 0.0)) if loss == "dpop" else 0.0
        act = (ps["logp_w"] < ps["ref_w"]).to_numpy()
        ratio_rise = lambda v: np.where(act, (1.0 + v) * sq > ip, sq > ip)       # noqa: E731
        row("dpop", "λ of DPOP (penalty inside σ)", True,
            f"acts only where log π(y_w|x) < ref ({_frac(int(act.sum()), n)} pair-steps); there d_w/d_l = 1 + λ, "
            "threshold λ* = max(0, ip_wl/sq_w − 1); elsewhere DPOP = DPO",
            current=cur_p, needed=np.where(np.isnan(lam_p), np.nan, np.maximum(cur_p, lam_p)),
            rise_at=ratio_rise, unfixable=float((~act & ~(sq > ip)).mean()) if n else float("nan"))
    else:
        row("dpop", "λ of DPOP", False, f"not derived for {loss!r}: DPOP's penalty modifies DPO's logit "
            "(use it for dpo or dpop with variant='inside' runs)")
    return pd.DataFrame(rows, columns=REMEDY_COLUMNS)


# ============================================================================ the report

def _tool_version() -> str:
    try:
        return importlib.metadata.version("dynamics")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (the dynamics package is not installed)"


def _parquet_rows(path: Path) -> int | str:
    """Row count from the Parquet footer (nothing else is read); "unreadable" if it cannot be."""
    import pyarrow.parquet as pq

    try:
        return int(pq.ParquetFile(path).metadata.num_rows)
    except Exception:  # pyarrow raises several types for a damaged file
        return "unreadable"


def _latest_grams(files: Sequence[Path], n: int = 3) -> list[tuple[str, int, Path]]:
    """``(pair_id, step, file)`` of the last recorded token Gram of the first ``n`` pairs (by id)."""
    latest: dict[str, tuple[int, Path]] = {}
    for f in files:
        try:
            step, pid = int(f.stem[4:10]), f.stem[11:]
        except ValueError:
            continue
        if pid not in latest or step > latest[pid][0]:
            latest[pid] = (step, f)
    return [(pid, step, f) for pid, (step, f) in sorted(latest.items())[:n]]


def _verdict(data: RunData, records: pd.DataFrame, v: dict, figures: bool) -> Section:
    cause_tab = None
    if v["n_fell"]:
        cause_tab = pd.DataFrame({"cause": list(CAUSES), "pair-steps": [v["causes"][c] for c in CAUSES],
                                  "share of summed fall": [v["cause_share"][c] for c in CAUSES],
                                  "meaning": [CAUSES[c] for c in CAUSES],
                                  "(pair, step)": [", ".join(f"{p}@{s}" for p, s in v["cause_steps"][c][:12])
                                                   + (" …" if len(v["cause_steps"][c]) > 12 else "") for c in CAUSES]})
    case_tab = None
    if v["n_grad"]:
        case_tab = case_table(records)
        case_tab.index = [f"{c} {CASES[c]}" for c in case_tab.index]
        case_tab.columns = [f"{c} {CASES[c]}" for c in case_tab.columns]
    has_grad = bool(v["n_grad"]) and records["cos_wl"].notna().any() and records["upd_dw"].notna().any() \
        and records["act_dw"].notna().any()
    return H.verdict_section(v, intervals(records), cause_tab, case_tab, records, has_grad=has_grad, figures=figures)


def _drivers(data: RunData, records: pd.DataFrame, v: dict, top_k: int) -> Section:
    dr = drivers(records, top_k, data.screen) if len(v["steps"]) > 1 else None
    corr, err = None, None
    if data.screen is not None and len(v["steps"]) > 1:
        try:
            corr = screen_correlations(data.screen, records)
        except InputError as e:
            err = str(e)
    return H.drivers_section(v, dr, has_screen=data.screen is not None, screen_corr=corr, screen_error=err)


def _contributions(data: RunData, records: pd.DataFrame, v: dict, top_k: int) -> Section:
    note = data.table_notes.get("contributions")
    if data.contributions is None:
        return H.contributions_section(None, None, None, None, top_k=top_k, note=note)
    c, tr = data.contributions, data.train_records
    return H.contributions_section(v["contrib"], probe_falls(c, records), fall_contributors(c, records, top_k, tr),
                                   train_pair_pushes(c, records, top_k), top_k=top_k, note=note)


def _inrun(data: RunData, v: dict, top_k: int, figures: bool) -> Section:
    note = data.table_notes.get("train_records")
    tr = data.train_records
    if tr is None:
        return H.inrun_section(None, None, None, None, None, top_k=top_k, figures=figures, note=note)
    return H.inrun_section(v["train"], train_step_table(tr), train_cos_distribution(tr), train_top_falls(tr, top_k),
                           missing_entries(tr), top_k=top_k, figures=figures, note=note)


def _tokens(data: RunData, figures: bool) -> Section:
    seg = token_segments(data.token_decomp) if data.token_decomp is not None else None
    attr = None
    if data.attributions is not None:
        attr = (attribution_reliability(data.attributions), top_attributions(data.attributions, 5))
    return H.tokens_section(seg, _latest_grams(data.token_grams), attributions=attr, figures=figures)


def _whatif(data: RunData, figures: bool) -> Section:
    if data.whatif is None:
        return H.whatif_section(None, None, figures=figures)
    ws = whatif_summary(data.whatif)
    ws.insert(1, "run's loss", ws["loss"] == data.loss)
    return H.whatif_section(ws, data.whatif, figures=figures)


def _remedies(data: RunData, records: pd.DataFrame, v: dict) -> Section:
    kw = dict(loss=data.loss, loss_params=data.loss_params)
    if not pair_steps(records).shape[0]:
        return H.remedies_section(None, **kw)
    try:
        rm = remedies(records, data.loss, data.loss_params)
    except InputError as e:
        return H.remedies_section(None, error=str(e), **kw)
    caution = None
    if v["primary_cause"] in ("others", "curvature"):
        caution = (f"Caution: these remedies act on each pair's own gradient; most of the observed fall "
                   f"({100 * v['cause_share'][v['primary_cause']]:.0f}%) came from {CAUSES[v['primary_cause']]}, "
                   "which they do not address.")
    return H.remedies_section(rm, caution=caution, **kw)


def _config(data: RunData) -> Section:
    files = [(p.name, _parquet_rows(p)) for p in sorted(data.path.glob("*.parquet"))]
    if data.token_grams:
        files.append(("token_grams/*.npz", len(data.token_grams)))
    return H.config_section(data.config, version=_tool_version(), files=pd.DataFrame(files, columns=["file", "rows"]),
                            notes=data.notes)


def build_report(run: str | Path | RunData, *, top_k: int = 5, figures: bool = True) -> Report:
    """The `Report` of a run directory (or of its `load_run` result; sections `SECTION_IDS`).
    Input problems raise `InputError` (`load_run`) before anything is computed; ``figures=False``
    skips the (slower) figures."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise InputError(f"top_k must be an integer >= 1, got {top_k!r}")
    data = run if isinstance(run, RunData) else load_run(run)
    records = prepared_records(data.records)
    v = verdict(records, train_records=data.train_records, contributions=data.contributions)
    sections = [_verdict(data, records, v, figures), _drivers(data, records, v, top_k),
                _contributions(data, records, v, top_k), _inrun(data, v, top_k, figures), _tokens(data, figures),
                _whatif(data, figures), _remedies(data, records, v), _config(data)]
    title = f"Why did the chosen log-prob fall? — {data.path.name or data.path} ({data.loss or 'unknown loss'})"
    return Report(title=title, sections=sections, verdict=v)


def diagnose(run_dir: str | Path, out: str | Path | None = None, *, top_k: int = 5, figures: bool = True) -> Path:
    """Write the diagnosis of ``run_dir`` as one self-contained HTML file and return its path.

    ``out``: the file to write (default ``RUN_DIR/report.html``; an existing directory gets
    ``report.html`` inside). Raises `InputError` for a bad run directory (`load_run`) or an output
    path that cannot be written, before any computation or write. The file is written atomically.
    """
    target = Path(run_dir) / "report.html" if out is None else Path(out)
    if target.is_dir():
        target = target / "report.html"
    data = load_run(run_dir)                                                     # fail fast, before heavy work
    if not target.parent.is_dir():
        raise InputError(f"cannot write {target}: {target.parent} is not a directory")
    text = build_report(data, top_k=top_k, figures=figures).to_html()
    try:
        atomic_write_bytes(target, lambda p: p.write_text(text, encoding="utf-8"))
    except OSError as e:
        raise InputError(f"cannot write {target}: {e}") from e
    return target


# ============================================================================ screening page

SCREEN_SECTION_IDS = ("distribution", "at-risk", "cases")
"""The ``id`` of every section of `screen_report`'s page, in page order."""


def screen_report(table: pd.DataFrame, out: str | Path, *, top: int = 10, title: str = "Pair screening") -> Path:
    """Write the screening table of `dynamics.core.screen.screen_pairs` as one self-contained HTML
    page (sections `SCREEN_SECTION_IDS`): the distribution of ``ches_norm``, ``cos_wl`` and
    ``pred_dw`` with their quantiles, the ``top`` pairs most at risk (highest ``ches_norm``: the
    displacement score of Razin et al.), and the count of pairs per predicted case (`CASES`, from
    the pairs' own gradients at θ₀, a first-order prediction). Returns the path."""
    from dynamics.core.screen import screen_summary

    summary = screen_summary(table, top=top)
    quant = pd.DataFrame(summary["quantiles"]).T                                  # score x (min, q10, ..., max, mean)
    sections = H.screen_sections(table, quant, pd.DataFrame(summary["top"]), pd.DataFrame(summary["cases"]),
                                 min(top, len(table)))
    text = Report(title, sections).to_html()
    target = Path(out)
    if not target.parent.is_dir():
        raise InputError(f"cannot write {target}: {target.parent} is not a directory")
    atomic_write_bytes(target, lambda p: p.write_text(text, encoding="utf-8"))
    return target
