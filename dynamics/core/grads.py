"""Exact per-example gradient inner products of response log-probs (the torch.func engine).

For a response y of prompt x (seed 004 §4)::

    g   = ∇_θ log π(y|x)                  sentence level
    g^t = ∇_θ log π(y^t | x, y^<t)        token level,  Σ_t g^t = g

We compute Gram matrices of these, exactly (no random projection):

- `sentence_gram`: ``G[i, j] = ⟨g_i, g_j⟩`` over N sequences, shape (N, N);
- `token_gram`: ``M[t, s] = ⟨g_a^t, g_b^s⟩`` between two responses, shape (|y_a|, |y_b|), plus
  each token's ``‖g^t‖²`` for cosines (seed 004 Fig. 4b);
- `pair_inner_products`: ``⟨g_w, g_l⟩``, ``‖g_w‖²``, ``‖g_l‖²`` and the cosine of B preference
  pairs (the sign of ``⟨g_w, g_l⟩`` is condition (7) of seed 004; Theorem 1 is a test); the ghost
  engine forms only these 3B entries (`dynamics.core.probe_pass`), not the (2B)² Gram.

θ is a chosen subset of the parameters (`select_params`): all of them, the trainable ones, the
LoRA adapters, or regex patterns. Tied weights (``lm_head`` = ``embed_tokens``) are one
parameter, so their gradient sums both uses.

Mode. Every implementation evaluates the model in eval mode (dropout off), with grad enabled,
and restores the caller's mode afterwards: the numbers are those of the deterministic model,
so a `TrainerCallback` may call these functions mid-training without toggling anything.
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import torch
from torch import Tensor
from torch.func import functional_call, grad, jacrev, vmap

from dynamics.core.logprobs import (Batch, TokenizedPairs, TokenizedSequence, batch_logprobs, check_context,
                                    collate, model_device, unwrap)

__all__ = ["IMPLS", "select_params", "TokenGram", "sentence_gram", "token_gram",
           "pair_inner_products", "flat_grads", "token_flat_grads", "resolve_params", "analysis_mode",
           "split_params", "functional_logits", "gram_of", "requiring_grad"]

IMPLS = ("ghost", "func", "autograd")
"""Implementations, fastest first; all exact and equal to float64 round-off (tested).

- ``"ghost"`` (`dynamics.core.ghost`): one forward/backward over the whole batch with hooks; for each
  linear layer ``⟨g_i,g_j⟩ = Σ_{τσ} (A_i A_jᵀ)_{τσ} (B_i B_jᵀ)_{τσ}`` — cost ``T_i T_j (d_in+d_out)``,
  never materializes a per-example gradient. The default.
- ``"func"``: `torch.func` per-example gradients, ``vmap(grad(logp))`` (sentence) or
  ``jacrev`` (token). Materializes N × P (or |y| × P) gradients; ``chunk_size`` bounds the vmap
  width. Simple and general (any module), memory-bound. Needs eager attention (switched to).
- ``"autograd"``: one ``torch.autograd.grad`` per sequence (per token) on an unpadded forward,
  flattened and concatenated. Obviously correct, slowest: the oracle of the tests.
