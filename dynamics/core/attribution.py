"""Token attributions of response log-probs and of the DPO margin (integrated gradients, captum).

Which input tokens make ``f = log π(y|x) = Σ_t log π(y^t | x, y^<t)`` (or the margin
``log π(y_w|x) − log π(y_l|x)``) large? Integrated gradients (Sundararajan et al. 2017) at the
input-embedding layer: with ``e`` the (T, d) embeddings of the input, ``e'`` those of a baseline
and the straight path ``e(α) = e' + α (e − e')``::

    attr_i = (e_i − e'_i) · ∫_0^1 ∂f(e(α)) / ∂e_i dα        (the dot sums the d embedding dims)

Completeness: ``Σ_i attr_i = f(e) − f(e')`` exactly (the fundamental theorem of calculus along the
path). The integral is a quadrature ``Σ_k w_k ∇f(e(α_k))``; the default Gauss-Legendre rule
(nodes α_k and weights w_k of ``numpy.polynomial.legendre.leggauss`` mapped to [0, 1]) converges
exponentially in ``n_steps`` for the smooth f of a transformer. The quadrature error shows in
captum's *convergence delta* ``δ = Σ_i attr_i − (f(e) − f(e'))``, returned with every attribution.
captum casts the quadrature weights to float32, so even a float64 model gets |δ| ≈ 1e-8 · |f(e) − f(e')|
at best.

Baseline (``e'``): ``"pad"`` (recommended) replaces every input token, prompt and response, by the
pad token (``e'_i`` = the pad embedding); ``"zeros"`` sets every input embedding to the zero vector.
Only the model *input* moves along the path: the response tokens scored by f (the labels) stay
fixed, so ``f(e')`` is the log-prob of the same response after an uninformative context. Positions
and the attention mask are those of the real sequence. A response token is both a label and an
input that conditions the later tokens; its attribution measures the latter (the last response
token conditions nothing, so its attribution is exactly 0). Caveats: with ``"zeros"``, a pre-norm
model without learned position embeddings (Llama, GPT-NeoX) sees a residual stream ∝ α near α = 0,
where RMSNorm/LayerNorm (x / sqrt(|x|²/d + ε)) jumps from 0 to its full value within α ~ sqrt(ε)/|e|:
a nearly singular integrand that needs hundreds of steps (the delta shows it). And a model whose
embedding has ``padding_idx = pad_id`` (e.g. Llama configs with ``pad_token_id``) has a zero pad
row, so there ``"pad"`` is ``"zeros"``.

Convergence on a real model. The delta is the only check that the quadrature resolved the
integrand, and on SmolLM2-135M it often does not: along the straight path from the pad baseline
the log-prob of a 50-token sequence swings by tens of nats back and forth (measured: f(e(α))
from −101 down to −134, up to −84, down to −120, up to −18; slopes up to ~2600 per unit α;
features ~0.005 wide, smooth at finer scales, no jump), so |δ|/|f(e) − f(e')| was 1.08, 0.85,
0.50 and 0.094 at 16, 64, 256 and 1024 Gauss-Legendre steps (zeros baseline: 0.65, 0.54 at 16, 64);
1024 steps took 227 s on 2 CPU cores for that 50-token sequence, so use ``n_steps`` ≥ 1024 there. An
attribution whose |δ| exceeds `CONVERGED_REL` of the gap (`Attribution.converged`) is not a
decomposition of f; the CLI says so and `dynamics diagnose` shows it under a warning. On the tiny
test models |δ| falls below 1e-8 of the gap by 16 steps.

Implementation: `captum.attr.LayerIntegratedGradients` on ``model.get_input_embeddings()`` (PEFT
unwrapped), the forward being `dynamics.core.logprobs.batch_logprobs` on a right-padded batch, so
``f(e)`` is exactly the library's log-prob. The model always receives the real ids (they are the
labels too); for the baseline pass a temporary forward hook on the embedding replaces its output at
the real positions by the baseline vector (removed afterwards). The model runs in eval mode with its
parameters frozen (``requires_grad=False``) for the duration: only activations are differentiated,
parameter ``.grad`` are never touched, and the caller's train/eval mode and ``requires_grad`` flags
are restored, also when an error is raised.

Margin. For a pair sharing the prompt x, ``f = log π(y_w|x) − log π(y_l|x)`` is a sum of two terms
over the two input sequences; by linearity of IG its attributions are the chosen-target ones minus
the rejected-target ones. The prompt appears in both sequences: its attribution is the sum over both,
``attr_w(x_i) − attr_l(x_i)``, reported once; each response's own tokens get their attribution to the
margin (the rejected ones with the minus sign). Completeness then covers prompt + both responses.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from dynamics.core.grads import analysis_mode
from dynamics.core.logprobs import (Batch, TokenizedSequence, batch_logprobs, check_context, collate,
                                    model_device, unwrap)
from dynamics.errors import InputError

__all__ = ["TARGETS", "BASELINES", "METHODS", "ATTRIBUTION_COLUMNS", "CONVERGED_REL", "INTERNAL_BATCH_SIZE",
           "Attribution", "token_attributions", "attribution_frame"]

TARGETS = ("chosen", "rejected", "margin")
"""``"chosen"``: f = log π(seq|x); ``"rejected"``: f = log π(seq_other|x); ``"margin"``: their difference."""
BASELINES = ("pad", "zeros")
"""``"pad"``: every input token replaced by the pad token; ``"zeros"``: every input embedding zero."""
METHODS = ("gausslegendre", "riemann_middle", "riemann_left", "riemann_right")
"""captum quadrature rules accepted. captum's ``"riemann_trapezoid"`` is refused: its weights sum to
(n−1)/n instead of 1 (nodes spaced 1/(n−1), weights 1/n), so Σ attributions is off by −(f(e) − f(e'))/n."""
ATTRIBUTION_COLUMNS = ["target", "side", "segment", "position", "token_id", "token", "attribution"]
CONVERGED_REL = 0.1
"""An attribution is converged when |δ| ≤ CONVERGED_REL · |f(e) − f(e')| (`Attribution.converged`)."""
INTERNAL_BATCH_SIZE = 32
"""Default rows (sequences × quadrature points) per forward/backward. Memory grows with it times the
sequence length (every row keeps its activations for the backward): all 1024 points of a 128-token
SmolLM2 sequence at once need more than 24 GB, 32 rows about 1 GB. The values do not depend on it
beyond float rounding (captum sums the same terms in batches)."""


@dataclass(frozen=True)
class Attribution:
    """Per-token integrated-gradients attributions of one target (see the module docstring).

    ``token_ids``, ``tokens`` and ``attributions`` (T,) cover the attributed sequence, prompt then
    response (T = P + |y|, ``response_start`` = P): ``seq`` for the ``"chosen"`` and ``"margin"``
    targets, ``seq_other`` for ``"rejected"``. For ``"margin"`` the P prompt values are the shared
    prompt's attributions to the margin and ``other_*`` (|y_l|,) hold the rejected response tokens'
    attributions (None otherwise). Attributions are float64 numpy arrays.

    ``value`` = f(e), ``baseline_value`` = f(e'), ``delta`` = captum's convergence delta
    ``Σ attributions (+ Σ other_attributions) − (value − baseline_value)``.
    """
    target: str
    token_ids: tuple[int, ...]
    tokens: tuple[str, ...]
    attributions: np.ndarray
    response_start: int
    value: float
    baseline_value: float
    delta: float
    baseline: str
    method: str
    n_steps: int
    other_token_ids: tuple[int, ...] | None = None
    other_tokens: tuple[str, ...] | None = None
    other_attributions: np.ndarray | None = None

    @property
    def prompt_attributions(self) -> np.ndarray:
        """(P,) the prompt tokens' attributions."""
        return self.attributions[: self.response_start]

    @property
    def response_attributions(self) -> np.ndarray:
        """(|y|,) the attributed response's tokens' attributions."""
        return self.attributions[self.response_start:]

    def converged(self, rel: float = CONVERGED_REL) -> bool:
        """Whether captum's convergence delta is within ``rel`` of the gap f(e) − f(e') (a gap of
        exactly 0 counts as converged only with δ = 0)."""
        return abs(self.delta) <= rel * abs(self.value - self.baseline_value)

    @property
    def total(self) -> float:
        """Σ of all attributions (both responses for the margin) = value − baseline_value + delta."""
        other = 0.0 if self.other_attributions is None else float(self.other_attributions.sum())
        return float(self.attributions.sum()) + other

    def to_frame(self) -> pd.DataFrame:
        """`attribution_frame` of this attribution."""
        return attribution_frame(self)


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _check_args(model, seq, pad_id, target, seq_other, n_steps, baseline, method, internal_batch_size):
    """Raise `InputError` for any bad argument; returns the sequences to attribute."""
    if target not in TARGETS:
        raise InputError(f"unknown attribution target {target!r}; known: {', '.join(TARGETS)}")
    if target in ("rejected", "margin") and seq_other is None:
        raise InputError(f"target {target!r} needs the rejected sequence: pass seq_other")
    if baseline not in BASELINES:
        raise InputError(f"unknown baseline {baseline!r}; known: {', '.join(BASELINES)}")
    if method == "riemann_trapezoid":
        raise InputError("method 'riemann_trapezoid' is refused: captum's trapezoid weights sum to (n-1)/n, "
                         f"not 1 (biased by (f(x) - f(baseline))/n_steps); use one of {', '.join(METHODS)}")
    if method not in METHODS:
        raise InputError(f"unknown integration method {method!r}; known: {', '.join(METHODS)}")
    if not _is_int(n_steps) or n_steps < 1:
        raise InputError(f"n_steps must be an integer >= 1, got {n_steps!r}")
    if method != "gausslegendre" and n_steps < 2:
        raise InputError(f"method {method!r} needs n_steps >= 2, got {n_steps}")
    if internal_batch_size is not None and (not _is_int(internal_batch_size) or internal_batch_size < 1):
        raise InputError(f"internal_batch_size must be None or an integer >= 1, got {internal_batch_size!r}")
    seqs = {"chosen": [seq], "rejected": [seq_other], "margin": [seq, seq_other]}[target]
    names = {"chosen": ["seq"], "rejected": ["seq_other"], "margin": ["seq", "seq_other"]}[target]
    for name, s in zip(names, seqs):
        if not isinstance(s, TokenizedSequence):
            raise InputError(f"{name} must be a TokenizedSequence, got {type(s).__name__}")
        if not s.prompt_ids or not s.response_ids:
            raise InputError(f"{name} has {len(s.prompt_ids)} prompt and {len(s.response_ids)} response tokens; "
                             "both must be non-empty")
    if target == "margin" and seq.prompt_ids != seq_other.prompt_ids:
        raise InputError("target 'margin' needs chosen and rejected sequences with the same prompt "
                         f"(prompt lengths {len(seq.prompt_ids)} and {len(seq_other.prompt_ids)}, ids differ)")
    vocab = getattr(unwrap(model).get_input_embeddings(), "num_embeddings", None)
    if not _is_int(pad_id) or pad_id < 0 or (vocab is not None and pad_id >= vocab):
        raise InputError(f"pad_id must be a token id in [0, {vocab if vocab is not None else 'vocab'}), "
                         f"got {pad_id!r}")
    if vocab is not None:
        for s in seqs:
            bad = [i for i in s.prompt_ids + s.response_ids if not 0 <= i < vocab]
            if bad:
                raise InputError(f"token ids {bad[:5]} are outside the model's vocabulary of {vocab}")
    try:
        check_context(unwrap(model), seqs)
    except ValueError as e:
        raise InputError(str(e)) from None
    return seqs


def _token_strings(ids: Sequence[int], tokenizer, fallback: Sequence[str] | None = None) -> tuple[str, ...]:
    """Decoded token strings (one per id); without a tokenizer ``fallback`` or ``"<id>"``."""
    if tokenizer is not None:
        return tuple(tokenizer.decode([i]) for i in ids)
    if fallback is not None and len(fallback) == len(ids):
        return tuple(fallback)
    return tuple(f"<{i}>" for i in ids)


def token_attributions(model, seq: TokenizedSequence, pad_id: int, *, target: str = "chosen",
                       seq_other: TokenizedSequence | None = None, tokenizer=None, n_steps: int = 50,
                       baseline: str = "pad", method: str = "gausslegendre",
                       internal_batch_size: int | None = INTERNAL_BATCH_SIZE) -> Attribution:
    """Integrated-gradients attribution of a response log-prob (or of the margin) to the input tokens.

    Args:
        model: a transformers causal LM (or a PEFT wrapper of one).
        seq: the chosen sequence (any sequence for ``target="chosen"``).
        pad_id: the pad token id (the ``"pad"`` baseline, and padding of the margin's two rows).
        target: ``"chosen"`` (f = log π(seq|x)), ``"rejected"`` (f = log π(seq_other|x)) or
            ``"margin"`` (f = log π(seq|x) − log π(seq_other|x); the two share the prompt).
        seq_other: the rejected sequence (needed by ``"rejected"`` and ``"margin"``).
        tokenizer: decodes every token id for `Attribution.tokens`; without one the prompt tokens
            are shown as ``"<id>"`` and the response tokens are the sequence's ``tokens``.
        n_steps: quadrature points along the path (each a forward + backward of the batch).
        baseline: ``"pad"`` or ``"zeros"`` (see `BASELINES`).
        method: a captum quadrature rule of `METHODS`.
        internal_batch_size: at most this many rows (sequences × steps) per forward pass
            (`INTERNAL_BATCH_SIZE`); None: all n_steps × (1 or 2) rows at once.

    Returns:
        an `Attribution`: ``attributions`` (P + |y|,) float64, summed over the embedding dimension of
        captum's (T, d) layer attributions; for the margin also ``other_attributions`` (|y_l|,).

    Raises `InputError` for an unknown target / baseline / method, a missing ``seq_other``, prompts
    that differ (margin), ``n_steps < 1``, ids outside the vocabulary, or a sequence longer than the
    model's context.
    """
    seqs = _check_args(model, seq, pad_id, target, seq_other, n_steps, baseline, method, internal_batch_size)
    pad_id, n_steps = int(pad_id), int(n_steps)
    emb = unwrap(model).get_input_embeddings()
    device = model_device(model)
    batch = collate(seqs, pad_id, "right", device)                               # (N, T), N = 1 or 2
    N = len(seqs)
    real = batch.attention_mask.bool()                                           # (N, T)
    # baseline "ids": -1 marks a real position whose embedding the hook replaces by the baseline's
    base_ids = torch.where(real, torch.full_like(batch.input_ids, -1), batch.input_ids)
    sign = torch.tensor([1.0] if N == 1 else [1.0, -1.0], device=device)
    swap: list[torch.Tensor | None] = [None]                                     # (k·N, T) bool or None

    def forward(ids: torch.Tensor) -> torch.Tensor:
        """(k·N,) signed log-probs of k stacked copies of the batch rows (captum repeats step-major).
        The model always sees the real ids (they are also the labels); where ``ids < 0`` the
        embedding output is replaced by the baseline's (`swap_hook`)."""
        k = ids.shape[0] // N
        neg = ids < 0
        swap[0] = neg if bool(neg.any()) else None
        try:
            b = Batch(batch.input_ids.repeat(k, 1), batch.attention_mask.repeat(k, 1),
                      batch.position_ids.repeat(k, 1), batch.start.repeat(k), batch.lengths.repeat(k), "right")
            lp = batch_logprobs(model, b).logp                                   # (k·N,)
        finally:
            swap[0] = None
        return lp * sign.to(lp.dtype).repeat(k)

    base_vec: list[torch.Tensor] = []                                            # (d,) once computed

    def swap_hook(module, args, output):
        m = swap[0]
        return None if m is None else torch.where(m[..., None], base_vec[0].to(output.dtype), output)

    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    hook = emb.register_forward_hook(swap_hook)                                  # inert until swap[0] is set
    try:
        for p in params:
            p.requires_grad_(False)
        with analysis_mode(model):
            with torch.no_grad():
                pad_vec = emb(torch.tensor([[pad_id]], device=device))[0, 0]      # (d,), before the hook
            base_vec.append(torch.zeros_like(pad_vec) if baseline == "zeros" else pad_vec)
            from captum.attr import LayerIntegratedGradients  # here: importing this module stays light

            lig = LayerIntegratedGradients(forward, emb)
            attr, delta = lig.attribute(batch.input_ids, baselines=base_ids, n_steps=n_steps, method=method,
                                        internal_batch_size=internal_batch_size, return_convergence_delta=True)
            with torch.no_grad():
                value = float(forward(batch.input_ids).double().sum())
                base_value = float(forward(base_ids).double().sum())
    finally:
        hook.remove()
        for p, f in zip(params, flags):
            p.requires_grad_(f)

    a = attr.detach().double().sum(-1).cpu().numpy()                             # (N, T)
    first = seqs[0]                                                              # the attributed sequence
    P = len(first.prompt_ids)
    ids = first.prompt_ids + first.response_ids
    tokens = _token_strings(first.prompt_ids, tokenizer) + _token_strings(first.response_ids, tokenizer, first.tokens)
    row = a[0, : first.length].copy()
    other = dict()
    if target == "margin":
        row[:P] += a[1, :P]
        other = dict(other_token_ids=seq_other.response_ids,
                     other_tokens=_token_strings(seq_other.response_ids, tokenizer, seq_other.tokens),
                     other_attributions=a[1, P: seq_other.length].copy())
    return Attribution(target=target, token_ids=ids, tokens=tokens, attributions=row, response_start=P,
                       value=value, baseline_value=base_value, delta=float(delta.double().sum()),
                       baseline=baseline, method=method, n_steps=n_steps, **other)


def attribution_frame(attr: Attribution) -> pd.DataFrame:
    """Long format, one row per attributed token, columns `ATTRIBUTION_COLUMNS`:

    ``target``; ``side`` (the sequence the token belongs to: ``"chosen"`` or ``"rejected"``, and
    ``"shared"`` for the margin's prompt); ``segment`` (``"prompt"`` or ``"response"``);
    ``position`` (index in its own sequence, prompt then response); ``token_id``; ``token``;
    ``attribution``. Rows: P + |y| (+ |y_l| for the margin).
    """
    own = "rejected" if attr.target == "rejected" else "chosen"
    P = attr.response_start
    rows = [dict(target=attr.target, side=("shared" if attr.target == "margin" and i < P else own),
                 segment="prompt" if i < P else "response", position=i, token_id=int(t), token=s,
                 attribution=float(v))
            for i, (t, s, v) in enumerate(zip(attr.token_ids, attr.tokens, attr.attributions))]
    if attr.other_attributions is not None:
        rows += [dict(target=attr.target, side="rejected", segment="response", position=P + j, token_id=int(t),
                      token=s, attribution=float(v))
                 for j, (t, s, v) in enumerate(zip(attr.other_token_ids, attr.other_tokens, attr.other_attributions))]
    return pd.DataFrame(rows, columns=ATTRIBUTION_COLUMNS)
