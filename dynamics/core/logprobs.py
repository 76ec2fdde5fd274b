"""Response log-probabilities of a causal LM: per token and per sequence, for batches of pairs.

``log π(y|x) = Σ_t log π(y^t | x, y^<t)`` over the response tokens only (prompt masked), and the
length-normalized ``log π(y|x) / |y|`` (SimPO, IPO-avg, RRHF, ORPO).

Tokenization. The prompt and the response are tokenized *separately* and their ids concatenated
(``prompt_ids + response_ids``). The response tokens are then exactly the response's own tokens:
no BPE merge across the prompt/response boundary can move a character of the response into a
prompt token, so two responses that share a suffix share those tokens (what the token-level
analysis of seed 004 §4 needs). The prompt gets the tokenizer's special tokens (e.g. a BOS),
the response none (``append_eos=True`` adds the EOS token to every response, as TRL does).

Truncation never cuts a response silently: with ``truncation="error"`` (default) a pair longer
than ``max_length`` raises; with ``truncation="prompt_left"`` prompt tokens are dropped from the
left and the number dropped is recorded per sequence (``n_prompt_truncated``). A pair's two
sequences keep one prompt, cut by the longer response, so chosen and rejected are always scored
on the same context. A sequence longer than the model's context
(``config.max_position_embeddings``) always raises.

Padding. ``padding_side="right"`` (default) or ``"left"`` give identical log-probs (tested);
position ids are ``cumsum(attention_mask) - 1``, so either side sees the same positions. Right
is the default because with left padding a pad query row attends to nothing, and in eager
attention transformers' Llama/GPT-NeoX then produce NaN hidden states at the pad positions; the
values at real positions stay right but the NaN leaks into *gradients* (0·NaN in the attention
backward). The lm_head runs only at the positions that predict response tokens, so long
prompts (TL;DR) and a 49k vocabulary cost no full-sequence logits.
"""
from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

TRUNCATION = ("auto", "error", "prompt_left")
"""Policies for a sequence longer than ``max_length``: ``"prompt_left"`` drops prompt tokens from the
left (responses are never cut), ``"error"`` refuses, ``"auto"`` (the default) is ``"prompt_left"``
when a ``max_length`` is given and ``"error"`` otherwise (nothing to cut to)."""


def resolve_truncation(truncation: str, max_length: int | None) -> str:
    """``"auto"`` -> ``"prompt_left"`` if ``max_length`` else ``"error"``; other names checked."""
    if truncation not in TRUNCATION:
        raise ValueError(f"unknown truncation {truncation!r}; known: {', '.join(TRUNCATION)}")
    if truncation == "auto":
        return "prompt_left" if max_length else "error"
    return truncation


@dataclass(frozen=True)
class TokenizedSequence:
    """One prompt/response pair as ids: ``prompt_ids + response_ids`` is the model input."""
    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]
    tokens: tuple[str, ...]          # decoded response tokens, one string per response id
    n_prompt_truncated: int = 0

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


@dataclass
class TokenizedPairs:
    """Tokenized preference pairs: ``chosen[i]`` and ``rejected[i]`` belong to ``pair_ids[i]``."""
    pair_ids: list[str]
    chosen: list[TokenizedSequence]
    rejected: list[TokenizedSequence]
    pad_id: int
    max_length: int | None = None
    truncation: str = "error"

    def __len__(self) -> int:
        return len(self.pair_ids)

    def subset(self, indices: Sequence[int]) -> "TokenizedPairs":
        """The pairs at ``indices``, same settings."""
        return TokenizedPairs([self.pair_ids[i] for i in indices], [self.chosen[i] for i in indices],
                              [self.rejected[i] for i in indices], self.pad_id, self.max_length, self.truncation)


