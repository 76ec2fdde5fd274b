"""Checks of the first-order predictions against reality (seed 004 §3, eq. 5, 9, 10).

`sgd_self_step`: for each pair, one SGD step of size η on that pair's own loss; the predicted
changes ``η (d_w‖g_w‖² − d_l⟨g_w,g_l⟩)`` and ``η (d_w⟨g_w,g_l⟩ − d_l‖g_l‖²)`` against the
measured ones, for several η (the relative error of a first-order prediction grows ∝ η).

`adamw_steps`: a few AdamW steps on training batches; for each probe pair the SGD-form
prediction, the exact first-order prediction from the real update ``⟨g, θ_{t+1} − θ_t⟩`` and the
actual change. Both write tidy DataFrames; `summarize_errors` gives the tables of the note.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from dynamics.core import conditions
from dynamics.core.analyzer import Analyzer
from dynamics.core.logprobs import TokenizedPairs, pair_logprobs
from dynamics.core.losses import compute_loss, resolve_hyper


def _restore(params, snap):
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(snap[n])


def _loss(model, pairs, loss, hyper, ref):
    out = pair_logprobs(model, pairs)
    nw, nl = out.chosen.lengths.to(out.chosen.logp.dtype), out.rejected.lengths.to(out.chosen.logp.dtype)
    return out, compute_loss(loss, out.chosen.logp, out.rejected.logp, ref[0], ref[1], nw, nl, **hyper)


def sgd_self_step(model, pairs: TokenizedPairs, lrs=(1e-6, 1e-5, 1e-4), *, loss: str = "dpo",
                  hyper: dict | None = None, ref_offset: tuple[float, float] = (0.0, 0.0),
                  impl: str = "ghost") -> pd.DataFrame:
    """One row per (pair, η): predicted and actual Δlog π_w, Δlog π_l of one SGD step on the pair.

    The reference log-probs are the current ones shifted by ``ref_offset`` (so the margin, and
    with it ``d_w, d_l``, can be set away from zero). The model is restored after every step.
    """
    hyper = resolve_hyper(loss, hyper)
    an = Analyzer(model, pairs.pad_id, params="trainable", impl=impl)
    params = an.params
    model.eval()
    rows = []
    for k in range(len(pairs)):
        pair = pairs.subset([k])
        with torch.no_grad():
            out0 = pair_logprobs(model, pair)
        ref = (out0.chosen.logp - ref_offset[0], out0.rejected.logp - ref_offset[1])
        ip = an.pair_inner_products(pair)
        snap = an.snapshot()
        for lr in lrs:
            model.zero_grad(set_to_none=True)
            out, lo = _loss(model, pair, loss, hyper, ref)
            pred = conditions.predict(lo.d_w, lo.d_l, ip["ip_wl"], ip["sq_w"], ip["sq_l"], lr=lr)
            lo.loss.sum().backward()
            with torch.no_grad():
                for p in params.values():
                    if p.grad is not None:
                        p -= lr * p.grad
                new = pair_logprobs(model, pair)
            model.zero_grad(set_to_none=True)
            _restore(params, snap)
            rows.append(dict(pair_id=pair.pair_ids[0], lr=lr, d_w=float(lo.d_w[0]), d_l=float(lo.d_l[0]),
                             ip_wl=float(ip["ip_wl"][0]), sq_w=float(ip["sq_w"][0]), sq_l=float(ip["sq_l"][0]),
                             cos_wl=float(ip["cos_wl"][0]),
                             pred_dw=float(pred["dlogp_w"][0]), pred_dl=float(pred["dlogp_l"][0]),
                             act_dw=float(new.chosen.logp[0] - out.chosen.logp[0].detach()),
                             act_dl=float(new.rejected.logp[0] - out.rejected.logp[0].detach()),
                             case_pred=int(pred["case"][0])))
    df = pd.DataFrame(rows)
    df["case_obs"] = conditions.case(torch.tensor(df.act_dw.values), torch.tensor(df.act_dl.values)).tolist()
    return df


def adamw_steps(model, train: TokenizedPairs, probe: TokenizedPairs, *, steps: int = 3, lr: float = 5e-6,
                batch_size: int = 4, loss: str = "dpo", hyper: dict | None = None, impl: str = "ghost") -> pd.DataFrame:
    """AdamW on ``train`` batches (reference = the initial log-probs); per step and probe pair:
    the SGD-form prediction, the real-update prediction ⟨g, Δθ⟩ and the actual change.

    The model's trainable parameters are restored at the end.
    """
    hyper = resolve_hyper(loss, hyper)
    an = Analyzer(model, probe.pad_id, params="trainable", impl=impl)
    params = an.params
    snap0 = an.snapshot()
    model.eval()
    with torch.no_grad():
        o_tr, o_pr = pair_logprobs(model, train), pair_logprobs(model, probe)
    ref_tr, ref_pr = (o_tr.chosen.logp, o_tr.rejected.logp), (o_pr.chosen.logp, o_pr.rejected.logp)
    opt = torch.optim.AdamW(list(params.values()), lr=lr, weight_decay=0.0)
    rows = []
    for step in range(steps):
        idx = [(step * batch_size + i) % len(train) for i in range(batch_size)]
        with torch.no_grad():
            before, lo_p = _loss(model, probe, loss, hyper, ref_pr)
        ip = an.pair_inner_products(probe)
        pred = conditions.predict(lo_p.d_w, lo_p.d_l, ip["ip_wl"], ip["sq_w"], ip["sq_l"], lr=lr)
        snap = an.snapshot()
        opt.zero_grad(set_to_none=True)
        _, lo = _loss(model, train.subset(idx), loss, hyper, (ref_tr[0][idx], ref_tr[1][idx]))
        lo.loss.mean().backward()
        opt.step()
        upd = an.update_effects(probe.chosen + probe.rejected, an.delta(snap))
        with torch.no_grad():
            after = pair_logprobs(model, probe)
        B = len(probe)
        for k, pid in enumerate(probe.pair_ids):
            rows.append(dict(step=step, pair_id=pid, lr=lr, pred_dw=float(pred["dlogp_w"][k]),
                             pred_dl=float(pred["dlogp_l"][k]), upd_dw=float(upd[k]), upd_dl=float(upd[B + k]),
                             act_dw=float(after.chosen.logp[k] - before.chosen.logp[k]),
                             act_dl=float(after.rejected.logp[k] - before.rejected.logp[k])))
    opt.zero_grad(set_to_none=True)
    _restore(params, snap0)
    return pd.DataFrame(rows)


def relative_error(pred: pd.Series, act: pd.Series) -> pd.Series:
    """|pred − act| / |act| (NaN where the actual change is exactly 0)."""
    return (pred - act).abs() / act.abs().where(act != 0)


def summarize_errors(sgd: pd.DataFrame | None = None, adam: pd.DataFrame | None = None) -> dict[str, pd.DataFrame]:
    """Median relative errors: per η for the SGD self-step; per prediction for AdamW."""
    out = {}
    if sgd is not None and len(sgd):
        s = sgd.assign(err_w=relative_error(sgd.pred_dw, sgd.act_dw), err_l=relative_error(sgd.pred_dl, sgd.act_dl),
                       case_ok=sgd.case_pred == sgd.case_obs)
        out["sgd"] = s.groupby("lr").agg(median_err_w=("err_w", "median"), median_err_l=("err_l", "median"),
                                         max_err_w=("err_w", "max"), case_agreement=("case_ok", "mean"),
                                         pairs=("pair_id", "count")).reset_index()
    if adam is not None and len(adam):
        a = adam
        out["adamw"] = pd.DataFrame([
            dict(prediction="SGD form η(d_w‖g_w‖² − d_l⟨g_w,g_l⟩)", median_err_w=relative_error(a.pred_dw, a.act_dw).median(),
                 median_err_l=relative_error(a.pred_dl, a.act_dl).median()),
            dict(prediction="real update ⟨g, Δθ⟩", median_err_w=relative_error(a.upd_dw, a.act_dw).median(),
                 median_err_l=relative_error(a.upd_dl, a.act_dl).median()),
        ])
    return out


def predict_check(model, pairs: TokenizedPairs, out: str | Path, *, n_probe: int = 8,
                  lrs=(1e-6, 1e-5, 1e-4, 1e-3), loss: str = "dpo", ref_offset: float = 1.0, adam_steps: int = 3,
                  adam_lr: float = 5e-6) -> dict[str, pd.DataFrame]:
    """`dynamics predict-check`: the first ``min(n_probe, len(pairs) // 2)`` pairs are probes, the
    rest train. One SGD step of each size in ``lrs`` on each probe pair's own loss (reference =
    log-probs ∓ ``ref_offset``) and ``adam_steps`` AdamW steps on training batches; writes
    ``out/sgd_self_step.parquet`` and ``out/adamw_steps.parquet`` and returns `summarize_errors`'
    tables (``"sgd"``, ``"adamw"``)."""
    n = min(n_probe, len(pairs) // 2)
    probe, train = pairs.subset(range(n)), pairs.subset(range(n, len(pairs)))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sgd = sgd_self_step(model, probe, lrs, loss=loss, ref_offset=(ref_offset, -ref_offset))
    adam = adamw_steps(model, train, probe, steps=adam_steps, lr=adam_lr, loss=loss)
    sgd.to_parquet(out / "sgd_self_step.parquet", index=False)
    adam.to_parquet(out / "adamw_steps.parquet", index=False)
    return summarize_errors(sgd, adam)
