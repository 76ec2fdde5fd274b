"""From gradient inner products to predictions: one-step changes, Table 1 cases, what-if, tokens.

Notation (seed 004 §3): ``g_w = ∇_θ log π_w``, ``g_l = ∇_θ log π_l``; a loss contributes
``∇ℓ = -(d_w g_w - d_l g_l)`` (`dynamics.core.losses` sign convention), so one SGD step of size η
moves θ by ``Δθ = η (d_w g_w - d_l g_l)`` and, to first order (seed 004 eq. 5 / §3.2)::

    Δlog π_w ≈ ⟨g_w, Δθ⟩ = η (d_w ‖g_w‖² - d_l ⟨g_w,g_l⟩)
    Δlog π_l ≈ ⟨g_l, Δθ⟩ = η (d_w ⟨g_w,g_l⟩ - d_l ‖g_l‖²)

- `predict`: these two, the margin change, the thresholds of eq. 9/10 and the case (`case`).
- `update_prediction`: for *any* optimizer (Adam, clipping, weight decay…) the exact first-order
  prediction ``⟨∇log π(y|x), θ_{t+1} - θ_t⟩`` of the actual update, by forward-mode AD.
- `what_if`: the same gradient inner products under every loss of `LOSSES` (they differ only in
  ``(d_w, d_l)``): one gradient computation, the whole zoo's predicted step.
- `token_decomposition`: the per-token version (Theorem 3 of seed 004): the predicted change of
  every token's log-prob, summed before / at / after the first differing token.

First-order predictions carry an O(η²) residual; compare them with the observed change
(`case` applies to observed changes too).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import pandas as pd
import torch
from torch import Tensor
from torch.func import functional_call, jvp

from dynamics.core.grads import TokenGram, analysis_mode, resolve_params, split_params, token_gram
from dynamics.core.logprobs import TokenizedSequence, batch_logprobs, check_context, collate, model_device
from dynamics.core.losses import LOSSES, compute_loss, get_loss

__all__ = ["CASES", "case", "predict", "update_prediction", "snapshot_params", "param_delta",
           "what_if", "summarize", "first_difference", "token_predictions", "token_decomposition",
           "pair_token_decomposition"]

CASES = {
    0: "no change (Δw = Δl = 0)",
    1: "w↑ l↓ (ideal)",
    2: "w↓ l↓ (both fall)",
    3: "w↑ l↑ (both rise)",
    4: "w↓ l↑ (margin shrinks)",
}
"""Case numbers returned by `case`. 1-3 are Table 1 of seed 004; 4 is the remaining sign
pattern (the margin shrinks). To first order case 4 needs a negative coefficient: with
d_w, d_l ≥ 0, Δw < 0 < Δl would need ⟨g_w,g_l⟩² > ‖g_w‖²‖g_l‖² (Cauchy-Schwarz). It occurs for
IPO/SPPO past their targets (d < 0 pulls the margin back) and in observed changes of large
steps. (With d_w ≠ d_l > 0 the margin can still fall inside case 2 or 3; with d_w = d_l it
cannot, eq. 6.) 0 marks no change at all, e.g. a hinge loss past its margin with no NLL term."""


# ------------------------------------------------------------------ sentence level

def case(dw: Tensor, dl: Tensor) -> Tensor:
    """Case number (`CASES`) of changes ``dw = Δlog π_w``, ``dl = Δlog π_l``, each (B,) -> (B,) long.

    Table 1 of seed 004 with its inclusive inequalities, checked in order:
    1 if ``dw ≥ 0 ≥ dl``; 2 if ``0 ≥ dw, dl`` (then dw < 0); 3 if ``dw, dl ≥ 0`` (then dl > 0);
    4 otherwise (``dw < 0 < dl``); 0 where both are exactly 0. Works for predicted and observed
    changes alike.
    """
    dw, dl = torch.as_tensor(dw), torch.as_tensor(dl)
    out = torch.full(torch.broadcast_shapes(dw.shape, dl.shape), 4, dtype=torch.long, device=dw.device)
    out = torch.where((dw >= 0) & (dl >= 0), torch.full_like(out, 3), out)
    out = torch.where((dw <= 0) & (dl <= 0), torch.full_like(out, 2), out)
    out = torch.where((dw >= 0) & (dl <= 0), torch.full_like(out, 1), out)   # Table 1 order: case 1 first
    return torch.where((dw == 0) & (dl == 0), torch.zeros_like(out), out)


def _threshold(num: Tensor, den: Tensor, sq: Tensor) -> Tensor:
    """``(num/den)·sq``; where ``den = 0`` the sign of the change no longer depends on ⟨g_w,g_l⟩:
    +inf if ``num ≥ 0`` (the condition always holds), -inf otherwise (never holds)."""
    inf = torch.full_like(sq, float("inf"))
    safe = torch.where(den != 0, den, torch.ones_like(den))
    return torch.where(den != 0, num / safe * sq, torch.where(num >= 0, inf, -inf))


def predict(d_w: Tensor, d_l: Tensor, ip_wl: Tensor, sq_w: Tensor, sq_l: Tensor,
            lr: float | Tensor = 1.0) -> dict[str, Tensor]:
    """First-order one-SGD-step prediction (seed 004 eq. 5, §3.2, eq. 9, 10); all inputs (B,).

    ``d_w, d_l`` from `dynamics.core.losses.compute_loss`; ``ip_wl = ⟨g_w,g_l⟩``, ``sq_w = ‖g_w‖²``,
    ``sq_l = ‖g_l‖²`` from `dynamics.core.grads.pair_inner_products`; ``lr`` = η (scalar or (B,)).
    Each pair is treated as if it were stepped alone; for a batch-mean loss use ``lr/B`` and add
    the cross-pair terms yourself (or use `update_prediction` on the real update).

    Returns a dict of (B,) tensors:
      - ``dlogp_w = η (d_w ‖g_w‖² - d_l ⟨g_w,g_l⟩)``, ``dlogp_l = η (d_w ⟨g_w,g_l⟩ - d_l ‖g_l‖²)``;
      - ``dmargin = dlogp_w - dlogp_l = η (d_w ‖g_w‖² - (d_w + d_l)⟨g_w,g_l⟩ + d_l ‖g_l‖²)`` (eq. 6);
      - ``thr_w = (d_w/d_l) ‖g_w‖²``: eq. 9, chosen rises (Δ ≥ 0) iff ``⟨g_w,g_l⟩ ≤ thr_w``;
      - ``thr_l = (d_l/d_w) ‖g_l‖²``: eq. 10, rejected falls (Δ ≤ 0) iff ``⟨g_w,g_l⟩ ≤ thr_l``;
      - ``case``: `case` of the predicted changes (long).
    The "iff ≤" reading of a threshold holds when its denominator (d_l for thr_w, d_w for thr_l)
    is positive (all margin losses before their targets); when it is negative (IPO/SPPO past the
    target) the inequality flips; when it is 0 the threshold is ±inf (`_threshold`). DPO
    (d_w = d_l) gives Table 1: ``thr_w = ‖g_w‖²``, ``thr_l = ‖g_l‖²``.
    """
    # seed 004 §3.2: Δlog π ≈ ⟨∇log π, -η∇ℓ⟩ with -∇ℓ = d_w g_w - d_l g_l
    dw = lr * (d_w * sq_w - d_l * ip_wl)                                         # (B,) eq. 5, first line
    dl = lr * (d_w * ip_wl - d_l * sq_l)                                         # (B,) eq. 5, second line
    return dict(dlogp_w=dw, dlogp_l=dl, dmargin=dw - dl,
                thr_w=_threshold(d_w, d_l, sq_w),                                # eq. 9
                thr_l=_threshold(d_l, d_w, sq_l),                                # eq. 10
                case=case(dw, dl))


# ------------------------------------------------------------------ any optimizer: ⟨g, Δθ⟩

def snapshot_params(model, params="trainable") -> dict[str, Tensor]:
    """Detached copies of the selected parameters (a `select_params` spec or a dict), by name;
    take one before ``optimizer.step()`` and pass it to `param_delta` after."""
    return {n: p.detach().clone() for n, p in resolve_params(model, params).items()}


def param_delta(model, before: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``Δθ = θ_now - before`` for the parameters named in ``before`` (from `snapshot_params`)."""
    named = dict(model.named_parameters(remove_duplicate=False))
    missing = sorted(set(before) - set(named))
    if missing:
        raise ValueError(f"not parameters of the model: {missing}")
    return {n: named[n].detach() - b for n, b in before.items()}


