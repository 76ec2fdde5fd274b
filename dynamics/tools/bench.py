"""Benchmark of the gradient engines against one DPO forward+backward measured in the same run.

For each data set (long-suffix sentiment pairs, TL;DR pairs) and each implementation it reports
time per pair (wall and process CPU time), peak additional memory (resident set size above the
level before the call, sampled every 2 ms) and the ratio to one DPO forward+backward on the same
pair. Targets of issue 3: sentence level ≤ 1.5× DPO and ≥ 3× faster than the autograd loop.

Token level: the exact Gram needs one activation-gradient backward per response token, each
about one forward of the whole sequence (docs/math.md §6.3). Its *floor* is therefore
``|y_w| · t_fwd(w) + |y_l| · t_fwd(l)``, with ``t_fwd`` one forward of the sequence (logits
included, no grad) timed in the same run; the token rows report ``floor_s`` and
``ratio_to_floor`` beside ``ratio_to_dpo`` (issue 11's target: ≤ 1.2× the floor, the floor being
≈ (|y_w| + |y_l|)/6 DPO steps when a DPO step costs about six such forwards).

The autograd loop and torch.func at token level materialize |y| × P gradients (32 × 134.5M
floats = 17 GiB for SmolLM2), so they run on the first ``n_small`` tokens of each response and
are extrapolated: their cost is one backward (autograd) or one vjp (func) per token, linear in
|y_w| + |y_l|. The output says which rows are extrapolated (their memory is that of the smaller run).
"""
from __future__ import annotations

import gc
import os
import threading
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch

from dynamics.core.analyzer import Analyzer
from dynamics.core.grads import IMPLS
from dynamics.core.logprobs import (TokenizedPairs, TokenizedSequence, collate, model_device, pair_logprobs,
                                    tokenize_pairs)
from dynamics.core.losses import compute_loss


def _rss() -> int:
    """Resident set size of this process in bytes (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Context manager sampling RSS in a thread; ``.peak`` = max RSS − RSS at entry (bytes)."""

    def __enter__(self):
        gc.collect()
        self.base, self.peak, self._stop = _rss(), 0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss() - self.base)
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss() - self.base)


def _measure(fn, repeat: int) -> tuple[float, int, float]:
    """(wall seconds per call after one warm-up, peak additional bytes, process CPU seconds per call)."""
    fn()
    with PeakMemory() as mem:
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(repeat):
            fn()
        dt, dc = (time.perf_counter() - t0) / repeat, (time.process_time() - c0) / repeat
    return dt, mem.peak, dc


def forward(model, seq: TokenizedSequence, pad_id: int) -> None:
    """One forward of one sequence (all logits, no grad): the unit of the token Gram's floor."""
    b = collate([seq], pad_id, "right", model_device(model))
    with torch.no_grad():
        model(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids)


def dpo_step(model, pair: TokenizedPairs) -> None:
    """One DPO forward+backward on ``pair`` (reference = the current log-probs), grads dropped."""
    out = pair_logprobs(model, pair)
    lo = compute_loss("dpo", out.chosen.logp, out.rejected.logp, out.chosen.logp.detach(), out.rejected.logp.detach())
    lo.loss.sum().backward()
    model.zero_grad(set_to_none=True)


def _cut(seq: TokenizedSequence, n: int) -> TokenizedSequence:
    return replace(seq, response_ids=seq.response_ids[:n], tokens=seq.tokens[:n])


def cut_pairs(pairs: TokenizedPairs, n_tokens: int) -> TokenizedPairs:
    """Pairs whose responses are cut to their first ``n_tokens`` tokens (benchmark shapes only)."""
    return TokenizedPairs(pairs.pair_ids, [_cut(s, n_tokens) for s in pairs.chosen],
                          [_cut(s, n_tokens) for s in pairs.rejected], pairs.pad_id)


def default_datasets(tokenizer, root: str | Path, *, pairs: int = 2, tokens: int = 32, tldr_max_length: int = 256,
                     progress=print) -> dict[str, TokenizedPairs]:
    """The benchmark's pair sets: ``pairs`` sentiment long-suffix pairs (the shared tweets under
    ``root/../shared/data`` when present, else the built-in statements) and, when the shared
    TL;DR comparisons are present, ``pairs`` TL;DR pairs (prompt+response ≤ ``tldr_max_length``
    tokens) whose responses are cut to ``tokens`` tokens."""
    from dynamics.inputs import data

    tweets, tldr = data.default_tweets_path(root), data.default_tldr_path(root)
    sent = data.load_tweets(tweets, "long_suffix", limit=pairs) if tweets else \
        data.builtin_sentiment_pairs("long_suffix", n=pairs)
    sets = {f"sentiment long_suffix ({'tweets' if tweets else 'built-in'})": tokenize_pairs(tokenizer, sent)}
    if tldr:
        tp = tokenize_pairs(tokenizer, data.load_tldr(tldr), max_length=tldr_max_length)
        keep = [i for i in range(len(tp))
                if min(len(tp.chosen[i].response_ids), len(tp.rejected[i].response_ids)) >= tokens]
        sets[f"tldr (responses cut to {tokens} tokens)"] = cut_pairs(tp.subset(keep[:pairs]), tokens)
    else:
        progress(f"no TL;DR data under {data.shared_data_dir(root)}: TL;DR rows skipped")
    return sets


