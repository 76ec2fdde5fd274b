"""The report's tables of the training pairs and of what moved the probes (`dynamics.tools.diagnose`).

Pure functions of the optional tables of a run directory, each testable on its own:

- ``train_records.parquet`` (in-run rows, docs/math.md §8): `train_pair_steps`, `train_step_table`,
  `train_cos_distribution`, `train_top_falls`, `missing_entries`, `train_summary`;
- ``contributions.parquet`` (docs/math.md §4.1): `probe_falls`, `fall_contributors`,
  `train_pair_pushes`, `contribution_split`;
- ``attributions.parquet``: `attribution_reliability`, `top_attributions`;

and what every table of the report shares: the column groups it reads, `prepared_records` (the
records with every such column), `eq9` (seed 004's eq. 9 and its threshold in cosine units) and
`pct`. `dynamics.tools.diagnose` builds the report from these and re-exports them.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from dynamics.core.attribution import CONVERGED_REL
from dynamics.core.conditions import CASES
from dynamics.tools.report_html import fmt_frac, fmt_num

__all__ = ["GRAD_COLUMNS", "UPDATE_COLUMNS", "STATE_COLUMNS", "CONTRIB_COLUMNS", "TRAIN_EXTRA_COLUMNS",
           "ATTRIBUTION_TOLERANCE", "FALL_COLUMNS", "prepared_records", "eq9", "pct",
           "train_pair_steps", "train_step_table", "train_cos_distribution", "train_top_falls", "missing_entries",
           "train_summary", "probe_falls", "fall_contributors", "train_pair_pushes", "contribution_split",
           "attribution_reliability", "top_attributions"]

GRAD_COLUMNS = ("ip_wl", "sq_w", "sq_l", "cos_wl", "pred_dw", "pred_dl", "thr_w", "thr_l", "case_pred")
UPDATE_COLUMNS = ("upd_dw", "upd_dl", "act_dw", "act_dl", "case_obs")
STATE_COLUMNS = ("logp_w", "logp_l", "ref_w", "ref_l", "len_w", "len_l", "margin", "d_w", "d_l", "lr")
CONTRIB_COLUMNS = ("contrib_sum_w", "contrib_sum_l", "contrib_resid_w", "contrib_resid_l")
TRAIN_EXTRA_COLUMNS = ("micro", "c_w", "c_l", "upd_dw", "upd_dl")
ATTRIBUTION_TOLERANCE = CONVERGED_REL
"""An attribution has not converged when captum's |δ| > ATTRIBUTION_TOLERANCE · |f(x) − f(baseline)|
(the library's one threshold, `dynamics.core.attribution.CONVERGED_REL`)."""
_frac, _num = fmt_frac, fmt_num


def prepared_records(records: pd.DataFrame) -> pd.DataFrame:
    """A copy with every column the report reads (missing ones NaN), sorted by step and pair."""
    df = records.copy()
    for c in (*STATE_COLUMNS, *GRAD_COLUMNS, *UPDATE_COLUMNS, *CONTRIB_COLUMNS):
        if c not in df:
            df[c] = np.nan
    df["pair_id"] = df["pair_id"].astype(str)
    return df.sort_values(["step", "pair_id"], kind="mergesort").reset_index(drop=True)


def eq9(g: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """``(entangled, cos_thr_w)`` of rows with ``ip_wl, thr_w, d_l, sq_w, sq_l``: eq. 9 violated
    (``ip > thr_w``, ``<`` when ``d_l < 0``; False where NaN) and its threshold in cosine units."""
    ip, thr, d_l = g["ip_wl"].to_numpy(float), g["thr_w"].to_numpy(float), g["d_l"].to_numpy(float)
    entangled = np.where(d_l < 0, ip < thr, ip > thr)
    norm = np.sqrt(g["sq_w"].to_numpy(float) * g["sq_l"].to_numpy(float))
    with np.errstate(divide="ignore", invalid="ignore"):
        cos_thr = np.where(np.isfinite(thr) & (norm > 0), thr / norm, np.sign(thr) * np.inf)
    return entangled, cos_thr


def pct(x: float) -> str:
    """``x`` as a whole percentage, "n/a" for NaN, never "-0%"."""
    return "n/a" if x is None or math.isnan(x) else f"{round(100 * x)}%"


# ============================================================================ training pairs (in-run)

def train_pair_steps(train_records: pd.DataFrame) -> pd.DataFrame:
    """The rows of ``train_records.parquet`` (one per optimizer step × micro-batch × training pair),
    sorted by step, micro-batch and pair, every column the report reads present (NaN when not
    recorded), with added columns:

    - ``cos_thr_w``: eq. 9 in cosine units, ``thr_w/√(‖g_w‖²‖g_l‖²)`` (NaN where ⟨g_w,g_l⟩ is missing);
    - ``entangled``: eq. 9 violated (as in `dynamics.tools.diagnose.pair_steps`; False where ⟨g_w,g_l⟩ is missing);
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
    entangled, cos_thr = eq9(df)
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
    rec = prepared_records(records)
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
    rec = prepared_records(records)
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
        pc = {p: f"{_num(x)} ({pct(s['shares'][p])})" for p, x in s["parts"].items()}
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
                       f"{pct(s['shares']['others'])} from the training pairs of the step itself, "
                       f"{pct(s['shares']['residual'])} the residual (earlier steps' training pairs through the "
                       f"optimizer's momentum, with weight decay and rounding).")
        t = s["top"]
        out.append(f"The largest single push down: training pair {t['train_pair']} on probe {t['pair_id']} at step "
                   f"{t['step']}, {_num(t['contribution'])} ({pct(t['share'])} of that step's ⟨g_w, Δθ⟩)."
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
