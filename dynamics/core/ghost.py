"""Exact gradient inner products without materializing per-example gradients ("ghost" engine).

Every parameter use in a network is a sum of outer products. A linear layer ``y = W x`` used at
positions τ of item i contributes ``g_i = Σ_τ b_iτ ⊗ a_iτ`` to ``∇W`` (``a``: input, ``b``:
gradient of the output). Hence (docs/math.md §6.1; the cost choice in §6.2)::

    ⟨g_i, g_j⟩ = Σ_{τ,σ} (a_iτ·a_jσ) (b_iτ·b_jσ)                  cost T_i T_j (d_in + d_out)

instead of ``d_in·d_out`` per item. The same identity covers every use we meet, with a
*factor* on each side of the outer product:

    Linear     W (out, in):  rows = ∂y (dense),   cols = x
    Conv1D     W (in, out):  rows = x,            cols = ∂y        (transformers' GPT-2 layer)
    Embedding  W (V, d):     rows = one-hot(ids), cols = ∂y        (a·a' becomes [x_τ = x'_σ])
    bias       b (out,):     rows = ∂y,           cols = 1
    lm_head    W (V, d):     rows = e_y - π,      cols = h         (no backward needed)

A parameter used twice (tied embedding / lm_head) gets the cross terms between its uses.
Norm weights and any other module type are *materialized* per item with a per-module
``torch.func`` vjp (small). For each parameter the cheaper of the ghost contraction and the
materialized per-item gradient is chosen by a flop count.

Items are sequences (sentence level: ``g_i = ∇ log π(y_i|x_i)``) or the tokens of one response
(token level: ``g^t = ∇ log π(y^t|x, y^<t)``). The network body runs forward once with hooks
that record each use's input and output; the output gradients come from one backward (sentence
level) or one batched backward over the token log-probs (token level, ``is_grads_batched``,
chunked), started at the final hidden state with the analytic cotangent ``(e_y - π) W``.
"""
from __future__ import annotations

import bisect
import contextlib
import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynamics.core.logprobs import Batch, TokenizedSequence, body_and_head, collate, unwrap


# ------------------------------------------------------------------------------ factors

@dataclass
class Factor:
    """One side of a use's outer products: ``x`` is (I, T, k) dense or (I, T) ids (one-hot).

    ``I`` is the number of items, or 1 when the factor is shared by all items (token level:
    a layer's input does not depend on which token's log-prob is differentiated).
    """
    x: Tensor
    onehot: bool = False
    shared: bool = False

    @property
    def dim(self) -> int:
        """k for the cost model (a one-hot dot product costs one comparison)."""
        return 1 if self.onehot else self.x.shape[-1]


@dataclass
class Use:
    """One use of a parameter: per item, ``g_i = Σ_τ rows[i,τ] ⊗ cols[i,τ]`` (parameter layout),
    or a materialized per-item gradient ``mat`` of shape (I, numel)."""
    rows: Factor | None = None
    cols: Factor | None = None
    mat: Tensor | None = None


def _factor_dot(fa: Factor, fb: Factor) -> Tensor:
    """``fa[i,τ]·fb[j,σ]`` for all items and positions: (Ia, Ta, Ib, Tb) (I=1 when shared).

    Two one-hot factors give a boolean equality tensor ``[x_iτ = x'_jσ]``.
    """
    if fa.onehot and fb.onehot:
        return fa.x[:, :, None, None] == fb.x[None, None]
    if fa.onehot:  # e_{x_aτ} · fb[j,σ] = fb[j, σ, x_aτ]
        Ia, Ta = fa.x.shape
        Ib, Tb, _ = fb.x.shape
        g = fb.x[:, :, fa.x.reshape(-1)]                         # (Ib, Tb, Ia*Ta)
        return g.reshape(Ib, Tb, Ia, Ta).permute(2, 3, 0, 1)
    if fb.onehot:
        return _factor_dot(fb, fa).permute(2, 3, 0, 1)
    return torch.einsum("atk,bsk->atbs", fa.x, fb.x)


def _two_step(ua: Use, ub: Use) -> str | None:
    """"rows" / "cols" when that side is shared by all items in both uses and the other side is
    item-dependent and dense in both (token level), else None."""
    for shared, other in (("rows", "cols"), ("cols", "rows")):
        fa, fb, oa, ob = getattr(ua, shared), getattr(ub, shared), getattr(ua, other), getattr(ub, other)
        if fa.shared and fb.shared and not (oa.shared or ob.shared or oa.onehot or ob.onehot):
            return shared
    return None


def _pair(ua: Use, ub: Use, Ia: int, Ib: int, diag: bool) -> Tensor:
    """Σ_{τσ} (rows·rows)(cols·cols) between the items of two uses: (Ia, Ib), or (Ia,) if diag."""
    shared = _two_step(ua, ub)
    if shared is not None:
        # One side shared by all items (K), the other item-dependent (Y): two small contractions,
        # M[i,j] = Σ_{τσ} K[τ,σ] Y_a[i,τ]·Y_b[j,σ]          cost Ib·Ta·Tb·m + Ia·Ib·Ta·m
        other = "cols" if shared == "rows" else "rows"
        Ya, Yb = getattr(ua, other).x, getattr(ub, other).x                       # (I, T, m)
        K = _factor_dot(getattr(ua, shared), getattr(ub, shared))[0, :, 0, :].to(Ya.dtype)  # (Ta, Tb)
        if diag:
            W = torch.einsum("uv,ivm->ium", K, Ya)
            return (Ya * W).sum((1, 2))
        W = torch.einsum("uv,jvm->jum", K, Yb)                                     # (Ib, Ta, m)
        return torch.einsum("ium,jum->ij", Ya, W)
    R, C = _factor_dot(ua.rows, ub.rows), _factor_dot(ua.cols, ub.cols)                          # (Ia|1, Ta, Ib|1, Tb)
    R, C = (R.to(C.dtype), C) if R.dtype == torch.bool else (R, C.to(R.dtype))
    M = (R * C).sum((1, 3)).expand(Ia, Ib)
    return M.diagonal() if diag else M


def _materialize(u: Use, I: int) -> Tensor:
    """Per-item gradient of a use, flattened: (I, r*c)."""
    if u.mat is not None:
        return u.mat
    if u.rows.onehot or u.cols.onehot:
        raise NotImplementedError("one-hot (embedding) uses are never materialized")
    r = u.rows.x.expand(I, *u.rows.x.shape[1:])
    c = u.cols.x.expand(I, *u.cols.x.shape[1:])
    return torch.einsum("itr,itc->irc", r, c).reshape(I, -1)


def materialized(u: Use, n_items: int) -> Use:
    """``u`` with its per-item gradients formed: ``Use(mat=(I, rows·cols))`` (a ``mat`` use as is)."""
    return u if u.mat is not None else Use(mat=_materialize(u, n_items))


def _cost_ghost(ua: Use, ub: Use, Ia: int, Ib: int) -> float:
    Ta, Tb = ua.rows.x.shape[1], ub.rows.x.shape[1]
    k = ua.rows.dim + ua.cols.dim
    shared = _two_step(ua, ub)
    if shared is not None:
        m = (ua.cols if shared == "rows" else ua.rows).dim
        return Ta * Tb * k + Ib * Ta * Tb * m + Ia * Ib * Ta * m
    return Ia * Ta * Ib * Tb * k


