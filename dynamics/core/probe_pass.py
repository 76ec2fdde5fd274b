"""The probe pass: one forward and one activation backward of B preference pairs give their
log-probs, the three Gram entries of each pair and the first-order effect of a real update
(docs/math.md §4.2).

At θ, for the 2B sequences i (chosen 0..B-1, rejected B..2B-1) and a parameter update Δθ::

    log π_i                                             the forward (lm_head at response positions)
    ⟨g_w,g_l⟩, ‖g_w‖², ‖g_l‖²  per pair                 §6.1 on the captured factors, 3 entries a pair
    upd_i = ⟨g_i, Δθ⟩ = Σ_uses Σ_τ rows_iτᵀ ΔW cols_iτ   the same factors, one matmul per use

Every use of a selected parameter W is an outer-product sum g_i = Σ_τ rows_iτ ⊗ cols_iτ
(`dynamics.core.ghost.Use`: a linear layer's output gradient b and input a, an embedding's one-hot
ids and b, the lm_head's r = e_y − π and h, a norm weight's materialized per-item gradient), so
⟨g_i, ΔW⟩ = Σ_τ rows_iτ · (ΔW cols_iτ): for a linear layer one product ΔW a per position, the work
of the layer's forward; for an embedding a lookup of the rows of ΔE; a tied weight sums its uses.
Where the Gram entries of a use are computed from its per-sequence gradients G_i (long sequences,
the cost model of `dynamics.core.ghost.entry_costs`), G_i is formed once and upd_i = ⟨G_i, ΔW⟩
reads it: d_in·d_out per sequence instead of T·d_in·d_out.
This replaces the forward-mode jvp (`dynamics.core.conditions.update_prediction`, ≈ 3 forwards)
and the no-grad forward of the log-probs, and forms 3 Gram entries per pair where
`dynamics.core.grads.sentence_gram` forms (2B)².

The output gradients b come from one backward of Σ_i log π_i (rows do not interact in a causal LM,
so row i of b is sequence i's own) started at the final hidden state with the analytic cotangent
(e_y − π)W, and they are contracted as they arrive (tensor hooks), one module call at a time. That
backward differentiates with respect to activations only: a zero scalar leaf ζ is added to the
output of every recorded module call (x + 0 = x bit for bit) and ``torch.autograd.grad`` asks for
∂/∂ζ, so no parameter gradient is formed, nothing is accumulated into any ``.grad`` and no
parameter's ``requires_grad`` is touched (frozen parameters are measured as well).

Mode: eval (dropout off), right padding, outside any autocast the caller set up (the recorder
takes care of that). Needs a transformers causal LM with a linear lm_head (`body_and_head`) and
modules with one tensor input and one output owning the selected parameters (the ghost engine's
requirements); other models use `dynamics.core.grads` with ``impl="func"`` or ``"autograd"``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynamics.core.ghost import Factor, Use, call_uses, entry_costs, materialized, pair_entries_from_uses
from dynamics.core.grads import analysis_mode, resolve_params
from dynamics.core.logprobs import (PairLogProbs, SequenceLogProbs, TokenizedPairs, body_and_head, check_context,
                                    collate, model_device)

__all__ = ["ProbePass", "probe_pass", "update_dot"]


@dataclass
class ProbePass:
    """What one probe pass measured at θ (`probe_pass`).

    ``logps``: the chosen and rejected log-probs, as `dynamics.core.logprobs.pair_logprobs` gives
    them (model dtype); ``ip_wl``, ``sq_w``, ``sq_l``, ``cos_wl``: (B,) float64 ⟨g_w,g_l⟩, ‖g_w‖²,
    ‖g_l‖² and their cosine (0 where a norm is 0); ``upd``: (2B,) float64 ⟨g_i, Δθ⟩, chosen then
    rejected, or None when no Δθ was given."""
    logps: PairLogProbs
    ip_wl: Tensor
    sq_w: Tensor
    sq_l: Tensor
    cos_wl: Tensor
    upd: Tensor | None = None


def _dtype_of(*tensors: Tensor) -> torch.dtype:
    """float64 if any floating tensor is float64, else float32 (half precision upcast)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def update_dot(use: Use, delta: Tensor, n_items: int) -> Tensor:
    """(I,) float64 ``⟨g_i, Δ⟩`` of one use of a parameter with update ``delta`` (the parameter's shape).

    ``g_i = Σ_τ rows_iτ ⊗ cols_iτ`` in the parameter's layout (rows, cols), so
    ``⟨g_i, Δ⟩ = Σ_τ rows_iτ · (Δ cols_iτ)``; a one-hot side (embedding ids) picks rows of Δ
    instead, a materialized use is a dot product. A factor shared by all items (one row) is
    broadcast to the ``n_items`` items. Computed in float64 for float64 factors, else float32.
    """
    if use.mat is not None:                                                      # (I, numel)
        dt = _dtype_of(use.mat, delta)
        return (use.mat.to(dt) @ delta.reshape(-1).to(dt)).double().expand(n_items)
    r, c = use.rows, use.cols
    dt = _dtype_of(*[f.x for f in (r, c) if not f.onehot], delta)
    if r.onehot:                                                                 # Δ (V, k): Δ[id]·cols
        D = delta.reshape(-1, c.x.shape[-1]).to(dt)
        v = (D[r.x] * c.x.to(dt)).sum((1, 2))
    elif c.onehot:
        D = delta.reshape(r.x.shape[-1], -1).to(dt)
        v = (D.T[c.x] * r.x.to(dt)).sum((1, 2))
    else:                                                                        # Δ (k_rows, k_cols)
        D = delta.reshape(r.x.shape[-1], c.x.shape[-1]).to(dt)
        if r.x.shape[0] == 1 and c.x.shape[0] != 1:                              # project the shared side
            v = ((r.x.to(dt) @ D) * c.x.to(dt)).sum((1, 2))                      # (I, T, k_cols)
        else:
            v = ((c.x.to(dt) @ D.T) * r.x.to(dt)).sum((1, 2))                    # (I, T, k_rows)
    return v.double().expand(n_items)


