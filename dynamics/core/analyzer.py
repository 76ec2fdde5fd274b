"""`Analyzer`: one model under analysis, with θ, the gradient engine and chunking resolved once.

Every diagnostic of the library is a function of ``(model, sequences, θ, engine)``. Instead of
threading ``model, pad_id, params, impl, chunk_size`` through every call, an `Analyzer` binds
them once (validating the parameter selection and the engine name up front) and offers the
measurements the recorder, the callback, the benchmark, the experiments and the CLI need:

==================================  ==========================================================
log-probs                           `logprobs`, `logprobs_table`                (docs/math.md §1)
sentence / token gradient Grams     `sentence_gram`, `pair_inner_products`, `token_gram`,
                                    `kernel` (cross-Gram of two sequence sets)  (§4, §5, §6)
Theorem 3 token decomposition       `token_decomposition`                        (§5)
effect of a real update             `snapshot`, `delta`, `update_effects` = ⟨g_i, Δθ⟩ (§4)
all of a recorded probe step        `probe_pass`: log-probs, pair entries, ⟨g_i, Δθ⟩ (§4.2)
learning-dynamics probes            `probe_metrics`                              (§7)
==================================  ==========================================================

The functions behind the methods stay public in their modules (`dynamics.core.grads`,
`dynamics.core.conditions`, ...) for one-off use; the methods add no computation of their own.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import pandas as pd
from torch import Tensor

from dynamics.core import conditions
from dynamics.core.grads import IMPLS, TokenGram, pair_inner_products, resolve_params, sentence_gram, token_gram
from dynamics.core.kernels import logprob_kernel
from dynamics.core.logprobs import (PairLogProbs, TokenizedPairs, TokenizedSequence, logprobs_table,
                                    pair_logprobs, scoring_mode)
from dynamics.core.probe_pass import ProbePass, probe_pass

__all__ = ["Analyzer"]


class Analyzer:
    """Measurements of ``model`` with respect to the parameters θ selected by ``params``.

    ``pad_id``: the padding token of the tokenized sequences (``TokenizedPairs.pad_id``).
    ``params``: a `dynamics.core.grads.select_params` spec (``"all"``, ``"trainable"``, ``"lora"``,
    regex patterns) or a name -> parameter dict; resolved now (tied weights once, under their
    canonical name), so later changes of ``requires_grad`` do not change θ.
    ``impl``: gradient engine, one of `IMPLS` (``"ghost"`` default; all exact, see `IMPLS`).
    ``chunk_size``: per-example (``func``) or per-token (``func``, ``ghost`` token level)
    gradients formed at once; bounds memory, never changes values.
    ``tokenizer``: needed only by `probe_metrics`.
    """

    def __init__(self, model, pad_id: int, *, params="all", impl: str = "ghost", chunk_size: int | None = None,
                 tokenizer=None):
        if impl not in IMPLS:
            raise ValueError(f"unknown impl {impl!r}; known: {', '.join(IMPLS)}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
        self.model, self.pad_id, self.impl, self.chunk_size, self.tokenizer = model, pad_id, impl, chunk_size, tokenizer
        self.params = resolve_params(model, params)                              # canonical name -> parameter

    def _kw(self) -> dict:
        return dict(params=self.params, impl=self.impl, chunk_size=self.chunk_size)

    # ------------------------------------------------------------------ log-probs
    def logprobs(self, pairs: TokenizedPairs) -> PairLogProbs:
        """Chosen and rejected log-probs of B pairs, one forward pass, eval mode, no grad."""
        with scoring_mode(self.model):
            return pair_logprobs(self.model, pairs)

    def logprobs_table(self, pairs: TokenizedPairs, *, batch_size: int = 8, tokens: bool = False) -> pd.DataFrame:
        """`dynamics.core.logprobs.logprobs_table`: one row per pair (sum, normalized, lengths,
        optionally per-token values)."""
        return logprobs_table(self.model, pairs, batch_size=batch_size, tokens=tokens)

    # ------------------------------------------------------------------ gradient inner products
    def sentence_gram(self, seqs: Sequence[TokenizedSequence]) -> Tensor:
        """(N, N) ``⟨∇_θ log π(y_i|x_i), ∇_θ log π(y_j|x_j)⟩``."""
        return sentence_gram(self.model, seqs, self.pad_id, **self._kw())

    def pair_inner_products(self, pairs: TokenizedPairs) -> dict[str, Tensor]:
        """Per pair (B,) each: ``ip_wl``, ``sq_w``, ``sq_l``, ``cos_wl`` (ghost: 3B entries, linear in B;
        func, autograd: read off the (2B)² Gram)."""
        return pair_inner_products(self.model, pairs, **self._kw())

    def pair_table(self, pairs: TokenizedPairs, *, batch_size: int = 4, progress=None) -> pd.DataFrame:
        """`pair_inner_products` of every pair, ``batch_size`` pairs at a time (memory; with func
        and autograd also time, whose Gram grows with the batch squared): one row per pair with
        ``pair_id, ip_wl, sq_w, sq_l, cos_wl, len_w, len_l``. ``progress``: called with
        ``(done, total)`` after each batch."""
        rows = []
        for lo in range(0, len(pairs), batch_size):
            sub = pairs.subset(range(lo, min(lo + batch_size, len(pairs))))
            ip = {k: v.double().cpu() for k, v in self.pair_inner_products(sub).items()}
            for k, pid in enumerate(sub.pair_ids):
                rows.append(dict(pair_id=pid, **{name: float(v[k]) for name, v in ip.items()},
                                 len_w=len(sub.chosen[k].response_ids), len_l=len(sub.rejected[k].response_ids)))
            if progress is not None:
                progress(lo + len(sub), len(pairs))
        return pd.DataFrame(rows, columns=["pair_id", "ip_wl", "sq_w", "sq_l", "cos_wl", "len_w", "len_l"])

    def token_gram(self, seq_a: TokenizedSequence, seq_b: TokenizedSequence) -> TokenGram:
        """Token-level Gram ``M[t, s] = ⟨g_a^t, g_b^s⟩`` (La, Lb) and squared norms."""
        return token_gram(self.model, seq_a, seq_b, self.pad_id, **self._kw())

    def kernel(self, seqs_a: Sequence[TokenizedSequence], seqs_b: Sequence[TokenizedSequence]) -> Tensor:
        """(Na, Nb) cross-Gram ``K[a, b] = ⟨∇log π(y_a|x_a), ∇log π(y_b|x_b)⟩`` (empirical NTK in
        log-prob space, e.g. probes × training responses)."""
        return logprob_kernel(self.model, seqs_a, seqs_b, self.pad_id, **self._kw())

    def token_decomposition(self, seq_w: TokenizedSequence, seq_l: TokenizedSequence, d_w: float | Tensor,
                            d_l: float | Tensor, lr: float = 1.0) -> dict:
        """Theorem 3 split of the predicted per-token changes of one pair, with its three token
        Grams (``grams`` = ww, wl, ll): `dynamics.core.conditions.pair_token_decomposition`."""
        return conditions.pair_token_decomposition(self.model, seq_w, seq_l, self.pad_id, d_w, d_l, lr,
                                                   **self._kw())

    # ------------------------------------------------------------------ the effect of a real update
    def snapshot(self) -> dict[str, Tensor]:
        """Detached copies of θ (take one before ``optimizer.step()``)."""
        return conditions.snapshot_params(self.model, self.params)

    def delta(self, before: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``Δθ = θ_now - before`` (``before`` from `snapshot`)."""
        return conditions.param_delta(self.model, before)

    def update_effects(self, seqs: Sequence[TokenizedSequence], delta: Mapping[str, Tensor], *,
                       batch_size: int | None = None) -> Tensor:
        """(N,) exact first-order change ``⟨∇_θ log π(y_i|x_i), Δθ⟩`` of each sequence's log-prob
        under the update ``delta`` (one jvp; no per-example gradient)."""
        return conditions.update_prediction(self.model, seqs, self.pad_id, delta, self.params,
                                            batch_size=batch_size)

    def probe_pass(self, pairs: TokenizedPairs, delta: Mapping[str, Tensor] | None = None) -> ProbePass:
        """`dynamics.core.probe_pass.probe_pass`: log-probs, ``ip_wl, sq_w, sq_l, cos_wl`` and, with
        ``delta`` (from `delta`), ``upd = ⟨g_i, Δθ⟩`` of the 2B sequences, from one forward and one
        activation backward (the ghost engine's factors; ``impl`` is not consulted)."""
        return probe_pass(self.model, pairs, self.params, delta=delta)

    # ------------------------------------------------------------------ probes
    def probe_metrics(self, prompt: str | None, probes: Sequence) -> list[dict]:
        """`dynamics.core.probes.probe_metrics` of ``probes`` (needs the tokenizer)."""
        if self.tokenizer is None:
            raise ValueError("probe_metrics needs the tokenizer: Analyzer(..., tokenizer=tok)")
        from dynamics.core.probes import probe_metrics
        return probe_metrics(self.model, self.tokenizer, prompt, probes)
