"""Which training pairs moved a probe: the real update split over the pairs of its batch (docs/math.md §4.1).

One optimizer step minimizes the batch loss ``L = (1/B_opt) Σ_u ℓ_u`` over the B training pairs of
the step (all micro-batches). By the chain rule (§2) the gradient of pair u's share is

    G_u = c_w,u g_w,u + c_l,u g_l,u,      c_w,u = ∂L/∂lw_u = −d_w,u/B_opt,   c_l,u = ∂L/∂ll_u = +d_l,u/B_opt,

and ``∇L = Σ_u G_u``. Given its state, each optimizer modelled here moves θ by

    Δθ = U(∇L) + R

with U linear (`update_map`; it does not depend on θ) and R what does not depend on this step's
gradient (momentum of earlier steps, weight decay). So for an observed response o (a probe) with
g_o = ∇log π(y_o|x_o) at θ_s, the first-order change ``upd[o] = ⟨g_o, Δθ⟩`` (§4) is

    upd[o] = Σ_u contrib[o, u] + residual[o],     contrib[o, u] = ⟨g_o, U(G_u)⟩,   residual[o] = ⟨g_o, R⟩.

For SGD without momentum or weight decay R = 0 and ``contrib[o, u] = −η (c_w,u K[o, w_u] + c_l,u
K[o, l_u])`` with the cross-Gram ``K[o, v] = ⟨g_o, g_v⟩`` (the empirical NTK in log-prob space).

- `update_map`: U of a ``torch.optim.SGD``, ``Adam`` or ``AdamW`` read off its state after the step
  (`UpdateMap`); anything else is refused with `InputError`.
- `TrainingBatch`: the training pairs of one step and their scalars c_w, c_l.
- `training_pair_contributions`: K, contrib, upd and the residual (`PairContributions`).
- `parameters_at`: put θ_s back into the model for the computation, θ_{s+1} restored bit for bit.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import torch
from torch import Tensor

from dynamics.core.conditions import update_prediction
from dynamics.core.grads import analysis_mode, requiring_grad, resolve_params
from dynamics.core.kernels import logprob_kernel
from dynamics.core.logprobs import TokenizedPairs, TokenizedSequence, batch_logprobs, collate, model_device
from dynamics.errors import InputError

__all__ = ["UpdateMap", "update_map", "TrainingBatch", "PairContributions", "training_pair_contributions",
           "parameters_at", "METHODS"]

METHODS = ("auto", "jvp")
"""How `training_pair_contributions` gets contrib: ``"jvp"`` always by one backward and one jvp per
training pair; ``"auto"`` from the cross-Gram K alone when U is one scalar on every parameter of θ
(SGD), which gives the same numbers without the B backwards and jvps."""


# ------------------------------------------------------------------ the optimizer's linear map U

@dataclass(frozen=True)
class UpdateMap:
    """The part of one optimizer step that is linear in the step's gradient: ``U(G)``.

    ``factors``: canonical parameter name -> the factor f with ``U(G) = f ⊙ G`` on that parameter, a
    Python float (SGD: one scalar per parameter group) or a tensor of the parameter's shape (Adam:
    element-wise). Parameters of θ that the step did not move are absent (U = 0 there).
    ``kind``: the optimizer's class name.
    """
    factors: dict[str, float | Tensor]
    kind: str

    @property
    def names(self) -> list[str]:
        """The parameters U moves, in θ's order."""
        return list(self.factors)

    @property
    def scalar(self) -> float | None:
        """The common factor when U = f·G with one scalar f on every moved parameter, else None."""
        vals = list(self.factors.values())
        if not vals or any(isinstance(v, Tensor) for v in vals) or len(set(vals)) != 1:
            return None
        return vals[0]

    def __call__(self, grads: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``U(G)``: ``grads`` maps every name of `names` to a tensor of that parameter's shape;
        returns the same names -> ``f ⊙ G`` (same shapes)."""
        missing = [n for n in self.factors if n not in grads]
        if missing:
            raise ValueError(f"U(G): no gradient for {missing}")
        return {n: f * grads[n] for n, f in self.factors.items()}


def _scalar(x) -> float:
    return float(x.item() if isinstance(x, Tensor) else x)


def update_map(optimizer, params) -> UpdateMap:
    """U of the step ``optimizer`` has just made, restricted to θ = ``params``: a dict canonical
    name -> parameter (`dynamics.core.grads.resolve_params`, ``Analyzer.params``). Call it after
    ``optimizer.step()`` and before anything changes the optimizer's state or learning rate (an lr
    scheduler's step): U is read off them. Returns an `UpdateMap`.

    Models torch 2.13's ``torch.optim.SGD``, ``Adam`` and ``AdamW`` (every group's own lr, betas,
    eps, weight decay, momentum; ``foreach``, ``fused``, ``capturable``, ``differentiable`` compute
    the same map):

    - SGD, ``p ← p − η b`` with ``b`` the gradient plus coupled weight decay λθ_s, through the
      momentum buffer when μ > 0: without momentum, and with momentum μ (dampening 0), U(G) = −η G
      at every step (the buffer is ``μ buf + G`` and the first step's buffer is G); with Nesterov
      U(G) = −η(1 + μ) G. R is −η(λθ_s) (times 1+μ with Nesterov) plus −ημ buf_{s−1} (−ημ² buf_{s−1}
      with Nesterov). Dampening τ > 0 makes U's factor −η on the step that creates the buffer and
      −η(1−τ) afterwards, which the state after the step does not tell apart: refused.
    - Adam/AdamW, ``m_t = β1 m_{t−1} + (1−β1) G̃``, ``Δθ = −η m_t / ((1−β1^t) D)`` with
      ``D = sqrt(v_t)/sqrt(1−β2^t) + eps`` (``max_exp_avg_sq`` instead of ``v_t`` with amsgrad). v_t
      and t are read after the step, so they include this step's gradient: D is exactly this
      step's denominator and U(G) = −η (1−β1)/(1−β1^t) · G / D element-wise. R = −η β1 m_{t−1} /
      ((1−β1^t) D) plus the weight decay: AdamW's decoupled −ηλθ_s (applied to θ before the Adam
      step), or Adam's coupled λθ_s inside G̃, which contributes −η(1−β1)/(1−β1^t) λθ_s / D.

    A parameter of θ in no group of the optimizer, frozen (``requires_grad`` False), or without
    Adam state (never stepped) is not moved: absent from the map. Raises `InputError` naming what is
    not modelled: another optimizer class (subclasses too: their ``step`` may differ),
    ``maximize=True``, SGD dampening with momentum, complex parameters.
    """
    kind = type(optimizer).__name__
    if type(optimizer) not in (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW):
        raise InputError(f"the per-training-pair split models torch.optim.SGD, Adam and AdamW; "
                         f"optimizer {type(optimizer).__module__}.{kind} is not modelled")
    if not isinstance(params, Mapping):
        raise TypeError("update_map needs params as a dict name -> parameter (e.g. Analyzer.params)")
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    factors: dict[str, float | Tensor] = {}
    for name, p in params.items():
        group = group_of.get(id(p))
        if group is None or not p.requires_grad:
            continue
        if group.get("maximize", False):
            raise InputError(f"{kind} with maximize=True (it ascends the loss) is not modelled by the "
                             f"per-training-pair split")
        if torch.is_complex(p):
            raise InputError(f"{kind}: complex parameter {name!r} is not modelled by the per-training-pair split")
        lr = _scalar(group["lr"])
        if kind == "SGD":
            mu, tau = _scalar(group["momentum"]), _scalar(group["dampening"])
            if mu != 0 and tau != 0:
                raise InputError(f"SGD with momentum {mu:g} and dampening {tau:g} is not modelled by the "
                                 f"per-training-pair split (its factor on the gradient differs on the step "
                                 f"that creates the momentum buffer); use dampening 0")
            factors[name] = -lr * (1.0 + mu if group["nesterov"] else 1.0)
            continue
        state = optimizer.state.get(p, {})
        if "step" not in state:
            continue                                                             # never stepped: not moved
        beta1, beta2 = (_scalar(b) for b in group["betas"])
        t = _scalar(state["step"])
        v = state["max_exp_avg_sq"] if group["amsgrad"] else state["exp_avg_sq"]
        bc1, bc2 = 1.0 - beta1 ** t, 1.0 - beta2 ** t
        denom = v.detach().sqrt() / math.sqrt(bc2) + _scalar(group["eps"])      # D, the step's own
        factors[name] = (-lr * (1.0 - beta1) / bc1) / denom
    return UpdateMap(factors, kind)


# ------------------------------------------------------------------ the step's training pairs

@dataclass
class TrainingBatch:
    """The B training pairs of one optimizer step and the scalars of its loss L.

    ``pairs``: the pairs (all micro-batches; `concat` joins micro-batches); ``c_w``, ``c_l``: (B,)
    ``∂L/∂lw_u`` and ``∂L/∂ll_u`` in pair order: ``−d_w/B_opt`` and ``+d_l/B_opt`` for the trainer's
    batch-mean loss over the whole optimizer batch of B_opt pairs (§2). Stored detached, float64, CPU.
    """
    pairs: TokenizedPairs
    c_w: Tensor
    c_l: Tensor

    def __post_init__(self):
        if not isinstance(self.pairs, TokenizedPairs):
            raise InputError(f"TrainingBatch.pairs must be TokenizedPairs, got {type(self.pairs).__name__}")
        B = len(self.pairs)
        if B == 0:
            raise InputError("TrainingBatch needs at least one training pair")
        for name in ("c_w", "c_l"):
            c = torch.as_tensor(getattr(self, name)).detach().double().cpu().reshape(-1)
            if c.shape != (B,):
                raise InputError(f"TrainingBatch.{name} has {c.numel()} entries for {B} pairs")
            if not torch.isfinite(c).all():
                raise InputError(f"TrainingBatch.{name} has non-finite entries: {c.tolist()}")
            setattr(self, name, c)

    def __len__(self) -> int:
        return len(self.pairs)

    @staticmethod
    def concat(batches: "TrainingBatch | Sequence[TrainingBatch]") -> "TrainingBatch":
        """One batch from the micro-batches of a step, in order (a single batch is returned as is)."""
        if isinstance(batches, TrainingBatch):
            return batches
        batches = list(batches)
        if not batches or not all(isinstance(b, TrainingBatch) for b in batches):
            raise InputError("train_batch must be a TrainingBatch or a non-empty list of them (one per micro-batch)")
        if len(batches) == 1:
            return batches[0]
        first = batches[0].pairs
        if len({b.pairs.pad_id for b in batches}) != 1:
            raise InputError("the micro-batches of a step have different pad ids")
        pairs = TokenizedPairs([i for b in batches for i in b.pairs.pair_ids],
                               [s for b in batches for s in b.pairs.chosen],
                               [s for b in batches for s in b.pairs.rejected], first.pad_id, first.max_length,
                               first.truncation)
        return TrainingBatch(pairs, torch.cat([b.c_w for b in batches]), torch.cat([b.c_l for b in batches]))


# ------------------------------------------------------------------ the split

@dataclass
class PairContributions:
    """Result of `training_pair_contributions` for N observed responses and B training pairs
    (float64, CPU).

    ``K`` (N, 2B): ``⟨g_o, g_v⟩`` over θ with the training chosen responses in columns 0..B−1 and the
    rejected in B..2B−1; ``contrib`` (N, B): ``⟨g_o, U(G_u)⟩``; ``upd`` (N,): ``⟨g_o, Δθ⟩``;
    ``residual`` (N,): ``upd − Σ_u contrib`` (= ⟨g_o, R⟩ up to rounding); ``c_w``, ``c_l`` (B,).
    """
    K: Tensor
    contrib: Tensor
    upd: Tensor
    residual: Tensor
    c_w: Tensor
    c_l: Tensor

    @property
    def K_w(self) -> Tensor:
        """(N, B) ``⟨g_o, g_w,u⟩``."""
        return self.K[:, : self.K.shape[1] // 2]

    @property
    def K_l(self) -> Tensor:
        """(N, B) ``⟨g_o, g_l,u⟩``."""
        return self.K[:, self.K.shape[1] // 2:]


def _pair_gradient(model, w: TokenizedSequence, l: TokenizedSequence, pad_id: int, c_w: float, c_l: float,
                   params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``G_u = ∇(c_w lw + c_l ll)`` over ``params`` (name -> tensor of its shape): one forward of the
    two sequences and one ``torch.autograd.grad`` (``.grad`` of the parameters untouched)."""
    ps = list(params.values())
    with requiring_grad(ps):
        logp = batch_logprobs(model, collate([w, l], pad_id, "right", model_device(model))).logp    # (2,)
        s = c_w * logp[0] + c_l * logp[1]
        grads = torch.autograd.grad(s, ps, allow_unused=True)
    return {n: (g if g is not None else torch.zeros_like(p)).detach() for (n, p), g in zip(params.items(), grads)}


