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

The page itself is laid out by `dynamics.tools.report_html`: this module computes, that one renders.
"""
from __future__ import annotations

import importlib.metadata
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from dynamics.core.attribution import CONVERGED_REL
from dynamics.core.conditions import CASES
from dynamics.core.losses import LOSSES, resolve_hyper
from dynamics.errors import InputError
from dynamics.runs.rundir import RunDir, atomic_write_bytes, read_config
from dynamics.tools import report_html as H
from dynamics.tools.report_html import Report, Section, fmt_frac, fmt_num

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

GRAD_COLUMNS = ("ip_wl", "sq_w", "sq_l", "cos_wl", "pred_dw", "pred_dl", "thr_w", "thr_l", "case_pred")
UPDATE_COLUMNS = ("upd_dw", "upd_dl", "act_dw", "act_dl", "case_obs")
STATE_COLUMNS = ("logp_w", "logp_l", "ref_w", "ref_l", "len_w", "len_l", "margin", "d_w", "d_l", "lr")
CONTRIB_COLUMNS = ("contrib_sum_w", "contrib_sum_l", "contrib_resid_w", "contrib_resid_l")
TRAIN_EXTRA_COLUMNS = ("micro", "c_w", "c_l", "upd_dw", "upd_dl")
REQUIRED_COLUMNS = ("step", "pair_id", "logp_w", "logp_l")
OPTIONAL_REQUIRED = {"train_records": ("step", "pair_id", "pred_dw", "case_pred"),
                     "contributions": ("step", "pair_id", "response", "train_pair", "contribution"),
                     "attributions": ("pair_id", "token", "attribution")}
"""Columns without which an optional table is not shown (a note says so)."""
ATTRIBUTION_TOLERANCE = CONVERGED_REL
"""An attribution has not converged when captum's |δ| > ATTRIBUTION_TOLERANCE · |f(x) − f(baseline)|
(the library's one threshold, `dynamics.core.attribution.CONVERGED_REL`)."""
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


def _prepared(records: pd.DataFrame) -> pd.DataFrame:
    """A copy with every column the report reads (missing ones NaN), sorted by step and pair."""
    df = records.copy()
    for c in (*STATE_COLUMNS, *GRAD_COLUMNS, *UPDATE_COLUMNS, *CONTRIB_COLUMNS):
        if c not in df:
            df[c] = np.nan
    df["pair_id"] = df["pair_id"].astype(str)
    return df.sort_values(["step", "pair_id"], kind="mergesort").reset_index(drop=True)


# ============================================================================ pure analyses

def _eq9(g: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """``(entangled, cos_thr_w)`` of rows with ``ip_wl, thr_w, d_l, sq_w, sq_l``: eq. 9 violated
    (``ip > thr_w``, ``<`` when ``d_l < 0``; False where NaN) and its threshold in cosine units."""
    ip, thr, d_l = g["ip_wl"].to_numpy(float), g["thr_w"].to_numpy(float), g["d_l"].to_numpy(float)
    entangled = np.where(d_l < 0, ip < thr, ip > thr)
    norm = np.sqrt(g["sq_w"].to_numpy(float) * g["sq_l"].to_numpy(float))
    with np.errstate(divide="ignore", invalid="ignore"):
        cos_thr = np.where(np.isfinite(thr) & (norm > 0), thr / norm, np.sign(thr) * np.inf)
    return entangled, cos_thr


def pair_steps(records: pd.DataFrame) -> pd.DataFrame:
    """The rows of ``records`` with recorded gradients (``ip_wl`` and ``thr_w`` not NaN), one per
    (step, pair), with three added columns:

    - ``entangled`` (bool): eq. 9 fails, the pair's own gradient lowers its chosen log-prob:
      ``⟨g_w,g_l⟩ > thr_w`` when ``d_l ≥ 0`` (thr_w = ±inf when d_l = 0), ``< thr_w`` when ``d_l < 0``;
      equivalently ``d_w‖g_w‖² − d_l⟨g_w,g_l⟩ < 0``;
    - ``cos_thr_w``: eq. 9 in cosine units, ``thr_w/√(‖g_w‖²‖g_l‖²)``;
    - ``cause``: for an observed fall (``act_dw < 0``) one key of `CAUSES`, else ``""``.
    """
    df = _prepared(records)
    g = df[df["ip_wl"].notna() & df["thr_w"].notna()].reset_index(drop=True)
    g["entangled"], g["cos_thr_w"] = _eq9(g)
    act, upd, pred = (g[c].to_numpy(float) for c in ("act_dw", "upd_dw", "pred_dw"))
    fell = act < 0
    g["cause"] = np.select([~fell, np.isnan(upd), upd >= 0, pred < 0], ["", "unknown", "curvature", "own"],
                           default="others")
    return g


def pair_changes(records: pd.DataFrame) -> pd.DataFrame:
    """Per pair (index ``pair_id``) the change from the first to the last recorded step of the
    run: ``logp_w_first, logp_w_last, dlogp_w``, the same for ``logp_l`` and ``margin``. Pairs
    absent at either step are left out."""
    df = _prepared(records)
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
    df = _prepared(records)
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
    df = _prepared(records).dropna(subset=["case_pred", "case_obs"])
    cases = list(CASES)
    tab = pd.crosstab(df["case_pred"].astype(int), df["case_obs"].astype(int))
    tab = tab.reindex(index=cases, columns=cases, fill_value=0).astype(int)
    tab.index.name, tab.columns.name = "predicted", "observed"
    return tab


_frac, _num = fmt_frac, fmt_num


def _pct(x: float) -> str:
    """``x`` as a whole percentage, "n/a" for NaN, never "-0%"."""
    return "n/a" if x is None or math.isnan(x) else f"{round(100 * x)}%"


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
    df = _prepared(records)
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
    obs = _prepared(records).dropna(subset=["case_obs"]).groupby("pair_id")["case_obs"]
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


# ============================================================================ training pairs (in-run)

def train_pair_steps(train_records: pd.DataFrame) -> pd.DataFrame:
    """The rows of ``train_records.parquet`` (one per optimizer step × micro-batch × training pair),
    sorted by step, micro-batch and pair, every column the report reads present (NaN when not
    recorded), with added columns:

    - ``cos_thr_w``: eq. 9 in cosine units, ``thr_w/√(‖g_w‖²‖g_l‖²)`` (NaN where ⟨g_w,g_l⟩ is missing);
    - ``entangled``: eq. 9 violated (as in `pair_steps`; False where ⟨g_w,g_l⟩ is missing);
    - ``own_fall``: the pair's own SGD-form step with the step's η lowers its chosen log-prob
      (``pred_dw < 0``; False where pred_dw is NaN). With η > 0 and ⟨g_w,g_l⟩ recorded this is
      ``entangled``; with d_l = 0 (no gradient to the rejected response) pred_dw is still exact;
    - ``missing``: an entry is NaN (``missing_reason`` set, or ``case_pred = −1``).
    """
    df = train_records.copy()
    for c in (*STATE_COLUMNS, *GRAD_COLUMNS, *TRAIN_EXTRA_COLUMNS):
        if c not in df:
            df[c] = np.nan
    if "missing_reason" not in df:
        df["missing_reason"] = None
    df["pair_id"] = df["pair_id"].astype(str)
    df = df.sort_values(["step", "micro", "pair_id"], kind="mergesort").reset_index(drop=True)
    has = (df["ip_wl"].notna() & df["thr_w"].notna() & df["sq_w"].notna() & df["sq_l"].notna()).to_numpy()
    entangled, cos_thr = _eq9(df)
    df["cos_thr_w"] = np.where(has, cos_thr, np.nan)
    df["entangled"] = has & entangled
    df["own_fall"] = (df["pred_dw"] < 0).to_numpy()
    df["missing"] = (df["missing_reason"].notna() | (df["case_pred"] < 0)).to_numpy()
    return df


def _cos_rows(tr: pd.DataFrame) -> pd.DataFrame:
    """Rows of `train_pair_steps` with a cosine and a finite cosine threshold."""
    return tr[tr["cos_wl"].notna() & np.isfinite(tr["cos_thr_w"].to_numpy(float))]


def train_step_table(train_records: pd.DataFrame) -> pd.DataFrame:
    """Per optimizer step of ``train_records``: ``n_pairs`` (training pair rows), ``n_missing`` (rows
    with a NaN entry), ``n_case`` (rows with a predicted case), ``frac_case0`` … ``frac_case4``
    (share of those ``n_case`` in each case of `CASES`, the pair's own SGD-form step: Table 1),
    ``mean_cos_wl``, ``q10_cos_wl``, ``q90_cos_wl`` (over the rows with a cosine),
    ``mean_cos_thr_w`` (eq. 9 threshold in cosine form, finite ones), ``frac_above_thr`` (share
    of the rows with a cosine violating eq. 9), ``frac_own_fall`` (share of the rows with a
    prediction whose own step lowers the chosen log-prob), ``frac_upd_fall`` (share with
    ``upd_dw < 0``, only when recorded: ``--in-run-update``) and ``lr``."""
    tr = train_pair_steps(train_records)
    has_upd = bool(tr["upd_dw"].notna().any())
    rows = []
    for s, g in tr.groupby("step", sort=True):
        cased = g[g["case_pred"] >= 0]
        cos = g["cos_wl"].dropna()
        thr = _cos_rows(g)
        pred = g[g["pred_dw"].notna()]
        row = dict(step=int(s), n_pairs=len(g), n_missing=int(g["missing"].sum()), n_case=len(cased))
        for c in CASES:
            row[f"frac_case{c}"] = float((cased["case_pred"] == c).mean()) if len(cased) else float("nan")
        row.update(mean_cos_wl=float(cos.mean()) if len(cos) else float("nan"),
                   q10_cos_wl=float(cos.quantile(0.1)) if len(cos) else float("nan"),
                   q90_cos_wl=float(cos.quantile(0.9)) if len(cos) else float("nan"),
                   mean_cos_thr_w=float(thr["cos_thr_w"].mean()) if len(thr) else float("nan"),
                   frac_above_thr=float(g.loc[g["cos_thr_w"].notna(), "entangled"].mean())
                   if g["cos_thr_w"].notna().any() else float("nan"),
                   frac_own_fall=float(pred["own_fall"].mean()) if len(pred) else float("nan"))
        if has_upd:
            upd = g["upd_dw"].dropna()
            row["frac_upd_fall"] = float((upd < 0).mean()) if len(upd) else float("nan")
        row["lr"] = float(g["lr"].mean())
        rows.append(row)
    return pd.DataFrame(rows)


def train_cos_distribution(train_records: pd.DataFrame) -> pd.DataFrame:
    """Quantiles over all training pair-steps (with a cosine and a finite threshold) of
    ``cos_wl``, of the eq. 9 threshold ``cos_thr_w`` and of the excess ``±(cos_wl − cos_thr_w)``
    (sign flipped where d_l < 0, so that > 0 ⇔ eq. 9 violated ⇔ the pair's own gradient lowers
    its chosen log-prob). Index: the three names; columns ``n, mean, min, q10, median, q90, max,
    frac_positive``."""
    g = _cos_rows(train_pair_steps(train_records))
    sign = np.where(g["d_l"].to_numpy(float) < 0, -1.0, 1.0)
    series = {"cos_wl": g["cos_wl"].astype(float), "cos_thr_w": g["cos_thr_w"].astype(float),
              "excess (cos_wl − cos_thr_w; > 0: own chosen falls)":
                  pd.Series(sign * (g["cos_wl"].to_numpy(float) - g["cos_thr_w"].to_numpy(float)))}
    rows = {}
    for name, x in series.items():
        x = x.dropna()
        q = x.quantile([0.0, 0.1, 0.5, 0.9, 1.0]).to_numpy() if len(x) else [float("nan")] * 5
        rows[name] = dict(n=len(x), mean=float(x.mean()) if len(x) else float("nan"), min=q[0], q10=q[1],
                          median=q[2], q90=q[3], max=q[4],
                          frac_positive=float((x > 0).mean()) if len(x) else float("nan"))
    return pd.DataFrame.from_dict(rows, orient="index")


def train_top_falls(train_records: pd.DataFrame, k: int = 5) -> pd.DataFrame:
    """The ``k`` training pair-steps whose own SGD-form step lowers the chosen log-prob most
    (``pred_dw < 0``, most negative first; ties in step, micro-batch, pair order). Columns
    ``step, micro, pair_id, pred_dw, pred_dl, case_pred, cos_wl, cos_thr_w, d_w, d_l, margin,
    logp_w`` (+ ``upd_dw`` when recorded)."""
    tr = train_pair_steps(train_records)
    top = tr[tr["own_fall"]].sort_values("pred_dw", kind="mergesort").head(k)
    cols = ["step", "micro", "pair_id", "pred_dw", "pred_dl", "case_pred", "cos_wl", "cos_thr_w", "d_w", "d_l",
            "margin", "logp_w"] + (["upd_dw"] if tr["upd_dw"].notna().any() else [])
    out = top[cols].reset_index(drop=True)
    out["case_pred"] = out["case_pred"].astype(int)
    return out


def missing_entries(train_records: pd.DataFrame) -> pd.DataFrame:
    """The training pair-steps with a NaN entry, by ``missing_reason``: ``n``, ``first_step``,
    ``last_step`` and up to five ``pair@step`` examples."""
    tr = train_pair_steps(train_records)
    m = tr[tr["missing"]].assign(reason=lambda d: d["missing_reason"].fillna("(no reason recorded)").astype(str))
    rows = []
    for reason, g in m.groupby("reason", sort=True):
        ex = [f"{r.pair_id}@{int(r.step)}" for r in g.head(5).itertuples()]
        rows.append(dict(missing_reason=reason, n=len(g), first_step=int(g["step"].min()),
                         last_step=int(g["step"].max()), examples=", ".join(ex) + (" …" if len(g) > 5 else "")))
    return pd.DataFrame(rows, columns=["missing_reason", "n", "first_step", "last_step", "examples"])


def train_summary(train_records: pd.DataFrame) -> dict:
    """Are the training pairs themselves in the gradient-entanglement case? Over all rows of
    ``train_records``: ``n_rows``, ``n_steps``; ``n_pred`` rows with a prediction, ``n_own_fall``
    of them whose own step lowers the chosen log-prob, ``frac_own_fall``; ``n_case``, ``n_case2``,
    ``frac_case2`` (both predicted to fall); ``n_cos`` rows with a cosine and finite threshold,
    ``n_entangled`` of them above it, ``mean_cos_wl``, ``mean_cos_thr_w``; ``n_missing`` and
    ``reasons`` ({missing_reason: count}); ``has_upd``, ``n_upd``, ``n_upd_fall`` (upd_dw < 0),
    ``frac_upd_fall``; ``regime``: ``"most"`` (≥ half the pair-steps' own chosen falls), ``"some"``,
    ``"none"`` or ``"unknown"`` (no prediction); ``sentence`` (the answer), ``upd_sentence`` (or
    None) and ``sentences`` (all, for the report)."""
    tr = train_pair_steps(train_records)
    pred, cased, cos = tr[tr["pred_dw"].notna()], tr[tr["case_pred"] >= 0], _cos_rows(tr)
    upd = tr["upd_dw"].dropna()
    s: dict[str, Any] = dict(n_rows=len(tr), n_steps=int(tr["step"].nunique()), n_pred=len(pred),
                             n_own_fall=int(pred["own_fall"].sum()), n_case=len(cased),
                             n_case2=int((cased["case_pred"] == 2).sum()), n_cos=len(cos),
                             n_entangled=int(cos["entangled"].sum()),
                             mean_cos_wl=float(cos["cos_wl"].mean()) if len(cos) else float("nan"),
                             mean_cos_thr_w=float(cos["cos_thr_w"].mean()) if len(cos) else float("nan"),
                             n_missing=int(tr["missing"].sum()), has_upd=bool(len(upd)), n_upd=len(upd),
                             n_upd_fall=int((upd < 0).sum()))
    s["reasons"] = {str(k): int(n) for k, n in
                    tr.loc[tr["missing"], "missing_reason"].fillna("(no reason recorded)").value_counts().items()}
    s["frac_own_fall"] = s["n_own_fall"] / s["n_pred"] if s["n_pred"] else float("nan")
    s["frac_case2"] = s["n_case2"] / s["n_case"] if s["n_case"] else float("nan")
    s["frac_upd_fall"] = s["n_upd_fall"] / s["n_upd"] if s["n_upd"] else float("nan")
    s["regime"] = ("unknown" if not s["n_pred"] else "none" if not s["n_own_fall"]
                   else "most" if s["frac_own_fall"] >= 0.5 else "some")
    own = (f"for {_frac(s['n_own_fall'], s['n_pred'])} training pair-steps the pair's own SGD-form step lowers "
           f"its chosen log-prob (pred_dw < 0: eq. 9 violated); both log-probs fall (case 2) in "
           f"{_frac(s['n_case2'], s['n_case'])}.")
    s["sentence"] = {
        "unknown": "Insufficient evidence about the training pairs: no in-run row has a prediction (every entry "
                   "is missing; see the reasons below).",
        "none": "the training pairs are NOT in the gradient-entanglement case: no training pair's own step lowers its "
                f"chosen log-prob (0/{s['n_pred']} pair-steps); both log-probs fall (case 2) in "
                f"{_frac(s['n_case2'], s['n_case'])}.",
        "some": "some training pairs are in the gradient-entanglement case, most are not: " + own,
        "most": "the training pairs themselves are in the gradient-entanglement case: " + own,
    }[s["regime"]]
    s["sentence"] = s["sentence"][0].upper() + s["sentence"][1:]
    s["upd_sentence"] = (f"The real update lowered the chosen log-prob of {_frac(s['n_upd_fall'], s['n_upd'])} "
                         f"training pair-steps to first order (upd_dw = ⟨g_w, Δθ⟩ < 0, --in-run-update)."
                         if s["n_upd"] else None)
    out = [s["sentence"]]
    if s["n_cos"]:
        out.append(f"Their mean cos(g_w, g_l) is {_num(s['mean_cos_wl'])} against a mean eq. 9 threshold in cosine "
                   f"form of {_num(s['mean_cos_thr_w'])}; the cosine exceeds its threshold in "
                   f"{_frac(s['n_entangled'], s['n_cos'])} pair-steps.")
    if s["upd_sentence"]:
        out.append(s["upd_sentence"])
    else:
        out.append("⟨g_w, Δθ⟩ of the real update on the training pairs was not recorded (--in-run-update).")
    if s["n_missing"]:
        out.append(f"{_frac(s['n_missing'], s['n_rows'])} training pair-steps have missing (NaN) entries, left out "
                   "of the counts that need them: " + "; ".join(f"{n}× {r}" for r, n in s["reasons"].items()) + ".")
    s["sentences"] = out
    return s


# ============================================================================ which training pairs moved the probes

FALL_COLUMNS = ["step", "pair_id", "act_dw", "upd_dw", "sum_contrib", "own", "others", "residual", "higher_order",
                "n_train", "top_train_pair", "top_contribution", "top_share"]


def _chosen_contributions(contributions: pd.DataFrame) -> pd.DataFrame:
    c = contributions.copy()
    for col in ("k_w", "k_l", "c_w", "c_l"):
        if col not in c:
            c[col] = np.nan
    for col in ("pair_id", "train_pair", "response"):
        c[col] = c[col].astype(str)
    c = c[c["response"] == "chosen"]
    return c.sort_values(["step", "pair_id", "train_pair"], kind="mergesort").reset_index(drop=True)


def probe_falls(contributions: pd.DataFrame, records: pd.DataFrame) -> pd.DataFrame:
    """One row per fall of a probe's chosen log-prob (``act_dw < 0`` in ``records``) at a step
    with contributions, largest fall first, columns `FALL_COLUMNS`:

    ``upd_dw`` = ⟨g_w, Δθ⟩ = ``sum_contrib`` + ``residual`` (docs/math.md §4.1); ``sum_contrib``
    = Σ over the step's training pairs = ``own`` (the training pair with the probe's id, if the
    probe was trained on) + ``others``; ``residual`` from records' ``contrib_resid_w`` (else
    upd_dw − sum_contrib): momentum of earlier steps, weight decay, rounding; ``higher_order`` =
    act_dw − upd_dw; ``top_train_pair``, ``top_contribution``: the most negative contribution,
    ``top_share`` = top_contribution / upd_dw."""
    rec = _prepared(records)
    c = _chosen_contributions(contributions)
    if c.empty:
        return pd.DataFrame(columns=FALL_COLUMNS)
    g = c.groupby(["step", "pair_id"], sort=True)
    agg = pd.DataFrame({"sum_contrib": g["contribution"].sum(), "n_train": g["train_pair"].nunique()})
    own = c[c["train_pair"] == c["pair_id"]].groupby(["step", "pair_id"])["contribution"].sum()
    agg["own"] = own.reindex(agg.index).fillna(0.0)
    top = c.loc[g["contribution"].idxmin().to_numpy()]
    agg["top_train_pair"] = top["train_pair"].to_numpy()
    agg["top_contribution"] = top["contribution"].to_numpy(float)
    agg = agg.reset_index()
    falls = rec.loc[rec["act_dw"] < 0, ["step", "pair_id", "act_dw", "upd_dw", "contrib_resid_w"]]
    out = falls.merge(agg, on=["step", "pair_id"], how="inner")
    upd = out["upd_dw"].to_numpy(float)
    out["residual"] = np.where(out["contrib_resid_w"].notna(), out["contrib_resid_w"], upd - out["sum_contrib"])
    out["others"] = out["sum_contrib"] - out["own"]
    out["higher_order"] = out["act_dw"] - out["upd_dw"]
    with np.errstate(divide="ignore", invalid="ignore"):
        out["top_share"] = np.where(upd != 0, out["top_contribution"].to_numpy(float) / upd, np.nan)
    out["n_train"] = out["n_train"].astype(int)
    out = out.sort_values("act_dw", kind="mergesort").reset_index(drop=True)
    return out[FALL_COLUMNS]


def fall_contributors(contributions: pd.DataFrame, records: pd.DataFrame, k: int = 5,
                      train_records: pd.DataFrame | None = None) -> pd.DataFrame:
    """For each fall of `probe_falls` (same order), the ``k`` training pairs of its step with the
    most negative contribution to the probe's chosen change: ``step, pair_id`` (the probe),
    ``train_pair``, ``contribution``, ``share`` (of the probe's upd_dw = ⟨g_w, Δθ⟩; the shares of
    all the step's training pairs and of the residual sum to 1), ``k_w, k_l`` (⟨g_o, g_w,u⟩,
    ⟨g_o, g_l,u⟩), ``c_w, c_l`` (∂L/∂lw_u, ∂L/∂ll_u), ``own`` (the training pair is the probe
    pair itself); with ``train_records`` also the training pair's own SGD-form ``train_pred_dw``
    and ``train_case`` at that step (in-run)."""
    falls = probe_falls(contributions, records)
    cols = ["step", "pair_id", "train_pair", "contribution", "share", "k_w", "k_l", "c_w", "c_l", "own"]
    if falls.empty:
        return pd.DataFrame(columns=cols)
    c = _chosen_contributions(contributions)
    keyed = falls[["step", "pair_id", "upd_dw"]].assign(fall=np.arange(len(falls)))
    m = c.merge(keyed, on=["step", "pair_id"], how="inner")
    m = m.sort_values(["fall", "contribution", "train_pair"], kind="mergesort").groupby("fall").head(k)
    with np.errstate(divide="ignore", invalid="ignore"):
        m["share"] = np.where(m["upd_dw"] != 0, m["contribution"] / m["upd_dw"], np.nan)
    m["own"] = m["train_pair"] == m["pair_id"]
    out = m[cols].reset_index(drop=True)
    if train_records is not None and not train_records.empty:
        tr = train_pair_steps(train_records).drop_duplicates(["step", "pair_id"])
        tr = tr[["step", "pair_id", "pred_dw", "case_pred"]].rename(
            columns={"pair_id": "train_pair", "pred_dw": "train_pred_dw", "case_pred": "train_case"})
        out = out.merge(tr, on=["step", "train_pair"], how="left")
    return out


def train_pair_pushes(contributions: pd.DataFrame, records: pd.DataFrame, k: int = 5) -> pd.DataFrame:
    """Over every recorded step and probe pair (chosen responses), per training pair: ``n_steps``
    (recorded steps it was trained at), ``n_probe_rows`` (probe pair-steps it reached), ``n_down``
    (those its contribution lowered), ``frac_down``, ``sum_down`` (Σ of its negative
    contributions), ``net`` (Σ of all its contributions), ``n_top_fall`` (falls of `probe_falls`
    where it was the most negative contribution). Of the training pairs that lowered at least one
    probe's chosen log-prob (``n_down > 0``), the ``k`` with the most negative ``net`` (ties by name)."""
    c = _chosen_contributions(contributions)
    cols = ["train_pair", "n_steps", "n_probe_rows", "n_down", "frac_down", "sum_down", "net", "n_top_fall"]
    if c.empty:
        return pd.DataFrame(columns=cols)
    c = c.assign(down=c["contribution"] < 0, neg=c["contribution"].where(c["contribution"] < 0, 0.0))
    g = c.groupby("train_pair", sort=True)
    out = pd.DataFrame({"n_steps": g["step"].nunique(), "n_probe_rows": g.size(), "n_down": g["down"].sum(),
                        "sum_down": g["neg"].sum(), "net": g["contribution"].sum()})
    out["frac_down"] = out["n_down"] / out["n_probe_rows"]
    falls = probe_falls(contributions, records)
    tops = falls.loc[falls["top_contribution"] < 0, "top_train_pair"].value_counts()
    out["n_top_fall"] = tops.reindex(out.index).fillna(0).astype(int)
    out = out[out["n_down"] > 0].reset_index().sort_values(["net", "train_pair"], kind="mergesort").head(k)
    out["n_down"] = out["n_down"].astype(int)
    return out[cols].reset_index(drop=True)


def contribution_split(contributions: pd.DataFrame, records: pd.DataFrame) -> dict:
    """The probes' falls split by origin, summed over `probe_falls` (falls whose upd_dw is known):
    ``n_falls``, ``act_sum`` (Σ act_dw), ``upd_sum``, ``parts`` = {``own``: the probe pair's own
    step, ``others``: the other training pairs of the step, ``residual``: momentum of earlier
    steps, weight decay, rounding, ``higher_order``: act − upd} (they sum to ``act_sum``) and
    ``shares`` (each / act_sum); ``held_out`` (no probe pair is a training pair of any step with
    contributions); ``n_uncovered`` (falls at steps without contributions); ``n_probe_steps``;
    ``top`` (the largest single push: step, probe, training pair, contribution, share),
    ``net_top`` / ``often_top`` (`train_pair_pushes` rows: most negative net, most n_down);
    ``sentences``."""
    rec = _prepared(records)
    c = _chosen_contributions(contributions)
    falls = probe_falls(contributions, records)
    ok = falls.dropna(subset=["upd_dw", "residual"])
    covered = set(zip(c["step"].tolist(), c["pair_id"].tolist()))
    all_falls = rec[rec["act_dw"] < 0]
    s: dict[str, Any] = dict(n_falls=len(ok), n_no_upd=len(falls) - len(ok), n_probe_steps=len(covered),
                             n_uncovered=int(sum((int(r.step), r.pair_id) not in covered
                                                 for r in all_falls.itertuples())),
                             held_out=not bool(c["train_pair"].isin(set(c["pair_id"])).any()))
    s["act_sum"], s["upd_sum"] = float(ok["act_dw"].sum()), float(ok["upd_dw"].sum())
    s["parts"] = {p: float(ok[p].sum()) for p in ("own", "others", "residual", "higher_order")}
    s["shares"] = {p: (x / s["act_sum"] + 0.0 if s["act_sum"] else float("nan")) for p, x in s["parts"].items()}
    pushes = train_pair_pushes(contributions, records, k=10 ** 9)
    s["net_top"] = pushes.iloc[0].to_dict() if len(pushes) and pushes["net"].iloc[0] < 0 else None
    often = pushes.sort_values(["n_down", "net"], ascending=[False, True], kind="mergesort")
    s["often_top"] = often.iloc[0].to_dict() if len(often) and often["n_down"].iloc[0] > 0 else None
    top = ok.sort_values("top_contribution", kind="mergesort").head(1)
    s["top"] = (dict(step=int(top["step"].iloc[0]), pair_id=top["pair_id"].iloc[0],
                     train_pair=top["top_train_pair"].iloc[0], contribution=float(top["top_contribution"].iloc[0]),
                     share=float(top["top_share"].iloc[0])) if len(top) else None)
    out = []
    if s["n_falls"]:
        pc = {p: f"{_num(x)} ({_pct(s['shares'][p])})" for p, x in s["parts"].items()}
        out.append(f"Per training pair (contributions.parquet, docs/math.md §4.1), over the {s['n_falls']} probe "
                   f"pair-steps whose chosen log-prob fell (Σ act_dw = {_num(s['act_sum'])}): the probe pair's own "
                   f"step {pc['own']}, the other training pairs of the step {pc['others']}, the residual (momentum "
                   f"of earlier steps, weight decay, rounding) {pc['residual']}, beyond first order (act_dw − upd_dw) "
                   f"{pc['higher_order']}.")
        if any(x < 0 or x > 1 for x in s["shares"].values()):
            out.append("Some parts have the opposite sign of the fall, so the shares (of Σ act_dw) are not all "
                       "within 0–100%: e.g. a first-order push larger than the observed fall, partly undone beyond "
                       "first order.")
        if s["held_out"]:
            out.append(f"The probe pairs are held out from training (none is a training pair of a recorded step), so "
                       f"none of it is their own step: all of the first-order change comes from training pairs — "
                       f"{_pct(s['shares']['others'])} from the training pairs of the step itself, "
                       f"{_pct(s['shares']['residual'])} the residual (earlier steps' training pairs through the "
                       f"optimizer's momentum, with weight decay and rounding).")
        t = s["top"]
        out.append(f"The largest single push down: training pair {t['train_pair']} on probe {t['pair_id']} at step "
                   f"{t['step']}, {_num(t['contribution'])} ({_pct(t['share'])} of that step's ⟨g_w, Δθ⟩)."
                   if t and t["contribution"] < 0 and not math.isnan(t["share"]) else
                   "No training pair's contribution to a fall was negative.")
        if s["net_top"] is not None:
            n, o = s["net_top"], s["often_top"]
            out.append(f"Over all recorded steps, training pair {n['train_pair']} pushed the probes' chosen log-probs "
                       f"down most (net {_num(n['net'])} over {int(n['n_probe_rows'])} probe pair-steps); "
                       f"{o['train_pair']} most often ({int(o['n_down'])} of {int(o['n_probe_rows'])}).")
    if s["n_uncovered"]:
        out.append(f"{s['n_uncovered']} fall(s) of a probe's chosen log-prob are at steps without contributions "
                   "(not split).")
    if s["n_no_upd"]:
        out.append(f"{s['n_no_upd']} fall(s) lack upd_dw in records.parquet (not split).")
    s["sentences"] = out
    return s


# ============================================================================ token attributions

def attribution_reliability(attributions: pd.DataFrame, tol: float = ATTRIBUTION_TOLERANCE) -> pd.DataFrame:
    """Per (``pair_id``, ``target``) of ``attributions.parquet`` (``dynamics attribute``): ``n_tokens``,
    captum's convergence ``delta`` δ, ``gap`` = f(x) − f(baseline), ``ratio`` = |δ|/|gap| (inf for a
    zero gap with δ ≠ 0), ``status`` ("converged": |δ| ≤ tol·|gap|, "not converged", "unchecked":
    no delta/gap columns) and ``note`` ("not converged (|δ|/|gap| = …): raise --n-steps")."""
    a = attributions.assign(pair_id=attributions["pair_id"].astype(str))
    keys = ["pair_id"] + (["target"] if "target" in a else [])
    g = a.groupby(keys, sort=True)
    out = g.size().rename("n_tokens").reset_index()
    if {"delta", "gap"} <= set(a.columns):
        out = out.merge(g[["delta", "gap"]].first().reset_index(), on=keys)
    else:
        out["delta"], out["gap"] = np.nan, np.nan
    d, gap = out["delta"].abs().to_numpy(float), out["gap"].abs().to_numpy(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(gap > 0, d / gap, np.where(d > 0, np.inf, 0.0))
    unknown = np.isnan(d) | np.isnan(gap)
    out["ratio"] = np.where(unknown, np.nan, ratio)
    out["status"] = np.where(unknown, "unchecked", np.where(d > tol * gap, "not converged", "converged"))
    out["note"] = [f"not converged (|δ|/|gap| = {_num(r, 2)}): raise --n-steps" if st == "not converged" else ""
                   for r, st in zip(out["ratio"], out["status"])]
    return out


def top_attributions(attributions: pd.DataFrame, k: int = 5) -> pd.DataFrame:
    """The ``k`` tokens with the largest |attribution| of each (``pair_id``, ``target``), by pair and
    target, largest first."""
    a = attributions.assign(pair_id=attributions["pair_id"].astype(str), abs=attributions["attribution"].abs())
    keys = ["pair_id"] + (["target"] if "target" in a else [])
    a = a.sort_values([*keys, "abs"], ascending=[True] * len(keys) + [False], kind="mergesort")
    return a.groupby(keys, sort=False).head(k).drop(columns="abs").reset_index(drop=True)


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
    records = _prepared(data.records)
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