def bench_grads(model, datasets: dict[str, TokenizedPairs], *, n_small: int = 4, repeat: int = 1,
                token_level: bool = True, token_chunk: int | None = 8, progress=print) -> pd.DataFrame:
    """Time and memory of every implementation and level; one row per (data, impl, level).

    ``datasets`` maps a name to the pairs to run (each pair is measured alone; rows report the
    mean over pairs). ``token_chunk``: tokens per batched backward of the ghost token Gram (the
    recorder's default, 8). Columns: data, level, impl, s_per_pair, cpu_s_per_pair, peak_mib,
    ratio_to_dpo, tokens (La×Lb at token level), extrapolated, dpo_s, and on the token rows fwd_w_s,
    fwd_l_s (one forward of each sequence, timed before and after the ghost Gram and averaged),
    floor_s = La·t_fwd(w) + Lb·t_fwd(l),
    ratio_to_floor (wall time) and cpu_ratio_to_floor (CPU time: steadier on a shared machine).
    """
    rows = []
    for name, pairs in datasets.items():
        for k in range(len(pairs)):
            pair = pairs.subset([k])
            w, l = pair.chosen[0], pair.rejected[0]
            La, Lb = len(w.response_ids), len(l.response_ids)
            t_dpo, m_dpo, c_dpo = _measure(lambda: dpo_step(model, pair), repeat)
            base = dict(data=name, pair=pair.pair_ids[0], T_w=w.length, T_l=l.length, dpo_s=t_dpo, dpo_cpu_s=c_dpo)
            rows.append(dict(base, level="-", impl="dpo fwd+bwd", s_per_pair=t_dpo, cpu_s_per_pair=c_dpo,
                             peak_mib=m_dpo / 2**20, tokens="", extrapolated=False))
            for impl in IMPLS:
                an = Analyzer(model, pair.pad_id, impl=impl)
                t, m, c = _measure(lambda: an.pair_inner_products(pair), repeat)
                rows.append(dict(base, level="sentence", impl=impl, s_per_pair=t, cpu_s_per_pair=c,
                                 peak_mib=m / 2**20, tokens="", extrapolated=False))
                progress(f"{name} pair {k}: sentence {impl}: {t:.2f} s ({t / t_dpo:.2f}x DPO)")
            if not token_level:
                continue
            # the floor's forwards timed just before and just after the Gram, averaged: a drift in
            # the machine's load between them hits the floor as it hits the Gram
            fwd = lambda: [_measure(lambda: forward(model, s, pair.pad_id), max(repeat, 3)) for s in (w, l)]  # noqa: E731
            before = fwd()
            an = Analyzer(model, pair.pad_id, chunk_size=token_chunk)
            t, m, c = _measure(lambda: an.token_gram(w, l), repeat)
            (tw, _, cw), (tl, _, cl) = [[(x + y) / 2 for x, y in zip(b, a)] for b, a in zip(before, fwd())]
            floor, cfloor = La * tw + Lb * tl, La * cw + Lb * cl
            tok = dict(base, level="token", fwd_w_s=tw, fwd_l_s=tl, floor_s=floor, floor_cpu_s=cfloor)
            rows.append(dict(tok, impl="ghost", s_per_pair=t, cpu_s_per_pair=c, peak_mib=m / 2**20,
                             tokens=f"{La}x{Lb}", extrapolated=False))
            progress(f"{name} pair {k}: token ghost {La}x{Lb}: {t:.2f} s = {t / t_dpo:.2f}x DPO = "
                     f"{t / floor:.2f}x its floor (floor: {La}+{Lb} forwards of {tw:.3f}/{tl:.3f} s = {floor:.2f} s "
                     f"= {floor / t_dpo:.2f}x DPO; in CPU time {c / cfloor:.2f}x the floor), peak +{m / 2**30:.2f} GiB")
            n = min(n_small, La, Lb)
            ws, ls = _cut(w, n), _cut(l, n)
            for impl in ("func", "autograd"):
                t, m, c = _measure(lambda: Analyzer(model, pair.pad_id, impl=impl, chunk_size=2).token_gram(ws, ls), repeat)
                scale = (La + Lb) / (2 * n)  # cost ∝ number of token gradients
                rows.append(dict(tok, impl=impl, s_per_pair=t * scale, cpu_s_per_pair=c * scale, peak_mib=m / 2**20,
                                 tokens=f"{n}x{n} -> {La}x{Lb}", extrapolated=True))
                progress(f"{name} pair {k}: token {impl} {n}x{n}: {t:.2f} s, extrapolated to {La}x{Lb}: "
                         f"{t * scale:.2f} s = {t * scale / floor:.2f}x the floor")
    df = pd.DataFrame(rows)
    df["ratio_to_dpo"] = df["s_per_pair"] / df["dpo_s"]
    if "floor_s" in df:
        df["ratio_to_floor"] = df["s_per_pair"] / df["floor_s"]
        df["cpu_ratio_to_floor"] = df["cpu_s_per_pair"] / df["floor_cpu_s"]
    return df


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Mean over pairs per (data, level, impl), with the ratio to DPO and to the autograd loop, and
    on the token rows the floor (mean seconds) and the ratios to it (NaN on the other rows)."""
    aggs = dict(s_per_pair=("s_per_pair", "mean"), peak_mib=("peak_mib", "max"), ratio_to_dpo=("ratio_to_dpo", "mean"),
                tokens=("tokens", "first"), extrapolated=("extrapolated", "first"), T_w=("T_w", "mean"))
    if "floor_s" in df:
        aggs.update(floor_s=("floor_s", "mean"), ratio_to_floor=("ratio_to_floor", "mean"),
                    cpu_ratio_to_floor=("cpu_ratio_to_floor", "mean"))
    g = df.groupby(["data", "level", "impl"], sort=False).agg(**aggs).reset_index()
    auto = g[g.impl == "autograd"].set_index(["data", "level"])["s_per_pair"]
    g["speedup_vs_autograd"] = [auto.get((d, lv), float("nan")) / s
                                for d, lv, s in zip(g.data, g.level, g.s_per_pair)]
    return g


def write_report(df: pd.DataFrame, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(out, index=False)
    return out