def _tokenize_shared_prompt(tokenizer, prompt: str, responses: Sequence[str], *, max_length: int | None,
                            truncation: str, append_eos: bool, whats: Sequence[str]) -> list[TokenizedSequence]:
    """Tokenize one prompt (with special tokens) and its ``responses`` (without); every sequence
    gets the *same* prompt ids. With ``max_length`` and ``"prompt_left"`` the prompt is cut from
    the left once, by what the longest response needs (prompt + longest response = max_length),
    so responses compared with each other (a preference pair) are always scored on one context."""
    truncation = resolve_truncation(truncation, max_length)
    prompt_ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    resp = [list(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in responses]
    if append_eos:
        if tokenizer.eos_token_id is None:
            raise ValueError("append_eos=True but the tokenizer has no eos token")
        for r in resp:
            r.append(tokenizer.eos_token_id)
    for r, what in zip(resp, whats):
        if not r:
            raise ValueError(f"empty response ({what}): it tokenizes to zero tokens")
    if not prompt_ids:
        raise ValueError(f"empty prompt ({whats[0]}): with no prompt token (and no BOS) the first "
                         "response token has no context to be predicted from")
    cut = 0
    longest = max(range(len(resp)), key=lambda j: len(resp[j]))
    n = len(prompt_ids) + len(resp[longest])
    if max_length is not None and n > max_length:
        if truncation == "error" or len(resp[longest]) >= max_length:
            raise ValueError(
                f"{whats[longest]}: prompt ({len(prompt_ids)} tokens) + response ({len(resp[longest])} tokens) = {n} "
                f"> max_length={max_length}; responses are never cut — use truncation='prompt_left' "
                "to drop prompt tokens from the left, or raise max_length")
        cut = n - max_length
        prompt_ids = prompt_ids[cut:]
    return [TokenizedSequence(tuple(prompt_ids), tuple(r), tuple(tokenizer.decode([i]) for i in r), cut)
            for r in resp]


def tokenize_response(tokenizer, prompt: str, response: str, *, max_length: int | None = None,
                      truncation: str = "auto", append_eos: bool = False, what: str = "") -> TokenizedSequence:
    """Tokenize ``prompt`` (with special tokens) and ``response`` (without) separately.

    ``what`` names the sequence in error messages (e.g. ``"pair 3, chosen"``).
    Raises ValueError for an empty response, an empty prompt, or (``truncation="error"``)
    a sequence longer than ``max_length``.
    """
    return _tokenize_shared_prompt(tokenizer, prompt, [response], max_length=max_length, truncation=truncation,
                                   append_eos=append_eos, whats=[what])[0]


def tokenize_pairs(tokenizer, pairs, *, max_length: int | None = None, truncation: str = "auto",
                   append_eos: bool = False) -> TokenizedPairs:
    """Tokenize `dynamics.inputs.data.PreferencePair`-like objects (``id, prompt, chosen, rejected``).

    A pair's chosen and rejected sequences share one prompt: under ``"prompt_left"`` truncation
    the prompt is cut once, by the longer response, so both responses are scored on the same
    context (cut separately, a long TL;DR post would lose more of its start before the shorter
    summary than before the longer one, and the pair would compare two different prompts).

    Raises ValueError when the tokenizer has no pad token, or a pair's two responses tokenize
    identically (nothing to prefer), besides the errors of `tokenize_response`.
    """
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; set one first, e.g. "
                         "tokenizer.pad_token = tokenizer.eos_token")
    truncation = resolve_truncation(truncation, max_length)
    ids, chosen, rejected = [], [], []
    for p in pairs:
        w, l = _tokenize_shared_prompt(tokenizer, p.prompt, [p.chosen, p.rejected], max_length=max_length,
                                       truncation=truncation, append_eos=append_eos,
                                       whats=[f"pair {p.id!r}, chosen", f"pair {p.id!r}, rejected"])
        if w.response_ids == l.response_ids:
            raise ValueError(f"pair {p.id!r}: chosen and rejected responses are identical after tokenization")
        ids.append(str(p.id)), chosen.append(w), rejected.append(l)
    return TokenizedPairs(ids, chosen, rejected, tokenizer.pad_token_id, max_length, truncation)


