"""Cost of the instrumentation: a plain training step against the same step with each recorder on.

One model, fixed batches of synthetic pairs (random token ids: the cost depends on lengths and
widths only), one optimizer; per (shape, batch size) every variant runs one untimed warm-up step,
then ``steps`` timed rounds in which every variant makes one optimizer step (round-robin, the
starting variant rotating from round to round) so that a change in machine load hits all alike,
then one untimed memory step each. Medians of wall and process CPU time; every ratio is to the
median plain step of the same run (same shape, batch size, model and process). Variants:

- ``plain``: the trainer's step (`dynamics.runs.train`): forward of the 2B stacked sequences
  (`pair_logprobs`), the loss, backward, AdamW step;
- ``in_run``: + `InRunRecorder` (``RecorderConfig(in_run=True)``): hooks, the contractions during
  the backward, the rows (its Parquet write, every 20 steps in training, is not timed);
- ``in_run_bookkeeping``: ``in_run`` with ``in_run_bookkeeping=True`` (the linear layers' weight
  gradients formed per sequence instead of the batch gradient; `dynamics.core.inrun`);
- ``in_run_update``: + ``in_run_update=True`` (θ_s snapshot, one jvp over the 2B sequences);
- ``in_run_update_factors``: ``in_run_update`` from the kept factors of the training backward
  (``in_run_update_from="factors"``: no jvp; the factors held until the optimizer step), and
  ``in_run_update_factors_bookkeeping`` the same with ``in_run_bookkeeping`` (⟨G_i, ΔW⟩ from the
  per-sequence gradients book-keeping forms anyway);
- ``probe``: the plain step + `Recorder` recording it (``before_update`` before ``opt.step()``,
  ``after_update(optimizer=opt)`` after) for ``n_probe`` probe pairs of the same shape,
  `PROBE_CONFIG`, reference log-probs computed once before timing; its Parquet appends (records,
  what-if) are part of ``after_update`` and timed;
- ``trl_plain`` / ``trl_in_run``: TRL's ``DPOTrainer`` step (LoRA of rank ``lora_r`` on every linear
  layer, the head frozen; ``lora_r=0``: full fine-tuning against a frozen copy as reference) without and
  with ``DynamicsCallback(...,
  RecorderConfig(in_run=True)).attach(trainer)``, timed from ``on_step_begin`` to ``on_step_end``
  (TRL's forward of policy and no-grad reference, backward, clipping, AdamW, scheduler; the
  callback's per-step bookkeeping included; batch loading and logging excluded). Two trainers with
  the same seed and data run in two threads that take turns step by step (one runs while the
  other waits), so their steps alternate as the loop variants do; the first step of each is the
  warm-up (the callback records its probe pair there, at step 0, and never again).

Issue 11's targets: in-run ≤ 1.25× a plain step; a recorded probe step ≤ 2× a plain step with 16
probe pairs (`TARGETS`). Memory: one extra step per variant after the timed ones, with Python's
garbage and glibc's free heap returned first; ``step_peak_mib`` is the resident set size sampled
every 2 ms during it above its level at the step's start (`dynamics.tools.bench.PeakMemory`),
``cuda_peak_mib`` ``torch.cuda.max_memory_allocated`` of that step (CUDA only).

    from dynamics.tools.bench_instrument import bench_instrument
    res = bench_instrument(shapes=["tweets"], batch_sizes=[4], steps=3)
    print(res.summary, res.targets)
"""
from __future__ import annotations

import contextlib
import copy
import ctypes
import gc
import random
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from dynamics.core.logprobs import (TokenizedPairs, TokenizedSequence, check_context, pair_logprobs,
                                    reference_logprobs)
from dynamics.core.losses import compute_loss
from dynamics.errors import InputError
from dynamics.inputs.models import load_model
from dynamics.runs.recorder import InRunRecorder, Recorder, RecorderConfig
from dynamics.runs.rundir import RunDir
from dynamics.tools.bench import PeakMemory


