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

In-run rows (``RecorderConfig(in_run=True)``, TRL's ``DPOTrainer`` only, after ``attach``): one row
per optimizer step × *training* pair in ``train_records.parquet`` (the columns of
`dynamics.runs.recorder.TRAIN_RECORD_COLUMNS`), read off the trainer's own forward/backward
(`dynamics.core.inrun`). ``attach`` wraps the trainer's ``training_step`` (one call per
micro-batch) in an `InRunCapture`; a forward hook on the policy (and reference) model picks the
``fused_lm_head`` forward with grad of TRL's ``_compute_loss`` and hooks its per-token
``log_probs`` (`InRunCapture.watch_tokens`), from which c = ∂L/∂log π of every sequence is read.
See `DynamicsCallback` for the columns' meaning under TRL. Supported: LoRA, and full fine-tuning
(TRL's fused head multiplies by the lm_head weight outside the lm_head module, where no hook sees
it; a forward hook on the backbone keeps its last hidden state h, and the head's use is rebuilt
from h, the labels and the per-token gradient: `InRunCapture.watch_tokens` with ``fused_head``;
a model with scaled or soft-capped logits is refused), every TRL loss type that depends on each
sequence only through its summed log-prob (sigmoid, hinge, ipo, …, ``use_weighting``, several
``loss_type`` at once), gradient accumulation, ``precompute_ref_log_probs``, a ``ref_model`` or
PEFT's disabled adapter as reference, ``in_run_update``, ``in_run_bookkeeping``. Refused at train
begin with `InputError`: ``ld_alpha`` (a per-token weighting), gradient checkpointing
(TRL's default: pass ``gradient_checkpointing=False``), ``padding_free``, MoE router aux loss,
prompt-learning PEFT, vision datasets, DeepSpeed, FSDP version 1, and a trainer that is not a TRL
``DPOTrainer`` or a callback that was not attached with ``attach``.

Multi-process training (DDP: ``accelerate launch`` or ``torchrun``; the Trainer wraps the model in
``DistributedDataParallel`` and accelerate initializes the process group) goes through
`dynamics.runs.distributed`: the probe pairs are split into contiguous blocks over the ranks and
each rank computes the reference log-probs of its block and records it on its own replica (the
unwrapped model, so no probe backward reaches DDP's gradient hooks); the rows are gathered and
rank 0 writes every file (``config.json`` included; the other ranks hold a `ReplicaRunDir`). In-run
rows are those of each rank's own micro-batches, gathered at every step. The rows are those one
process writes with the same global batch (accelerate shards the Trainer's batches so that the
ranks' shares in rank order are the one-process batch), and the summaries added to the logs are
computed from the gathered rows, so every rank logs the same ones. A rank that fails in the
callback (a bad probe pair, an in-run row) makes every rank raise
(`dynamics.runs.distributed.agree`).

FSDP version 2 (``accelerate launch --use_fsdp --fsdp_version 2``, or ``fsdp_config={"fsdp_version":
2}``; the Trainer hands the callback the ``fully_shard``-ed model itself) is recorded the same way,
on the full parameters: every pass of the callback on the model (the reference log-probs of a
rank's probe block, the learning-dynamics probe sets, the head check of ``in_run``) and every
recorder call runs inside `dynamics.runs.distributed.full_parameters`, which all-gathers every
FSDP unit once (each rank then holds the whole model for the duration, as under DDP) and reshards
afterwards; in-run rows gather the units for each recorded micro-batch (see
`dynamics.runs.distributed.DistributedInRunRecorder`). The training's sharded parameters,
gradients and optimizer state are not touched. Accelerate shards the model's tail (final norm,
lm_head, a tied embedding) as one unit of several modules, which is gathered once. On CPU
accelerate does not shard (``AcceleratorState`` enables FSDP for GPU-like devices only and trains
with DDP, ``--use_fsdp`` notwithstanding): the callback records what runs, and ``config.json``
says which (``parallel``: ``fsdp2``, ``ddp``, ``none``). Refused at train begin with `InputError`:
DeepSpeed (ZeRO shards outside torch's FSDP) and FSDP version 1 (the ``FullyShardedDataParallel``
wrapper and its flat parameters). It tokenizes the probe pairs itself (prompt and response
separately, `dynamics.core.logprobs`); ``append_eos="auto"`` appends the EOS token to every response
when the training arguments come from TRL (TRL's preference trainers append EOS to
non-conversational completions), so the probe log-probs are those of the sequences TRL trains on.
"""
from __future__ import annotations

import contextlib
import time
import warnings
from pathlib import Path
from typing import Sequence

import pandas as pd
import torch

from dynamics.core.logprobs import (TokenizedPairs, TokenizedSequence, body_and_head, pair_fingerprints,
                                    reference_logprobs, tokenize_pairs, unwrap)
from dynamics.runs import distributed
from dynamics.runs.distributed import shard_slice
from dynamics.runs.rundir import RunDir, to_jsonable
from dynamics.inputs.models import precision_name
from dynamics.core.inrun import NONCONSTANT_REASON
from dynamics.core.losses import compute_loss, resolve_hyper
from dynamics.errors import InputError
from dynamics.runs.recorder import InRunRecorder, Recorder, RecorderConfig, outside_autocast

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
        max_length: tokenization limit (a pair's prompt cut once from the left, by its longer response).
        append_eos: end every probe response with the EOS token; ``"auto"``: when ``args`` is a
            TRL config (as TRL does for non-conversational data), else not.

    In-run rows under TRL's DPOTrainer (``recorder.in_run``; module docstring for what is supported):

    - ``step``: ``state.global_step`` during the step's micro-batches (θ_s, before update s);
      ``micro``: the micro-batch within the step; ``lr``: the scheduler's rate of update s.
    - ``pair_id``: TRL's batches carry no ids, so the id is the 16-hex fingerprint of the pair's
      token ids as trained (prompt and completion of chosen and rejected, padding stripped), the
      same as `dynamics.core.logprobs.pair_fingerprints` of ``tokenize_pairs(tok, pairs,
      append_eos=True)`` when TRL tokenized the pair that way; a pair seen twice keeps its id.
    - ``logp_w, logp_l``: TRL's per-sequence sums of the training forward's ``log_probs``
      (float32 fused head, train mode); ``len_w, len_l``: completion tokens; ``ref_w, ref_l``:
      ``inputs["ref_chosen_logps"/"ref_rejected_logps"]`` with ``precompute_ref_log_probs``, else
      the sums of the no-grad reference forward of the same ``_compute_loss`` (the ``ref_model``
      or PEFT's disabled adapter); NaN if neither was seen.
    - ``c_w, c_l`` = ∂L/∂logp of the loss L the trainer backpropagated (captured);
      ``d_w = −c_w·b_opt``, ``d_l = c_l·b_opt`` with ``b_opt = B_micro × GA``: TRL's loss is the
      mean of the per-pair losses over the micro-batch's B_micro pairs and transformers' Trainer
      divides it by the step's number of micro-batches GA (``current_gradient_accumulation_steps``;
      1 if the trainer scales for accumulation itself; divided by the fp16 grad-scaler scale). So
      ``d`` is TRL's own coefficient (any loss type, ``use_weighting``, ``f_divergence_type``) and
      the predictions ``pred_dw, pred_dl, thr_w, thr_l, case_pred`` use it. DDP over W processes:
      B_micro is the rank's share, each rank backpropagates its own mean and DDP averages the
      gradients, so the batch loss is the mean of the ranks' losses: ``c`` is recorded as the
      rank's captured scale / W (∂ of the batch loss, the one-process value) and ``d`` as above.
      ``loss_value`` is the callback's ``loss``; when its d differs from TRL's beyond rounding a
      warning says so once.
    - ``ip_wl, sq_w, sq_l, cos_wl`` of θ = the trainable parameters (``recorder.params``), the
      gradients of the fused head's float32 log-probs; ``missing_reason`` as in
      `dynamics.core.inrun`.
    Rows are flushed every 20 steps, at every ``on_save`` (after the trainer wrote the checkpoint),
    at train end, and when the callback's own recording fails (the rows of the finished steps).
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
        if self.recorder.cross:
            raise InputError("DynamicsCallback does not record cross (probe x training-pair contributions): it needs each "
                             "recorded step's training pairs with their dL/dlogp and the optimizer after its step, which "
                             "a transformers callback is not handed; use the plain trainer (dynamics train --cross) or "
                             "cross=False")
        self.loss, self.loss_params = loss, resolve_hyper(loss, loss_params)  # validated now, not at train begin
        self.append_eos = append_eos
        self.pairs, self.ref, self.max_length = list(probe_pairs), ref, max_length
        self.others = list(others) if others is not None else None
        w = distributed.world()   # torchrun's environment (accelerate makes the process group later)
        # ranks other than 0 of a multi-process run hold a replica that writes nothing
        self.run = distributed.run_dir(out_dir, w) if w.size > 1 else RunDir(out_dir)
        self.rec: Recorder | None = None
        self._summary: dict | None = None
        self._t_step = self._t_rec = 0.0
        self._trainer = None
        self._body = None          # in_run with a trained output layer: the backbone whose output the fused head reads
        self.inrun: InRunRecorder | None = None
        self._inrun_summary: dict | None = None
        self._micro = 0
        self._loss_checked = False

    def attach(self, trainer) -> "DynamicsCallback":
        """Put this callback first in ``trainer``'s list, before the reporting integrations; with
        ``recorder.in_run``, also wrap ``trainer.training_step`` (one call per micro-batch) so that
        each micro-batch's forward and backward run under an in-run capture."""
        trainer.callback_handler.callbacks.insert(0, self)
        self._trainer = trainer
        if self.recorder.in_run and not getattr(trainer.training_step, "_dynamics_in_run", False):
            original = trainer.training_step

            def training_step(model, inputs, *args, **kwargs):
                if self.inrun is None:
                    return original(model, inputs, *args, **kwargs)
                return self._in_run_step(original, model, inputs, *args, **kwargs)

            training_step._dynamics_in_run = True
            trainer.training_step = training_step
        return self

    # ------------------------------------------------------------------ in-run rows (TRL DPOTrainer)
    def _in_run_checks(self, args, model) -> None:
        """Refuse, before anything is written or trained, what the in-run rows cannot measure."""
        tr = self._trainer
        if tr is None:
            raise InputError("in_run: the callback must be attached with DynamicsCallback.attach(trainer) (it wraps "
                             "the trainer's training_step); passing it in callbacks=[...] is not enough")
        if not any(c.__name__ == "DPOTrainer" and c.__module__.split(".")[0] == "trl" for c in type(tr).__mro__):
            raise InputError(f"in_run with DynamicsCallback supports TRL's DPOTrainer only, not {type(tr).__name__}; "
                             "use in_run=False, or the plain trainer (dynamics train --in-run)")
        off = "; set it off or use in_run=False"
        base = unwrap(model)
        flag = ("is_activation_checkpointing" if hasattr(type(base), "is_activation_checkpointing")
                else "is_gradient_checkpointing")  # transformers >= 5 renamed it (as InRunCapture reads it)
        if (getattr(args, "activation_checkpointing", False) or getattr(args, "gradient_checkpointing", False)
                or getattr(base, flag, False)):
            raise InputError("in_run does not support gradient (activation) checkpointing: the checkpointed forward is "
                             "run again inside the backward; TRL's configs turn it on by default: pass "
                             "gradient_checkpointing=False (activation_checkpointing=False), or use in_run=False")
        if getattr(tr, "ld_alpha", None) is not None:
            raise InputError(f"in_run does not support TRL's ld_alpha={tr.ld_alpha} (it weights the tokens beyond the "
                             "shared length, so the loss is not a function of each response's summed log-prob and "
                             "no per-sequence gradient scale exists); use ld_alpha=None or in_run=False")
        if getattr(tr, "padding_free", False):
            raise InputError("in_run does not support padding_free (sequences packed into one row)" + off)
        if getattr(tr, "aux_loss_enabled", False):
            raise InputError("in_run does not support the MoE router aux loss (its gradient does not pass through "
                             "the log-probs); set router_aux_loss_coef=0 or in_run=False")
        if getattr(tr, "_is_vision_dataset", False):
            raise InputError("in_run does not support vision datasets" + off.replace("set it off", "use text data"))
        peft = getattr(model, "peft_config", None)
        if isinstance(peft, dict) and any(getattr(c, "is_prompt_learning", False) for c in peft.values()):
            raise InputError("in_run does not support prompt-learning PEFT (virtual tokens shift the log-probs); "
                             "use LoRA or in_run=False")

    def _start_in_run(self, args, model, w: distributed.World):
        # multi-process: each rank's own micro-batches, gathered every step (DistributedInRunRecorder)
        inrun = distributed.make_in_run_recorder(w, model, self.run, self.recorder, loss=self.loss,
                                                 loss_params=self.loss_params)
        base = unwrap(model)
        get_head = getattr(base, "get_output_embeddings", None)
        head = get_head() if callable(get_head) else None
        ids = {id(p) for p in inrun.capture.params.values()}
        with distributed.full_parameters(model):  # FSDP2: the head holds FSDP's unsharded parameters, as the capture
            head_trained = head is not None and any(id(p) in ids for p in head.parameters())
        # Full fine-tuning: TRL's fused LM head uses the head's weight outside the lm_head module, so its
        # use is rebuilt from the backbone's last hidden state and the per-token gradient
        # (`InRunCapture.watch_tokens(fused_head=...)`); that needs logits = W h + b, unscaled.
        split = body_and_head(model) if head_trained else None
        self._body = split[0] if split is not None else None
        if head_trained and self._body is None:
            raise InputError("in_run with a trained output layer (full fine-tuning) needs a linear LM head with "
                             "unscaled, uncapped logits (TRL's fused head then projects W h + b); this model scales "
                             "or soft-caps its logits: train with LoRA, freeze the head, or use in_run=False")
        return inrun

    def _in_run_step(self, original, model, inputs, *args, **kwargs):
        """One micro-batch of TRL's training_step under the in-run capture, then its rows."""
        tr, inrun = self._trainer, self.inrun
        if self._micro == 0:
            inrun.begin_step()
        sink = _FusedOutputs()
        mods = []
        for m in (model, tr.model, getattr(tr, "ref_model", None)):
            if isinstance(m, torch.nn.Module) and all(m is not x for x in mods):
                mods.append(m)
        with inrun.micro_batch() as cap:
            sink.cap = cap
            handles = [m.register_forward_hook(sink.hook, with_kwargs=True) for m in mods]
            if self._body is not None:                        # full fine-tuning: the fused head's input
                handles.append(self._body.register_forward_hook(sink.body_hook))
            try:
                loss = original(model, inputs, *args, **kwargs)
            finally:
                for h in handles:
                    h.remove()
        t = time.perf_counter()
        num_items = args[0] if args else kwargs.get("num_items_in_batch")
        failed = None
        try:
            self._add_rows(inputs, sink, num_items)
        except Exception as e:
            failed = e
        with self._flush_on_error():
            distributed.agree(failed)   # multi-process: one rank's failure stops every rank here (else: raises it)
        self._t_rec += cap.seconds + time.perf_counter() - t
        self._micro += 1
        return loss

    def _b_opt(self, n_pairs: int, num_items_in_batch) -> float:
        """L_backward = (Σ_k ℓ_k / n_pairs) / GA × scale: the factor b_opt with d = ∓c·b_opt."""
        tr = self._trainer
        scaled = getattr(tr, "loss_is_scaled_for_ga", None)
        if scaled is None:
            scaled = ((getattr(tr, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None)
                      or getattr(tr, "compute_loss_func", None) is not None)
        ga = 1 if scaled else getattr(tr, "current_gradient_accumulation_steps", tr.args.gradient_accumulation_steps)
        scaler = getattr(getattr(tr, "accelerator", None), "scaler", None)
        on = scaler is not None and getattr(scaler, "is_enabled", lambda: True)()
        scale = float(scaler.get_scale()) if on else 1.0
        return n_pairs * ga / scale

    def _add_rows(self, inputs, sink: "_FusedOutputs", num_items_in_batch) -> None:
        tr = self._trainer
        if sink.policy is None:
            raise RuntimeError("in_run: no fused_lm_head forward with grad was seen in this training step (has TRL's "
                               "DPOTrainer._compute_loss changed?); use in_run=False")
        lp, mask = sink.policy
        ids = inputs["input_ids"]
        N, B = lp.shape[0], lp.shape[0] // 2
        if ids.shape[0] != N or lp.shape[1] != ids.shape[1] - 1:
            raise RuntimeError(f"in_run: TRL's log_probs {tuple(lp.shape)} do not match input_ids {tuple(ids.shape)} "
                               "(rows = sequences, one position less); use in_run=False")
        sums = lp.sum(1).double().cpu()                     # as TRL: per_token_logps.sum(dim=1)
        n = mask.sum(1).cpu()
        if "ref_chosen_logps" in inputs and "ref_rejected_logps" in inputs:
            rw, rl = (torch.as_tensor(inputs[k]).detach().double().cpu() for k in ("ref_chosen_logps",
                                                                                   "ref_rejected_logps"))
        elif sink.ref is not None:
            ref = sink.ref.sum(1).double().cpu()
            rw, rl = ref[:B], ref[B:]
        else:
            rw = rl = torch.full((B,), float("nan"), dtype=torch.float64)
        pairs = trl_batch_pairs(inputs, self._pad_id())
        sched = getattr(tr, "lr_scheduler", None)
        lr = sched.get_last_lr()[0] if sched is not None else tr.args.learning_rate
        b_opt = self._b_opt(B, num_items_in_batch)
        # Multi-process (DDP): this rank's loss is Σ_own ℓ / (B·GA) and DDP averages the gradients over
        # the W ranks, so the batch loss is L = (1/W) Σ_ranks Σ_own ℓ / (B·GA): ∂L/∂logp = c / W, which
        # DistributedInRunRecorder records (c_scale = 1/W); it takes b_opt of L (W·B·GA) times c_scale,
        # so that d = ∓c·B·GA stays TRL's coefficient.
        b_rows = b_opt / getattr(self.inrun, "c_scale", 1.0)
        self.inrun.add(tr.state.global_step, pair_fingerprints(pairs), lw=sums[:B], ll=sums[B:], len_w=n[:B],
                       len_l=n[B:], ref_w=rw, ref_l=rl, lr=lr, micro=self._micro,
                       pairs=pairs if self.recorder.in_run_update else None, b_opt=b_rows)
        if not self._loss_checked:
            self._check_loss(sums[:B], sums[B:], rw, rl, n[:B], n[B:], b_opt, lp.dtype)

    def _check_loss(self, lw, ll, rw, rl, nw, nl, b_opt, dtype) -> None:
        """Warn once when the callback's ``loss`` is not the one TRL trains with (d of the zoo ≠ d read
        off the backward). Tolerance: TRL forms d from the same log-probs in their dtype (float32 from
        the fused head), so the same loss agrees with the float64 zoo to ~1e-7 relative, while
        another β or loss differs at order 1: 1e-4, or 8 epsilons of half-precision log-probs."""
        prod = self.inrun.capture.result()
        ok = rw.isfinite() & rl.isfinite() & torch.tensor([m != NONCONSTANT_REASON for m in prod.missing])
        if not bool(ok.any()):
            return
        self._loss_checked = True
        lo = compute_loss(self.loss, lw, ll, rw, rl, nw.double(), nl.double(), **self.loss_params)
        trl_w, trl_l = -prod.c_w * b_opt, prod.c_l * b_opt
        scale = max(lo.d_w.abs().max().item(), lo.d_l.abs().max().item(), trl_w.abs().max().item(), 1e-30)
        err = max((lo.d_w - trl_w)[ok].abs().max().item(), (lo.d_l - trl_l)[ok].abs().max().item())
        tol = max(1e-4, 8 * torch.finfo(dtype).eps)
        if err > tol * scale:
            warnings.warn(f"DynamicsCallback: loss={self.loss!r} {self.loss_params} does not match the loss TRL trains "
                          f"with (its coefficients d_w, d_l differ from those read off TRL's backward by "
                          f"{err / scale:.2e} relative): the in-run rows' d_w, d_l and predictions are TRL's (from the "
                          "backward), their loss_value is the callback's loss; pass the matching loss/loss_params",
                          stacklevel=2)

    def _pad_id(self) -> int:
        tr = self._trainer
        for src in (getattr(tr, "data_collator", None), getattr(tr, "processing_class", None)):
            src = getattr(src, "tokenizer", src)
            pad = getattr(src, "pad_token_id", None)
            if isinstance(pad, int):
                return pad
        return 0

    def _check_parallel(self, args, model) -> distributed.World:
        """The `World` of a run the callback can record: one process, DDP with the process group
        accelerate made, or FSDP2 (the model's ``fully_shard`` units); `InputError` for DeepSpeed and
        FSDP version 1."""
        sharded = _sharded_training(args, self._trainer, model)
        if sharded == "DeepSpeed":
            raise InputError("DynamicsCallback does not support DeepSpeed: its engine shards the parameters (ZeRO) "
                             "outside torch's FSDP, which the callback can gather; train with FSDP version 2 "
                             "(accelerate launch --use_fsdp --fsdp_version 2), DDP (accelerate launch without "
                             "--use_deepspeed, or torchrun) or in one process")
        if sharded == "FSDP1":
            raise InputError("DynamicsCallback supports FSDP version 2 (torch's fully_shard) only, not version 1 "
                             "(the FullyShardedDataParallel wrapper, whose flat parameters it cannot gather); "
                             "launch with accelerate launch --use_fsdp --fsdp_version 2 (or fsdp_config="
                             "{'fsdp_version': 2}), or train with DDP")
        w = distributed.world()
        size = int(getattr(args, "world_size", 1) or 1)
        if size > 1 and not (w.distributed and w.size == size):
            raise RuntimeError(f"DynamicsCallback: the trainer runs {size} processes but torch.distributed has "
                               f"{'no process group' if not w.initialized else f'a group of {w.size}'}; launch with "
                               "accelerate launch or torchrun")
        return w

    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        w = self._check_parallel(args, model)
        model = _unwrap_ddp(model)  # DDP: the diagnostics run on the replica itself, never through DDP's hooks
        # FSDP2 (the model's fully_shard units): every pass below on the model gathers its full parameters
        # (distributed.full_parameters, collective), the recorders do the same at every call
        self.run = distributed.run_dir(self.run.path, w) if w.distributed else RunDir(self.run.path)
        self.inrun = None
        cfg = self.recorder
        # every rank validates; if one fails, all raise (distributed.agree) before anything is written
        failed = inrun = None
        try:
            if cfg.in_run:
                self._in_run_checks(args, model)
                inrun = self._start_in_run(args, model, w)
            tok = processing_class if processing_class is not None else kwargs.get("tokenizer")
            tok = getattr(tok, "tokenizer", tok)  # processors wrap a tokenizer
            eos = self.append_eos
            if eos == "auto":
                eos = type(args).__module__.split(".")[0] == "trl"
            probe = tokenize_pairs(tok, self.pairs, max_length=self.max_length, append_eos=eos)
        except Exception as e:
            failed = e
        distributed.agree(failed)

        # multi-process: each rank computes those of its block of the probe pairs (the block its recorder
        # measures, in the same batches: at step 0 the margin is exactly 0, as in one process), all gathered
        ref = self.ref if self.ref is not None else _sharded_reference(model, probe, w)
        failed = None
        try:
            # the trainer's precision (its steps); the diagnostics always run in the parameters' dtype
            precision = precision_name(bool(getattr(args, "bf16", False)), bool(getattr(args, "fp16", False)))
            name = getattr(getattr(model, "config", None), "_name_or_path", None) or type(model).__name__
            self.run.write_config(dict(model=name, loss=self.loss, loss_params=self.loss_params,
                                       lr=args.learning_rate, recorder=cfg, trainer=type(args).__name__,
                                       append_eos=eos, precision=precision, processes=w.size,
                                       parallel=_parallel_name(model, w),
                                       diagnostics_precision="parameters' dtype, outside autocast",
                                       training_args={k: to_jsonable(v) for k, v in args.to_dict().items()}),
                                  writer="DynamicsCallback")                    # rank 0 only
            sets = None
            if cfg.probes:
                from dynamics.core.probes import build_probe_sets
                with distributed.full_parameters(model):      # FSDP2: the model's forward on whole tensors
                    sets = build_probe_sets(model, tok, self.pairs, self.others or self.pairs, seed=0)
            # multi-process: each rank records its block of the probe pairs, rank 0 writes them all
            rec = distributed.make_recorder(w, model, probe, ref, self.run, cfg, loss=self.loss,
                                            loss_params=self.loss_params, lr=args.learning_rate, tokenizer=tok,
                                            probe_sets=sets)
        except Exception as e:
            failed = e
        distributed.agree(failed)
        self.rec = rec
        if cfg.in_run:
            self.inrun, self._micro, self._loss_checked = inrun, 0, False

    @contextlib.contextmanager
    def _flush_on_error(self):
        """When the block raises, the in-run rows of the finished steps are written before the error
        leaves (the trainer does not call ``on_train_end`` then); local, no communication."""
        try:
            yield
        except BaseException:
            if self.inrun is not None:
                with contextlib.suppress(Exception):
                    self.inrun.flush()
            raise

    def on_step_begin(self, args, state, control, **kwargs):
        self._t_step, self._t_rec = time.perf_counter(), 0.0

    def on_pre_optimizer_step(self, args, state, control, lr_scheduler=None, **kwargs):
        if self.rec is not None and self.recorder.due(state.global_step):
            t = time.perf_counter()
            lr = lr_scheduler.get_last_lr()[0] if lr_scheduler is not None else args.learning_rate
            with self._flush_on_error():
                self.rec.before_update(state.global_step, lr=lr)
            self._t_rec += time.perf_counter() - t

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.rec is not None and self.rec.pending:
            t = time.perf_counter()
            with self._flush_on_error():
                self._summary = self.rec.after_update()
            self._t_rec += time.perf_counter() - t
        if self.inrun is not None and self._micro:
            t = time.perf_counter()
            self._inrun_summary = self.inrun.end_step()   # after the update: in_run_update's jvp needs θ_{s+1}
            self._micro = 0
            self._t_rec += time.perf_counter() - t

    def on_step_end(self, args, state, control, **kwargs):
        # step_s: the trainer's own step; record_s: the diagnostics inside it (overhead)
        total = time.perf_counter() - self._t_step
        self.run.append("steps", [dict(step=state.global_step, step_s=total - self._t_rec, record_s=self._t_rec)])

    def on_log(self, args, state, control, logs=None, **kwargs):
        summary = {**(self._summary or {}), **(self._inrun_summary or {})}
        if summary and logs is not None:
            logs.update(summary)  # later callbacks (TensorBoard, W&B) see them
            if state.log_history:
                state.log_history[-1].update(summary)
            self._summary = self._inrun_summary = None

    def on_save(self, args, state, control, **kwargs):
        if self.inrun is not None:
            self.inrun.flush()

    def on_train_end(self, args, state, control, **kwargs):
        if self.inrun is not None:
            self.inrun.flush()
        if self.rec is not None:
            self.rec.final(state.global_step)


def _sharded_reference(model, probe: TokenizedPairs, w: distributed.World) -> pd.DataFrame:
    """Reference log-probs of ``probe`` (TRL's default reference: the model as it is; a PEFT model
    with its adapters disabled), outside autocast. Multi-process: each rank computes its block
    (`dynamics.runs.distributed.shard_slice`), the blocks are gathered on every rank in rank order;
    an error on one rank raises on all."""
    def reference(pairs):
        disable = getattr(model, "disable_adapter", None)
        with (disable() if callable(disable) else contextlib.nullcontext()), outside_autocast(model):
            return reference_logprobs(model, pairs)

    if not w.distributed:
        with distributed.full_parameters(model):       # FSDP2 over one process: whole tensors all the same
            return reference(probe)
    block = shard_slice(len(probe), w.rank, w.size)
    failed = mine = None
    try:
        with distributed.full_parameters(model):       # FSDP2: collective, also for an empty block
            if block.stop > block.start:
                mine = reference(probe.subset(range(block.start, block.stop)))
    except Exception as e:
        failed = e
    distributed.agree(failed)
    parts = [p for p in distributed.gather_objects(mine) if p is not None]
    if not parts:                                       # no probe pair at all: the empty table
        with distributed.full_parameters(model):
            return reference(probe)
    return pd.concat(parts, ignore_index=True)


def _unwrap_ddp(model):
    """``model`` without its ``DistributedDataParallel`` wrappers (a PEFT wrapper stays)."""
    from torch.nn.parallel import DistributedDataParallel

    while isinstance(model, DistributedDataParallel):
        model = model.module
    return model


def _sharded_training(args, trainer, model) -> str | None:
    """How the trainer shards ``model``: ``"DeepSpeed"`` (from the trainer, its arguments,
    accelerate's launch environment or the model's wrapper), ``"FSDP1"`` (a FullyShardedDataParallel
    wrapper in the model, or accelerate's FSDP plugin of version 1), ``"FSDP2"`` (``fully_shard``
    units in the model), else None.

    FSDP is read off the model the callback is handed, which at ``on_train_begin`` is the prepared
    one (under FSDP the Trainer hands over the sharded model itself), not off the launch
    environment: accelerate on CPU (``DistributedType.MULTI_CPU``) ignores ``--use_fsdp``
    (``AcceleratorState`` sets ``DistributedType.FSDP`` only for GPU-like devices and drops the
    plugin) and trains with DDP, which is recorded as such."""
    import os

    kind = str(getattr(getattr(trainer, "accelerator", None), "distributed_type", "")).upper()
    name = type(model).__name__
    if (getattr(trainer, "is_deepspeed_enabled", False) or getattr(args, "deepspeed", None) or "DEEPSPEED" in kind
            or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true" or name == "DeepSpeedEngine"):
        return "DeepSpeed"
    plugin = getattr(getattr(getattr(trainer, "accelerator", None), "state", None), "fsdp_plugin", None)
    v1 = any(type(m).__name__ == "FullyShardedDataParallel" for m in _modules(model))
    if v1 or (getattr(trainer, "is_fsdp_enabled", False) and getattr(plugin, "fsdp_version", 2) == 1):
        return "FSDP1"
    if distributed.fsdp_units(model):
        return "FSDP2"
    return None


def _modules(model) -> list:
    return list(model.modules()) if isinstance(model, torch.nn.Module) else []


def _parallel_name(model, w: distributed.World) -> str:
    """``config.json``'s ``parallel``: how the trainer trained (``fsdp2``, ``ddp``, ``none``)."""
    if distributed.fsdp_units(model):
        return "fsdp2"
    return "ddp" if w.distributed else "none"


class _FusedOutputs:
    """Forward hook collecting the ``fused_lm_head`` outputs of one training micro-batch: the
    first with grad is the policy's (its ``log_probs`` are watched by the capture), a later
    no-grad one of the same shape the reference's (TRL's ``_compute_loss`` order)."""

    def __init__(self):
        self.cap = None
        self.policy: tuple | None = None     # (log_probs detached, label_mask)
        self.ref = None
        self.hidden = None                   # full fine-tuning: the policy backbone's last hidden state (body_hook)
        self._seen: list = []

    def body_hook(self, module, args, out):
        """The first backbone forward with grad (the policy's): the hidden states the fused head projects."""
        h = getattr(out, "last_hidden_state", None)
        if self.hidden is None and torch.is_grad_enabled() and isinstance(h, torch.Tensor) and h.requires_grad:
            self.hidden = h.detach()

    def _fused_head(self, kwargs, mask):
        """``(h, y)`` of the fused head as TRL forms them (h[:, :-1] against labels[:, 1:]), or None
        without a captured backbone output (the head is not trained)."""
        if self.hidden is None:
            return None
        labels = kwargs.get("labels")
        if kwargs.get("shift_labels") is not None or not isinstance(labels, torch.Tensor):
            raise InputError("in_run with a trained output layer: TRL's fused head was called without labels or with "
                             "shift_labels (context/sequence parallelism), which the in-run rows do not follow; "
                             "train with LoRA or use in_run=False")
        h, y = self.hidden[:, :-1], labels[:, 1:].to(mask.device)
        if h.shape[:2] != mask.shape:
            raise RuntimeError(f"in_run: the backbone's hidden states {tuple(h.shape)} do not match TRL's label mask "
                               f"{tuple(mask.shape)}; use in_run=False")
        return h.to(mask.device), y

    def hook(self, module, args, kwargs, out):
        lp, mask = getattr(out, "log_probs", None), getattr(out, "label_mask", None)
        if not isinstance(lp, torch.Tensor) or not isinstance(mask, torch.Tensor) or any(out is o for o in self._seen):
            return
        self._seen.append(out)               # one output seen through nested hooked modules counts once
        if torch.is_grad_enabled() and lp.requires_grad:
            if self.policy is None:
                self.policy = (lp.detach(), mask.detach())
                self.cap.watch_tokens(lp, mask, fused_head=self._fused_head(kwargs, mask))
        elif self.policy is not None and self.ref is None and lp.shape == self.policy[0].shape:
            self.ref = lp.detach()


def trl_batch_pairs(inputs, pad_id: int) -> TokenizedPairs:
    """The pairs of a TRL DPO batch (``input_ids`` (2B, T): B chosen rows then B rejected, right
    padded; ``completion_mask`` marks the completion) as `TokenizedPairs` of the trained token ids
    (prompt = the attended tokens before the completion; ``tokens`` left empty), ids =
    `pair_fingerprints`."""
    ids = inputs["input_ids"].detach().cpu()
    comp = inputs["completion_mask"].detach().cpu().bool()
    att = inputs.get("attention_mask")
    att = torch.ones_like(comp) if att is None else att.detach().cpu().bool()
    seqs = [TokenizedSequence(tuple(ids[i][att[i] & ~comp[i]].tolist()), tuple(ids[i][comp[i]].tolist()), ())
            for i in range(ids.shape[0])]
    B = len(seqs) // 2
    tp = TokenizedPairs([""] * B, seqs[:B], seqs[B:], pad_id)
    tp.pair_ids = pair_fingerprints(tp)
    return tp