@dataclass
class _Call:
    module: nn.Module
    names: list                 # selected (role, parameter) owned by the module
    inp: Tensor | None          # detached input, (N, T, d_in) or (N, T) ids; dropped once contracted


class _Accumulator:
    """Per-pair Gram entries and per-sequence ``upd``, summed over the uses as they are handed in.

    A parameter with one use is contracted at once; one with several (a tied embedding / lm_head,
    a module called twice) keeps its uses until `finish`, for the cross terms between them."""

    def __init__(self, B: int, n_uses: dict[int, int], delta: dict[int, Tensor] | None, device):
        self.B, self.n_uses, self.delta = B, n_uses, delta
        self.w = torch.arange(B, device=device)
        self.l = torch.arange(B, 2 * B, device=device)
        zeros = lambda n: torch.zeros(n, dtype=torch.float64, device=device)  # noqa: E731
        self.ip, self.sq_w, self.sq_l = zeros(B), zeros(B), zeros(B)
        self.upd = zeros(2 * B) if delta is not None else None
        self.pending: dict[int, list[Use]] = {}

    def add(self, uses: list[tuple[int, Use]]) -> None:
        now: dict[int, list[Use]] = {}
        for pid, use in uses:
            if self.upd is not None and self.n_uses[pid] == 1 and use.mat is None:
                c_ghost, c_mat = entry_costs([use], self.B)
                if c_mat < c_ghost:   # the entries form G_i anyway: ⟨G_i, ΔW⟩ (P a sequence) instead of ΔW a (T·P)
                    use = materialized(use, 2 * self.B)
            if self.upd is not None:
                self.upd += update_dot(use, self.delta[pid], 2 * self.B)         # Σ_τ rows·(ΔW cols)
            if self.n_uses[pid] == 1:
                now.setdefault(pid, []).append(use)
            else:
                self.pending.setdefault(pid, []).append(use)
        if now:
            self._entries(now)

    def _entries(self, uses: dict[int, list[Use]]) -> None:
        ip, sw, sl = pair_entries_from_uses(uses, self.w, self.l)                # §6.1, (w_k,l_k),(w_k,w_k),(l_k,l_k)
        self.ip += ip.to(self.ip.device)
        self.sq_w += sw.to(self.ip.device)
        self.sq_l += sl.to(self.ip.device)

    def finish(self) -> None:
        if self.pending:
            self._entries(self.pending)
            self.pending = {}