@dataclass
class Batch:
    """Padded model input for N sequences of padded length T.

    ``start[i]``: index in the padded row of the first response token; ``lengths[i]``: |y_i|.
    """
    input_ids: Tensor        # (N, T) long
    attention_mask: Tensor   # (N, T) long
    position_ids: Tensor     # (N, T) long
    start: Tensor            # (N,) long
    lengths: Tensor          # (N,) long
    padding_side: str

    def response_positions(self) -> tuple[Tensor, Tensor]:
        """``(tgt, mask)``, each (N, L) with L = max |y|: ``tgt[i, j]`` is the index in the padded
        row of response token j of sequence i (``start[i] + j``, clamped inside the row past |y_i|)
        and ``mask[i, j] = j < |y_i|``. The logit at ``tgt - 1`` scores the token at ``tgt``."""
        T = self.input_ids.shape[1]
        j = torch.arange(int(self.lengths.max()), device=self.input_ids.device)
        mask = j[None, :] < self.lengths[:, None]                                  # (N, L)
        tgt = (self.start[:, None] + j[None, :]).clamp(max=T - 1)                  # (N, L)
        return tgt, mask


def collate(seqs: Sequence[TokenizedSequence], pad_id: int, padding_side: str = "right",
            device: str | torch.device = "cpu") -> Batch:
    """Pad ``seqs`` into one `Batch` (``padding_side`` ``"left"`` or ``"right"``)."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    T = max(s.length for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    start = torch.empty(len(seqs), dtype=torch.long)
    for i, s in enumerate(seqs):
        row = torch.tensor(s.prompt_ids + s.response_ids, dtype=torch.long)
        off = T - s.length if padding_side == "left" else 0
        ids[i, off:off + s.length] = row
        mask[i, off:off + s.length] = 1
        start[i] = off + len(s.prompt_ids)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    lengths = torch.tensor([len(s.response_ids) for s in seqs], dtype=torch.long)
    return Batch(ids.to(device), mask.to(device), pos.to(device), start.to(device), lengths.to(device), padding_side)


@dataclass
class SequenceLogProbs:
    """Response log-probs of N sequences; token values left-aligned and zero past each length."""
    token_logps: Tensor   # (N, L) log π(y^t | x, y^<t), L = max |y|
    mask: Tensor          # (N, L) bool, True for real response tokens
    lengths: Tensor       # (N,) long, |y|

    @property
    def logp(self) -> Tensor:
        """(N,) ``Σ_t log π(y^t|x,y^<t)``."""
        return self.token_logps.sum(-1)

    @property
    def logp_norm(self) -> Tensor:
        """(N,) length-normalized ``log π(y|x) / |y|``."""
        return self.logp / self.lengths.to(self.token_logps.dtype)

    def per_sequence(self) -> list[Tensor]:
        """The token log-probs of each sequence without padding: list of (|y_i|,)."""
        return [self.token_logps[i, : int(n)] for i, n in enumerate(self.lengths)]


def unwrap(model):
    """The transformers model inside a PEFT wrapper (LoRA layers stay in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


LOGIT_SCALINGS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                  "logits_scaling")
"""Config attributes with which transformers models (Gemma 2, Cohere, Granite, MiniCPM, Falcon-H1, …)
scale or soft-cap the logits after the head; any of them set (≠ 1) makes `body_and_head` None."""


def body_and_head(model):
    """``(body, head)`` of a transformers causal LM — ``logits = head(body(...).last_hidden_state)``
    — or None when the model is not of that form (custom modules, logit scaling/soft-capping)."""
    model = unwrap(model)
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    body = getattr(model, "base_model", None)
    cfg = getattr(model, "config", None)
    scaled = any(getattr(cfg, a, None) not in (None, 1.0) for a in LOGIT_SCALINGS)
    if not isinstance(head, torch.nn.Linear) or body is None or body is model or scaled:
        return None
    return body, head