def training_pair_contributions(model, observed: Sequence[TokenizedSequence], batch: TrainingBatch,
                                update: UpdateMap, delta: Mapping[str, Tensor], *, params="all",
                                impl: str = "ghost", chunk_size: int | None = None,
                                method: str = "auto") -> PairContributions:
    """Split the first-order change of N observed responses under one optimizer step over the
    step's B training pairs (docs/math.md §4.1). The model must be at θ_s, the parameters before
    the step (`parameters_at` with a snapshot taken before it).

    ``observed``: N sequences (the recorder: the probes' chosen then rejected responses, N = 2n);
    ``batch``: the step's training pairs and c_w, c_l (`TrainingBatch`); ``update``: the step's
    `UpdateMap` (`update_map` after the step); ``delta``: Δθ = θ_{s+1} − θ_s over θ
    (`dynamics.core.conditions.param_delta`); ``params``: θ, as for `dynamics.core.grads.sentence_gram`
    (every name of ``update`` must be in it); ``impl``, ``chunk_size``: the Gram engine.

    Computes, in analysis mode (eval, grad enabled; call it outside autocast):

    - ``K`` (N, 2B): one Gram of the N + 2B sequences (``impl``), the cross block;
    - ``upd`` (N,): ``⟨g_o, Δθ⟩`` by one jvp along Δθ;
    - ``contrib`` (N, B): per training pair u, ``G_u`` by one forward and one ``torch.autograd.grad``
      of ``c_w,u lw_u + c_l,u ll_u`` over its two sequences (never ``.backward()``: the trainer's
      ``.grad`` stays untouched), ``v_u = U(G_u)``, then one jvp of the N observed log-probs along
      v_u (`dynamics.core.conditions.update_prediction`). With ``method="auto"`` and U one scalar
      −a on every parameter of θ (SGD), ``contrib = −a (c_w K_w + c_l K_l)`` instead, from K;
    - ``residual`` (N,): ``upd − Σ_u contrib``.

    Cost per call: the Gram of N + 2B sequences and 1 jvp over the N sequences; with the jvp path
    also B backwards on 2 sequences and B jvps over the N sequences (≈ 3 forwards of N sequences
    each). Memory: one gradient-sized G_u and v_u at a time.

    The trainer's gradient is computed in its own mode (train, possibly under autocast); G_u here in
    eval mode at full precision, so dropout, mixed precision, gradient clipping or anything else
    between the backward and the step shows up in the residual, not in contrib.
    """
    if method not in METHODS:
        raise InputError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    if not isinstance(batch, TrainingBatch):
        raise InputError(f"batch must be a TrainingBatch, got {type(batch).__name__}")
    if not isinstance(update, UpdateMap):
        raise InputError(f"update must be an UpdateMap (update_map(optimizer, params)), got {type(update).__name__}")
    observed = list(observed)
    if not observed:
        raise InputError("training_pair_contributions needs at least one observed sequence")
    params = resolve_params(model, params)
    stray = [n for n in update.names if n not in params]
    if stray:
        raise InputError(f"the update map moves parameters outside θ: {stray}")
    pad_id, B, N = batch.pairs.pad_id, len(batch), len(observed)
    train_seqs = batch.pairs.chosen + batch.pairs.rejected

    K = logprob_kernel(model, observed, train_seqs, pad_id, params=params, impl=impl,
                       chunk_size=chunk_size).double().cpu()                       # (N, 2B)
    upd = update_prediction(model, observed, pad_id, delta, params).double().cpu()   # (N,)
    moving = {n: params[n] for n in update.names}
    scalar = update.scalar if len(moving) == len(params) else None
    if method == "auto" and scalar is not None:
        contrib = scalar * (batch.c_w[None, :] * K[:, :B] + batch.c_l[None, :] * K[:, B:])
    else:
        contrib = torch.zeros(N, B, dtype=torch.float64)
        with analysis_mode(model):
            for u in range(B):
                c_w, c_l = float(batch.c_w[u]), float(batch.c_l[u])
                if not moving or (c_w == 0 and c_l == 0):
                    continue                                                     # G_u = 0 (e.g. an inactive hinge)
                G = _pair_gradient(model, batch.pairs.chosen[u], batch.pairs.rejected[u], pad_id, c_w, c_l, moving)
                v = update(G)
                del G
                contrib[:, u] = update_prediction(model, observed, pad_id, v, moving).double().cpu()
    return PairContributions(K=K, contrib=contrib, upd=upd, residual=upd - contrib.sum(1),
                             c_w=batch.c_w.clone(), c_l=batch.c_l.clone())


# ------------------------------------------------------------------ θ_s back in place

@contextlib.contextmanager
def parameters_at(model, values: Mapping[str, Tensor]) -> Iterator[None]:
    """Temporarily give the named parameters of ``model`` the ``values`` (name -> tensor, e.g. θ_s
    from `dynamics.core.conditions.snapshot_params`); on exit, also after an error, they get back
    their current values bit for bit (a copy of them is held meanwhile). Nothing else (``.grad``,
    optimizer state, modes) is touched."""
    named = dict(model.named_parameters(remove_duplicate=False))
    unknown = sorted(set(values) - set(named))
    if unknown:
        raise ValueError(f"not parameters of the model: {unknown}")
    for n, v in values.items():
        if v.shape != named[n].shape:
            raise ValueError(f"values[{n!r}] has shape {tuple(v.shape)}, parameter {tuple(named[n].shape)}")
    current = {n: named[n].detach().clone() for n in values}
    try:
        with torch.no_grad():
            for n, v in values.items():
                named[n].copy_(v)
        yield
    finally:
        with torch.no_grad():
            for n, v in current.items():
                named[n].copy_(v)
