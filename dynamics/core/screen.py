"""Pre-training pair screening: which preference pairs risk *likelihood displacement*?

Before any training step, score each pair (x, y⁺, y⁻) for the risk that DPO-like training lowers
log π(y⁺|x). With ``h_{x,y<k}`` the last-layer hidden state that produces the logits of the k-th
response token (the state at the position just before that token) and ``s(y) = Σ_{k=1}^{|y|} h_{x,y<k}``:

    CHES(x,y⁺,y⁻)      = ⟨s(y⁺), s(y⁻)⟩ − ‖s(y⁺)‖²
    CHES_norm(x,y⁺,y⁻) = ⟨s(y⁺)/|y⁺|, s(y⁻)/|y⁻|⟩ − ‖s(y⁺)/|y⁺|‖²

the centered hidden embedding similarity of Razin et al., "Unintentional Unalignment: Likelihood
Displacement in Direct Preference Optimization" (ICLR 2025), and its length-normalized version
(as in their reference code, ``ches/ches.py`` of github.com/princeton-nlp/unintentional-unalignment:
the |y| states from the last prompt token to the second-to-last response token). Higher CHES =
displacement more likely. Sums and inner products are taken in float64.

Alongside (one row per pair, `screen_pairs`): ``h_ip = ⟨h⁺_last, h⁻_last⟩``, the inner product of the
last-layer hidden states at the final token of x‖y⁺ and of x‖y⁻ (the paper's "last hidden
embedding" baseline); the token-level Levenshtein distance and shared prefix/suffix of the two
responses; the exact sentence-gradient inner products at θ₀ (`dynamics.core.analyzer.Analyzer`);
the loss coefficients ``d_w, d_l`` at θ₀ with the reference equal to the policy (margin 0); and the
one-SGD-step predicted changes and Table-1 case of `dynamics.core.conditions.predict`.
`screen_summary` condenses the table for a report; `rank_correlation` gives the Spearman
correlation of each score with a realized change of log π(y⁺|x) after training.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

from dynamics.core.analyzer import Analyzer
from dynamics.core.conditions import CASES, predict
from dynamics.core.grads import IMPLS
from dynamics.core.logprobs import (Batch, TokenizedPairs, TokenizedSequence, body_and_head, check_context, collate,
                                    model_device, scoring_mode)
from dynamics.core.losses import compute_loss, resolve_hyper
from dynamics.errors import InputError

__all__ = ["SCREEN_COLUMNS", "RANK_SCORES", "screen_pairs", "screen_summary", "rank_correlation",
           "hidden_features", "ches_scores", "edit_distance", "prefix_suffix", "spearman"]

SCREEN_COLUMNS = ["pair_id", "len_w", "len_l", "ches", "ches_norm", "h_ip", "edit_distance", "prefix", "suffix",
                  "ip_wl", "sq_w", "sq_l", "cos_wl", "logp_w", "logp_l", "d_w", "d_l",
                  "pred_dw", "pred_dl", "case_pred"]
"""Columns of the `screen_pairs` table, in order."""

RANK_SCORES = ("ches", "ches_norm", "h_ip", "edit_distance", "cos_wl", "pred_dw")
"""The pre-training scores `rank_correlation` correlates with a realized change."""


# ------------------------------------------------------------------ sequence comparisons

def edit_distance(a: Sequence[int], b: Sequence[int]) -> int:
    """Exact Levenshtein distance (unit-cost insert, delete, substitute) between two id sequences.

    Row-by-row dynamic programme, each row vectorized: with ``t[j] = min(D[i-1][j-1] + [a_i ≠ b_j],
    D[i-1][j] + 1)`` (substitution/match, deletion) and ``t[0] = i``, the insertion chain
    ``D[i][j] = min(t[j], D[i][j-1] + 1)`` unrolls to ``D[i][j] = j + min_{k ≤ j} (t[k] − k)``,
    a cumulative minimum. O(|a|·|b|) integer work, O(min(|a|,|b|)) memory.
    """
    a = np.asarray(list(a), dtype=np.int64)
    b = np.asarray(list(b), dtype=np.int64)
    if len(a) < len(b):
        a, b = b, a                                                                # columns over the shorter
    n = len(b)
    if n == 0:
        return int(len(a))
    j = np.arange(n + 1, dtype=np.int64)                                           # (n+1,)
    prev = j.copy()                                                                # D[0][j] = j
    t = np.empty(n + 1, dtype=np.int64)
    for i, ai in enumerate(a, start=1):
        t[0] = i
        t[1:] = np.minimum(prev[:-1] + (b != ai), prev[1:] + 1)                    # substitute/match, delete
        prev = np.minimum.accumulate(t - j) + j                                    # insert: j + cummin(t[k] − k)
    return int(prev[-1])


def prefix_suffix(a: Sequence[int], b: Sequence[int]) -> tuple[int, int]:
    """``(prefix, suffix)``: lengths of the common prefix and common suffix of two id sequences,
    non-overlapping (the suffix is counted after the prefix, so ``prefix + suffix ≤ min(|a|, |b|)``;
    the same convention as `dynamics.inputs.data.shared_prefix_suffix`)."""
    a, b = list(a), list(b)
    n = min(len(a), len(b))
    prefix = next((i for i in range(n) if a[i] != b[i]), n)
    suffix = next((k for k in range(n - prefix) if a[-1 - k] != b[-1 - k]), n - prefix)
    return prefix, suffix


# ------------------------------------------------------------------ hidden states and CHES

def _check_seqs(pairs: TokenizedPairs) -> None:
    for k, pid in enumerate(pairs.pair_ids):
        for side, s in (("chosen", pairs.chosen[k]), ("rejected", pairs.rejected[k])):
            if len(s.response_ids) == 0:
                raise InputError(f"pair {pid!r}: the {side} response is empty (CHES needs at least one token)")
            if len(s.prompt_ids) == 0:
                raise InputError(f"pair {pid!r}: the {side} prompt is empty, so the first response token "
                                 "has no hidden state to be predicted from")
        if tuple(pairs.chosen[k].response_ids) == tuple(pairs.rejected[k].response_ids):
            raise InputError(f"pair {pid!r}: chosen and rejected responses are identical (nothing to prefer)")


def _split(model):
    split = body_and_head(model)
    if split is None:
        raise InputError(
            f"pair screening needs the last-layer hidden states of a transformers causal LM whose logits are "
            f"lm_head(base_model(...).last_hidden_state) — get_output_embeddings() a torch.nn.Linear, a "
            f"base_model, no logit soft-capping or scaling; {type(model).__name__} is not of that form")
    return split


def hidden_features(model, seqs: Sequence[TokenizedSequence], pad_id: int) -> dict[str, Tensor]:
    """One forward pass over N sequences (right padding): per sequence, float64, on the model's device,

    - ``sum``  (N, d): ``s(y) = Σ_{k=1}^{|y|} h_{x,y<k}``, the last-layer states at positions
      ``start−1 … start+|y|−2`` of the unpadded row (each produces the logits of response token k);
    - ``last`` (N, d): the last-layer state at the final token of x‖y (position ``start+|y|−1``);
    - ``logp`` (N,): ``log π(y|x) = Σ_k log softmax(head(h_{x,y<k}))[y_k]`` from the same states;
    - ``lengths`` (N,): |y|.

    ``model`` must be of the `dynamics.core.logprobs.body_and_head` form (else InputError). Run it
    under `dynamics.core.logprobs.scoring_mode` (eval, no grad); `screen_pairs` does.
    """
    body, head = _split(model)
    batch: Batch = collate(seqs, pad_id, "right", model_device(model))
    tgt, mask = batch.response_positions()                                         # (N, L) each
    h = body(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
             position_ids=batch.position_ids, use_cache=False).last_hidden_state   # (N, T, d)
    d = h.shape[-1]
    h_pred = h.gather(1, (tgt - 1)[..., None].expand(-1, -1, d))                   # (N, L, d) h_{x,y<k}
    logits = head(h_pred)                                                          # (N, L, V)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    targets = batch.input_ids.gather(1, tgt)                                       # (N, L)
    token_logps = -F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # (N, L)
    logp = torch.where(mask, token_logps, torch.zeros_like(token_logps)).double().sum(-1)  # (N,)
    # s(y) = Σ_k h_{x,y<k}, accumulated in float64; where() (not ·mask) so a non-finite pad state cannot leak
    h64 = h_pred.double()
    s = torch.where(mask[..., None], h64, torch.zeros_like(h64)).sum(1)            # (N, d)
    last_pos = batch.start + batch.lengths - 1                                     # (N,)
    last = h.gather(1, last_pos[:, None, None].expand(-1, 1, d))[:, 0].double()    # (N, d)
    return dict(sum=s, last=last, logp=logp, lengths=batch.lengths)


def ches_scores(s_w: Tensor, s_l: Tensor, len_w: Tensor, len_l: Tensor) -> tuple[Tensor, Tensor]:
    """``(ches, ches_norm)``, each (B,) float64, from the hidden sums ``s_w = s(y⁺)``, ``s_l = s(y⁻)``
    (B, d) and the response lengths (B,) (Razin et al. 2025)::

        ches      = ⟨s_w, s_l⟩ − ‖s_w‖²
        ches_norm = ⟨s_w/|y⁺|, s_l/|y⁻|⟩ − ‖s_w/|y⁺|‖²
    """
    s_w, s_l = s_w.double(), s_l.double()
    nw = len_w.to(device=s_w.device, dtype=torch.float64)                           # (B,)
    nl = len_l.to(device=s_w.device, dtype=torch.float64)                           # (B,)
    ches = (s_w * s_l).sum(-1) - (s_w * s_w).sum(-1)                               # ⟨s⁺,s⁻⟩ − ‖s⁺‖²
    m_w, m_l = s_w / nw[:, None], s_l / nl[:, None]                                # means (B, d)
    ches_norm = (m_w * m_l).sum(-1) - (m_w * m_w).sum(-1)                          # ⟨m⁺,m⁻⟩ − ‖m⁺‖²
    return ches, ches_norm


# ------------------------------------------------------------------ the screening table

def _check_real(name: str, x, *, positive: bool) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or (positive and x <= 0):
        raise InputError(f"{name} must be a finite {'positive ' if positive else ''}number, got {x!r}")
    return float(x)


def screen_pairs(model, pairs: TokenizedPairs, *, loss: str = "dpo", loss_params=None, lr: float = 5e-6,
                 params="all", impl: str = "ghost", batch_size: int = 4, chunk_size: int | None = None,
                 progress: Callable[[int, int], None] | None = None) -> pd.DataFrame:
    """Score every pair of ``pairs`` before training: one row per pair, columns `SCREEN_COLUMNS`.

    - ``ches``, ``ches_norm``: `ches_scores` of the `hidden_features` sums (float64);
    - ``h_ip = ⟨h⁺_last, h⁻_last⟩``: last-layer states at the final token of x‖y⁺ and x‖y⁻;
    - ``edit_distance``, ``prefix``, ``suffix``: `edit_distance`, `prefix_suffix` of the response ids;
    - ``ip_wl, sq_w, sq_l, cos_wl``: ``⟨g_w,g_l⟩, ‖g_w‖², ‖g_l‖²``, cosine, with ``g = ∇_θ log π(y|x)``
      at θ₀ (`Analyzer.pair_inner_products`, θ = ``params``, engine ``impl``);
    - ``logp_w, logp_l``: log π(y⁺|x), log π(y⁻|x) at θ₀;
    - ``d_w, d_l``: coefficients of ``loss`` (`dynamics.core.losses.compute_loss`) at θ₀ with the
      reference equal to the policy (ref = logp, margin 0), hyper-parameters ``loss_params``;
    - ``pred_dw, pred_dl, case_pred``: `dynamics.core.conditions.predict` with step ``lr``:
      ``pred_dw = lr (d_w ‖g_w‖² − d_l ⟨g_w,g_l⟩)``, ``pred_dl = lr (d_w ⟨g_w,g_l⟩ − d_l ‖g_l‖²)``.

    ``batch_size`` pairs per forward pass and per Gram; ``chunk_size`` bounds gradient memory
    (`Analyzer`); ``progress(done, total)`` is called after each batch. Eval mode, no grad for the
    hidden states; the model's train/eval mode is restored. Bad input (empty pairs, an empty or
    identical response, an unknown loss/engine/parameter selection, a model without separable
    hidden states, a sequence longer than the context) raises `dynamics.errors.InputError` before
    any heavy work.
    """
    if not isinstance(pairs, TokenizedPairs):
        raise InputError(f"pairs must be TokenizedPairs (see dynamics.core.logprobs.tokenize_pairs), "
                         f"got {type(pairs).__name__}")
    if len(pairs) == 0:
        raise InputError("no pairs to screen: the pair set is empty")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    lr = _check_real("lr", lr, positive=True)
    if impl not in IMPLS:
        raise InputError(f"unknown impl {impl!r}; known: {', '.join(IMPLS)}")
    hyper = resolve_hyper(loss, loss_params)                                       # InputError if unknown/bad
    _split(model)
    _check_seqs(pairs)
    try:
        check_context(model, pairs.chosen + pairs.rejected)
        analyzer = Analyzer(model, pairs.pad_id, params=params, impl=impl, chunk_size=chunk_size)
    except InputError:
        raise
    except ValueError as e:
        raise InputError(str(e)) from e

    B = len(pairs)
    cols: dict[str, list] = {k: [] for k in ("ches", "ches_norm", "h_ip", "logp_w", "logp_l",
                                             "ip_wl", "sq_w", "sq_l", "cos_wl")}
    for lo in range(0, B, batch_size):
        sub = pairs.subset(range(lo, min(lo + batch_size, B)))
        b = len(sub)
        with scoring_mode(model):
            f = hidden_features(model, sub.chosen + sub.rejected, sub.pad_id)      # 2b sequences
        s, last = f["sum"], f["last"]                                              # (2b, d) float64
        ches, ches_norm = ches_scores(s[:b], s[b:], f["lengths"][:b], f["lengths"][b:])
        h_ip = (last[:b] * last[b:]).sum(-1)                                       # ⟨h⁺_last, h⁻_last⟩
        ip = analyzer.pair_inner_products(sub)                                     # (b,) each
        for name, v in (("ches", ches), ("ches_norm", ches_norm), ("h_ip", h_ip),
                        ("logp_w", f["logp"][:b]), ("logp_l", f["logp"][b:]), *ip.items()):
            cols[name].append(v.detach().double().cpu())
        if progress is not None:
            progress(lo + b, B)
    t = {k: torch.cat(v) for k, v in cols.items()}                                 # (B,) float64 each

    len_w = torch.tensor([len(s.response_ids) for s in pairs.chosen], dtype=torch.float64)
    len_l = torch.tensor([len(s.response_ids) for s in pairs.rejected], dtype=torch.float64)
    # the loss at θ₀ with π_ref = π_θ0 (ref = logp: every log-ratio and the DPO margin are 0)
    out = compute_loss(loss, t["logp_w"], t["logp_l"], t["logp_w"], t["logp_l"], len_w, len_l, **hyper)
    pred = predict(out.d_w, out.d_l, t["ip_wl"], t["sq_w"], t["sq_l"], lr=lr)
    ps = [prefix_suffix(w.response_ids, l.response_ids) for w, l in zip(pairs.chosen, pairs.rejected)]
    df = pd.DataFrame(dict(
        pair_id=list(pairs.pair_ids), len_w=len_w.long().numpy(), len_l=len_l.long().numpy(),
        ches=t["ches"].numpy(), ches_norm=t["ches_norm"].numpy(), h_ip=t["h_ip"].numpy(),
        edit_distance=[edit_distance(w.response_ids, l.response_ids) for w, l in zip(pairs.chosen, pairs.rejected)],
        prefix=[p for p, _ in ps], suffix=[q for _, q in ps],
        ip_wl=t["ip_wl"].numpy(), sq_w=t["sq_w"].numpy(), sq_l=t["sq_l"].numpy(), cos_wl=t["cos_wl"].numpy(),
        logp_w=t["logp_w"].numpy(), logp_l=t["logp_l"].numpy(),
        d_w=out.d_w.double().numpy(), d_l=out.d_l.double().numpy(),
        pred_dw=pred["dlogp_w"].double().numpy(), pred_dl=pred["dlogp_l"].double().numpy(),
        case_pred=pred["case"].long().numpy()))
    return df[SCREEN_COLUMNS]


# ------------------------------------------------------------------ summary and validation

def _need_columns(df, needed: Sequence[str], what: str) -> None:
    if not isinstance(df, pd.DataFrame):
        raise InputError(f"{what} needs a pandas DataFrame (the screen_pairs table), got {type(df).__name__}")
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise InputError(f"{what}: the table lacks column(s) {missing}; expected the screen_pairs columns")


_QUANTILES = {"min": 0.0, "q10": 0.1, "q25": 0.25, "median": 0.5, "q75": 0.75, "q90": 0.9, "max": 1.0}
_TOP_COLUMNS = ["pair_id", "ches", "ches_norm", "h_ip", "edit_distance", "cos_wl", "pred_dw", "pred_dl",
                "case_pred", "len_w", "len_l"]


def _py(v):
    """numpy scalar -> plain Python (JSON-ready)."""
    return v.item() if isinstance(v, np.generic) else v


def screen_summary(df: pd.DataFrame, top: int = 10) -> dict:
    """A JSON-ready digest of a `screen_pairs` table for a report.

    Returns ``{"n_pairs": int, "quantiles": {score: {min, q10, q25, median, q75, q90, max, mean}}``
    for ``ches``, ``ches_norm``, ``cos_wl``; ``"cases": [{case, label, count}]`` for every case of
    `dynamics.core.conditions.CASES` (predicted, ``case_pred``); ``"top": [row dicts]``, the ``top``
    pairs most at risk, by ``ches_norm`` descending (ties keep table order)}.
    """
    _need_columns(df, _TOP_COLUMNS, "screen_summary")
    if isinstance(top, bool) or not isinstance(top, int) or top < 0:
        raise InputError(f"top must be an integer >= 0, got {top!r}")
    if len(df) == 0:
        raise InputError("screen_summary: the table has no rows")
    quantiles = {}
    for col in ("ches", "ches_norm", "cos_wl"):
        x = df[col].astype("float64")
        q = {k: float(x.quantile(p)) for k, p in _QUANTILES.items()}
        q["mean"] = float(x.mean())
        quantiles[col] = q
    counts = df["case_pred"].value_counts()
    cases = [dict(case=c, label=label, count=int(counts.get(c, 0))) for c, label in CASES.items()]
    ranked = df.sort_values("ches_norm", ascending=False, kind="mergesort").head(top)
    rows = [{k: _py(v) for k, v in r.items()} for r in ranked[_TOP_COLUMNS].to_dict("records")]
    return dict(n_pairs=int(len(df)), quantiles=quantiles, cases=cases, top=rows)


def spearman(a: pd.Series, b: pd.Series) -> float:
    """Spearman rank correlation of two equally indexed series: the Pearson correlation of their
    ranks, ties given their average rank. NaN when fewer than two values or a constant series."""
    ra = a.astype("float64").rank(method="average").to_numpy()
    rb = b.astype("float64").rank(method="average").to_numpy()
    if len(ra) < 2:
        return float("nan")
    da, db = ra - ra.mean(), rb - rb.mean()
    den = math.sqrt(float((da * da).sum()) * float((db * db).sum()))
    return float((da * db).sum() / den) if den > 0 else float("nan")     # r = Σ da·db / √(Σda² Σdb²)


def rank_correlation(df: pd.DataFrame, realized: pd.Series,
                     scores: Sequence[str] = RANK_SCORES) -> dict[str, float]:
    """Spearman correlation (`spearman`) of each pre-training score of ``df`` (a `screen_pairs`
    table; ``scores`` default `RANK_SCORES`) with ``realized``, a change of log π(y⁺|x) indexed by
    ``pair_id``. Pairs are matched by id (order does not matter); pairs missing on either side or
    with a NaN realized value are left out. A score that predicts displacement well has a negative
    correlation (higher score, larger fall). NaN where a score or ``realized`` is constant.
    """
    _need_columns(df, ["pair_id", *scores], "rank_correlation")
    if not isinstance(realized, pd.Series):
        raise InputError(f"realized must be a pandas Series indexed by pair_id, got {type(realized).__name__}")
    if df["pair_id"].duplicated().any():
        raise InputError("rank_correlation: the table has duplicated pair_id values")
    if realized.index.duplicated().any():
        raise InputError("rank_correlation: realized has duplicated pair_id index values")
    table = df.set_index("pair_id")
    common = table.index.intersection(realized.dropna().index)
    if len(common) == 0:
        raise InputError(f"rank_correlation: no pair_id of the table is in realized's index (table ids like "
                         f"{list(table.index[:3])!r}, realized like {list(realized.index[:3])!r}); "
                         "index realized by the same pair_id values (strings)")
    y = realized.loc[common].astype("float64")
    return {s: spearman(table.loc[common, s], y) for s in scores}
