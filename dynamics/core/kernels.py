"""Empirical NTKs and the one-step A·K·G decomposition of learning dynamics (seed 000).

After one SGD step ``Δθ = -η ∇_θ L(u)`` on an update example u, the logits ``z`` of an observed
example o move, to first order, by ``Δz_o = J_o Δθ`` with ``J = ∂z/∂θ`` (seed 000, "Learning
dynamics")::

    Δlog π(y_o^t | χ_o^t) = -η  A(χ_o^t)  Σ_s K(χ_o^t, χ_u^s)  G(χ_u^s)  + O(η²)

    A(χ_o^t)        = I - 1 π_o^tᵀ          softmax Jacobian of log π; the row of token y is
                                              (e_y - π_o^t)ᵀ, so Δlog π(y) = (e_y - π)ᵀ Δz
    K(χ_o^t, χ_u^s) = J_o^t J_u^sᵀ            (V, V) empirical NTK of the logits
    G(χ_u^s)        = ∂L/∂z_u^s               SFT, L = -Σ_s log π(y_u^s):  π_u^s - e_{y_u^s}

χ^t is the prompt plus the response prefix that predicts response token t (teacher forcing).
For a margin loss ``∇L = -(d_w ∇log π_w - d_l ∇log π_l)`` (seed 004, eq. 8; DPO: d_w = d_l =
β σ(-β·margin)), ``Δz_o = -η [K(o, u⁺) G⁺ - K(o, u⁻) G⁻]`` with ``G^± = d_{w/l} (π_u^± - e_{y_u^±})``
(seed 000: ``G_DPO± = β(1-α)(π - y±)``); any loss of `dynamics.core.losses` fits with its own d_w, d_l.

Contracting A, K and G for one token pair gives back the gradient inner product of the token
log-probs: ``-η a_tᵀ K_ts G_s = η ⟨∇log π(y_o^t), ∇log π(y_u^s)⟩`` (SFT), i.e. ``η M[t, s]`` of
`dynamics.core.grads.token_gram` — the log-prob kernel (`logprob_kernel`) is the practical eNTK that
scales to real models with the ghost engine, while the logit kernel K is materialized here with
``torch.func.jacrev`` (memory ∝ |y|·|vocab|·P: tiny models, or a `vocab_subset` for real ones).
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import Tensor
from torch.func import jacrev

from dynamics.core.grads import (analysis_mode, functional_logits, gram_of, requiring_grad, resolve_params,
                            split_params, sentence_gram)
from dynamics.core.logprobs import TokenizedSequence, check_context, sequence_logprobs

__all__ = ["AKG_LOSSES", "logprob_kernel", "logit_ntk", "vocab_subset", "akg_prediction", "akg_residual"]

AKG_LOSSES = ("sft", "dpo")


# ------------------------------------------------------------------ log-prob space

def logprob_kernel(model, seqs_a: Sequence[TokenizedSequence], seqs_b: Sequence[TokenizedSequence],
                   pad_id: int, *, params="all", impl: str = "ghost", chunk_size: int | None = None) -> Tensor:
    """(Na, Nb) ``K[a, b] = ⟨∇_θ log π(y_a|x_a), ∇_θ log π(y_b|x_b)⟩``, e.g. probes × training responses.

    One `sentence_gram` over the concatenation ``seqs_a + seqs_b`` (any ``impl``), sliced to the
    off-diagonal block. ``η K[a, b]`` is the first-order change of ``log π(y_a|x_a)`` after an SGD
    step that raises ``log π(y_b|x_b)`` (a step on the SFT loss of b).
    """
    a, b = list(seqs_a), list(seqs_b)
    if not a or not b:
        raise ValueError(f"logprob_kernel needs at least one sequence on each side (got {len(a)} and {len(b)})")
    G = sentence_gram(model, a + b, pad_id, params=params, impl=impl, chunk_size=chunk_size)  # (Na+Nb, Na+Nb)
    return G[: len(a), len(a):]


# ------------------------------------------------------------------ logit space

def _ids(model, seq: TokenizedSequence) -> Tensor:
    return torch.tensor(seq.prompt_ids + seq.response_ids, device=next(model.parameters()).device)  # (T,)


def _check_positions(seq: TokenizedSequence, positions: Sequence[int], what: str) -> list[int]:
    L = len(seq.response_ids)
    out = [int(p) for p in positions]
    bad = [p for p in out if not 0 <= p < L]
    if bad:
        raise ValueError(f"{what}: response positions {bad} out of range for a response of {L} tokens")
    return out


def _logit_jacobian(model, seq: TokenizedSequence, positions: Sequence[int], vocab: Tensor | None,
                    params: dict, chunk_size: int | None) -> tuple[Tensor, dict[str, Tensor]]:
    """Logits ``z`` (n, S) at the rows predicting response tokens ``positions`` (restricted to
    ``vocab``, S = |vocab| or V) and their Jacobian ``name -> (n·S, *param_shape)``.

    Response token t of a prompt of P tokens is predicted by the logit row ``P + t - 1``.
    """
    theta, consts = split_params(model, params)
    ids = _ids(model, seq)
    T, P = ids.shape[0], len(seq.prompt_ids)
    rows = torch.tensor([P + t - 1 for t in positions], device=ids.device)       # (n,)
    vocab = None if vocab is None else torch.as_tensor(vocab, dtype=torch.long, device=ids.device)
    pos = torch.arange(T, device=ids.device)

    def z(theta):                                                                # -> (n·S,)
        logits = functional_logits(model, theta, consts, ids, None, pos)[rows]             # (n, V)
        return (logits if vocab is None else logits[:, vocab]).reshape(-1)

    with analysis_mode(model, eager=True):
        value = z(theta).detach()
        jac = jacrev(z, chunk_size=chunk_size)(theta)                            # name -> (n·S, *shape)
    return value.reshape(len(positions), -1), jac


def _kernel_blocks(jo: dict[str, Tensor], ju: dict[str, Tensor], no: int, nu: int) -> Tensor:
    """(no, So, nu, Su) ``K[t, v, s, w] = ⟨∂z_o^t[v]/∂θ, ∂z_u^s[w]/∂θ⟩`` from flat Jacobians."""
    K = gram_of(jo, ju)                                                         # (no·So, nu·Su)
    return K.reshape(no, K.shape[0] // no, nu, K.shape[1] // nu)


def logit_ntk(model, seq_o: TokenizedSequence, pos_o: int, seq_u: TokenizedSequence, pos_u: int,
              vocab: Tensor | tuple[Tensor, Tensor] | None = None, *, params="all",
              chunk_size: int | None = None) -> Tensor:
    """(Vo, Vu) logit eNTK ``K = ∇_θ z_o[vocab_o] ∇_θ z_u[vocab_u]ᵀ`` at one position of each sequence.

    ``pos_o``, ``pos_u``: response-token indices (0-based); the logits are those *predicting*
    that token (row ``len(prompt) + pos - 1``). ``vocab``: None (the full vocabulary, exact and
    memory ∝ V·P), one LongTensor of token ids for both sides (e.g. `vocab_subset`), or a pair
    ``(vocab_o, vocab_u)``. Exact: a restriction is a sub-block of the full K, not an
    approximation of it. ``chunk_size`` bounds the vjps ``jacrev`` vmaps at once.
    """
    params = resolve_params(model, params)
    check_context(model, [seq_o, seq_u])
    vo, vu = vocab if isinstance(vocab, (tuple, list)) else (vocab, vocab)
    (po,), (pu,) = _check_positions(seq_o, [pos_o], "seq_o"), _check_positions(seq_u, [pos_u], "seq_u")
    _, jo = _logit_jacobian(model, seq_o, [po], vo, params, chunk_size)
    _, ju = _logit_jacobian(model, seq_u, [pu], vu, params, chunk_size)
    return _kernel_blocks(jo, ju, 1, 1)[0, :, 0, :]                              # (Vo, Vu)


@torch.no_grad()
def vocab_subset(model, seqs: Sequence[TokenizedSequence], k: int = 8) -> Tensor:
    """Sorted unique token ids: every response token of ``seqs`` plus the top-``k`` tokens of each
    next-token distribution along each response (teacher forcing) — where K, A and G carry mass."""
    keep = set()
    was_training = model.training
    model.eval()
    try:
        for s in seqs:
            P = len(s.prompt_ids)
            logits = model(input_ids=_ids(model, s)[None]).logits[0, P - 1:s.length - 1]  # (L, V)
            keep.update(s.response_ids)
            keep.update(logits.topk(min(k, logits.shape[-1]), -1).indices.flatten().tolist())
    finally:
        model.train(was_training)
    return torch.tensor(sorted(keep), dtype=torch.long, device=next(model.parameters()).device)


# ------------------------------------------------------------------ A · K · G

def _check_loss(loss, seq_u_rejected, d_w, d_l) -> None:
    if loss not in AKG_LOSSES:
        raise ValueError(f"unknown loss {loss!r}; known: {', '.join(AKG_LOSSES)} (any margin loss of "
                         "dynamics.core.losses is 'dpo' with its own coefficients d_w, d_l)")
    if loss == "sft" and (seq_u_rejected is not None or d_w is not None or d_l is not None):
        raise ValueError("loss='sft' takes no seq_u_rejected, d_w or d_l (it trains seq_u only)")
    if loss == "dpo" and (seq_u_rejected is None or d_w is None or d_l is None):
        raise ValueError("loss='dpo' needs seq_u_rejected, d_w and d_l (DPO: d_w = d_l = β σ(-β·margin); "
                         "dynamics.core.losses gives them for every loss)")


def _residual(z: Tensor, targets: Sequence[int]) -> tuple[Tensor, Tensor]:
    """(π, π - e_y) for logits z (n, V) and target ids (n,): both (n, V)."""
    pi = torch.softmax(z, -1)
    onehot = torch.nn.functional.one_hot(torch.tensor(list(targets), device=z.device), z.shape[-1]).to(z.dtype)
    return pi, pi - onehot


def akg_prediction(model, seq_o: TokenizedSequence, seq_u: TokenizedSequence, lr: float, *,
                   loss: str = "sft", seq_u_rejected: TokenizedSequence | None = None,
                   d_w: float | None = None, d_l: float | None = None, params="all",
                   chunk_size: int | None = None) -> dict:
    """Predicted change of each token log-prob of o after one SGD step of size ``lr`` on u.

    ``loss="sft"``: ``L = -Σ_s log π(y_u^s)``.
    ``loss="dpo"``: ``∇L = -(d_w ∇log π(y_u⁺) - d_l ∇log π(y_u⁻))``
    with ``seq_u`` = y⁺ and ``seq_u_rejected`` = y⁻ (any margin loss, given its d_w, d_l).
    Full vocabulary, so the result is the exact first-order change (tested against flat
    gradients to 1e-10); memory ∝ (|y_o| + |y_u|)·V·P for the Jacobians and |y_o|·|y_u|·V² for K.

    Returns a dict of tensors (Lo = |y_o|, Lu = |y_u|, V = vocabulary)::

        pred     (Lo,)          Δlog π(y_o^t) = a_tᵀ Δz_o^t                       (first order)
        delta_z  (Lo, V)        Δz_o^t = -η Σ_s K[t, :, s, :] G[s]   (DPO: K_w G_w - K_l G_l)
        A        (Lo, V)        a_t = e_{y_o^t} - π_o^t, the row of A = I - 1πᵀ for token y_o^t
        A_norm   (Lo,)          ‖a_t‖₂
        K        (Lo, V, Lu, V) logit eNTK blocks K(χ_o^t, χ_u^s)       (DPO: K_w, K_l)
        K_norm   (Lo, Lu)       Frobenius norm of each block            (DPO: K_w_norm, K_l_norm)
        G        (Lu, V)        π_u^s - e_{y_u^s}                        (DPO: G_w, G_l with d_w, d_l)
        G_norm   (Lu,)          ‖G[s]‖₂                                 (DPO: G_w_norm, G_l_norm)
        contrib  (Lo, Lu)       -η a_tᵀ K_ts G_s: the share of update token s (Σ_s = pred);
                                equals η ⟨∇log π(y_o^t), ∇log π(y_u^s)⟩ (DPO: contrib_w, contrib_l
                                with Δ = Σ contrib_w + Σ contrib_l, contrib_l = +η a K_l G_l)
    """
    _check_loss(loss, seq_u_rejected, d_w, d_l)
    params = resolve_params(model, params)
    updates = [("w", seq_u, d_w)] + ([("l", seq_u_rejected, d_l)] if loss == "dpo" else [])
    check_context(model, [seq_o] + [s for _, s, _ in updates])
    Lo = len(seq_o.response_ids)
    z_o, j_o = _logit_jacobian(model, seq_o, range(Lo), None, params, chunk_size)   # (Lo, V)
    a = -_residual(z_o, seq_o.response_ids)[1]                                   # (Lo, V) e_y - π
    out = dict(A=a, A_norm=a.norm(dim=-1), tokens_o=seq_o.tokens)
    delta_z = torch.zeros_like(z_o)
    pred = torch.zeros(Lo, dtype=z_o.dtype, device=z_o.device)
    for side, seq, coef in updates:
        Lu = len(seq.response_ids)
        z_u, j_u = _logit_jacobian(model, seq, range(Lu), None, params, chunk_size)  # (Lu, V)
        G = _residual(z_u, seq.response_ids)[1] * (1.0 if coef is None else float(coef))  # (Lu, V)
        K = _kernel_blocks(j_o, j_u, Lo, Lu)                                     # (Lo, V, Lu, V)
        sign = -1.0 if side == "w" else 1.0   # Δz = -η (K_w G_w - K_l G_l)
        KG = torch.einsum("tvsw,sw->tsv", K, G)                                  # (Lo, Lu, V)
        contrib = sign * lr * torch.einsum("tv,tsv->ts", a, KG)                  # (Lo, Lu)
        delta_z = delta_z + sign * lr * KG.sum(1)
        pred = pred + contrib.sum(1)
        sfx = "" if loss == "sft" else f"_{side}"
        out.update({f"K{sfx}": K, f"K{sfx}_norm": K.pow(2).sum(dim=(1, 3)).sqrt(),
                    f"G{sfx}": G, f"G{sfx}_norm": G.norm(dim=-1),
                    f"contrib{sfx}": contrib, f"tokens_u{sfx}": seq.tokens})
    out.update(pred=pred, delta_z=delta_z)
    return out


def _surrogate_loss(model, updates) -> Tensor:
    """``Σ_side ∓coef · log π(y_side)``: its gradient at θ_t is the step's ``∇L`` (d_w, d_l held at θ_t)."""
    total = 0
    for side, seq, coef in updates:
        logp = sequence_logprobs(model, [seq], 0).logp[0]
        total = total + (-1.0 if side == "w" else 1.0) * (1.0 if coef is None else float(coef)) * logp
    return total