@contextlib.contextmanager
def _recording(body: nn.Module, params: dict[str, nn.Parameter], zeta: Tensor,
               sink: dict) -> Iterator[list[_Call]]:
    """Forward hooks on every body module owning a selected parameter: record its input, return
    its output plus ζ (the same values, now downstream of ζ) with a tensor hook that hands the
    output gradient to ``sink["acc"]`` during the backward; forward hooks always removed."""
    wanted = {id(p) for p in params.values()}
    calls: list[_Call] = []
    handles = []

    def on_grad(call: _Call, g: Tensor) -> None:
        with torch.no_grad():
            sink["acc"].add(call_uses(call.module, call.names, call.inp, g.detach()))
        call.inp = None                                                          # its uses hold what is needed

    def make_hook(names):
        def hook(mod, args, kwargs, output):
            tensors = [a for a in args if isinstance(a, Tensor)] + [v for v in kwargs.values() if isinstance(v, Tensor)]
            if len(tensors) != 1 or not isinstance(output, Tensor) or not output.is_floating_point():
                raise NotImplementedError(
                    f"module {type(mod).__name__} takes {len(tensors)} tensor inputs / returns "
                    f"{type(output).__name__}; the probe pass needs one tensor in and one floating tensor out "
                    "(use impl='func' or 'autograd')")
            call = _Call(mod, names, tensors[0].detach())
            calls.append(call)
            out = output + zeta                                                  # x + 0 = x, bit for bit
            out.register_hook(lambda g: on_grad(call, g))
            return out
        return hook

    try:
        for module in body.modules():
            names = [(r, p) for r, p in module.named_parameters(recurse=False) if id(p) in wanted]
            if names:
                handles.append(module.register_forward_hook(make_hook(names), with_kwargs=True))
        yield calls
    finally:
        for h in handles:
            h.remove()


PAIRS_PER_PASS = 4
"""Probe pairs per forward/backward of `probe_pass` (8 sequences): every quantity is per pair or
per sequence, so the split bounds memory and changes no value beyond float rounding of the batch
shape. A pass holds about 1.8× the activations of a training step on as many sequences (the
recorded inputs, the hooked outputs, the head's e_y − π): measured on SmolLM2 float32 at 16 pairs
of 56 tokens, a recorded step peaked 5.0 GB (≈ 2.7 MB per token), so 16 TL;DR-length pairs
(32 × 387 tokens) in one pass would need ≈ 34 GB."""


def _cat(parts: list[SequenceLogProbs]) -> SequenceLogProbs:
    """The sequences of ``parts`` in order, token columns padded to the longest (zero, False)."""
    L = max(p.token_logps.shape[1] for p in parts)
    pad = lambda x: F.pad(x, (0, L - x.shape[1]))                               # noqa: E731
    return SequenceLogProbs(torch.cat([pad(p.token_logps) for p in parts]), torch.cat([pad(p.mask) for p in parts]),
                            torch.cat([p.lengths for p in parts]))