@contextlib.contextmanager
def scoring_mode(model) -> Iterator[None]:
    """Eval mode (no dropout) without grad for scoring; the caller's train/eval mode is restored."""
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def model_device(model) -> torch.device:
    """The device of the model's (first) parameter."""
    return next(model.parameters()).device


def check_context(model, seqs: Sequence[TokenizedSequence]) -> None:
    """Raise ValueError when a sequence is longer than the model's context
    (``config.max_position_embeddings``; no check for models without one)."""
    ctx = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if ctx is None:
        return
    for s in seqs:
        if s.length > ctx:
            raise ValueError(f"sequence of {s.length} tokens (prompt {len(s.prompt_ids)} + response "
                             f"{len(s.response_ids)}) is longer than the model's context of {ctx} tokens; "
                             "tokenize with max_length and truncation='prompt_left'")


def response_logits(model, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
    """One forward pass: the logits that score each response token (N, L, V), the tokens (N, L)
    and the mask (N, L) (see `Batch.response_positions`); differentiable when grad is enabled.

    For transformers models (`body_and_head`) the lm_head runs only at those N·L positions.
    Half-precision logits are returned in float32 (the log-softmax is taken in float32).
    """
    tgt, mask = batch.response_positions()                                       # (N, L) each
    targets = batch.input_ids.gather(1, tgt)                                     # (N, L)
    pred_pos = tgt - 1                                                           # (N, L) their predictors
    inputs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids)
    split = body_and_head(model)
    if split is not None:
        body, head = split
        h = body(**inputs, use_cache=False).last_hidden_state                    # (N, T, d)
        pred = head(h.gather(1, pred_pos[..., None].expand(-1, -1, h.shape[-1])))  # (N, L, V)
    else:
        logits = model(**inputs).logits                                         # (N, T, V)
        pred = logits.gather(1, pred_pos[..., None].expand(-1, -1, logits.shape[-1]))  # (N, L, V)
    if pred.dtype in (torch.float16, torch.bfloat16):
        pred = pred.float()
    return pred, targets, mask


def batch_logprobs(model, batch: Batch) -> SequenceLogProbs:
    """Response log-probs of the N sequences of ``batch`` from one forward pass
    (`response_logits`); differentiable when grad is enabled."""
    pred, targets, mask = response_logits(model, batch)                          # (N, L, V), (N, L), (N, L)
    token_logps = -F.cross_entropy(pred.transpose(1, 2), targets, reduction="none")  # (N, L)
    return SequenceLogProbs(token_logps * mask, mask, batch.lengths)


def sequence_logprobs(model, seqs: Sequence[TokenizedSequence], pad_id: int, *,
                      padding_side: str = "right") -> SequenceLogProbs:
    """Log-probs of the responses of ``seqs`` in one forward pass (see `batch_logprobs`)."""
    check_context(model, seqs)
    return batch_logprobs(model, collate(seqs, pad_id, padding_side, model_device(model)))


@dataclass
class PairLogProbs:
    """Chosen and rejected log-probs of B pairs (from one stacked forward pass)."""
    chosen: SequenceLogProbs
    rejected: SequenceLogProbs


def pair_logprobs(model, pairs: TokenizedPairs, *, padding_side: str = "right") -> PairLogProbs:
    """Chosen and rejected stacked into one batch of 2B sequences, one forward pass."""
    B = len(pairs)
    out = sequence_logprobs(model, pairs.chosen + pairs.rejected, pairs.pad_id, padding_side=padding_side)
    L_w = int(out.lengths[:B].max())
    L_l = int(out.lengths[B:].max())
    return PairLogProbs(
        SequenceLogProbs(out.token_logps[:B, :L_w], out.mask[:B, :L_w], out.lengths[:B]),
        SequenceLogProbs(out.token_logps[B:, :L_l], out.mask[B:, :L_l], out.lengths[B:]),
    )