class _LogProbs(torch.nn.Module):
    """``batch -> (N,) sequence log-probs``: `batch_logprobs` as a module, for functional_call."""

    def __init__(self, model):
        super().__init__()
        self.m = model

    def forward(self, batch):
        return batch_logprobs(self.m, batch).logp


def update_prediction(model, seqs: Sequence[TokenizedSequence], pad_id: int, delta: Mapping[str, Tensor],
                      params=None, *, batch_size: int | None = None) -> Tensor:
    """(N,) first-order prediction ``⟨∇_θ log π(y_i|x_i), Δθ⟩`` of each sequence's log-prob change.

    ``delta``: name -> ``Δθ`` tensor (parameter's shape), e.g. `param_delta` after any optimizer
    step; a tied alias name (``lm_head.weight``) is accepted. ``params``: which of them to use
    (a `select_params` spec or dict; default: all names in ``delta``); each must be in ``delta``.
    Parameters not selected are held fixed (their Δ counts as 0).

    Computed exactly, with no per-example gradient: the directional derivative of
    ``θ -> (log π(y_1|x_1), …, log π(y_N|x_N))`` along Δθ by forward-mode AD (``torch.func.jvp``)
    over the padded batch — row i depends only on sequence i, so one jvp gives all N at once.
    Cost ≈ 3 forward passes. ``batch_size`` bounds the rows per jvp. Eval mode and eager
    attention (CPU sdpa has no forward-mode derivative) for the call; the caller's state restored.
    """
    named = dict(model.named_parameters(remove_duplicate=False))
    unknown = sorted(set(delta) - set(named))
    if unknown:
        raise ValueError(f"delta names that are not parameters of the model: {unknown}")
    canon = resolve_params(model, {n: named[n] for n in delta})                 # canonical name -> param
    by_canon = {c: delta[n] for n in delta for c, p in canon.items() if p is named[n]}
    params = canon if params is None else resolve_params(model, params)
    missing = sorted(set(params) - set(by_canon))
    if missing:
        raise ValueError(f"params without an entry in delta: {missing}")
    for n, p in params.items():
        if by_canon[n].shape != p.shape:
            raise ValueError(f"delta[{n!r}] has shape {tuple(by_canon[n].shape)}, parameter {tuple(p.shape)}")
    check_context(model, seqs)
    theta, consts = split_params(model, params)
    tangent = {n: by_canon[n].to(dtype=theta[n].dtype, device=theta[n].device) for n in theta}
    wrapper = _LogProbs(model)
    pre = lambda d: {"m." + k: v for k, v in d.items()}                          # names inside the wrapper
    step = batch_size or max(len(seqs), 1)
    out = []
    with analysis_mode(model, eager=True):
        for lo in range(0, len(seqs), step):
            batch = collate(seqs[lo:lo + step], pad_id, "right", model_device(model))
            f = lambda th: functional_call(wrapper, (pre(th), pre(consts)), args=(batch,), tie_weights=True)
            _, d = jvp(f, (theta,), (tangent,))                                  # (n,) ⟨g_i, Δθ⟩
            out.append(d.detach())
    return torch.cat(out) if out else torch.zeros(0)