def _cost_mat(uses_a: list[Use], uses_b: list[Use], Ia: int, Ib: int) -> float:
    if any(u.mat is None and (u.rows.onehot or u.cols.onehot) for u in uses_a + uses_b):
        return float("inf")
    def size(u):
        return u.mat.shape[1] if u.mat is not None else u.rows.dim * u.cols.dim
    def build(u, I):
        return 0 if u.mat is not None else I * u.rows.x.shape[1] * size(u)
    P = size(uses_a[0])
    return sum(build(u, Ia) for u in uses_a) + sum(build(u, Ib) for u in uses_b) + Ia * Ib * P


def gram_from_uses(uses_a: dict[int, list[Use]], uses_b: dict[int, list[Use]], Ia: int, Ib: int,
                   *, diag: bool = False) -> Tensor:
    """``Σ_params ⟨Σ_u g^u_a[i], Σ_v g^v_b[j]⟩`` — (Ia, Ib), or (Ia,) when ``diag`` (a is b).

    Per parameter, the cheaper of the pairwise ghost contractions and the materialized
    per-item gradients is used.
    """
    out = None
    for pid, ua_list in uses_a.items():
        ub_list = uses_b[pid]
        has_mat = any(u.mat is not None for u in ua_list + ub_list)
        c_mat = _cost_mat(ua_list, ub_list, Ia, Ib)
        if has_mat or c_mat < sum(_cost_ghost(u, v, Ia, Ib) for u in ua_list for v in ub_list):
            if c_mat == float("inf"):
                raise NotImplementedError("a parameter with both an embedding use and a materialized use")
            Ga = sum(_materialize(u, Ia) for u in ua_list)                                # (Ia, P)
            if diag:
                term = (Ga * Ga).sum(1)
            else:
                Gb = sum(_materialize(v, Ib) for v in ub_list)
                term = Ga @ Gb.T
        else:
            term = sum(_pair(u, v, Ia, Ib, diag) for u in ua_list for v in ub_list)
        out = term if out is None else out + term
    if out is None:
        raise ValueError("no parameters selected")
    return out


# ------------------------------------------------------------------------------ capture

def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
        return Conv1D
    except ImportError:  # pragma: no cover
        return ()


def _body_and_head(model):
    split = body_and_head(model)
    if split is None:
        raise NotImplementedError(f"{type(unwrap(model)).__name__} is not a transformers causal LM with a "
                                  "linear lm_head and no logit scaling; use impl='func' or 'autograd'")
    return split


@dataclass
class _Call:
    module: nn.Module
    names: list[tuple[str, nn.Parameter]]   # selected (role, parameter) of this module
    inp: Tensor
    out: Tensor
    order: int = 0                           # position in the forward's sequence of hooked calls


@dataclass
class _Block:
    """One call of a transformer block: its input and output hidden states (segment boundaries)."""
    inp: Tensor
    out: Tensor
    start: int                               # hooked calls with start <= order < end are inside
    end: int


class _Recording(list):
    """The recorded `_Call`s of one forward, plus the block boundaries in ``blocks``."""
    blocks: list[_Block]


def _find_blocks(body: nn.Module) -> nn.ModuleList | None:
    """The decoder layers (the largest ``nn.ModuleList`` directly under the body), or None."""
    lists = [m for m in body.children() if isinstance(m, nn.ModuleList)]
    return max(lists, key=len) if lists else None


@contextlib.contextmanager
def _recording(body: nn.Module, params: dict[str, nn.Parameter]):
    """Forward hooks on every body module that owns a selected parameter, and on the decoder
    blocks (to cut the backward into per-block segments); always removed."""
    wanted = {id(p) for p in params.values()}
    calls = _Recording()
    calls.blocks = []
    handles = []
    pending: list[tuple[Tensor, int]] = []

    def pre_block(mod, args, kwargs):
        x = args[0] if args else kwargs.get("hidden_states")
        pending.append((x, len(calls)))

    def post_block(mod, args, kwargs, output):
        x, start = pending.pop()
        y = output if isinstance(output, Tensor) else output[0]
        calls.blocks.append(_Block(x, y, start, len(calls)))

    def make_hook(module, names):
        def hook(mod, args, kwargs, output):
            tensors = [a for a in args if isinstance(a, Tensor)] + [v for v in kwargs.values() if isinstance(v, Tensor)]
            if len(tensors) != 1 or not isinstance(output, Tensor):
                raise NotImplementedError(
                    f"module {type(mod).__name__} takes {len(tensors)} tensor inputs / returns "
                    f"{type(output).__name__}; the ghost engine needs one tensor in and one out")
            calls.append(_Call(mod, names, tensors[0].detach(), output, len(calls)))
        return hook

    try:
        for mname, module in body.named_modules():
            names = [(r, p) for r, p in module.named_parameters(recurse=False) if id(p) in wanted]
            if names:
                handles.append(module.register_forward_hook(make_hook(module, names), with_kwargs=True))
        for block in _find_blocks(body) or []:
            handles.append(block.register_forward_pre_hook(pre_block, with_kwargs=True))
            handles.append(block.register_forward_hook(post_block, with_kwargs=True))
        yield calls
    finally:
        for h in handles:
            h.remove()


def _mask_positions(t: Tensor, keep: Tensor) -> Tensor:
    """Zero ``t`` (N, T, ...) where ``keep`` (N, T) is False (no-op for other shapes)."""
    if t.shape[:2] != keep.shape:
        return t
    k = keep.reshape(*keep.shape, *([1] * (t.dim() - 2)))
    return torch.where(k, t, torch.zeros((), dtype=t.dtype, device=t.device))


def _flat(t: Tensor) -> Tensor:
    """(I, ..., k) -> (I, positions, k)."""
    return t.reshape(t.shape[0], -1, t.shape[-1])


def _uses_of_call(call: _Call, grad: Tensor, shared: bool) -> list[tuple[int, Use]]:
    """Uses of one recorded module call given the output gradient.

    ``grad``: (I, *out.shape[1:]) with the output's batch dim replaced by items (token level,
    ``shared=True``: the input is the same for all items) or equal to it (sentence level).
    """
    x = call.inp
    I = grad.shape[0]
    if shared:  # (1, T, ...) input of one sequence; grads (L, 1, T, ...) -> (L, T, ...)
        grad = grad.reshape(I, *grad.shape[2:])
        x = x.reshape(1, *x.shape[1:])
    m = call.module
    out = []
    conv1d = _conv1d_type()
    if isinstance(m, nn.Embedding):
        if m.max_norm is not None:
            raise NotImplementedError("nn.Embedding with max_norm is not supported")
        ids = x.reshape(x.shape[0], -1)                                        # (I|1, T)
        g = _flat(grad)                                                         # (I, T, d)
        if m.padding_idx is not None:  # no gradient flows into the padding row
            g = g * (ids != m.padding_idx).unsqueeze(-1).to(g.dtype)
        for role, p in call.names:
            out.append((id(p), Use(Factor(ids, onehot=True, shared=shared), Factor(g))))
        return out
    if isinstance(m, nn.Linear) or (conv1d and isinstance(m, conv1d)):
        a, b = Factor(_flat(x), shared=shared), Factor(_flat(grad))
        ones = Factor(torch.ones(1, b.x.shape[1], 1, dtype=grad.dtype, device=grad.device), shared=True)
        for role, p in call.names:
            if role == "weight":
                use = Use(b, a) if isinstance(m, nn.Linear) else Use(a, b)
            else:  # bias: Σ_τ b_τ ⊗ 1
                use = Use(b, ones)
            out.append((id(p), use))
        return out
    # Fallback: materialize this module's per-item parameter gradients with torch.func.
    from torch.func import functional_call, vjp, vmap
    base = {r: p.detach() for r, p in call.names}

    def one(xi, gi):
        f = lambda prm: functional_call(m, prm, (xi.unsqueeze(0),))
        return vjp(f, base)[1](gi.unsqueeze(0))[0]

    grads = vmap(one, in_dims=(None if shared else 0, 0))(x[0] if shared else x, grad)
    for role, p in call.names:
        out.append((id(p), Use(mat=grads[role].reshape(I, -1))))
    return out