# ---------------------------------------------------------------- reference log-probs

REF_COLUMNS = ["pair_id", "ref_w", "ref_l", "len_w", "len_l", "fingerprint"]


def _fingerprint(w: TokenizedSequence, l: TokenizedSequence) -> str:
    h = hashlib.sha1(repr((w.prompt_ids, w.response_ids, l.prompt_ids, l.response_ids)).encode())
    return h.hexdigest()[:16]


def pair_fingerprints(pairs: TokenizedPairs) -> list[str]:
    """A hash of each pair's prompt and response token ids (the ``fingerprint`` column)."""
    return [_fingerprint(w, l) for w, l in zip(pairs.chosen, pairs.rejected)]


LOGPROB_COLUMNS = ["pair_id", "logp_w", "logp_l", "logp_w_norm", "logp_l_norm", "len_w", "len_l",
                   "n_prompt_truncated", "fingerprint"]
TOKEN_COLUMNS = ["tokens_w", "tokens_l", "token_logps_w", "token_logps_l"]


def logprobs_table(model, pairs: TokenizedPairs, *, batch_size: int = 8, padding_side: str = "right",
                   tokens: bool = False) -> pd.DataFrame:
    """Chosen and rejected log-probs of every pair, ``batch_size`` pairs per forward pass.

    One row per pair with `LOGPROB_COLUMNS` (``fingerprint`` hashes the pair's token ids, so a
    cache can detect staleness); ``tokens=True`` adds `TOKEN_COLUMNS` (decoded response tokens
    and per-token log-probs, lists). Eval mode, no grad; the model's mode is restored.
    """
    rows = []
    with scoring_mode(model):
        for lo in range(0, len(pairs), batch_size):
            sub = pairs.subset(range(lo, min(lo + batch_size, len(pairs))))
            out = pair_logprobs(model, sub, padding_side=padding_side)
            per_w, per_l = out.chosen.per_sequence(), out.rejected.per_sequence()
            for k, pid in enumerate(sub.pair_ids):
                w, l = sub.chosen[k], sub.rejected[k]
                row = dict(pair_id=pid, logp_w=float(out.chosen.logp[k]), logp_l=float(out.rejected.logp[k]),
                           logp_w_norm=float(out.chosen.logp_norm[k]), logp_l_norm=float(out.rejected.logp_norm[k]),
                           len_w=int(out.chosen.lengths[k]), len_l=int(out.rejected.lengths[k]),
                           n_prompt_truncated=w.n_prompt_truncated, fingerprint=_fingerprint(w, l))
                if tokens:
                    row.update(tokens_w=list(w.tokens), tokens_l=list(l.tokens),
                               token_logps_w=per_w[k].tolist(), token_logps_l=per_l[k].tolist())
                rows.append(row)
    return pd.DataFrame(rows, columns=LOGPROB_COLUMNS + (TOKEN_COLUMNS if tokens else []))


def reference_logprobs(model, pairs: TokenizedPairs, *, batch_size: int = 8,
                       padding_side: str = "right") -> pd.DataFrame:
    """Reference log-probs ``log π_ref(y_w|x)``, ``log π_ref(y_l|x)`` of every pair: the columns
    `REF_COLUMNS` of `logprobs_table` (``logp_w``, ``logp_l`` renamed ``ref_w``, ``ref_l``)."""
    table = logprobs_table(model, pairs, batch_size=batch_size, padding_side=padding_side)
    return table.rename(columns={"logp_w": "ref_w", "logp_l": "ref_l"})[REF_COLUMNS]


def model_fingerprint(model) -> str:
    """A hash of a model's identity and every parameter and buffer (names, dtypes, shapes, values):
    two models give the same reference log-probs only if their fingerprints agree."""
    h = hashlib.blake2b(digest_size=16)
    h.update(type(model).__name__.encode())
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        h.update(config.to_json_string(use_diff=False).encode())
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        t = t.detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