@dataclass(frozen=True)
class Shape:
    """Token lengths of every synthetic pair: a ``prompt`` shared by the chosen (``len_w``) and the
    rejected (``len_l``) response."""
    name: str
    prompt: int
    len_w: int
    len_l: int


# Means measured with SmolLM2's tokenizer (`dynamics data-summary --model smollm2-135m`): tweets
# long-suffix, 400 pairs of ../shared/data/tweets/train.csv: prompt 35.5, responses 10 | 10 tokens;
# TL;DR, 300 pairs of batch13.json: prompt 349, chosen 37.9, rejected 33.9 tokens.
SHAPES = {"tweets": Shape("tweets", 36, 10, 10), "tldr": Shape("tldr", 349, 38, 34)}
IN_RUN_VARIANTS = {
    "in_run": {}, "in_run_bookkeeping": dict(in_run_bookkeeping=True),
    "in_run_update": dict(in_run_update=True),
    "in_run_update_factors": dict(in_run_update=True, in_run_update_from="factors"),
    "in_run_update_factors_bookkeeping": dict(in_run_update=True, in_run_update_from="factors", in_run_bookkeeping=True),
}
"""The in-run variants: their `RecorderConfig` fields besides ``in_run=True``."""
LOOP_VARIANTS = ("plain", *IN_RUN_VARIANTS, "probe")
TRL_VARIANTS = ("trl_plain", "trl_in_run")
VARIANTS = LOOP_VARIANTS + TRL_VARIANTS
BASELINE = {**{v: "plain" for v in LOOP_VARIANTS}, **{v: "trl_plain" for v in TRL_VARIANTS}}
# (variant, limit on its ratio to the baseline, n_probe the target is stated for or None)
TARGETS = (("in_run", 1.25, None), ("in_run_bookkeeping", 1.25, None), ("trl_in_run", 1.25, None), ("probe", 2.0, 16))
PROBE_CONFIG = RecorderConfig(whatif=True, token_pairs=0, probes=False)
"""The probe variant's recorder: the default `RecorderConfig` with ``token_pairs=0``."""
GROUP = ["mode", "shape", "prompt", "len_w", "len_l", "batch_size", "variant"]


def parse_shape(spec: str) -> Shape:
    """A name of `SHAPES` or ``PROMPT:CHOSEN:REJECTED`` token counts (e.g. ``8:3:4``)."""
    if spec in SHAPES:
        return SHAPES[spec]
    parts = spec.split(":")
    try:
        lengths = [int(p) for p in parts]
    except ValueError:
        lengths = []
    if len(parts) != 3 or len(lengths) != 3 or min(lengths) < 1:
        raise InputError(f"unknown shape {spec!r}; known: {', '.join(SHAPES)}, or PROMPT:CHOSEN:REJECTED token "
                         "counts >= 1 (e.g. 8:3:4)")
    return Shape(spec, *lengths)