def akg_residual(model, seq_o: TokenizedSequence, seq_u: TokenizedSequence, lr: float, *,
                 loss: str = "sft", seq_u_rejected: TokenizedSequence | None = None,
                 d_w: float | None = None, d_l: float | None = None, params="all",
                 chunk_size: int | None = None, prediction: dict | None = None) -> dict:
    """`akg_prediction` against one real SGD step ``θ ← θ - lr ∇L`` on a copy of the model.

    Only the ``params`` selection moves (the others stay, as in the prediction). For DPO-type
    losses the step uses the fixed coefficients d_w, d_l, which is exactly one SGD step of the
    loss whose coefficients at θ_t they are. ``prediction`` reuses an `akg_prediction` result
    made at the same ``lr`` (it is linear in lr: scale ``pred`` to reuse one across rates).

    Returns (Lo,) tensors ``pred``, ``actual`` (``log π_{t+1}(y_o^t) - log π_t(y_o^t)``) and
    ``residual = actual - pred``, which is O(lr²) (tested), and the ``prediction`` dict.
    """
    _check_loss(loss, seq_u_rejected, d_w, d_l)
    names = list(resolve_params(model, params))
    if prediction is None:
        prediction = akg_prediction(model, seq_o, seq_u, lr, loss=loss, seq_u_rejected=seq_u_rejected,
                                    d_w=d_w, d_l=d_l, params=params, chunk_size=chunk_size)
    updates = [("w", seq_u, d_w)] + ([("l", seq_u_rejected, d_l)] if loss == "dpo" else [])
    stepped = copy.deepcopy(model)
    ps = [dict(stepped.named_parameters())[n] for n in names]
    with analysis_mode(stepped), requiring_grad(ps):
        grads = torch.autograd.grad(_surrogate_loss(stepped, updates), ps, allow_unused=True)
        with torch.no_grad():
            for p, g in zip(ps, grads):
                if g is not None:
                    p.sub_(lr * g)
    with analysis_mode(model), analysis_mode(stepped), torch.no_grad():
        before = sequence_logprobs(model, [seq_o], 0).token_logps[0]             # (Lo,)
        after = sequence_logprobs(stepped, [seq_o], 0).token_logps[0]
    actual = after - before
    pred = prediction["pred"]
    return dict(pred=pred, actual=actual, residual=actual - pred, prediction=prediction)
