"""A transformers `TrainerCallback` that records the margin-pitfall diagnostics of a probe set.

Works with any `transformers.Trainer` whose model is a causal LM, in particular TRL's
``DPOTrainer`` (and ``CPOTrainer``/``ORPOTrainer``/``KTOTrainer``: pass the matching ``loss``)::

    cb = DynamicsCallback(probe_pairs, "runs/trl_dpo", RecorderConfig(eval_every=10), loss="dpo", loss_params={"beta": 0.1})
    trainer = DPOTrainer(model=model, args=args, ...)
    cb.attach(trainer)           # first in the callback list, so summaries reach TensorBoard / W&B
    trainer.train()

Every ``recorder.eval_every`` optimizer steps it runs the shared `dynamics.runs.recorder.Recorder`:
``on_pre_optimizer_step`` measures θ_s (after the gradients of the step were accumulated, so
gradient accumulation is handled) and snapshots the trainable parameters; ``on_optimizer_step``
measures θ_{s+1}, i.e. the real update of the real optimizer, and writes the rows; ``on_log``
adds the scalar summaries (``dyn/cos_wl``, ``dyn/act_dw``, …) to the trainer's logs.

Reference log-probs of the probe pairs are computed at ``on_train_begin`` from the model as it
is then (TRL's default reference: the initial policy; for a PEFT model, with the adapters
disabled), unless given as ``ref`` (a DataFrame with ``ref_w, ref_l`` in probe order).

What it cannot do: the in-run rows of ``RecorderConfig.in_run`` (refused: see `__init__`), and
sharded or multi-process training (DeepSpeed ZeRO-3, FSDP, DDP — the
parameter snapshot and the probe forward passes assume one process holding the whole model;
it raises for ``world_size > 1``). It tokenizes the probe pairs itself (prompt and response
separately, `dynamics.core.logprobs`); ``append_eos="auto"`` appends the EOS token to every response
when the training arguments come from TRL (TRL's preference trainers append EOS to
non-conversational completions), so the probe log-probs are those of the sequences TRL trains on.
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Sequence

import pandas as pd

from dynamics.core.logprobs import reference_logprobs, tokenize_pairs
from dynamics.runs.rundir import RunDir, to_jsonable
from dynamics.inputs.models import precision_name
from dynamics.core.losses import resolve_hyper
from dynamics.errors import InputError
from dynamics.runs.recorder import Recorder, RecorderConfig, outside_autocast

try:
    from transformers import TrainerCallback
except ImportError:  # pragma: no cover
    TrainerCallback = object


class DynamicsCallback(TrainerCallback):
    """Records seed-004 diagnostics of ``probe_pairs`` into ``out_dir`` every ``recorder.eval_every`` steps.

    Args:
        probe_pairs: `dynamics.inputs.data.PreferencePair`-like objects (``id, prompt, chosen, rejected``).
        out_dir: run directory (``config.json``, ``records.parquet``, ``whatif.parquet``, …).
        recorder: what is recorded and how often (`RecorderConfig`: ``eval_every``, ``impl``,
            ``params``, ``whatif``, ``token_pairs``, ``token_chunk``, ``probes``).
        loss, loss_params: the loss whose ``d_w, d_l`` apply (a name in ``LOSSES``; TRL's
            ``loss_type="sigmoid"`` is ``"dpo"`` with its ``beta``).
        others: training pairs whose responses serve as "other prompt" probes (default: the probes).
        ref: precomputed reference log-probs of the probe pairs (else computed at train begin).
        max_length: tokenization limit (prompt cut from the left).
        append_eos: end every probe response with the EOS token; ``"auto"``: when ``args`` is a
            TRL config (as TRL does for non-conversational data), else not.
    """

    def __init__(self, probe_pairs: Sequence, out_dir: str | Path, recorder: RecorderConfig | None = None, *,
                 loss: str = "dpo", loss_params: dict | None = None, ref: pd.DataFrame | None = None,
                 max_length: int | None = None, others: Sequence | None = None, append_eos: bool | str = "auto",
                 **removed):
        if removed:
            moved = {k: ("eval_every" if k == "every" else k) for k in removed}
            raise TypeError(f"DynamicsCallback({', '.join(f'{k}=' for k in removed)}...): these settings moved into "
                            f"the RecorderConfig; pass recorder=RecorderConfig("
                            f"{', '.join(f'{v}=...' for v in moved.values())})")
        if append_eos not in (True, False, "auto"):
            raise ValueError(f"append_eos must be True, False or 'auto', got {append_eos!r}")
        self.recorder = recorder if recorder is not None else RecorderConfig()
        if self.recorder.in_run:
            raise InputError("DynamicsCallback does not record in_run rows yet: TRL's DPOTrainer computes its "
                             "log-probs with a fused LM head and its loss from reference log-probs the callback "
                             "cannot see, so the per-pair scales and coefficients are not available from a "
                             "callback; use the plain trainer (dynamics train --in-run) or in_run=False")
        self.loss, self.loss_params = loss, resolve_hyper(loss, loss_params)  # validated now, not at train begin
        self.append_eos = append_eos
        self.pairs, self.ref, self.max_length = list(probe_pairs), ref, max_length
        self.others = list(others) if others is not None else None
        self.run = RunDir(out_dir)
        self.rec: Recorder | None = None
        self._summary: dict | None = None
        self._t_step = self._t_rec = 0.0

    def attach(self, trainer) -> "DynamicsCallback":
        """Put this callback first in ``trainer``'s list, before the reporting integrations."""
        trainer.callback_handler.callbacks.insert(0, self)
        return self

    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        if getattr(args, "world_size", 1) > 1:
            raise RuntimeError("DynamicsCallback supports single-process training only (world_size > 1)")
        tok = processing_class if processing_class is not None else kwargs.get("tokenizer")
        tok = getattr(tok, "tokenizer", tok)  # processors wrap a tokenizer
        eos = self.append_eos
        if eos == "auto":
            eos = type(args).__module__.split(".")[0] == "trl"
        probe = tokenize_pairs(tok, self.pairs, max_length=self.max_length, append_eos=eos)
        ref = self.ref
        if ref is None:
            disable = getattr(model, "disable_adapter", None)
            with (disable() if callable(disable) else contextlib.nullcontext()), outside_autocast(model):
                ref = reference_logprobs(model, probe)
        cfg = self.recorder
        # the trainer's precision (its steps); the diagnostics always run in the parameters' dtype
        precision = precision_name(bool(getattr(args, "bf16", False)), bool(getattr(args, "fp16", False)))
        name = getattr(getattr(model, "config", None), "_name_or_path", None) or type(model).__name__
        self.run.write_config(dict(model=name, loss=self.loss, loss_params=self.loss_params, lr=args.learning_rate,
                                   recorder=cfg, trainer=type(args).__name__, append_eos=eos, precision=precision,
                                   diagnostics_precision="parameters' dtype, outside autocast",
                                   training_args={k: to_jsonable(v) for k, v in args.to_dict().items()}),
                              writer="DynamicsCallback")
        sets = None
        if cfg.probes:
            from dynamics.core.probes import build_probe_sets
            sets = build_probe_sets(model, tok, self.pairs, self.others or self.pairs, seed=0)
        self.rec = Recorder(model, probe, ref, self.run, cfg, loss=self.loss, loss_params=self.loss_params,
                            lr=args.learning_rate, tokenizer=tok, probe_sets=sets)

    def on_step_begin(self, args, state, control, **kwargs):
        self._t_step, self._t_rec = time.perf_counter(), 0.0

    def on_pre_optimizer_step(self, args, state, control, lr_scheduler=None, **kwargs):
        if self.rec is not None and self.recorder.due(state.global_step):
            t = time.perf_counter()
            lr = lr_scheduler.get_last_lr()[0] if lr_scheduler is not None else args.learning_rate
            self.rec.before_update(state.global_step, lr=lr)
            self._t_rec += time.perf_counter() - t

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.rec is not None and self.rec.pending:
            t = time.perf_counter()
            self._summary = self.rec.after_update()
            self._t_rec += time.perf_counter() - t

    def on_step_end(self, args, state, control, **kwargs):
        # step_s: the trainer's own step; record_s: the diagnostics inside it (overhead)
        total = time.perf_counter() - self._t_step
        self.run.append("steps", [dict(step=state.global_step, step_s=total - self._t_rec, record_s=self._t_rec)])

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._summary and logs is not None:
            logs.update(self._summary)  # later callbacks (TensorBoard, W&B) see them
            if state.log_history:
                state.log_history[-1].update(self._summary)
            self._summary = None

    def on_train_end(self, args, state, control, **kwargs):
        if self.rec is not None:
            self.rec.final(state.global_step)