# ------------------------------------------------------------------ what-if over the loss zoo

def what_if(logp_w: Tensor, logp_l: Tensor, ref_w: Tensor | None, ref_l: Tensor | None,
            len_w: Tensor | None, len_l: Tensor | None, ip_wl: Tensor, sq_w: Tensor, sq_l: Tensor,
            lr: float | Tensor, losses: Sequence[str] | None = None,
            hyper: Mapping[str, Mapping] | None = None, pair_ids: Sequence | None = None) -> pd.DataFrame:
    """Predicted one-step changes of B pairs under each loss, from one gradient computation.

    All tensors (B,): log-probs, reference log-probs, response lengths, and ``⟨g_w,g_l⟩``,
    ``‖g_w‖²``, ``‖g_l‖²`` (`dynamics.core.grads.pair_inner_products`). ``losses``: names in `LOSSES`
    (default: all); ``hyper``: ``{loss: {hyper-parameter: value}}`` overriding the defaults.
    References are required whenever a selected loss needs them (at step 0, pass the policy
    log-probs themselves: π_ref = π_θ).

    Every loss shares g_w, g_l and differs only in ``(d_w, d_l)`` (seed 004 eq. 8), so the
    prediction is `predict` with each loss's coefficients. Returns a long DataFrame, one row per
    (pair, loss): ``pair`` (index or ``pair_ids``), ``loss``, ``d_w``, ``d_l``, ``dlogp_w``,
    ``dlogp_l``, ``dmargin``, ``case``, ``thr_w``, ``thr_l``.
    """
    names = sorted(LOSSES) if losses is None else list(losses)
    for n in names:
        get_loss(n)                                                              # unknown name: ValueError
    hyper = dict(hyper or {})
    stray = sorted(set(hyper) - set(names))
    if stray:
        raise ValueError(f"hyper given for losses not selected: {stray}; selected: {names}")
    if ref_w is None or ref_l is None:
        need = [n for n in names if LOSSES[n].needs_ref]
        if need:
            raise ValueError(f"losses {need} need ref_w and ref_l; pass them (at step 0 the policy "
                             "log-probs themselves) or choose losses without a reference")
    B = logp_w.shape[0]
    pair = list(pair_ids) if pair_ids is not None else list(range(B))
    if len(pair) != B:
        raise ValueError(f"pair_ids has {len(pair)} entries for {B} pairs")
    frames = []
    for n in names:
        out = compute_loss(n, logp_w.detach(), logp_l.detach(), ref_w, ref_l, len_w, len_l, **hyper.get(n, {}))
        p = predict(out.d_w, out.d_l, ip_wl, sq_w, sq_l, lr)
        cols = dict(d_w=out.d_w, d_l=out.d_l, **p)
        frames.append(pd.DataFrame({"pair": pair, "loss": n,
                                    **{k: v.detach().cpu().numpy() for k, v in cols.items()}}))
    cols = ["pair", "loss", "d_w", "d_l", "dlogp_w", "dlogp_l", "dmargin", "case", "thr_w", "thr_l"]
    return pd.concat(frames, ignore_index=True)[cols]


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Per loss (rows) the fraction of pairs in each case (columns `CASES`) and the mean
    predicted changes, from a `what_if` frame (or any frame with ``loss``, ``case``, ``dlogp_*``)."""
    frac = pd.crosstab(df["loss"], df["case"], normalize="index").reindex(columns=list(CASES), fill_value=0.0)
    frac.columns = [f"case_{c}" for c in frac.columns]
    means = df.groupby("loss")[["dlogp_w", "dlogp_l", "dmargin"]].mean()
    return frac.join(means)


# ------------------------------------------------------------------ token level (Theorem 3)

def first_difference(ids_w: Sequence[int], ids_l: Sequence[int]) -> int:
    """Index m (0-based) of the first response token where ``ids_w`` and ``ids_l`` differ; when one
    is a prefix of the other, m = the shorter length. ValueError if they are identical."""
    ids_w, ids_l = list(ids_w), list(ids_l)
    if ids_w == ids_l:
        raise ValueError("chosen and rejected responses are identical: no differing token")
    return next((i for i, (a, b) in enumerate(zip(ids_w, ids_l)) if a != b), min(len(ids_w), len(ids_l)))


def _mat(x: Tensor | TokenGram) -> Tensor:
    return x.M if isinstance(x, TokenGram) else x


def token_predictions(M_ww: Tensor | TokenGram, M_wl: Tensor | TokenGram, M_ll: Tensor | TokenGram,
                      d_w: float | Tensor, d_l: float | Tensor, lr: float = 1.0) -> tuple[Tensor, Tensor]:
    """Predicted change of each token's log-prob after one SGD step of one pair: ``(La,), (Lb,)``.

    ``M_ww`` (La, La), ``M_wl`` (La, Lb), ``M_ll`` (Lb, Lb): token Grams ``⟨g^t, g^s⟩`` (or the
    `TokenGram`s of `token_gram(w, w)`, `token_gram(w, l)`, `token_gram(l, l)`); ``d_w, d_l``
    scalars. Since ``g_w = Σ_s g_w^s`` and ``Δθ = η (d_w g_w - d_l g_l)``, per token (eq. 5)::

        Δlog π(y_w^t|x,y_w^<t) ≈ ⟨g_w^t, Δθ⟩ = η (d_w Σ_s M_ww[t,s] - d_l Σ_s M_wl[t,s])
        Δlog π(y_l^s|x,y_l^<s) ≈ ⟨g_l^s, Δθ⟩ = η (d_w Σ_t M_wl[t,s] - d_l Σ_r M_ll[s,r])

    Their sums are `predict`'s ``dlogp_w``, ``dlogp_l``.
    """
    M_ww, M_wl, M_ll = _mat(M_ww), _mat(M_wl), _mat(M_ll)
    La, Lb = M_wl.shape
    if M_ww.shape != (La, La) or M_ll.shape != (Lb, Lb):
        raise ValueError(f"inconsistent Gram shapes: M_ww {tuple(M_ww.shape)}, M_wl {tuple(M_wl.shape)}, "
                         f"M_ll {tuple(M_ll.shape)}")
    tok_w = lr * (d_w * M_ww.sum(1) - d_l * M_wl.sum(1))                         # (La,)
    tok_l = lr * (d_w * M_wl.sum(0) - d_l * M_ll.sum(1))                         # (Lb,)
    return tok_w, tok_l


def token_decomposition(M_ww: Tensor | TokenGram, M_wl: Tensor | TokenGram, M_ll: Tensor | TokenGram,
                        d_w: float | Tensor, d_l: float | Tensor, m: int, lr: float = 1.0) -> dict:
    """Theorem 3 of seed 004: per-token predicted changes split before / at / after token m.

    ``m``: the first differing token (`first_difference` of the response ids); other arguments as
    `token_predictions`. Returns a dict: ``m``; ``tok_w`` (La,), ``tok_l`` (Lb,) per-token
    predictions; ``w_before, w_at, w_after`` and ``l_before, l_at, l_after``: their sums over
    t < m, t = m, t > m (0-d tensors; an empty segment sums to 0); ``dlogp_w, dlogp_l``: the
    totals (= `predict`'s sentence-level values).

    Theorem 3 (learnable logits, edit distance 1) predicts before ≈ 0 (eq. 11), at ≥ 0 (eq. 12),
    after ≤ 0 (eq. 13) for the chosen response. In a transformer the tokens before m share
    parameters with everything else, so their change is not zero in general; the decomposition
    itself is exact to first order for any model.
    """
    tok_w, tok_l = token_predictions(M_ww, M_wl, M_ll, d_w, d_l, lr)
    if not 0 <= m <= max(tok_w.shape[0], tok_l.shape[0]):
        raise ValueError(f"m={m} outside the responses (lengths {tok_w.shape[0]}, {tok_l.shape[0]})")
    out = dict(m=m, tok_w=tok_w, tok_l=tok_l, dlogp_w=tok_w.sum(), dlogp_l=tok_l.sum())
    for side, tok in (("w", tok_w), ("l", tok_l)):
        out[f"{side}_before"] = tok[:m].sum()                                    # t < m: eq. 11
        out[f"{side}_at"] = tok[m:m + 1].sum()                                   # t = m: eq. 12
        out[f"{side}_after"] = tok[m + 1:].sum()                                 # t > m: eq. 13
    return out


def pair_token_decomposition(model, seq_w: TokenizedSequence, seq_l: TokenizedSequence, pad_id: int,
                             d_w: float | Tensor, d_l: float | Tensor, lr: float = 1.0, *,
                             params="all", impl: str = "ghost", chunk_size: int | None = None) -> dict:
    """`token_decomposition` of one pair straight from the model: computes the three token Grams
    with `dynamics.core.grads.token_gram` (``params``, ``impl``, ``chunk_size`` passed on) and m by
    `first_difference`; adds ``tokens_w``, ``tokens_l`` (decoded response tokens) and
    ``grams`` = (ww, wl, ll) `TokenGram`s to the returned dict."""
    m = first_difference(seq_w.response_ids, seq_l.response_ids)
    kw = dict(params=params, impl=impl, chunk_size=chunk_size)
    ww = token_gram(model, seq_w, seq_w, pad_id, **kw)
    wl = token_gram(model, seq_w, seq_l, pad_id, **kw)
    ll = token_gram(model, seq_l, seq_l, pad_id, **kw)
    out = token_decomposition(ww, wl, ll, d_w, d_l, m, lr)
    out.update(tokens_w=tuple(seq_w.tokens), tokens_l=tuple(seq_l.tokens), grams=(ww, wl, ll))
    return out