@contextlib.contextmanager
def _requires_grad(params: dict[str, nn.Parameter]):
    flags = [(p, p.requires_grad) for p in params.values()]
    try:
        for p, _ in flags:
            p.requires_grad_(True)
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)


def _head_forward(head: nn.Linear, h: Tensor, batch: Batch):
    """Logits at the positions that predict response tokens and the analytic gradients.

    Returns ``h_sel`` (N, L, d), ``r = mask·(e_y - π)`` (N, L, V) — ∂ log π(y^t)/∂ logits —,
    the positions (N, L) and the mask (N, L).
    """
    tgt, mask = batch.response_positions()                                       # (N, L) each
    pos = tgt - 1
    h_sel = h.detach().gather(1, pos[..., None].expand(-1, -1, h.shape[-1]))     # (N, L, d)
    with torch.no_grad():
        logits = F.linear(h_sel, head.weight, head.bias)                         # (N, L, V)
        pi = torch.softmax(logits, -1)
        y = batch.input_ids.gather(1, tgt)                                       # (N, L)
        r = -pi
        r.scatter_add_(-1, y[..., None], torch.ones_like(y[..., None], dtype=r.dtype))
        r = r * mask[..., None].to(r.dtype)
    return h_sel, r, pos, mask


def _head_uses(head: nn.Linear, params, h_sel: Tensor, r: Tensor) -> list[tuple[int, Use]]:
    """lm_head uses: weight ``Σ_t r_t ⊗ h_t``, bias ``Σ_t r_t`` (items on dim 0)."""
    wanted = {id(p) for p in params.values()}
    out = []
    if id(head.weight) in wanted:
        out.append((id(head.weight), Use(Factor(r), Factor(h_sel))))
    if head.bias is not None and id(head.bias) in wanted:
        out.append((id(head.bias), Use(Factor(r), Factor(torch.ones(*r.shape[:2], 1, dtype=r.dtype, device=r.device)))))
    return out


def _group_all(pairs: list[tuple[int, Use]]) -> dict[int, list[Use]]:
    groups: dict[int, list[Use]] = {}
    for pid, use in pairs:
        groups.setdefault(pid, []).append(use)
    return groups


def _group(pairs: list[tuple[int, Use]], params) -> dict[int, list[Use]]:
    groups = _group_all(pairs)
    missing = [n for n, p in params.items() if id(p) not in groups]
    if missing:
        raise ValueError(f"selected parameter(s) {missing[:5]} are used by no module call the ghost "
                         "engine can see (used outside a module forward?); use impl='func'")
    return groups


def _body_forward(body, batch: Batch) -> Tensor:
    return body(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                position_ids=batch.position_ids, use_cache=False).last_hidden_state      # (N, T, d)


# ------------------------------------------------------------------------------ public

def ghost_sentence_gram(model, batch: Batch, params: dict[str, nn.Parameter]) -> Tensor:
    """Sentence-level Gram ``G[i,j] = ⟨∇log π(y_i|x_i), ∇log π(y_j|x_j)⟩`` over the N sequences of
    ``batch`` from one forward and one backward: (N, N), in the model's dtype."""
    body, head = _body_and_head(model)
    N = batch.input_ids.shape[0]
    with torch.enable_grad(), _requires_grad(params), _recording(body, params) as calls:
        h = _body_forward(body, batch)
    with torch.no_grad():  # below: one backward (autograd.grad works without grad mode) and contractions
        return _sentence_from_forward(head, h, batch, calls, params, N)


def _sentence_from_forward(head, h, batch, calls, params, N) -> Tensor:
    h_sel, r, pos, mask = _head_forward(head, h, batch)
    pairs = _head_uses(head, params, h_sel, r)
    if calls:
        # ∂ Σ_i log π_i / ∂h: (e_y - π)W placed at each predicting position
        cot = torch.zeros_like(h)
        cot.scatter_add_(1, pos[..., None].expand(-1, -1, h.shape[-1]), r @ head.weight)
        grads = torch.autograd.grad(h, [c.out for c in calls], cot, allow_unused=True)
        for c, g in zip(calls, grads):
            g = torch.zeros_like(c.out) if g is None else g
            # Padding positions contribute nothing, but a fully masked query row can hold
            # non-finite values (left padding): zero inputs and gradients there explicitly.
            keep = batch.attention_mask.bool()
            c.inp = _mask_positions(c.inp, keep)
            pairs += _uses_of_call(c, _mask_positions(g, keep), shared=False)
    groups = _group(pairs, params)
    return gram_from_uses(groups, groups, N, N)


def _segments(calls: _Recording, h: Tensor):
    """Cut the body into backward segments, top down: ``(out, inp, calls inside)``.

    Segment boundaries are the blocks' input/output hidden states: the top segment runs from the
    final hidden state ``h`` (after the final norm) to the last block's output, then one segment
    per block, then the bottom one from the first block's input to the embeddings (``inp=None``).
    Leading blocks whose input needs no gradient (e.g. LoRA on later layers only) join the bottom
    segment; without recognizable blocks the whole body is one segment.
    """
    blocks = calls.blocks
    j = len(blocks)  # blocks[j:] have inputs that require grad (earlier ones hold no selected parameter upstream)
    while j > 0 and isinstance(blocks[j - 1].inp, Tensor) and blocks[j - 1].inp.requires_grad:
        j -= 1
    if j == len(blocks):
        return [(h, None, list(calls))]
    segs = [(h, blocks[-1].out, [c for c in calls if c.order >= blocks[-1].end])]
    for b in reversed(blocks[j:]):
        segs.append((b.out, b.inp, [c for c in calls if b.start <= c.order < b.end]))
    segs.append((blocks[j].inp, None, [c for c in calls if c.order < blocks[j].start]))
    return segs