def synthetic_pairs(tokenizer, n_pairs: int, *, prompt_len: int, len_w: int, len_l: int, seed: int = 0,
                    prefix: str = "synthetic") -> TokenizedPairs:
    """``n_pairs`` pairs of random (non-special) token ids: a ``prompt_len`` prompt shared by the
    chosen (``len_w`` tokens) and the rejected (``len_l``) response; ids ``{prefix}-{k}``."""
    g = torch.Generator().manual_seed(seed)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    vocab = [i for i in range(len(tokenizer)) if i not in special]
    draw = lambda n: tuple(vocab[int(j)] for j in torch.randint(len(vocab), (n,), generator=g))  # noqa: E731
    ids, chosen, rejected = [], [], []
    for k in range(n_pairs):
        prompt = draw(prompt_len)
        w, l = draw(len_w), draw(len_l)
        chosen.append(TokenizedSequence(prompt, w, tuple("" for _ in w)))
        rejected.append(TokenizedSequence(prompt, l, tuple("" for _ in l)))
        ids.append(f"{prefix}-{k}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return TokenizedPairs(ids, chosen, rejected, pad)


@dataclass
class InstrumentResult:
    """``summary``: one row per (mode, shape, batch size, variant): medians ``wall_s``, ``cpu_s``,
    ratios ``x_plain_wall``, ``x_plain_cpu`` to the baseline variant of the same run (`BASELINE`),
    ``step_peak_mib``, ``cuda_peak_mib``, ``steps``; ``steps``: every timed step (``round``,
    ``wall_s``, ``cpu_s``); ``targets``: one row per target and (shape, batch size) with ``met``;
    ``config``: what was run."""
    summary: pd.DataFrame
    steps: pd.DataFrame
    targets: pd.DataFrame
    config: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- measuring one step
def _release_free_memory() -> None:
    """Python's garbage collected and glibc's free heap returned to the OS (no-op elsewhere), so
    that the next step's resident-set peak is its own."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Meter:
    """Wall and process CPU time of one step, or (``memory=True``) its memory peaks."""

    def __init__(self, device: torch.device, memory: bool = False):
        self.device, self.memory = device, memory

    def __enter__(self):
        self._mem = None
        if self.memory:
            _release_free_memory()
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            self._mem = PeakMemory().__enter__()
        _sync(self.device)
        self._t, self._c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        _sync(self.device)
        self.wall_s, self.cpu_s = time.perf_counter() - self._t, time.process_time() - self._c
        if self._mem is not None:
            self._mem.__exit__(*exc)
            self.step_peak_mib = self._mem.peak / 2 ** 20
            self.cuda_peak_mib = (torch.cuda.max_memory_allocated(self.device) / 2 ** 20
                                  if self.device.type == "cuda" else float("nan"))


def train_step(model, opt, tp: TokenizedPairs, *, loss: str = "dpo", lr: float, step: int = 0,
               inrun: InRunRecorder | None = None, probe: Recorder | None = None) -> None:
    """One optimizer step as `dynamics.runs.train` makes it (one micro-batch), with the in-run
    recorder and/or the probe recorder around it when given. The reference log-probs are the
    current ones ∓ 0.1 (a nonzero margin; the trainer reads cached ones: no forward either way)."""
    opt.zero_grad(set_to_none=True)
    if inrun is not None:
        inrun.begin_step()
    with inrun.micro_batch() if inrun is not None else contextlib.nullcontext() as cap:
        out = pair_logprobs(model, tp)
        lw, ll = out.chosen.logp, out.rejected.logp
        if cap is not None:
            cap.watch(lw, ll)
        rw, rl = lw.detach() + 0.1, ll.detach() - 0.1
        lo = compute_loss(loss, lw, ll, rw, rl, out.chosen.lengths.to(lw.dtype), out.rejected.lengths.to(lw.dtype))
        (lo.loss.sum() / len(tp)).backward()
    if inrun is not None:
        inrun.add(step, tp.pair_ids, lw=lw, ll=ll, len_w=out.chosen.lengths, len_l=out.rejected.lengths,
                  ref_w=rw, ref_l=rl, lw_norm=out.chosen.logp_norm, ll_norm=out.rejected.logp_norm, lr=lr, pairs=tp)
    if probe is not None:
        probe.before_update(step, lr)
    opt.step()
    if probe is not None:
        probe.after_update(optimizer=opt)
    if inrun is not None:
        inrun.end_step()


# ----------------------------------------------------------------------------- the training loop's step
def _loop_run(model, tokenizer, shape: Shape, B: int, variants: list[str], *, steps: int, n_probe: int, lr: float,
              loss: str, tmp: Path, progress) -> tuple[list[dict], list[dict]]:
    device = next(model.parameters()).device
    pairs = synthetic_pairs(tokenizer, B * (steps + 2), prompt_len=shape.prompt, len_w=shape.len_w, len_l=shape.len_l)
    batches = [pairs.subset(range(k * B, (k + 1) * B)) for k in range(steps + 2)]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    hooks = {}
    for v in variants:
        run = RunDir(tmp / f"{shape.name.replace(':', '_')}_B{B}_{v}")
        if v == "plain":
            hooks[v] = {}
        elif v in IN_RUN_VARIANTS:
            cfg = RecorderConfig(in_run=True, **IN_RUN_VARIANTS[v])
            hooks[v] = dict(inrun=InRunRecorder(model, run, cfg, loss=loss, flush_every=10 ** 9))
        else:
            probe = synthetic_pairs(tokenizer, n_probe, prompt_len=shape.prompt, len_w=shape.len_w,
                                    len_l=shape.len_l, seed=1, prefix="probe")
            hooks[v] = dict(probe=Recorder(model, probe, reference_logprobs(model, probe), run, PROBE_CONFIG,
                                           loss=loss, lr=lr))
    timed, memory = [], []
    n = len(variants)
    for rnd in range(steps + 2):                       # 0: warm-up, 1..steps: timed, steps + 1: memory
        order = [variants[(rnd + i) % n] for i in range(n)] if 1 <= rnd <= steps else variants
        for v in order:
            with _Meter(device, memory=rnd == steps + 1) as m:
                train_step(model, opt, batches[rnd], loss=loss, lr=lr, step=rnd, **hooks[v])
            if rnd == steps + 1:
                memory.append(dict(variant=v, step_peak_mib=m.step_peak_mib, cuda_peak_mib=m.cuda_peak_mib))
            elif rnd:
                timed.append(dict(variant=v, round=rnd, wall_s=m.wall_s, cpu_s=m.cpu_s))
        if 1 <= rnd <= steps and progress is not None:
            now = {r["variant"]: r["wall_s"] for r in timed if r["round"] == rnd}
            progress(f"{shape.name} B={B} round {rnd}/{steps}: " + ", ".join(f"{v} {now[v]:.3f} s" for v in variants))
    return timed, memory


# ----------------------------------------------------------------------------- TRL's DPOTrainer
class _Turns:
    """n threads run one at a time, in the rotation 0, 1, ..., n-1, 0, ... (finished ones skipped)."""

    def __init__(self, n: int):
        self._cv, self._turn, self._done = threading.Condition(), 0, [False] * n

    def wait(self, i: int) -> None:
        with self._cv:
            self._cv.wait_for(lambda: self._turn == i)

    def pass_on(self, i: int, finished: bool = False) -> None:
        with self._cv:
            self._done[i] = self._done[i] or finished
            n = len(self._done)
            self._turn = next((j for j in ((i + k) % n for k in range(1, n + 1)) if not self._done[j]), -1)
            self._cv.notify_all()


@contextlib.contextmanager
def _quiet_trl():
    """No dataset progress bars and no deprecation warnings of transformers/TRL while they run."""
    import warnings

    import datasets

    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        if bars:
            datasets.enable_progress_bars()


def _word_pool(tokenizer, n: int = 256) -> list[str]:
    """Up to ``n`` words " xyz" that the tokenizer keeps as one token each, also side by side."""
    words = []
    for i in range(len(tokenizer)):
        s = tokenizer.decode([i])
        if (len(s) >= 3 and s[0] == " " and s[1:].isascii() and s[1:].isalpha()
                and tokenizer(s + s, add_special_tokens=False)["input_ids"] == [i, i]):
            words.append(s)
            if len(words) == n:
                break
    if len(words) < 2:
        raise InputError("the TRL benchmark builds texts of known token counts from words the tokenizer keeps as one "
                         f"token; this tokenizer has {len(words)} such words")
    return words


def _text_pairs(tokenizer, n: int, shape: Shape, seed: int = 0) -> dict[str, list[str]]:
    """Texts whose TRL tokenization has ``shape``'s lengths: ``shape.prompt`` one-token words, and
    responses one word shorter than ``len_w``/``len_l`` (TRL appends the EOS token)."""
    words, rng = _word_pool(tokenizer), random.Random(seed)
    text = lambda k: "".join(rng.choice(words) for _ in range(k))  # noqa: E731
    out = {"prompt": [], "chosen": [], "rejected": []}
    for _ in range(n):
        out["prompt"].append(text(shape.prompt))
        out["chosen"].append(text(shape.len_w - 1))
        out["rejected"].append(text(shape.len_l - 1))
    return out


def _trl_run(model, tokenizer, shape: Shape, B: int, *, steps: int, lr: float, lora_r: int, tmp: Path,
             progress) -> tuple[list[dict], list[dict], dict]:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import PrinterCallback, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from dynamics.inputs.data import PreferencePair
    from dynamics.runs.callbacks import DynamicsCallback

    device = next(model.parameters()).device
    if min(shape.len_w, shape.len_l) < 2:
        raise InputError(f"shape {shape.name}: the TRL benchmark needs responses of >= 2 tokens (TRL appends EOS)")
    ds = Dataset.from_dict(_text_pairs(tokenizer, B * (steps + 2), shape))
    probe = [PreferencePair("probe-0", **{k: v[0] for k, v in _text_pairs(tokenizer, 1, shape, seed=1).items()})]
    turns, timed, memory, beta = _Turns(2), [], [], 0.1

    class Timer(TrainerCallback):
        def __init__(self, i: int, variant: str):
            self.i, self.variant, self.meter = i, variant, None

        def on_step_begin(self, args, state, control, **kwargs):
            self.meter = _Meter(device, memory=state.global_step == steps + 1).__enter__()

        def on_step_end(self, args, state, control, **kwargs):
            m, rnd = self.meter, state.global_step - 1        # global_step counts the step just made
            m.__exit__(None, None, None)
            if rnd == steps + 1:
                memory.append(dict(variant=self.variant, step_peak_mib=m.step_peak_mib, cuda_peak_mib=m.cuda_peak_mib))
            elif rnd:
                timed.append(dict(variant=self.variant, round=rnd, wall_s=m.wall_s, cpu_s=m.cpu_s))
                if progress is not None and self.i == 1:
                    now = {r["variant"]: r["wall_s"] for r in timed if r["round"] == rnd}
                    progress(f"{shape.name} B={B} round {rnd}/{steps}: "
                             + ", ".join(f"{v} {s:.3f} s" for v, s in now.items()))
            turns.pass_on(self.i)
            turns.wait(self.i)

    trainers, lengths = [], {}
    for i, variant in enumerate(TRL_VARIANTS):
        out = tmp / f"trl_{shape.name.replace(':', '_')}_B{B}_{variant}"
        args = DPOConfig(output_dir=str(out / "trainer"), per_device_train_batch_size=B, max_steps=steps + 2,
                         learning_rate=lr, beta=beta, logging_strategy="no", report_to=[], save_strategy="no",
                         use_cpu=device.type == "cpu", activation_checkpointing=False, seed=0, disable_tqdm=True,
                         lr_scheduler_type="constant", bf16=False, fp16=False, max_length=None)
        torch.manual_seed(0)                                       # the same LoRA initialization in both
        lora = (LoraConfig(r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.0, target_modules="all-linear")
                if lora_r else None)                               # 0: full fine-tuning, a frozen copy as reference
        tr = DPOTrainer(model=copy.deepcopy(model), ref_model=None if lora else copy.deepcopy(model), args=args,
                        train_dataset=ds, processing_class=tokenizer, peft_config=lora, callbacks=[Timer(i, variant)])
        if variant == "trl_in_run":
            cfg = RecorderConfig(in_run=True, eval_every=10 ** 9, whatif=False, token_pairs=0)
            DynamicsCallback(probe, out / "dynamics", cfg, loss="dpo", loss_params={"beta": beta}).attach(tr)
        tr.remove_callback(PrinterCallback)                       # no metrics printed at train end
        trainers.append(tr)
        data = tr.train_dataset
        if {"prompt_ids", "chosen_ids", "rejected_ids"} <= set(data.column_names):
            lengths = {k: sorted({len(x) for x in data[c]}) for k, c in
                       (("prompt", "prompt_ids"), ("len_w", "chosen_ids"), ("len_l", "rejected_ids"))}
    errors = [None, None]

    def run(i: int) -> None:
        try:
            turns.wait(i)
            trainers[i].train()
        except BaseException as e:                                 # re-raised in the calling thread
            errors[i] = e
        finally:
            turns.pass_on(i, finished=True)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        while t.is_alive():
            t.join(0.5)
    for e in errors:
        if e is not None:
            raise e
    return timed, memory, lengths


# ----------------------------------------------------------------------------- the benchmark
def check_variants(variants) -> list[str]:
    """The variants in `VARIANTS` order; `InputError` for an unknown one or a missing baseline."""
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise InputError(f"unknown variant {unknown[0]!r}; known: {', '.join(VARIANTS)}")
    chosen = [v for v in VARIANTS if v in variants]
    for v in chosen:
        if BASELINE[v] not in chosen:
            raise InputError(f"variant {v} is reported as a ratio to {BASELINE[v]}, measured in the same run: "
                             f"add {BASELINE[v]}")
    if any(v in TRL_VARIANTS for v in chosen) and chosen[-2:] != list(TRL_VARIANTS):
        raise InputError(f"the TRL variants run together: {' and '.join(TRL_VARIANTS)}")
    return chosen


def bench_instrument(model=None, tokenizer=None, *, model_name: str | None = None, shapes=("tweets", "tldr"),
                     batch_sizes=(4, 16), variants=LOOP_VARIANTS, steps: int = 5, n_probe: int = 16,
                     lr: float = 5e-6, loss: str = "dpo", lora_r: int = 16, threads: int | None = None,
                     device: str = "cpu", progress=print) -> InstrumentResult:
    """Time every variant per optimizer step for every (shape, batch size); see the module docstring.

    ``model``/``tokenizer``: a loaded model, else ``load_model(model_name or "smollm2-135m",
    device=device)`` (``model_name`` names it in the output); the loop variants train it in place,
    the TRL ones train copies (LoRA of rank ``lora_r``, or fully with ``lora_r=0``). ``shapes``: names of `SHAPES`, ``PROMPT:CHOSEN:REJECTED``
    strings or `Shape` objects; ``batch_sizes``: pairs per step; ``steps``: timed steps of each
    variant; ``n_probe``: probe pairs of the ``probe`` variant; ``threads``: torch intra-op threads
    (restored afterwards; None: unchanged); ``progress``: called with one line per timed round
    (None: silent). Returns an `InstrumentResult`.
    """
    variants = check_variants(variants)
    shapes = [s if isinstance(s, Shape) else parse_shape(s) for s in shapes]
    sizes = [("batch size", b) for b in batch_sizes]
    for name, v, low in (("steps", steps, 1), ("n_probe", n_probe, 1), ("lora_r", lora_r, 0),
                         *[(n, b, 1) for n, b in sizes]):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise InputError(f"{name} must be an integer >= {low}, got {v!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise InputError(f"threads must be an integer >= 1, got {threads!r}")
    if not shapes or not batch_sizes:
        raise InputError("give at least one shape and one batch size")
    if model is None:
        model_name = model_name or "smollm2-135m"
        model, tokenizer = load_model(model_name, device=device)
    for s in shapes:
        one = synthetic_pairs(tokenizer, 1, prompt_len=s.prompt, len_w=s.len_w, len_l=s.len_l)
        check_context(model, one.chosen + one.rejected)
    loop = [v for v in variants if v in LOOP_VARIANTS]
    n_threads, was_training = torch.get_num_threads(), model.training
    if threads is not None:
        torch.set_num_threads(threads)
    dev = next(model.parameters()).device
    probe_cfg = ", ".join(f"{k}={getattr(PROBE_CONFIG, k)!r}" for k in ("whatif", "token_pairs", "probes", "impl",
                                                                         "params"))
    config = dict(model=model_name or getattr(model.config, "_name_or_path", None) or type(model).__name__,
                  device=str(dev), dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
                  threads=torch.get_num_threads(), steps=steps, loss=loss, lr=lr,
                  n_probe=n_probe if "probe" in variants else None,
                  probe_config=f"RecorderConfig({probe_cfg})" if "probe" in variants else None,
                  trl_lora_r=lora_r if "trl_plain" in variants else None,
                  capability=torch.backends.cpu.get_cpu_capability())
    trl_base = copy.deepcopy(model) if "trl_plain" in variants else None  # before the loop variants train it
    timed, memory = [], []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for s in shapes:
                for B in batch_sizes:
                    key = dict(shape=s.name, prompt=s.prompt, len_w=s.len_w, len_l=s.len_l, batch_size=B)
                    if loop:
                        model.train()
                        t, m = _loop_run(model, tokenizer, s, B, loop, steps=steps, n_probe=n_probe, lr=lr,
                                         loss=loss, tmp=Path(tmp), progress=progress)
                        timed += [dict(mode="loop", **key, **r) for r in t]
                        memory += [dict(mode="loop", **key, **r) for r in m]
                    if trl_base is not None:
                        with _quiet_trl():
                            t, m, lengths = _trl_run(trl_base, tokenizer, s, B, steps=steps, lr=lr, lora_r=lora_r,
                                                     tmp=Path(tmp), progress=progress)
                        if lengths and lengths != {"prompt": [s.prompt], "len_w": [s.len_w], "len_l": [s.len_l]}:
                            config[f"trl_lengths_{s.name}"] = lengths
                            if progress is not None:
                                progress(f"note: TRL tokenized shape {s.name} to lengths {lengths}")
                        timed += [dict(mode="trl", **key, **r) for r in t]
                        memory += [dict(mode="trl", **key, **r) for r in m]
    finally:
        torch.set_num_threads(n_threads)
        model.train(was_training)
    return summarize(pd.DataFrame(timed), pd.DataFrame(memory), config)


def summarize(steps: pd.DataFrame, memory: pd.DataFrame, config: dict) -> InstrumentResult:
    """The `InstrumentResult` of the timed steps (``GROUP`` columns, ``round``, ``wall_s``, ``cpu_s``) and
    the memory steps (``GROUP`` columns, ``step_peak_mib``, ``cuda_peak_mib``): medians per group, each
    divided by the median of its `BASELINE` variant in the same (mode, shape, batch size)."""
    keys = GROUP[:-1]
    summary = steps.groupby(GROUP, sort=False).agg(wall_s=("wall_s", "median"), cpu_s=("cpu_s", "median"),
                                                   steps=("wall_s", "size")).reset_index()
    base = summary.set_index(keys + ["variant"])
    ref = [base.loc[tuple(r[k] for k in keys) + (BASELINE[r["variant"]],)] for _, r in summary.iterrows()]
    summary["x_plain_wall"] = summary.wall_s.to_numpy() / [b.wall_s for b in ref]
    summary["x_plain_cpu"] = summary.cpu_s.to_numpy() / [b.cpu_s for b in ref]
    summary = summary.merge(memory, on=GROUP, how="left")
    order = {v: k for k, v in enumerate(VARIANTS)}                   # rows in run order, variants in VARIANTS order
    summary = summary.sort_values("variant", key=lambda c: c.map(order), kind="stable")
    summary = summary.sort_values(["mode", "shape", "batch_size"], key=lambda c: c.map(
        {v: k for k, v in enumerate(dict.fromkeys(steps[c.name]))}), kind="stable").reset_index(drop=True)
    summary = summary[GROUP + ["wall_s", "cpu_s", "x_plain_wall", "x_plain_cpu", "step_peak_mib", "cuda_peak_mib",
                               "steps"]]
    rows = []
    for variant, limit, n_probe in TARGETS:
        for _, r in summary[summary.variant == variant].iterrows():
            applies = n_probe is None or config.get("n_probe") == n_probe
            rows.append(dict(target=f"{variant} <= {limit:g}x {BASELINE[variant]}"
                             + (f" (n_probe={n_probe})" if n_probe else ""), shape=r["shape"],
                             batch_size=r["batch_size"], x_wall=r["x_plain_wall"], x_cpu=r["x_plain_cpu"], limit=limit,
                             met=bool(r["x_plain_wall"] <= limit) if applies else None))
    targets = pd.DataFrame(rows, columns=["target", "shape", "batch_size", "x_wall", "x_cpu", "limit", "met"])
    return InstrumentResult(summary, steps, targets, config)


# ----------------------------------------------------------------------------- reporting
def target_lines(res: InstrumentResult) -> list[str]:
    """One line per target and (shape, batch size): met / not met with the numbers (wall time decides);
    on the probe lines also the recording's own cost (ratio − 1), the measure the issue's baseline
    (11–25× today) was stated in."""
    out = []
    for _, t in res.targets.iterrows():
        verdict = ("not evaluated: stated for n_probe=16, run with n_probe=" + str(res.config.get("n_probe"))
                   if t.met is None else "met" if t.met else "NOT met")
        line = f"target {t.target}: {t['shape']} B={t.batch_size}: {t.x_wall:.3f}x wall ({t.x_cpu:.3f}x CPU): {verdict}"
        if t.target.startswith("probe"):
            # the "today 11-25x" was the recording's added time over the plain step
            line += (f"; the recording itself adds {t.x_wall - 1:.3f}x wall ({t.x_cpu - 1:.3f}x CPU) for "
                     f"{res.config.get('n_probe')} probe pairs on a {t.batch_size}-pair step")
        out.append(line)
    return out


def _markdown_table(df: pd.DataFrame) -> str:
    cell = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(df.columns) + " |", "|" + " --- |" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def to_markdown(res: InstrumentResult, command: str | None = None) -> str:
    """The summary table, the target lines and the configuration as Markdown."""
    parts = ["# Instrumentation cost per optimizer step", ""]
    if command:
        parts += [f"`{command}`", ""]
    parts += [_markdown_table(res.summary), "", *[f"- {line}" for line in target_lines(res)], "",
              "Configuration: " + ", ".join(f"{k}={v}" for k, v in res.config.items() if v is not None), ""]
    return "\n".join(parts)


def write_outputs(res: InstrumentResult, out: str | Path, command: str | None = None) -> list[Path]:
    """``out`` (.csv or .parquet): the summary; beside it ``<stem>_steps`` (every timed step, same
    format) and ``<stem>.md`` (`to_markdown`). Returns the paths written."""
    out = Path(out)
    if out.suffix not in (".csv", ".parquet"):
        raise InputError(f"--out {str(out)!r}: write a .csv or .parquet file")
    out.parent.mkdir(parents=True, exist_ok=True)
    steps, md = out.with_name(f"{out.stem}_steps{out.suffix}"), out.with_suffix(".md")
    for df, path in ((res.summary, out), (res.steps, steps)):
        df.to_csv(path, index=False) if out.suffix == ".csv" else df.to_parquet(path, index=False)
    md.write_text(to_markdown(res, command))
    return [out, steps, md]