def probe_pass(model, pairs: TokenizedPairs, params="all", *,
               delta: Mapping[str, Tensor] | None = None, pairs_per_pass: int | None = PAIRS_PER_PASS) -> ProbePass:
    """Log-probs, per-pair gradient inner products and (with ``delta``) ``⟨g_i, Δθ⟩`` of ``pairs``
    at the model's current parameters, from one forward and one activation backward per
    ``pairs_per_pass`` pairs (None: all at once) (module docstring; docs/math.md §4.2).

    ``params``: θ, a `dynamics.core.grads.select_params` spec or dict (resolved here; tied weights
    once). ``delta``: canonical name -> Δθ for every parameter of θ (e.g.
    `dynamics.core.conditions.param_delta`), or None to skip ``upd``. The model's parameters,
    their ``.grad`` and ``requires_grad`` flags and its train/eval mode are left as they were.

    Raises NotImplementedError for a model the pass cannot see into (no linear lm_head, a module
    with several tensor inputs owning a selected parameter) and ValueError for a selected
    parameter no module call uses or a ``delta`` without an entry of θ.
    """
    if pairs_per_pass is not None and (isinstance(pairs_per_pass, bool) or not isinstance(pairs_per_pass, int)
                                       or pairs_per_pass < 1):
        raise ValueError(f"pairs_per_pass must be an integer >= 1 or None, got {pairs_per_pass!r}")
    params = resolve_params(model, params)
    if not params:
        raise ValueError("no parameters selected")
    B = len(pairs)
    if pairs_per_pass is not None and B > pairs_per_pass:
        parts = [probe_pass(model, pairs.subset(range(lo, min(lo + pairs_per_pass, B))), params, delta=delta,
                            pairs_per_pass=None) for lo in range(0, B, pairs_per_pass)]
        cat = lambda name: torch.cat([getattr(q, name) for q in parts])          # noqa: E731
        upd = None if delta is None else torch.cat([q.upd[:len(q.ip_wl)] for q in parts]
                                                   + [q.upd[len(q.ip_wl):] for q in parts])   # chosen, then rejected
        return ProbePass(PairLogProbs(_cat([q.logps.chosen for q in parts]), _cat([q.logps.rejected for q in parts])),
                         cat("ip_wl"), cat("sq_w"), cat("sq_l"), cat("cos_wl"), upd)
    split = body_and_head(model)
    if split is None:
        raise NotImplementedError("the probe pass needs a transformers causal LM with a linear lm_head and no logit "
                                  "scaling; use impl='func' or 'autograd'")
    body, head = split
    by_id = {id(p): n for n, p in params.items()}
    dlt = None
    if delta is not None:
        missing = sorted(set(params) - set(delta))
        if missing:
            raise ValueError(f"delta has no entry for the parameters {missing[:5]}")
        dlt = {id(p): delta[n].detach() for n, p in params.items()}
    seqs = pairs.chosen + pairs.rejected
    check_context(model, seqs)
    B, device = len(pairs), model_device(model)
    batch = collate(seqs, pairs.pad_id, "right", device)
    head_params = [(r, p) for r, p in (("weight", head.weight), ("bias", head.bias))
                   if p is not None and id(p) in by_id]
    with analysis_mode(model):
        zeta = torch.zeros((), device=device, requires_grad=True)                # ζ = 0, a leaf
        sink: dict = {}
        with _recording(body, params, zeta, sink) as calls:
            h = body(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                     position_ids=batch.position_ids, use_cache=False).last_hidden_state     # (N, T, d)
        n_uses: dict[int, int] = {}
        for _, p in [np for c in calls for np in c.names] + head_params:
            n_uses[id(p)] = n_uses.get(id(p), 0) + 1
        unused = [n for n, p in params.items() if id(p) not in n_uses]
        if unused:
            raise ValueError(f"selected parameter(s) {unused[:5]} are used by no module call the probe pass can see "
                             "(used outside a module forward?); use impl='func'")
        acc = sink["acc"] = _Accumulator(B, n_uses, dlt, device)
        with torch.no_grad():
            # the lm_head at the positions that predict response tokens (as `logprobs.response_logits`)
            tgt, mask = batch.response_positions()                               # (N, L) each
            pos = tgt - 1
            h_sel = h.detach().gather(1, pos[..., None].expand(-1, -1, h.shape[-1]))   # (N, L, d)
            logits = F.linear(h_sel, head.weight, head.bias)                     # (N, L, V)
            if logits.dtype in (torch.float16, torch.bfloat16):
                logits = logits.float()
            y = batch.input_ids.gather(1, tgt)                                   # (N, L)
            token_logps = -F.cross_entropy(logits.transpose(1, 2), y, reduction="none") * mask   # (N, L)
            # r = ∂ log π(y^t)/∂ logits = e_y − π at response positions, 0 elsewhere
            r = -torch.softmax(logits, -1)
            r.scatter_add_(-1, y[..., None], torch.ones_like(r[..., :1]))
            r = r * mask[..., None].to(r.dtype)
            del logits
            head_uses = {"weight": lambda: Use(Factor(r), Factor(h_sel)),
                         "bias": lambda: Use(Factor(r), Factor(torch.ones_like(r[..., :1])))}
            acc.add([(id(p), head_uses[role]()) for role, p in head_params])
            if calls:
                # ∂ Σ_i log π_i / ∂h = (e_y − π) W at each predicting position; the hooks contract
                cot = torch.zeros_like(h)
                cot.scatter_add_(1, pos[..., None].expand(-1, -1, h.shape[-1]), r.to(head.weight.dtype) @ head.weight)
                torch.autograd.grad(h, [zeta], cot, allow_unused=True)
            acc.finish()
    lengths = batch.lengths
    L_w, L_l = int(lengths[:B].max()), int(lengths[B:].max())
    logps = PairLogProbs(SequenceLogProbs(token_logps[:B, :L_w], mask[:B, :L_w], lengths[:B]),
                         SequenceLogProbs(token_logps[B:, :L_l], mask[B:, :L_l], lengths[B:]))
    denom = (acc.sq_w * acc.sq_l).sqrt()
    cos = torch.where(denom > 0, acc.ip / denom.clamp_min(torch.finfo(denom.dtype).tiny), torch.zeros_like(acc.ip))
    return ProbePass(logps, acc.ip.cpu(), acc.sq_w.cpu(), acc.sq_l.cpu(), cos.cpu(),
                     None if acc.upd is None else acc.upd.cpu())