class _TokenStream:
    """One response's forward with hooks; yields its per-token uses one body segment at a time.

    Token t's log-prob is an item. The lm_head use is ``r_t ⊗ h_t`` at one position (no
    backward). The body's output gradients come from a batched backward (``is_grads_batched``,
    ``chunk`` tokens at a time) started at ``h`` with the cotangent ``r_t W`` at position p_t,
    carried down block by block, so only one block's gradients are alive at a time. The chunks
    stay separate (no concatenation): each use comes as one `Use` per chunk, items in order.
    """

    def __init__(self, model, seq: TokenizedSequence, pad_id: int, params, chunk: int | None):
        self.body, self.head = _body_and_head(model)
        device = next(unwrap(model).parameters()).device
        self.batch = collate([seq], pad_id, "right", device)
        self.L = len(seq.response_ids)
        self.params, self.chunk = params, chunk or self.L
        with torch.enable_grad(), _requires_grad(params), _recording(self.body, params) as calls:
            self.h = _body_forward(self.body, self.batch)                        # (1, T, d)
        self.calls = calls
        with torch.no_grad():
            h_sel, self.r, self.pos, _ = _head_forward(self.head, self.h, self.batch)  # (1, L, ·)
        self.h_sel = h_sel

    @property
    def T(self) -> int:
        return self.h.shape[1]

    def head_uses(self) -> list[tuple[int, list[Use]]]:
        # items (L, 1, ·): token t's lm_head gradient is r_t ⊗ h_t at a single position
        uses = _head_uses(self.head, self.params, self.h_sel.transpose(0, 1), self.r.transpose(0, 1))
        return [(pid, [u]) for pid, u in uses]

    def segment_uses(self):
        """Yield the uses of each body segment, top down (see `_segments`): ``(id(p), chunks)``."""
        L, h = self.L, self.h
        cot = torch.zeros(L, *h.shape, dtype=h.dtype, device=h.device)           # (L, 1, T, d)
        cot[torch.arange(L), 0, self.pos[0]] = self.r[0] @ self.head.weight
        cots = list(cot.split(self.chunk))                                       # per chunk (L_c, 1, T, d)
        for out, inp, seg_calls in _segments(self.calls, h):
            inputs = ([inp] if inp is not None else []) + [c.out for c in seg_calls]
            if not inputs:
                yield []
                continue
            grads = []                                                           # per chunk, per input
            for ct in cots:
                g = torch.autograd.grad(out, inputs, ct, retain_graph=True, allow_unused=True, is_grads_batched=True)
                grads.append([torch.zeros(ct.shape[0], *x.shape, dtype=x.dtype, device=x.device)
                              if gi is None else gi for gi, x in zip(g, inputs)])
            if inp is not None:
                cots, grads = [g[0] for g in grads], [g[1:] for g in grads]
            pairs = []
            for i, c in enumerate(seg_calls):
                f = None if isinstance(c.module, (nn.Linear, nn.Embedding, _conv1d_type())) else _unscaled(c.module, c.names, c.inp)
                per_chunk = [_token_call_uses(c, g[i], f) for g in grads]
                pairs += [(pid, [uses[j][1] for uses in per_chunk]) for j, (pid, _) in enumerate(per_chunk[0])]
            yield pairs


def _unscaled(module: nn.Module, names, x: Tensor) -> Tensor | None:
    """``f(x)`` of a module ``y = γ ⊙ f(x) (+ β)`` whose selected parameters are its 1-D scale γ
    (and shift β) — LayerNorm, RMSNorm —, checked on ``x``; None for any other module."""
    roles = {r for r, _ in names}
    d = x.shape[-1]
    if not x.is_floating_point() or x.dim() < 2 or not all(p.dim() == 1 and p.shape[0] == d for _, p in names):
        return None
    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1 and roles <= {"weight", "bias"}:
        return F.layer_norm(x, module.normalized_shape, None, None, module.eps)
    if roles != {"weight"}:
        return None
    from torch.func import functional_call
    (_, w), = names
    try:
        f = functional_call(module, {"weight": torch.ones_like(w)}, (x,))
        ok = isinstance(f, Tensor) and f.shape == x.shape and torch.equal(w * f, functional_call(module, {"weight": w}, (x,)))
    except (RuntimeError, TypeError):
        return None
    return f if ok else None


def _token_call_uses(c: _Call, grad: Tensor, f: Tensor | None) -> list[tuple[int, Use]]:
    """`_uses_of_call` at token level (input shared by the items, ``grad`` (L, 1, ...)); a norm
    with ``f = _unscaled(...)`` of its input gets its scale/shift gradients in closed form, token
    t's ``Σ_τ g_tτ ⊙ f(x_τ)`` and ``Σ_τ g_tτ`` (a product over positions, not a vjp per token)."""
    if f is None:
        return _uses_of_call(c, grad, shared=True)
    L, d = grad.shape[0], grad.shape[-1]
    g = grad.reshape(L, -1, d)                                                   # (L, positions, d)
    mats = {"weight": (g * f.reshape(1, -1, d)).sum(1), "bias": g.sum(1)}        # (L, d) each
    return [(id(p), Use(mat=mats[r])) for r, p in c.names]


def _merged(chunks: list[Use]) -> Use:
    """The use with its chunks' items concatenated (for the contractions that need them at once)."""
    if len(chunks) == 1:
        return chunks[0]
    u = chunks[0]
    if u.mat is not None:
        return Use(mat=torch.cat([c.mat for c in chunks]))
    cat = lambda side: side(u) if side(u).shared else Factor(torch.cat([side(c).x for c in chunks]), side(u).onehot)
    return Use(cat(lambda c: c.rows), cat(lambda c: c.cols))


# Token-level contractions (docs/math.md §6.3). The items are the tokens of two responses a, b;
# a linear-type use has one input factor X shared by a stream's items and per-token output
# gradients Y_t. Over the *union* rows of the pair (a's positions, then b's positions past the
# prefix S the two sequences share, whose inputs are identical in a causal LM) let R be the
# triangular factor of a QR of Xᵀ: X Xᵀ = Rᵀ R, R (r, N) upper trapezoidal, r = min(N, d_in). Then
#     ⟨g_t, g_s⟩ = tr(Y_tᵀ X Xᵀ Y_s) = ⟨R Y_t, R Y_s⟩
# so every token's gradient is Z_t = R Y_t (r × m numbers instead of d_in × m): M = Z_a Z_bᵀ,
# ‖g_t‖² = ‖Z_t‖², and ⟨g_t, g_s⟩ of a w–l pair, ‖g^t_w‖², ‖g^s_l‖² all come from one Z per token.
# Y_t is zero past token t's position (causality) and R is zero below its diagonal, so Z_t is built
# block by block from the nonzero blocks only: ≈ (p_t)²/2 · m per token, about half of one
# two-step ghost contraction, against ≈ p_t · d_in · m for the token's backward through the layer.
# r = min(N, d_in) makes it the materialized gradient (in a rotated basis) where d_in < N.

_ROW_BLOCK = 128   # rows of R per matmul: ≈ equal blocks up to this size (fewer, larger GEMMs beat exact triangles)


@dataclass
class _PairLayout:
    """Where the positions of streams a and b sit among the union rows of a pair (see above)."""
    Ta: int
    Tb: int
    S: int                      # positions < S hold the same ids in a and b (common prefix)
    last_a: list[int]           # per token item: its position p_t (rows > p_t of Y_t are zero)
    last_b: list[int]
    same: bool                  # a and b are the same sequence (one stream)

    @classmethod
    def of(cls, a: _TokenStream, b: _TokenStream) -> "_PairLayout":
        ia, ib = a.batch.input_ids[0], b.batch.input_ids[0]
        n = min(len(ia), len(ib))
        diff = (ia[:n] != ib[:n]).nonzero()
        S = int(diff[0]) if len(diff) else n
        return cls(a.T, b.T, S, a.pos[0].tolist(), b.pos[0].tolist(), a is b)

    def cols(self, side: str, S: int) -> list[int]:
        """Union column of each own row: a's rows come first, b's rows < S are a's."""
        if side == "a" or self.same:
            return list(range(self.Ta))
        return list(range(S)) + list(range(self.Ta, self.Ta + self.Tb - S))


