"""Cost of the in-run diagnostics: a plain training step against the same step with ``in_run`` on.

One model, one fixed set of batches; plain and in-run steps alternate (after one warm-up of each)
so that a change in machine load hits both alike, and the medians are compared. A step is what
the trainer does per optimizer step: forward of the 2B stacked sequences, the loss, backward,
AdamW step; the in-run step adds the hooks (`dynamics.core.inrun.InRunCapture`), the contractions
they run during the backward, and the rows (`dynamics.runs.recorder.InRunRecorder`; the final
Parquet write is not timed). Issue 11's target: in-run ≤ 1.25× a plain step.

Where the time goes (docs/math.md §6.2): per linear layer the in-run engine pays
min(3B·T²·(d_in + d_out), 2B·T·d_in·d_out) multiply-adds against the step's ≈ 6·2B·T·d_in·d_out,
i.e. at most ≈ 1/3 of the step's linear-layer work (per-example gradients formed beside the batch
gradient) and ≈ T(d_in + d_out)/(4 d_in d_out) of it for short sequences (ghost form). The pairs
are synthetic (random token ids): the cost depends on lengths and widths only.

    from dynamics.tools.bench_inrun import bench_in_run
    res = bench_in_run(prompt_len=400, len_w=40, len_l=56, batch_size=2, steps=4)
"""
from __future__ import annotations

import contextlib
import statistics
import tempfile
import time

import torch

from dynamics.core.logprobs import TokenizedPairs, TokenizedSequence, pair_logprobs
from dynamics.core.losses import compute_loss
from dynamics.inputs.models import load_model
from dynamics.runs.recorder import InRunRecorder, RecorderConfig
from dynamics.runs.rundir import RunDir


def synthetic_pairs(tokenizer, n_pairs: int, *, prompt_len: int, len_w: int, len_l: int, seed: int = 0) -> TokenizedPairs:
    """``n_pairs`` pairs of random (non-special) token ids: a ``prompt_len`` prompt shared by the
    chosen (``len_w`` tokens) and the rejected (``len_l``) response."""
    g = torch.Generator().manual_seed(seed)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    vocab = [i for i in range(len(tokenizer)) if i not in special]
    draw = lambda n: tuple(vocab[int(j)] for j in torch.randint(len(vocab), (n,), generator=g))
    ids, chosen, rejected = [], [], []
    for k in range(n_pairs):
        prompt = draw(prompt_len)
        w, l = draw(len_w), draw(len_l)
        chosen.append(TokenizedSequence(prompt, w, tuple("" for _ in w)))
        rejected.append(TokenizedSequence(prompt, l, tuple("" for _ in l)))
        ids.append(f"synthetic-{k}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return TokenizedPairs(ids, chosen, rejected, pad)


def bench_in_run(model=None, tokenizer=None, *, model_name: str = "smollm2-135m", batch_size: int = 2,
                 prompt_len: int = 400, len_w: int = 40, len_l: int = 56, steps: int = 4, loss: str = "dpo",
                 lr: float = 1e-6, params="trainable", progress=print) -> dict:
    """Median seconds of a plain step and of an in-run step on the same model and batches.

    ``model``/``tokenizer``: a loaded model (else ``load_model(model_name)``, offline for SmolLM2);
    ``batch_size`` pairs per step (2B sequences of ``prompt_len + len_w|len_l`` tokens); ``steps``
    timed steps of each kind, alternating, after one untimed warm-up of each. ``progress``: called
    with one line per timed step (None: silent).

    Returns a dict: ``plain_s``, ``in_run_s`` (medians of wall time), ``ratio`` (= in_run_s / plain_s),
    ``cpu_plain_s``, ``cpu_in_run_s``, ``cpu_ratio`` (the same in process CPU time, which a shared
    machine's load disturbs less),
    ``contract_s`` (median seconds inside the in-run contractions of a step: during the backward
    and after it), the per-step lists ``plain``, ``in_run``, ``cpu_plain``, ``cpu_in_run``, and the
    shape (``batch_size``, ``prompt_len``, ``len_w``, ``len_l``, ``threads``).
    """
    if model is None:
        model, tokenizer = load_model(model_name)
    pairs = synthetic_pairs(tokenizer, batch_size * (steps + 1), prompt_len=prompt_len, len_w=len_w, len_l=len_l)
    batches = [pairs.subset(range(k * batch_size, (k + 1) * batch_size)) for k in range(steps + 1)]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    with tempfile.TemporaryDirectory() as tmp:
        inrun = InRunRecorder(model, RunDir(tmp), RecorderConfig(params=params), loss=loss, flush_every=10 ** 9)
        plain, in_run, contract, cpu_plain, cpu_in_run = [], [], [], [], []

        def step(tp: TokenizedPairs, on: bool) -> tuple[float, float]:
            t0, c0 = time.perf_counter(), time.process_time()
            opt.zero_grad(set_to_none=True)
            with inrun.micro_batch() if on else contextlib.nullcontext() as cap:
                out = pair_logprobs(model, tp)
                lw, ll = out.chosen.logp, out.rejected.logp
                if cap is not None:
                    cap.watch(lw, ll)
                rw, rl = lw.detach() + 0.1, ll.detach() - 0.1
                lo = compute_loss(loss, lw, ll, rw, rl, out.chosen.lengths.to(lw.dtype), out.rejected.lengths.to(lw.dtype))
                (lo.loss.sum() / len(tp)).backward()
            if on:
                inrun.add(0, tp.pair_ids, lw=lw, ll=ll, len_w=out.chosen.lengths, len_l=out.rejected.lengths,
                          ref_w=rw, ref_l=rl, lr=lr)
            opt.step()
            if on:
                inrun.end_step()
            return time.perf_counter() - t0, time.process_time() - c0

        model.train()
        try:
            step(batches[0], False), step(batches[0], True)                     # warm-up
            for k in range(steps):
                tp = batches[k + 1]
                for on, wall, cpu in ((False, plain, cpu_plain), (True, in_run, cpu_in_run)):
                    w, c = step(tp, on)
                    wall.append(w), cpu.append(c)
                contract.append(inrun.capture.seconds)
                if progress is not None:
                    progress(f"step {k + 1}/{steps}: plain {plain[-1]:.2f} s (cpu {cpu_plain[-1]:.2f}), in-run "
                             f"{in_run[-1]:.2f} s (cpu {cpu_in_run[-1]:.2f}; contractions {contract[-1]:.2f} s)")
        finally:
            model.eval()
    med = statistics.median
    res = dict(plain_s=med(plain), in_run_s=med(in_run), contract_s=med(contract), cpu_plain_s=med(cpu_plain),
               cpu_in_run_s=med(cpu_in_run), plain=plain, in_run=in_run, cpu_plain=cpu_plain, cpu_in_run=cpu_in_run,
               batch_size=batch_size, prompt_len=prompt_len, len_w=len_w, len_l=len_l, threads=torch.get_num_threads())
    res["ratio"] = res["in_run_s"] / res["plain_s"]
    res["cpu_ratio"] = res["cpu_in_run_s"] / res["cpu_plain_s"]
    if progress is not None:
        progress(f"median plain {res['plain_s']:.3f} s, in-run {res['in_run_s']:.3f} s: ratio {res['ratio']:.3f} "
                 f"(process CPU time: {res['cpu_plain_s']:.2f} s, {res['cpu_in_run_s']:.2f} s, ratio "
                 f"{res['cpu_ratio']:.3f}; target <= 1.25); B={batch_size}, T={prompt_len}+{len_w}|{len_l}, "
                 f"{res['threads']} threads")
    return res