"""


# ------------------------------------------------------------------ parameter selection

def _canonical_names(model) -> dict[int, str]:
    """id(parameter) -> its first name in ``model.named_parameters()`` (tied weights share one)."""
    return {id(p): n for n, p in model.named_parameters()}


def select_params(model, which: str | Sequence[str] = "all") -> dict[str, torch.nn.Parameter]:
    """The parameters θ to differentiate with respect to, as an ordered dict name -> parameter.

    ``which``:
      - ``"all"``: every parameter once; a tied weight (``lm_head.weight`` = ``embed_tokens.weight``)
        appears once, under the first name ``model.named_parameters()`` gives;
      - ``"trainable"``: those with ``requires_grad``;
      - ``"lora"``: PEFT adapter parameters (names containing ``"lora_"``);
      - a list of regex patterns, ``re.search``-ed against the names. A pattern matching an alias
        of a tied weight (``"lm_head"`` in GPT-2) selects it under its canonical name.

    Raises ValueError for an unknown string, no LoRA parameter, or patterns matching nothing.
    """
    named = dict(model.named_parameters())
    if isinstance(which, str):
        if which == "all":
            return named
        if which == "trainable":
            return {n: p for n, p in named.items() if p.requires_grad}
        if which == "lora":
            out = {n: p for n, p in named.items() if "lora_" in n}
            if not out:
                raise ValueError("params='lora' but the model has no LoRA adapter parameter (no name "
                                 "contains 'lora_'); wrap it with peft.get_peft_model first")
            return out
        raise ValueError(f"unknown params {which!r}; known: all, trainable, lora, or a list of regex patterns")
    patterns = list(which)
    hit: set[str] = set()
    chosen: set[int] = set()
    for alias, p in model.named_parameters(remove_duplicate=False):  # aliases of tied weights too
        for pat in patterns:
            if re.search(pat, alias):
                hit.add(pat)
                chosen.add(id(p))
    missing = [pat for pat in patterns if pat not in hit]
    if missing:
        raise ValueError(f"parameter patterns matched no parameter name: {missing}")
    return {n: p for n, p in named.items() if id(p) in chosen}


def resolve_params(model, params) -> dict[str, torch.nn.Parameter]:
    """``params`` as accepted by the public functions -> canonical-name dict (checked)."""
    if not isinstance(params, Mapping):
        return select_params(model, params)
    canon = _canonical_names(model)
    out = {}
    for name, p in params.items():
        if id(p) not in canon:
            raise ValueError(f"params[{name!r}] is not a parameter of the model")
        out[canon[id(p)]] = p  # a tied alias name would clash with the constants in functional_call
    return out


def _check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; known: {', '.join(IMPLS)}")


@contextlib.contextmanager
def analysis_mode(model, eager: bool = False) -> Iterator[None]:
    """Eval mode (dropout and activation checkpointing off), grad enabled, optionally eager
    attention (vmap, jvp), and without the input-requires-grad hook that trainers add for PEFT +
    checkpointing (``requires_grad_`` inside a torch.func transform is an error); the caller's
    state is restored."""
    was_training = model.training
    attn = getattr(getattr(model, "config", None), "_attn_implementation", None)
    switch = eager and attn is not None and attn != "eager"
    get_emb = getattr(unwrap(model), "get_input_embeddings", None)
    emb = get_emb() if callable(get_emb) else None
    # transformers' enable_input_require_grads hook (possibly registered more than once)
    hooks = {k: f for k, f in getattr(emb, "_forward_hooks", {}).items()
             if getattr(f, "__name__", "") == "make_inputs_require_grads"}
    try:
        model.eval()
        if switch:
            model.set_attn_implementation("eager")
        for k in hooks:
            del emb._forward_hooks[k]
        with torch.enable_grad():
            yield
    finally:
        if hooks:
            emb._forward_hooks.update(hooks)
        if switch:
            model.set_attn_implementation(attn)
        model.train(was_training)


# ------------------------------------------------------------------ autograd: the oracle

def _flat(grads: Sequence[Tensor | None], params: Sequence[Tensor]) -> Tensor:
    """Concatenate per-parameter grads into one (P,) vector; an unused parameter counts as 0."""
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])


@contextlib.contextmanager
def requiring_grad(params: Sequence[Tensor]) -> Iterator[None]:
    """Temporarily ``requires_grad=True`` on ``params`` (e.g. frozen base weights under PEFT)."""
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        yield
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)


def _single_token_logps(model, seq: TokenizedSequence) -> Tensor:
    """(|y|,) token log-probs of one unpadded sequence (a batch of one, no padding anywhere)."""
    return batch_logprobs(model, collate([seq], 0, "right", model_device(model))).token_logps[0]


def token_flat_grads(model, seq: TokenizedSequence, params) -> Tensor:
    """(|y|, P) rows ``g^t = ∇_θ log π(y^t|x,y^<t)`` flattened: one forward, one grad per token."""
    params = resolve_params(model, params)
    ps = list(params.values())
    with analysis_mode(model), requiring_grad(ps):
        lp = _single_token_logps(model, seq)                                          # (L,)
        rows = [_flat(torch.autograd.grad(lp[t], ps, retain_graph=True, allow_unused=True), ps)
                for t in range(lp.shape[0])]
    return torch.stack(rows)                                                          # (L, P)


def flat_grads(model, seqs: Sequence[TokenizedSequence], pad_id: int, params="all") -> Tensor:
    """(N, P) rows ``g_i = ∇_θ log π(y_i|x_i)`` flattened: one unpadded forward + grad per sequence.

    ``pad_id`` is unused (no padding: each sequence runs alone); kept for a uniform signature.
    """
    params = resolve_params(model, params)
    ps = list(params.values())
    rows = []
    with analysis_mode(model), requiring_grad(ps):
        for s in seqs:
            logp = _single_token_logps(model, s).sum()
            rows.append(_flat(torch.autograd.grad(logp, ps, allow_unused=True), ps))
    return torch.stack(rows)                                                          # (N, P)


# ------------------------------------------------------------------ torch.func

def split_params(model, params: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(θ detached, every other parameter and buffer detached as constants) for functional_call.

    Tied weights: the dicts hold each tensor under its canonical name only; functional_call with
    ``tie_weights=True`` (the default) substitutes it for every alias (``lm_head.weight``), so the
    gradient of a tied θ sums the embedding and the output-layer uses (tested against autograd).
    """
    ids = {id(p) for p in params.values()}
    theta = {n: p.detach() for n, p in params.items()}
    consts = {n: p.detach() for n, p in model.named_parameters() if id(p) not in ids}
    consts.update({n: b.detach() for n, b in model.named_buffers()})
    return theta, consts


