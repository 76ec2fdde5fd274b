"""Probe responses and squeezing metrics for learning dynamics (seed 000).

A probe is a response scored under a prompt of the training pair, to watch how learning on
``(x, y⁺, y⁻)`` moves other responses (seed 000: "desired response increases; others increase
then decrease"; hallucination via ``[x_u, y_{j≠u}]``; the squeezing effect of negative
gradients). Probe names:

===================  =====================================================================
``chosen``           y⁺ of the pair
``rejected``         y⁻ of the pair
``other_chosen``     y⁺ of another *training* prompt, under this prompt
``held_out_chosen``  y⁺ of a held-out (never trained) prompt, under this prompt
``chosen_shuffled``  the words of y⁺ in a shuffled order (same bag of words, non-human text)
``other_shuffled``   the words of ``other_chosen`` shuffled (unrelated non-human text)
``rephrase_k``       the k-th user-given rephrase of y⁺ (k = 0, 1, ...)
``argmax_teacher``   y*: per-token argmax under teacher forcing on y⁺ (|y*| = |y⁺|), `model_probes`
``greedy``           free greedy decoding until EOS or ``max_new_tokens``, `model_probes`
===================  =====================================================================

Model-dependent probes change as the model trains: call `model_probes` again at every
evaluation (or freeze them at step 0, to follow one fixed y*).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import Tensor

from dynamics.core.logprobs import (TokenizedSequence, check_context, collate, model_device, response_logits,
                                    scoring_mode, tokenize_response)

__all__ = ["Probe", "ProbeList", "PROBE_NAMES", "probe_set", "model_probes", "probe_metrics", "METRICS", "build_probe_sets"]

PROBE_NAMES = ("chosen", "rejected", "other_chosen", "held_out_chosen", "chosen_shuffled",
               "other_shuffled", "rephrase_k", "argmax_teacher", "greedy")


@dataclass(frozen=True)
class Probe:
    """A response to score under a prompt. ``response_ids``, when set, are the exact response
    tokens (model probes: decoding then re-tokenizing the text may merge tokens differently)."""
    name: str
    prompt: str
    response: str
    response_ids: tuple[int, ...] | None = None


class ProbeList(list):
    """A list of probes plus ``skipped``: ``(name, reason)`` for each probe that could not be made."""

    def __init__(self, probes: Iterable[Probe] = (), skipped: Iterable[tuple[str, str]] = ()):
        super().__init__(probes)
        self.skipped: list[tuple[str, str]] = list(skipped)


def _shuffle_words(text: str, rng: random.Random) -> str | None:
    """The words of ``text`` (whitespace-split) in a new order, leading whitespace kept; None when
    no reordering differs from the original (fewer than two distinct words)."""
    words = text.split()
    if len(set(words)) < 2:
        return None
    lead = text[: len(text) - len(text.lstrip())]
    order = list(words)
    while order == words:  # terminates: two distinct words admit a different order
        rng.shuffle(order)
    return lead + " ".join(order)


def probe_set(pair, *, others: Sequence, held_out=None, rephrases: Sequence[str] = (),
              seed: int = 0) -> ProbeList:
    """The model-independent probes of ``pair`` (a `dynamics.inputs.data.PreferencePair`), all under
    ``pair.prompt``.

    ``others``: other *training* pairs; one with a different prompt and a different chosen
    response is drawn with ``random.Random(seed)`` for ``other_chosen`` / ``other_shuffled``
    (``others=[]`` leaves both out, recorded in ``skipped``). ``held_out``: a pair not trained
    on (its prompt differs from ``pair``'s and from every training prompt). Shuffles use the same
    seeded generator: the set is a deterministic function of its arguments.
    Raises ValueError when ``others`` is non-empty but holds no usable pair, or ``held_out`` is
    not held out.
    """
    rng = random.Random(seed)
    probes = ProbeList([Probe("chosen", pair.prompt, pair.chosen), Probe("rejected", pair.prompt, pair.rejected)])
    other = None
    if others:
        cands = [o for o in others if o.prompt != pair.prompt and o.chosen.strip() != pair.chosen.strip()]
        if not cands:
            raise ValueError(f"pair {pair.id!r}: no pair in others has a different prompt and chosen response")
        other = cands[rng.randrange(len(cands))]
        probes.append(Probe("other_chosen", pair.prompt, other.chosen))
    else:
        probes.skipped.append(("other_chosen", "no other training pair given (others=[])"))
    if held_out is not None:
        trained = {pair.prompt, *(o.prompt for o in others)}
        if held_out.prompt in trained:
            raise ValueError(f"held_out pair {held_out.id!r} is not held out: its prompt is a training prompt")
        probes.append(Probe("held_out_chosen", pair.prompt, held_out.chosen))
    else:
        probes.skipped.append(("held_out_chosen", "no held-out pair given"))
    for name, text in [("chosen_shuffled", pair.chosen), ("other_shuffled", other.chosen if other else None)]:
        if text is None:
            probes.skipped.append((name, "no other training pair given (others=[])"))
            continue
        shuffled = _shuffle_words(text, rng)
        if shuffled is None:
            probes.skipped.append((name, f"{text!r} has fewer than two distinct words: nothing to shuffle"))
        else:
            probes.append(Probe(name, pair.prompt, shuffled))
    probes.extend(Probe(f"rephrase_{k}", pair.prompt, r) for k, r in enumerate(rephrases))
    return probes


# ------------------------------------------------------------------ model-dependent probes

def _response_logits(model, seqs: Sequence[TokenizedSequence], pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """`response_logits` of ``seqs`` right-padded into one batch: (N, L, V), (N, L), (N, L)."""
    return response_logits(model, collate(seqs, pad_id, "right", model_device(model)))


def model_probes(model, tokenizer, pair, max_new_tokens: int = 32) -> ProbeList:
    """``argmax_teacher`` (y*_t = argmax_v π(v | x, y⁺_<t), same length as y⁺) and ``greedy``
    (free greedy decoding from ``pair.prompt``, stopped at the tokenizer's EOS, which is not kept,
    or after ``max_new_tokens``, or at the model's context). An empty greedy response is skipped,
    with the reason in ``skipped``. Both probes carry their exact ``response_ids``."""
    seq = tokenize_response(tokenizer, pair.prompt, pair.chosen)
    out = ProbeList()
    with scoring_mode(model):
        logits, _, _ = _response_logits(model, [seq], 0)                         # (1, L, V)
        ystar = tuple(logits[0].argmax(-1).tolist())
        out.append(Probe("argmax_teacher", pair.prompt, tokenizer.decode(list(ystar)), ystar))
        ids = list(seq.prompt_ids)
        ctx = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        limit = max_new_tokens if ctx is None else min(max_new_tokens, ctx - len(ids))
        eos = getattr(tokenizer, "eos_token_id", None)
        gen: list[int] = []
        stop = f"reached max_new_tokens={max_new_tokens}"
        for _ in range(limit):
            nxt = int(model(input_ids=torch.tensor([ids + gen], device=model_device(model))).logits[0, -1].argmax())
            if eos is not None and nxt == eos:
                stop = "EOS"
                break
            gen.append(nxt)
    if gen:
        out.append(Probe("greedy", pair.prompt, tokenizer.decode(gen), tuple(gen)))
    else:
        why = "EOS was the first greedy token" if stop == "EOS" else f"no room to decode ({stop}, context {ctx})"
        out.skipped.append(("greedy", f"empty greedy response: {why}"))
    return out


# ------------------------------------------------------------------ metrics

METRICS = {
    "logp": "Σ_t log π(y_t | x, y_<t)",
    "logp_mean": "logp / |y|",
    "argmax_logp": "Σ_t log π(y*_t | x, y_<t),  y*_t = argmax_v π(v | x, y_<t)",
    "argmax_log1m": "Σ_t log(1 - π(y*_t | x, y_<t))",
    "argmax_mass": "mean_t π(y*_t | x, y_<t)   (rises under squeezing)",
    "a_norm": "mean_t ‖A_t‖₂ = mean_t √V ‖π_t‖₂,  A_t = I - 1π_tᵀ (A is a projector: ‖A‖=‖1πᵀ‖)",
    "g_norm": "mean_t ‖π_t - e_{y_t}‖₂   (the SFT residual G; also the norm of A's row for y_t)",
    "one_minus_p": "mean_t (1 - π(y_t | x, y_<t))",
    "entropy": "mean_t H(π_t) = -mean_t Σ_v π_t(v) log π_t(v)   (falls under squeezing)",
}
"""Metric name -> formula. π_t is the next-token distribution at response position t under
teacher forcing on the probe's own response y; every metric is computed for every probe, so the
per-prompt metrics "teacher-forced on y⁺" are the row of the ``chosen`` probe."""


def _tokenize_probe(tokenizer, prompt: str, p: Probe) -> TokenizedSequence:
    if p.response_ids is None:
        return tokenize_response(tokenizer, prompt, p.response, what=f"probe {p.name!r}")
    prompt_ids = tuple(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    if not prompt_ids or not p.response_ids:
        raise ValueError(f"probe {p.name!r}: empty prompt or response ids")
    return TokenizedSequence(prompt_ids, tuple(p.response_ids), tuple(tokenizer.decode([i]) for i in p.response_ids))


def probe_metrics(model, tokenizer, prompt: str | None, probes: Sequence[Probe], *,
                  batch_size: int = 16) -> list[dict]:
    """One flat record per probe: ``name``, ``prompt``, ``response``, ``n_tokens`` and every
    metric of `METRICS` (Python floats; ``pd.DataFrame(records)`` is long format).

    ``prompt``: score every probe under this prompt, or None for each probe's own prompt.
    One right-padded forward per ``batch_size`` probes, no grad, eval mode (restored).
    """
    pad = tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else 0
    prompts = [prompt if prompt is not None else p.prompt for p in probes]
    seqs = [_tokenize_probe(tokenizer, x, p) for x, p in zip(prompts, probes)]
    check_context(model, seqs)
    records = []
    with scoring_mode(model):
        for lo in range(0, len(seqs), batch_size):
            chunk = seqs[lo:lo + batch_size]
            logits, y, mask = _response_logits(model, chunk, pad)                # (N, L, V), (N, L), (N, L)
            logp_all = torch.log_softmax(logits.double(), -1)                    # (N, L, V)
            pi = logp_all.exp()
            n = mask.sum(-1).double()                                            # (N,)
            m = mask.double()

            def tsum(x):                                                         # (N, L) -> (N,) masked sum
                return (x * m).sum(-1)

            lp_y = logp_all.gather(-1, y[..., None])[..., 0]                     # (N, L) log π(y_t)
            lp_star, _ = logp_all.max(-1)                                        # (N, L) log π(y*_t)
            p_star = lp_star.exp()
            onehot = torch.nn.functional.one_hot(y, pi.shape[-1]).double()
            V = pi.shape[-1]
            vals = dict(
                logp=tsum(lp_y), logp_mean=tsum(lp_y) / n,
                argmax_logp=tsum(lp_star), argmax_log1m=tsum(torch.log1p(-p_star)),
                argmax_mass=tsum(p_star) / n,
                a_norm=tsum(V ** 0.5 * pi.norm(dim=-1)) / n,
                g_norm=tsum((pi - onehot).norm(dim=-1)) / n,
                one_minus_p=tsum(1 - lp_y.exp()) / n,
                entropy=tsum(-(pi * logp_all).sum(-1)) / n,
            )
            for i, s in enumerate(chunk):
                p = probes[lo + i]
                rec = dict(name=p.name, prompt=prompts[lo + i], response=p.response, n_tokens=len(s.response_ids))
                rec.update({k: float(v[i]) for k, v in vals.items()})
                records.append(rec)
    return records


def build_probe_sets(model, tokenizer, probe_pairs, train_pairs, *, seed: int = 0) -> dict:
    """{pair_id: probes} for every probe pair (seed 000's set): y⁺, y⁻, another prompt's y⁺, a
    held-out prompt's y⁺ (the next probe pair), shuffled y⁺, shuffled other response, and the
    model-made y* (argmax under teacher forcing on y⁺) and greedy decode, made from the model
    as it is now (the reference) and kept fixed."""
    sets = {}
    for k, pair in enumerate(probe_pairs):
        held = probe_pairs[(k + 1) % len(probe_pairs)] if len(probe_pairs) > 1 else None
        sets[str(pair.id)] = list(probe_set(pair, others=train_pairs, held_out=held, seed=seed)) + \
            list(model_probes(model, tokenizer, pair, max_new_tokens=16))
    return sets