def _compute(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _dense_side(u: Use) -> tuple[Tensor, Tensor] | None:
    """``(X (T, k), Y (L, T, m))`` of a linear-type use (weight of Linear/Conv1D, bias: X = 1):
    one side shared by all token items, the other per item; None for any other use."""
    if u.mat is not None:
        return None
    for sh, it in ((u.rows, u.cols), (u.cols, u.rows)):
        if sh.shared and not sh.onehot and not it.shared and not it.onehot and it.x.dim() == 3 \
                and sh.x.shape[:2] == (1, it.x.shape[1]):
            return sh.x[0], it.x
    return None


def _dense_chunks(uses: list[list[Use]], T: int) -> tuple[Tensor, list[Tensor]] | None:
    """``(X (T, k), [Y chunk (L_c, T, m)])`` of a parameter with one linear-type use of one row
    per position, else None."""
    if len(uses) != 1:
        return None
    sides = [_dense_side(u) for u in uses[0]]
    if any(s is None or s[1].shape[1] != T for s in sides):
        return None
    return sides[0][0], [s[1] for s in sides]


def _rows_agree(xa: Tensor, xb: Tensor) -> bool:
    """The shared-prefix inputs of the two streams are the same numbers up to rounding (a causal
    LM computes them from the same ids); else the rows are kept apart (still exact)."""
    if xa.numel() == 0:
        return True
    tol = torch.finfo(_compute(xa.dtype)).eps ** 0.5
    return bool((xa - xb).abs().max() <= tol * xa.abs().max().clamp_min(torch.finfo(xa.dtype).tiny))


def _causal_last(ys: list[Tensor], last: list[int]) -> list[int]:
    """``last`` if every item's Y is zero past its position (causal attention), else no skipping.

    Only the rows past the first item's position are read (the response rows, not the prompt's)."""
    T, i = ys[0].shape[1], 0
    lo = min(last[0] + 1, T)
    for y in ys:
        n = y.shape[0]
        past = torch.arange(lo, T, device=y.device)[None, :] > torch.tensor(last[i:i + n], device=y.device)[:, None]
        if bool((y[:, lo:].reshape(n, T - lo, -1).abs().amax(-1) * past).any()):
            return [T - 1] * len(last)
        i += n
    return last


def _row_blocks(kmax: int) -> list[tuple[int, int]]:
    """Rows [0, kmax) of R cut into ≈ equal blocks of at most `_ROW_BLOCK` rows."""
    n = -(-kmax // _ROW_BLOCK)
    size = -(-kmax // n)
    return [(k0, min(k0 + size, kmax)) for k0 in range(0, kmax, size)]


class _Projected:
    """One stream's items ``Z_t = R[:, cols] Y_t`` row block by row block, never all rows at once.

    ``cols`` (T,) increasing union column of each own row; ``ys`` the items' Y in chunks
    (L_c, T, m), items in order, with the rows past ``last[t]`` of item t zero (``last``
    increasing). R (r, N) is upper trapezoidal, so the rows [k0, k1) of Z_t need only the own rows
    whose column is ≥ k0, and are zero for the items whose last row lies before them.
    """

    def __init__(self, R: Tensor, cols: list[int], ys: list[Tensor], last: list[int]):
        self.Tm = last[-1] + 1                                                   # rows past it: zero for all
        self.cols, self.last = cols, last
        self.R = R[:, cols[:self.Tm]]                                            # (r, Tm)
        self.ys = [y if y.dtype == R.dtype else y.to(R.dtype) for y in ys]       # (L_c, T, m) each
        self.kmax = min(R.shape[0], cols[self.Tm - 1] + 1)                       # rows of R that meet them

    def block(self, k0: int, k1: int) -> tuple[int, Tensor | None]:
        """``(i0, Z)``: items ≥ i0 of rows [k0, k1), Z (L - i0, (k1 - k0)·m); None if all are zero."""
        L = len(self.last)
        t0 = bisect.bisect_left(self.cols, k0, 0, self.Tm)                       # R[k, cols[t]] = 0 for cols[t] < k0
        i0 = bisect.bisect_left(self.last, t0)
        if k0 >= self.kmax or i0 == L:
            return i0, None
        Rk = self.R[k0:k1, t0:]
        Z = torch.empty(L - i0, k1 - k0, self.ys[0].shape[2], dtype=Rk.dtype, device=Rk.device)
        c0 = 0
        for y in self.ys:                                                        # chunk: items [c0, c1)
            c1 = c0 + y.shape[0]
            if c1 > i0:
                j = max(i0, c0)
                torch.matmul(Rk, y[j - c0:, t0:self.Tm], out=Z[j - i0:c1 - i0])  # (n, k1 - k0, m)
            c0 = c1
        return i0, Z.view(L - i0, -1)


def _rowdot(Z: Tensor, inplace: bool = False) -> Tensor:
    """(n,) squared norms of the rows of ``Z`` (n, K) (``inplace``: squaring ``Z`` itself). A torch
    reduction (cascade summation), not a BLAS dot: over K ~ 10⁵ float32 squares a dot's running sum
    is off by ~1e-4 (measured on SmolLM2)."""
    return (Z.square_() if inplace else Z.square()).sum(1)


def _dense_terms(da, db, lay: _PairLayout, cache: dict, out: tuple[Tensor, Tensor, Tensor]) -> None:
    """Add ``(M, sq_a, sq_b)`` of one linear-type parameter to ``out``; ``da``, ``db``: its
    `_dense_chunks` in streams a and b."""
    (xa, ya), (xb, yb) = da, db
    M, sq_a, sq_b = out
    S = lay.S
    if not lay.same and S and not _rows_agree(xa[:S], xb[:S]):
        S = 0
    key = (xa.data_ptr(), xb.data_ptr(), tuple(xa.shape), tuple(xb.shape), S)
    if key not in cache:
        X = xa if lay.same else torch.cat([xa, xb[S:]])                         # (N, k) union rows
        cache[key] = torch.linalg.qr(X.to(M.dtype).T, mode="r").R                # (r, N): X Xᵀ = Rᵀ R
    R = cache[key]
    pa = _Projected(R, lay.cols("a", S), ya, _causal_last(ya, lay.last_a))
    pb = pa if lay.same else _Projected(R, lay.cols("b", S), yb, _causal_last(yb, lay.last_b))
    for k0, k1 in _row_blocks(max(pa.kmax, pb.kmax)):
        ia, za = pa.block(k0, k1)
        ib, zb = (ia, za) if lay.same else pb.block(k0, k1)
        if za is not None and zb is not None:
            M[ia:, ib:] += za @ zb.T
        if za is not None:
            sq_a[ia:] += _rowdot(za, inplace=True)
        if zb is not None and not lay.same:
            sq_b[ib:] += _rowdot(zb, inplace=True)


def _embed_head_parts(uses: list[Use]):
    """``(ids (T,), G (L, T, d))`` of the one embedding use and ``(r (L, V), h (L, d))`` of the one
    lm_head-type use (rank one at a single position) among ``uses`` (either may be None), or None
    if ``uses`` holds anything else."""
    emb = head = None
    for u in uses:
        if u.mat is None and u.rows.onehot and u.rows.shared and not u.cols.onehot and not u.cols.shared \
                and emb is None:
            emb = (u.rows.x[0], u.cols.x)
        elif u.mat is None and not (u.rows.onehot or u.cols.onehot or u.rows.shared or u.cols.shared) \
                and u.rows.x.shape[1] == 1 and head is None:
            head = (u.rows.x[:, 0], u.cols.x[:, 0])
        else:
            return None
    return emb, head


def _embed_head_terms(pa, pb, lay: _PairLayout) -> tuple[Tensor, Tensor, Tensor]:
    """``(M, sq_a, sq_b)`` of an embedding and/or lm_head parameter (tied: both uses).

    Token t's gradient is ``G_t = r_t ⊗ h_t + Σ_τ e_{x_τ} ⊗ g_tτ`` (V × d). On the ids U that occur
    in either sequence it is ``Z_t = r_t[U] ⊗ h_t + Σ_τ e_{x_τ} ⊗ g_tτ`` (|U| × d); elsewhere only
    the head's ``r̄_t ⊗ h_t`` (r̄ = r with U zeroed). So ⟨G_t, G_s⟩ = ⟨Z_t, Z_s⟩ + (r̄_t·r̄_s)(h_t·h_s).
    """
    (ea, ha), (eb, hb) = pa, pb
    ids = [e[0] for e in (ea, eb) if e is not None]
    U, inv = (torch.unique(torch.cat(ids), return_inverse=True) if ids else (None, None))

    def side(e, hd, n_before):
        Z = rb = hh = None
        if e is not None:
            x, g = e
            ct = _compute(g.dtype)
            Z = torch.zeros(g.shape[0], len(U), g.shape[2], dtype=ct, device=g.device)
            Z.index_add_(1, inv[n_before:n_before + len(x)], g.to(ct))
        if hd is not None:
            r, hh = hd
            ct = _compute(r.dtype)
            r, hh = r.to(ct), hh.to(ct)
            rb = r
            if U is not None:
                Z = Z + r[:, U, None] * hh[:, None, :]
                rb = r.clone()
                rb[:, U] = 0
        return Z, rb, hh

    Za, ra, ha_ = side(ea, ha, 0)
    Zb, rb, hb_ = (Za, ra, ha_) if lay.same else side(eb, hb, len(ea[0]) if ea is not None else 0)
    M = sq_a = sq_b = 0
    if Za is not None:
        Za, Zb = Za.reshape(Za.shape[0], -1), Zb.reshape(Zb.shape[0], -1)           # (L, |U|·d)
        M, sq_a, sq_b = Za @ Zb.T, _rowdot(Za), _rowdot(Zb)
    if ra is not None:
        M = M + (ra @ rb.T) * (ha_ @ hb_.T)
        sq_a = sq_a + _rowdot(ra) * _rowdot(ha_)
        sq_b = sq_b + _rowdot(rb) * _rowdot(hb_)
    return M, sq_a, sq_b


def _token_terms(ua: list[list[Use]], ub: list[list[Use]], lay: _PairLayout, cache: dict,
                 out: tuple[Tensor, Tensor, Tensor]) -> None:
    """Add ``(M (La, Lb), sq_a (La,), sq_b (Lb,))`` of one parameter, from its uses in streams a
    and b (each use as its chunks), to ``out`` (``sq_b`` is ``sq_a`` when a is b)."""
    M, sq_a, sq_b = out
    da, db = _dense_chunks(ua, lay.Ta), _dense_chunks(ub, lay.Tb)
    if da is not None and db is not None:
        return _dense_terms(da, db, lay, cache, out)  # one row per position (causal skipping applies)
    ua, ub = [_merged(u) for u in ua], [_merged(u) for u in ub]
    if all(u.mat is not None for u in ua + ub):                                 # norm weights: (L, P) each
        Ga, Gb = sum(u.mat for u in ua).to(M.dtype), sum(u.mat for u in ub).to(M.dtype)
        m, qa, qb = Ga @ Gb.T, _rowdot(Ga), _rowdot(Gb)
    else:
        pa, pb = _embed_head_parts(ua), _embed_head_parts(ub)
        if pa is not None and pb is not None and [x is None for x in pa] == [x is None for x in pb]:
            m, qa, qb = _embed_head_terms(pa, pb, lay)
        else:  # anything else (a weight with several uses of one kind, ...): the generic contraction
            La, Lb = M.shape
            m = gram_from_uses({0: ua}, {0: ub}, La, Lb)
            qa = gram_from_uses({0: ua}, {0: ua}, La, La, diag=True)
            qb = gram_from_uses({0: ub}, {0: ub}, Lb, Lb, diag=True)
    M.add_(m)
    sq_a.add_(qa)
    if sq_b is not sq_a:
        sq_b.add_(qb)


def ghost_token_gram(model, seq_a: TokenizedSequence, seq_b: TokenizedSequence, pad_id: int,
                     params: dict[str, nn.Parameter], chunk_size: int | None = None):
    """Token-level Gram ``M[t,s] = ⟨∇log π(y_a^t|·), ∇log π(y_b^s|·)⟩`` and the squared norms.

    Returns ``(M (La, Lb), sq_a (La,), sq_b (Lb,))`` in the model's dtype (contracted in float32
    for a half-precision model). One forward and one batched backward per response (one in all
    when ``seq_a == seq_b``); the two backwards advance together block by block and each block's
    uses are contracted as soon as both are known, so memory holds one block's per-token
    gradients (|y| × T × Σ d_out of that block), not the whole network's. Each token's gradient
    is contracted once, into ``Z_t = R Y_t`` over the union of the two sequences' positions (the
    shared prompt counted once), from which M and both norms follow (docs/math.md §6.3).
    Parameters used in several segments (a tied embedding / lm_head) keep their uses until the
    end for the cross terms.
    """
    with torch.no_grad():
        a = _TokenStream(model, seq_a, pad_id, params, chunk_size)
        b = a if seq_a == seq_b else _TokenStream(model, seq_b, pad_id, params, chunk_size)
        La, Lb = a.L, b.L
        lay = _PairLayout.of(a, b)
        # parameters with uses in more than one segment (or in the head and the body) wait
        seg_of: dict[int, set] = {}
        for k, (_, _, seg_calls) in enumerate(_segments(a.calls, a.h)):
            for c in seg_calls:
                for _, p in c.names:
                    seg_of.setdefault(id(p), set()).add(k)
        head_ids = {pid for pid, _ in a.head_uses()}
        for pid in head_ids:
            seg_of.setdefault(pid, set()).add("head")
        deferred = {pid for pid, segs in seg_of.items() if len(segs) > 1}
        missing = [n for n, p in params.items() if id(p) not in seg_of]
        if missing:
            raise ValueError(f"selected parameter(s) {missing[:5]} are used by no module call the ghost "
                             "engine can see (used outside a module forward?); use impl='func'")
        dt = a.h.dtype
        ct = _compute(dt)
        M = torch.zeros(La, Lb, dtype=ct, device=a.h.device)
        sq_a = torch.zeros(La, dtype=ct, device=a.h.device)
        sq_b = sq_a if lay.same else torch.zeros(Lb, dtype=ct, device=a.h.device)
        keep_a: dict[int, list[list[Use]]] = {}
        keep_b: dict[int, list[list[Use]]] = keep_a if lay.same else {}

        def contract(ga, gb):
            cache: dict = {}                                                     # QR factors by input
            for pid in ga:
                _token_terms(ga[pid], gb[pid], lay, cache, (M, sq_a, sq_b))

        def add(pairs_a, pairs_b):
            ga = _group_all(pairs_a)
            gb = ga if lay.same else _group_all(pairs_b)
            for pid in list(ga):
                if pid in deferred:
                    keep_a.setdefault(pid, []).extend(ga.pop(pid))
                    if not lay.same:
                        keep_b.setdefault(pid, []).extend(gb.pop(pid))
            contract(ga, gb)

        add(a.head_uses(), b.head_uses())
        for pairs_a, pairs_b in zip(a.segment_uses(), b.segment_uses() if b is not a else itertools.repeat(None)):
            add(pairs_a, pairs_b)
        if keep_a:
            contract(keep_a, keep_b)
    return M.to(dt), sq_a.to(dt), (sq_a if lay.same else sq_b).to(dt)



# ------------------------------------------------------------------ pair entries (in-run diagnostics)
#
# Used by `dynamics.core.inrun` on the factors captured from a *training* backward: only the three
# Gram entries of each preference pair are needed, ⟨g_w,g_l⟩, ‖g_w‖², ‖g_l‖² (linear in the number
# of pairs B), not the full (2B)² Gram of `gram_from_uses`.

def call_uses(module: nn.Module, names: list[tuple[str, nn.Parameter]], inp: Tensor, grad: Tensor,
              *, compact: bool = False) -> list[tuple[int, Use]]:
    """The uses ``(id(parameter), Use)`` of one module call, from its input and output gradient.

    ``module``: the module called; ``names``: its selected ``(role, parameter)`` (``"weight"``,
    ``"bias"``); ``inp``: the call's input, (N, T, d_in) or (N, T) ids for an ``nn.Embedding``;
    ``grad``: the gradient of the scalar the backward started from with respect to the call's
    output, (N, T, d_out). Items are the N rows (sequences): rows do not interact in a causal LM,
    so row i of ``grad`` is item i's own output gradient (times whatever scalar ∂L/∂log π_i the
    backward carried).

    ``compact``: for position-wise uses (``nn.Linear``, GPT-2 ``Conv1D``, ``nn.Embedding``) drop
    the positions where the output gradient is exactly 0 (e.g. the prompt positions of a
    full-sequence lm_head, which no response log-prob depends on): a position τ contributes
    ``b_τ ⊗ a_τ = 0`` there, so the Gram is unchanged but the contractions get shorter. Kept
    positions are packed to the left: (N, T', ·) with T' the largest count of a row; a row's
    unused slots are zeroed. It costs a pass over ``grad``, so it pays only where many positions
    carry no gradient. Without it, a zero-gradient position whose input is non-finite would
    give NaN — as it does in the training's own weight gradient Σ_τ b_τ ⊗ a_τ.
    Other modules (norm weights) get their per-item gradient materialized from the raw input.
    """
    conv1d = _conv1d_type()
    positionwise = isinstance(module, (nn.Linear, nn.Embedding)) or (conv1d and isinstance(module, conv1d))
    if compact and positionwise and grad.dim() >= 3 and inp.shape[:2] == grad.shape[:2]:
        inp, grad = compact_positions(inp, grad)
    if not positionwise:
        fast = _elementwise_param_uses(module, names, inp, grad)
        if fast is not None:
            return fast
    return _uses_of_call(_Call(module, list(names), inp, grad), grad, shared=False)


def _elementwise_param_uses(module: nn.Module, names, inp: Tensor, grad: Tensor) -> list[tuple[int, Use]] | None:
    """Per-item gradients of 1-D parameters that act elementwise along the last axis (norm weights
    and biases: ``y = γ ⊙ n(x) + β``) from one vjp, with each item given its own copy of the
    parameter, broadcast over positions: γ → (N, 1, .., d). Row i of the output depends only on
    copy i, so the vjp with the output gradient gives item i's gradient in row i.

    ``nn.LayerNorm`` (whose ``F.layer_norm`` needs γ of shape (d,)) is done in closed form. Other
    modules are used only when their output with the broadcast copies equals their ordinary
    output exactly; else None (the caller falls back to one vmapped vjp per item)."""
    from torch.func import functional_call, vjp

    d, N = inp.shape[-1], grad.shape[0]
    if inp.dim() < 3 or not inp.is_floating_point() or not all(p.dim() == 1 and p.shape[0] == d for _, p in names):
        return None
    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1:
        # y = γ ⊙ x̂ + β with x̂ = layer_norm(x) unscaled: item i's gradients Σ_τ b_iτ ⊙ x̂_iτ and Σ_τ b_iτ
        xhat = F.layer_norm(inp, module.normalized_shape, None, None, module.eps)
        pos = tuple(range(1, inp.dim() - 1))
        g = {"weight": (grad * xhat).sum(pos), "bias": grad.sum(pos)}
        return [(id(p), Use(mat=g[r].reshape(N, d))) for r, p in names]
    base = {r: p.detach() for r, p in names}
    per = {r: p.expand(N, *([1] * (inp.dim() - 2)), d) for r, p in base.items()}
    try:
        with torch.enable_grad():
            out, pull = vjp(lambda prm: functional_call(module, prm, (inp,)), per)
        if out.shape != grad.shape or not torch.equal(out, functional_call(module, base, (inp,))):
            return None
    except RuntimeError:
        return None
    grads = pull(grad)[0]
    return [(id(p), Use(mat=grads[r].reshape(N, d))) for r, p in names]


def compact_positions(inp: Tensor, grad: Tensor) -> tuple[Tensor, Tensor]:
    """Keep, per row, the positions where ``grad`` (N, T, ...) is not all zero, packed to the left.

    Returns ``(inp', grad')`` with T' = the largest number of kept positions of a row; slots past
    a row's count hold zeros (id 0 for an integer ``inp``) in both, so they contribute nothing.
    """
    N, T = grad.shape[:2]
    keep = grad.reshape(N, T, -1).ne(0).any(-1)                                   # (N, T)
    n_keep = keep.sum(1)                                                         # (N,)
    Tk = max(int(n_keep.max()), 1)
    if Tk < T:
        order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :Tk]  # kept first, in order
        take = lambda t: t.gather(1, order.reshape(N, Tk, *([1] * (t.dim() - 2))).expand(N, Tk, *t.shape[2:]))
        inp, grad = take(inp), take(grad)
        keep = torch.arange(Tk, device=grad.device)[None, :] < n_keep[:, None]   # (N, Tk)
    zero_out = lambda t: torch.where(keep.reshape(N, -1, *([1] * (t.dim() - 2))), t,
                                     torch.zeros((), dtype=t.dtype, device=t.device))
    return zero_out(inp), zero_out(grad)


def _items(f: Factor, idx: Tensor | slice) -> Tensor:
    """The factor's rows for items ``idx`` ((B,) indices or a slice: a view, no copy):
    (B, T, k) or (B, T) ids (a shared factor expands)."""
    if f.x.shape[0] == 1:
        n = len(range(*idx.indices(10 ** 12))) if isinstance(idx, slice) else len(idx)
        return f.x.expand(n, *f.x.shape[1:])
    return f.x[idx]


def _as_slice(idx: Tensor) -> Tensor | slice:
    """``idx`` as a slice when it is a run of consecutive indices (rows then index as views)."""
    if len(idx) and bool((idx == torch.arange(int(idx[0]), int(idx[0]) + len(idx), device=idx.device)).all()):
        return slice(int(idx[0]), int(idx[0]) + len(idx))
    return idx


def _factor_dot_pairs(fa: Factor, ia, fb: Factor, ib, dtype: torch.dtype) -> Tensor:
    """``fa[ia[k], τ] · fb[ib[k], σ]`` for each k: (B, Ta, Tb) in ``dtype``.

    One-hot (embedding) factors: equality of ids, or the dense factor's entry at the id.
    """
    xa, xb = _items(fa, ia), _items(fb, ib)
    if fa.onehot and fb.onehot:
        return (xa[:, :, None] == xb[:, None, :]).to(dtype)
    if fa.onehot:  # e_{x_aτ} · fb[σ] = fb[σ, x_aτ]
        return xb.to(dtype).gather(2, xa[:, None, :].expand(-1, xb.shape[1], -1)).transpose(1, 2)
    if fb.onehot:
        return _factor_dot_pairs(fb, ib, fa, ia, dtype).transpose(1, 2)
    return torch.bmm(xa.to(dtype), xb.to(dtype).transpose(1, 2))


def _pair_term(u: Use, ia, v: Use, ib, dtype: torch.dtype) -> Tensor:
    """``Σ_{τσ} (rows_u[ia_k,τ]·rows_v[ib_k,σ]) (cols_u[ia_k,τ]·cols_v[ib_k,σ])`` for each k: (B,)."""
    R = _factor_dot_pairs(u.rows, ia, v.rows, ib, dtype)                                  # (B, Ta, Tb)
    C = _factor_dot_pairs(u.cols, ia, v.cols, ib, dtype)
    return (R * C).sum((1, 2))


def _restrict(u: Use, idx) -> Use:
    """The use with its items restricted to ``idx`` (indices or a slice; shared factors stay shared)."""
    if u.mat is not None:
        return Use(mat=u.mat[idx])
    pick = lambda f: f if f.x.shape[0] == 1 else Factor(f.x[idx], f.onehot, f.shared)
    return Use(pick(u.rows), pick(u.cols))


def _compute_dtype(uses: list[Use]) -> torch.dtype:
    """float64 if any dense factor (or materialized gradient) is float64, else float32."""
    dts = {u.mat.dtype for u in uses if u.mat is not None}
    dts |= {f.x.dtype for u in uses if u.mat is None for f in (u.rows, u.cols) if not f.onehot}
    return torch.float64 if torch.float64 in dts else torch.float32


def entry_costs(ulist: list[Use], B: int) -> tuple[float, float]:
    """``(ghost, materialized)``: multiply-adds of the three entries per pair of `pair_entries_from_uses`
    over B pairs, for one parameter with the uses ``ulist`` (only their shapes are read: meta
    tensors do); ``inf`` where a form does not exist (an embedding use is never materialized, a
    ``mat`` use has no ghost form). docs/math.md §6.2."""
    if any(u.mat is not None for u in ulist):
        c_ghost = float("inf")
    else:
        c_ghost = 3 * B * sum(u.rows.x.shape[1] * v.rows.x.shape[1] * (u.rows.dim + u.cols.dim)
                              for u in ulist for v in ulist)
    if any(u.mat is None and (u.rows.onehot or u.cols.onehot) for u in ulist) and c_ghost != float("inf"):
        return c_ghost, float("inf")
    P = ulist[0].mat.shape[1] if ulist[0].mat is not None else ulist[0].rows.dim * ulist[0].cols.dim
    return c_ghost, sum(0 if u.mat is not None else 2 * B * u.rows.x.shape[1] * P for u in ulist) + 3 * B * P


def pair_entries_from_uses(uses: dict[int, list[Use]], w: Tensor, l: Tensor, *,
                           mode: str = "auto") -> tuple[Tensor, Tensor, Tensor]:
    """``(⟨g_w[k], g_l[k]⟩, ‖g_w[k]‖², ‖g_l[k]‖²)`` for the item pairs ``(w[k], l[k])``: three (B,)
    float64 tensors, summed over the parameters in ``uses`` (``id(parameter) -> its uses``, a tied
    weight's uses together so that the cross terms between uses are included).

    Per parameter, the cheaper of two exact forms (flop count; docs/math.md §6.2):

    - ghost: ``Σ_{u,v} Σ_{τσ} (rows_u·rows_v)(cols_u·cols_v)`` over ordered pairs of uses, three
      (B, T_u, T_v) contractions per pair of uses (w·l, w·w, l·l) — cost 3 B T_u T_v (k_rows + k_cols);
    - materialized: each item's gradient ``Σ_u Σ_τ rows ⊗ cols`` (2B, P), then three row-wise dot
      products — cost 2B T P + 3 B P (never for an embedding use; always for a ``mat`` use).

    ``mode="ghost"`` / ``"materialize"`` forces one form where it exists (tests, benchmarks).
    The contraction runs in float64 for float64 factors, else float32 (bf16/fp16 upcast).
    """
    if mode not in ("auto", "ghost", "materialize"):
        raise ValueError(f"unknown mode {mode!r}; known: auto, ghost, materialize")
    B = len(w)
    ip = torch.zeros(B, dtype=torch.float64, device=w.device)
    sq_w, sq_l = torch.zeros_like(ip), torch.zeros_like(ip)
    items = _as_slice(torch.cat([w, l]))
    w, l = _as_slice(w), _as_slice(l)
    for pid, ulist in uses.items():
        dtype = _compute_dtype(ulist)
        onehot = any(u.mat is None and (u.rows.onehot or u.cols.onehot) for u in ulist)
        c_ghost, c_mat = entry_costs(ulist, B)
        if mode != "auto" and c_mat != float("inf") and c_ghost != float("inf"):
            c_mat, c_ghost = (0.0, 1.0) if mode == "materialize" else (1.0, 0.0)
        if c_mat < c_ghost:
            if onehot:
                raise NotImplementedError("a parameter with both an embedding use and a materialized use")
            G = _materialize(_restrict(ulist[0], items), 2 * B).to(dtype)                # (2B, P)
            for u in ulist[1:]:
                G = G + _materialize(_restrict(u, items), 2 * B).to(dtype)
            Gw, Gl = G[:B], G[B:]
            ip += (Gw * Gl).sum(1).double()        # torch's cascade sums, not a BLAS dot (see `_rowdot`)
            sq_w += (Gw * Gw).sum(1).double()
            sq_l += (Gl * Gl).sum(1).double()
        else:
            for u in ulist:
                for v in ulist:
                    ip += _pair_term(u, w, v, l, dtype).double()
                    sq_w += _pair_term(u, w, v, w, dtype).double()
                    sq_l += _pair_term(u, l, v, l, dtype).double()
    return ip, sq_w, sq_l