def functional_logits(model, theta, consts, input_ids: Tensor, attention_mask: Tensor | None,
            position_ids: Tensor) -> Tensor:
    """(T, V) logits of one sequence (T,) with parameters ``theta`` substituted."""
    kwargs = dict(input_ids=input_ids[None], position_ids=position_ids[None])           # (1, T)
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask[None]
    return functional_call(model, (theta, consts), args=(), kwargs=kwargs, tie_weights=True).logits[0]


def _func_sentence_grads(model, batch: Batch, params: dict[str, Tensor],
                         chunk_size: int | None) -> dict[str, Tensor]:
    """Per-example grads ``name -> (N, *shape)`` by ``vmap(grad(logp))`` over right-padded rows."""
    theta, consts = split_params(model, params)
    N, T = batch.input_ids.shape
    pos = torch.arange(T, device=batch.input_ids.device)
    rel = pos[None, :] - batch.start[:, None]
    target_mask = (rel >= 0) & (rel < batch.lengths[:, None])                    # (N, T) response positions

    def logp(theta, input_ids, attention_mask, position_ids, target_mask):       # one example, (T,) each
        logits = functional_logits(model, theta, consts, input_ids, attention_mask, position_ids)   # (T, V)
        # logit at p-1 scores the token at p: log π(x_p | x_<p), p = 1..T-1
        lp = torch.log_softmax(logits[:-1], -1).gather(-1, input_ids[1:, None])[:, 0]     # (T-1,)
        return torch.where(target_mask[1:], lp, torch.zeros_like(lp)).sum()      # Σ_t log π(y^t|x,y^<t)

    per_example = vmap(grad(logp), in_dims=(None, 0, 0, 0, 0), chunk_size=chunk_size)
    return per_example(theta, batch.input_ids, batch.attention_mask, batch.position_ids, target_mask)


def _func_token_jacobian(model, seq: TokenizedSequence, params: dict[str, Tensor],
                         chunk_size: int | None) -> dict[str, Tensor]:
    """Per-token grads ``name -> (|y|, *shape)``: ``jacrev`` of the token log-prob vector."""
    theta, consts = split_params(model, params)
    dev = model_device(model)
    ids = torch.tensor(seq.prompt_ids + seq.response_ids, device=dev)            # (T,) no padding
    P, T = len(seq.prompt_ids), seq.length

    def token_logps(theta):                                                      # -> (|y|,)
        logits = functional_logits(model, theta, consts, ids, None, torch.arange(T, device=dev))   # (T, V)
        return torch.log_softmax(logits[P - 1:T - 1], -1).gather(-1, ids[P:, None])[:, 0]

    return jacrev(token_logps, chunk_size=chunk_size)(theta)


def _dot(a: Tensor, b: Tensor, chunk: int = 1 << 20) -> Tensor:
    """``a bᵀ`` for (Na, P) and (Nb, P), accumulated in float64 over chunks of P columns.

    A float32 dot product over P ~ 10⁸ positive terms loses percents to rounding (measured on
    SmolLM2-135M: 1% low against float64); chunked float64 accumulation keeps the oracle exact.
    """
    out = torch.zeros(a.shape[0], b.shape[0], dtype=torch.float64, device=a.device)
    for lo in range(0, a.shape[1], chunk):
        out += a[:, lo:lo + chunk].double() @ b[:, lo:lo + chunk].double().T
    return out.to(a.dtype)


def gram_of(ga: dict[str, Tensor], gb: dict[str, Tensor]) -> Tensor:
    """``Σ_params flat(ga) flat(gb)ᵀ``: (Na, Nb), accumulated one parameter at a time."""
    return sum(_dot(a.flatten(1), gb[n].flatten(1)).double() for n, a in ga.items()).to(next(iter(ga.values())).dtype)


def _sq_of(g: dict[str, Tensor]) -> Tensor:
    """(N,) squared norms ``Σ_params ‖flat(g)‖²``."""
    return sum(a.flatten(1).double().pow(2).sum(1) for a in g.values()).to(next(iter(g.values())).dtype)


# ------------------------------------------------------------------ public API

@dataclass
class TokenGram:
    """Token-level gradient Gram between responses a and b (seed 004 Fig. 4b)."""
    M: Tensor                   # (La, Lb) ⟨g_a^t, g_b^s⟩
    sq_a: Tensor                # (La,)    ‖g_a^t‖²
    sq_b: Tensor                # (Lb,)    ‖g_b^s‖²
    tokens_a: tuple[str, ...]
    tokens_b: tuple[str, ...]

    @property
    def cos(self) -> Tensor:
        """(La, Lb) ``M / (‖g_a^t‖ ‖g_b^s‖)``, 0 where a norm is 0."""
        denom = (self.sq_a[:, None] * self.sq_b[None, :]).sqrt()
        return torch.where(denom > 0, self.M / denom.clamp_min(torch.finfo(denom.dtype).tiny),
                           torch.zeros_like(self.M))


def sentence_gram(model, seqs: Sequence[TokenizedSequence], pad_id: int, *, params="all",
                  impl: str = "ghost", chunk_size: int | None = None) -> Tensor:
    """(N, N) ``G[i, j] = ⟨∇_θ log π(y_i|x_i), ∇_θ log π(y_j|x_j)⟩`` in the model's dtype.

    ``params``: a `select_params` spec or an already-selected dict. ``chunk_size`` bounds the
    vmap width of ``impl="func"`` (memory ∝ chunk × P); other impls ignore it.
    """
    _check_impl(impl)
    params = resolve_params(model, params)
    check_context(model, seqs)
    if impl == "autograd":
        g = flat_grads(model, seqs, pad_id, params)                              # (N, P)
        return _dot(g, g)
    if impl == "ghost":
        from dynamics.core.ghost import ghost_sentence_gram
        with analysis_mode(model):
            return ghost_sentence_gram(model, collate(seqs, pad_id, "right", model_device(model)), params)
    with analysis_mode(model, eager=True):
        g = _func_sentence_grads(model, collate(seqs, pad_id, "right", model_device(model)), params, chunk_size)
    return gram_of(g, g)


def token_gram(model, seq_a: TokenizedSequence, seq_b: TokenizedSequence, pad_id: int, *, params="all",
               impl: str = "ghost", chunk_size: int | None = None) -> TokenGram:
    """Token-level Gram ``M[t, s] = ⟨g_a^t, g_b^s⟩`` and squared norms, as a `TokenGram`.

    ``Σ_{t,s} M[t, s]`` equals ``sentence_gram([a, b])[0, 1]`` (tested). ``chunk_size`` bounds
    the number of token vjps vmapped at once by ``jacrev`` (``impl="func"``) or the ghost engine.
    """
    _check_impl(impl)
    params = resolve_params(model, params)
    check_context(model, [seq_a, seq_b])
    same = seq_a == seq_b
    if impl == "ghost":
        from dynamics.core.ghost import ghost_token_gram
        with analysis_mode(model):
            M, sq_a, sq_b = ghost_token_gram(model, seq_a, seq_b, pad_id, params, chunk_size)
    elif impl == "autograd":
        ga = token_flat_grads(model, seq_a, params)                              # (La, P)
        gb = ga if same else token_flat_grads(model, seq_b, params)              # (Lb, P)
        M, sq_a, sq_b = _dot(ga, gb), ga.double().pow(2).sum(1).to(ga.dtype), gb.double().pow(2).sum(1).to(gb.dtype)
    else:
        with analysis_mode(model, eager=True):
            ja = _func_token_jacobian(model, seq_a, params, chunk_size)          # name -> (La, *shape)
            jb = ja if same else _func_token_jacobian(model, seq_b, params, chunk_size)
        M, sq_a, sq_b = gram_of(ja, jb), _sq_of(ja), _sq_of(jb)
    return TokenGram(M, sq_a, sq_b, tuple(seq_a.tokens), tuple(seq_b.tokens))


def pair_inner_products(model, pairs: TokenizedPairs, *, params="all", impl: str = "ghost",
                        chunk_size: int | None = None) -> dict[str, Tensor]:
    """Per pair: ``ip_wl = ⟨g_w, g_l⟩``, ``sq_w = ‖g_w‖²``, ``sq_l = ‖g_l‖²``, ``cos_wl``; each (B,).

    ``impl="ghost"``: only the three Gram entries of each pair, (w_k, l_k), (w_k, w_k), (l_k, l_k),
    from one forward and one activation backward of the 2B sequences
    (`dynamics.core.probe_pass.probe_pass`): cost linear in B. Returned in the model's dtype
    (float32 for a half-precision model; contracted in float32 or float64 either way).
    ``"func"``, ``"autograd"``: one `sentence_gram` of the 2B sequences, (2B)² entries, of which
    these are read. For the off-pair entries use `sentence_gram`.
    """
    _check_impl(impl)
    B = len(pairs)
    if impl == "ghost":
        from dynamics.core.probe_pass import probe_pass
        out = probe_pass(model, pairs, params)
        like = out.logps.chosen.logp                                             # model dtype, half -> float32
        return {k: getattr(out, k).to(device=like.device, dtype=like.dtype) for k in ("ip_wl", "sq_w", "sq_l", "cos_wl")}
    G = sentence_gram(model, pairs.chosen + pairs.rejected, pairs.pad_id, params=params, impl=impl,
                      chunk_size=chunk_size)                                     # (2B, 2B)
    i = torch.arange(B, device=G.device)
    ip, sq_w, sq_l = G[i, B + i], G[i, i], G[B + i, B + i]
    denom = (sq_w * sq_l).sqrt()
    cos = torch.where(denom > 0, ip / denom.clamp_min(torch.finfo(G.dtype).tiny), torch.zeros_like(ip))
    return dict(ip_wl=ip, sq_w=sq_w, sq_l=sq_l, cos_wl=cos)
