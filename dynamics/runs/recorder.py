"""Diagnostics of a fixed probe set around optimizer updates, for any training loop.

    rec = Recorder(model, probe_pairs, ref_logps, RunDir("runs/x"), RecorderConfig(), loss="dpo", lr=5e-6)
    for step, batch in enumerate(loader):
        loss = ...; loss.backward()
        if step % 10 == 0:
            rec.before_update(step)        # snapshot θ_s
        optimizer.step(); optimizer.zero_grad()
        if rec.pending:
            logs = rec.after_update()      # θ_s put back: log-probs, gradient inner products, predictions,
                                           # ⟨g, Δθ⟩; θ_{s+1}: actual changes
    rec.final(step + 1)

With ``cross`` on, `Recorder.before_update` also takes the step's training pairs and their loss
scalars (``train_batch=TrainingBatch(pairs, c_w, c_l)``, one per micro-batch) and
`Recorder.after_update` the optimizer (``optimizer=opt``), whose state gives the update map U.

The plain trainer (`dynamics.runs.train`) and the transformers callback (`dynamics.runs.callbacks`) both
drive this class. One flat row per step × probe pair goes to ``records.parquet``:

- state at θ_s: ``logp_w, logp_l`` (+ ``_norm``), ``ref_w, ref_l``, ``margin``, ``reward_acc``,
  ``loss_value``, ``d_w, d_l`` (seed 004 eq. 8 coefficients of the run's loss);
- gradients at θ_s: ``ip_wl = ⟨g_w,g_l⟩``, ``sq_w``, ``sq_l``, ``cos_wl``;
- SGD-form prediction of a step of size η on this pair alone (seed 004 §3.2):
  ``pred_dw, pred_dl``, thresholds ``thr_w, thr_l`` (eq. 9/10) and ``case_pred`` (Table 1);
- the real update Δθ = θ_{s+1} − θ_s (any optimizer, any batch): its exact first-order effect
  ``upd_dw = ⟨g_w(θ_s), Δθ⟩``, ``upd_dl`` (no per-example gradient), the actual changes
  ``act_dw, act_dl`` and ``case_obs``.

Cost of a recorded step with the default ghost engine (docs/math.md §4.2): θ_s is measured after
the update, with the snapshot put back, by one probe pass (`dynamics.core.probe_pass`: one forward
and one activation backward of the 2n probe sequences give the log-probs, the 3 Gram entries of
each pair and ``upd`` from the same factors), then one no-grad forward at θ_{s+1}; the token Grams
(``token_pairs``), the learning-dynamics ``probes`` and ``cross`` come on top. With ``impl`` func or
autograd (the oracles): a no-grad forward, the (2n)² Gram, a jvp (≈ 3 forwards) and the forward
at θ_{s+1}.

With ``in_run`` on, `InRunRecorder` adds ``train_records.parquet``: one row per step × *training*
pair, at every optimizer step, measured on the training forward/backward itself (no probe pass):
the state columns above plus ``ip_wl, sq_w, sq_l, cos_wl``, the SGD-form ``pred_dw, pred_dl,
thr_w, thr_l, case_pred`` and ``missing_reason`` (`dynamics.core.inrun`); ``in_run_update`` adds
``upd_dw, upd_dl`` = ⟨g, Δθ⟩ of the step's real update for those pairs.

``whatif.parquet`` holds the SGD-form prediction under every loss of the zoo from the same
gradients; ``token_grams/step{s}_{pair}.npz`` the token Grams of the first ``token_pairs`` probes
with the Theorem 3 decomposition in ``token_decomp.parquet``.

With ``cross`` on, ``contributions.parquet`` splits each probe response's ``upd`` over the training
pairs of the step (docs/math.md §4.1, `dynamics.core.contrib`): one row per step × probe pair ×
response × training pair with ``k_w, k_l`` (the cross-Gram ⟨g_o, g_w,u⟩, ⟨g_o, g_l,u⟩ at θ_s),
``c_w, c_l`` (the step's ∂L/∂lw_u, ∂L/∂ll_u) and ``contribution = ⟨g_o, U(G_u)⟩``; the records rows
of that step get ``contrib_sum_w, contrib_sum_l`` (Σ_u) and ``contrib_resid_w, contrib_resid_l``
(``upd − Σ_u``: momentum, weight decay and rounding).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import pandas as pd
import torch

from dynamics.core import conditions
from dynamics.core.analyzer import Analyzer
from dynamics.core.contrib import TrainingBatch, parameters_at, training_pair_contributions, update_map
from dynamics.core.grads import IMPLS, select_params
from dynamics.core.inrun import InRunCapture, predict_with_missing
from dynamics.core.logprobs import PairLogProbs, TokenizedPairs
from dynamics.core.losses import compute_loss, resolve_hyper
from dynamics.errors import InputError
from dynamics.runs.rundir import RunDir, safe_name, save_token_gram


IN_RUN_UPDATE_FROM = ("jvp", "factors")
"""How ``in_run_update`` computes ⟨g_i, Δθ⟩ (`InRunRecorder`): equal values to rounding."""


@dataclass
class RecorderConfig:
    """What is recorded and how; nested in `dynamics.runs.train.TrainConfig` and given to
    `dynamics.runs.callbacks.DynamicsCallback`, saved under ``"recorder"`` in ``config.json``.
    The loss, its hyper-parameters and the learning rate are the training's own and are passed
    to `Recorder` separately."""
    eval_every: int = field(default=5, metadata={"help": "record the probe pairs at steps 0, e, 2e, ..."})
    impl: str = field(default="ghost", metadata={"help": "gradient engine for the diagnostics: ghost, func, autograd"})
    params: object = field(default="trainable", metadata={"help": "parameters θ of the gradients (a select_params spec)"})
    whatif: bool = field(default=True, metadata={"help": "record the what-if table over the loss zoo"})
    token_pairs: int = field(default=1, metadata={"help": "probe pairs whose token Grams are saved"})
    token_chunk: int | None = field(default=8, metadata={"help": "token gradients formed at once (memory, not values)"})
    probes: bool = field(default=False, metadata={"help": "record learning-dynamics probes (y+, y-, y*, greedy, shuffled, ...)"})
    in_run: bool = field(default=False, metadata={"help": "record every optimizer step's training pairs (train_records.parquet) from the training backward itself"})
    in_run_update: bool = field(default=False, metadata={"help": "with in_run: also the exact first-order effect <g, dtheta> of each real update on its training pairs (see in_run_update_from)"})
    in_run_update_from: str = field(default="jvp", metadata={"help": "how in_run_update computes <g, dtheta>: jvp (one forward-mode pass over the step's sequences, ~3 forwards, no memory) or factors (from the training backward's own factors, kept until the optimizer step: ~1 forward of matrix products, none for book-kept layers, but the memory of those factors for every micro-batch of the step)"})
    in_run_bookkeeping: bool = field(default=False, metadata={"help": "with in_run: form the linear layers' weight gradients per sequence instead of the batch gradient and train on their sum (cheaper at long sequences; the training then equals a run without in_run to float rounding, not bit for bit)"})
    cross: bool = field(default=False, metadata={"help": "at recorded steps, split each probe's <g, dtheta> over the step's training pairs with the probe x training cross-Gram (contributions.parquet)"})

    def __post_init__(self):
        for name in ("in_run", "in_run_update", "in_run_bookkeeping", "cross"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.in_run_update and not self.in_run:
            raise InputError("in_run_update needs in_run (it adds columns to the in-run rows of train_records)")
        if self.in_run_update_from not in IN_RUN_UPDATE_FROM:
            raise InputError(f"unknown in_run_update_from {self.in_run_update_from!r}; known: {', '.join(IN_RUN_UPDATE_FROM)}")
        if self.in_run_bookkeeping and not self.in_run:
            raise InputError("in_run_bookkeeping needs in_run (it is a way of computing the in-run rows)")
        if self.impl not in IMPLS:
            raise InputError(f"unknown impl {self.impl!r}; known: {', '.join(IMPLS)}")
        for name, low in (("eval_every", 1), ("token_pairs", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise InputError(f"{name} must be an integer >= {low}, got {v!r}")
        if self.token_chunk is not None and (not isinstance(self.token_chunk, int) or self.token_chunk < 1):
            raise InputError(f"token_chunk must be an integer >= 1 or None, got {self.token_chunk!r}")

    def due(self, step: int) -> bool:
        """Whether optimizer step ``step`` is recorded."""
        return step % self.eval_every == 0


@contextlib.contextmanager
def outside_autocast(model):
    """Run ``model`` without mixed precision: the diagnostics do not depend on the trainer's precision.

    Disables any ambient ``torch.autocast`` (CPU and CUDA) and, for a model prepared by accelerate
    (transformers ``Trainer`` / TRL with ``bf16=True`` or ``fp16=True``), whose ``forward`` was
    replaced by an autocast wrapper, temporarily restores the original ``forward``. Parameters are
    used in their own dtype (float32 stays float32).
    """
    patched = []
    for m in {id(x): x for x in (model, getattr(model, "module", None)) if x is not None}.values():
        original = m.__dict__.get("_original_forward")
        if original is not None and "forward" in m.__dict__:
            patched.append((m, m.__dict__["forward"]))
            m.forward = original
    try:
        with contextlib.ExitStack() as stack:
            for device_type in ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",):
                stack.enter_context(torch.autocast(device_type=device_type, enabled=False))
            yield
    finally:
        for m, fwd in patched:
            m.forward = fwd


def _no_autocast(method):
    """Decorator: run a `Recorder` method under `outside_autocast` of its model."""
    import functools

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with outside_autocast(self.model):
            return method(self, *args, **kwargs)
    return wrapper


class Recorder:
    """Records the diagnostics of ``probe`` (B pairs) before and after optimizer updates.

    ``ref`` holds the reference log-probs of the probe pairs in probe order (a DataFrame with
    ``ref_w, ref_l``, e.g. from `dynamics.core.logprobs.reference_logprobs`). ``loss``,
    ``loss_params``: the training's loss (its ``d_w, d_l`` are recorded); ``lr``: the η of the
    SGD-form prediction when `before_update` is not given the optimizer's current one.

    ``cfg.cross``: at each recorded step also the per-training-pair split of ``upd``
    (`dynamics.core.contrib.training_pair_contributions`, docs/math.md §4.1) into
    ``contributions.parquet`` and the ``contrib_*`` columns of ``records.parquet``. Its cost per
    recorded step: one Gram of the 2n probe + 2B training sequences, and for an optimizer other than
    plain SGD (Adam, AdamW, several learning rates, θ wider than the trained parameters) B backwards
    on 2 sequences and B jvps over the 2n probe sequences.
    """

    def __init__(self, model, probe: TokenizedPairs, ref: pd.DataFrame, run: RunDir, cfg: RecorderConfig,
                 *, loss: str = "dpo", loss_params: dict | None = None, lr: float = 5e-6, tokenizer=None,
                 probe_sets: dict | None = None):
        if not (isinstance(lr, (int, float)) and lr > 0):
            raise InputError(f"lr must be > 0, got {lr!r}")
        self.model, self.probe, self.run, self.cfg = model, probe, run, cfg
        self.loss, self.loss_params, self.lr = loss, resolve_hyper(loss, loss_params), lr
        if cfg.probes and (tokenizer is None or not probe_sets):
            raise ValueError("probes=True needs the tokenizer and probe_sets {pair_id: [Probe, ...]}")
        self.probe_sets = probe_sets or {}
        self.analyzer = Analyzer(model, probe.pad_id, params=cfg.params, impl=cfg.impl, chunk_size=cfg.token_chunk,
                                 tokenizer=tokenizer)
        self.ref_w = torch.tensor(ref["ref_w"].to_numpy())
        self.ref_l = torch.tensor(ref["ref_l"].to_numpy())
        self._pending: dict | None = None
        (run.path / "token_grams").mkdir(exist_ok=True)

    @property
    def pending(self) -> bool:
        """True between `before_update` and `after_update`."""
        return self._pending is not None

    # ------------------------------------------------------------------ state at θ
    def _state(self, out: PairLogProbs | None = None) -> dict:
        """Log-probs of the probe pairs at the model's θ: ``out`` (e.g. of the probe pass), else one
        no-grad forward."""
        out = self.analyzer.logprobs(self.probe) if out is None else out
        lw, ll = out.chosen.logp.detach().double(), out.rejected.logp.detach().double()
        nw, nl = out.chosen.lengths.double(), out.rejected.lengths.double()
        return dict(lw=lw.cpu(), ll=ll.cpu(), lw_norm=out.chosen.logp_norm.detach().double().cpu(),
                    ll_norm=out.rejected.logp_norm.detach().double().cpu(), nw=nw.cpu(), nl=nl.cpu())

    def _snapshot(self) -> dict:
        """θ_s: the selected parameters and every trainable one (all that the step may move, so
        that the measurements of `after_update` at θ_s see the whole model at θ_s)."""
        keep = {**select_params(self.model, "trainable"), **self.analyzer.params}
        return conditions.snapshot_params(self.model, keep)

    @_no_autocast
    def before_update(self, step: int, lr: float | None = None, *,
                      train_batch: TrainingBatch | list[TrainingBatch] | None = None) -> None:
        """Snapshot θ_s (one copy of the trainable and selected parameters) with the step's η; every
        measurement of θ_s is taken by `after_update`, with θ_s put back, where the update Δθ is known
        (docs/math.md §4.2).

        ``train_batch`` (needed with ``cfg.cross``, ignored otherwise): the step's training pairs and
        their ``c_w = ∂L/∂lw``, ``c_l = ∂L/∂ll`` (`dynamics.core.contrib.TrainingBatch`), or a list
        of them, one per micro-batch."""
        lr = self.lr if lr is None else lr
        batch = None
        if self.cfg.cross:
            if train_batch is None:
                raise InputError("cross=True: before_update needs train_batch=TrainingBatch(pairs, c_w, c_l) "
                                 "(or a list, one per micro-batch): the training pairs of this step and "
                                 "their dL/dlogp")
            batch = TrainingBatch.concat(train_batch)
        self._pending = dict(step=step, lr=lr, snapshot=self._snapshot(), batch=batch)

    def _measure(self, p: dict, delta: dict, umap) -> None:
        """Everything of θ_s (the model holds θ_s): log-probs, coefficients, gradient inner products,
        predictions, ``upd`` (or, with ``cross``, the per-training-pair split), what-if, token Grams and
        probes, into ``p``.

        The ghost engine measures log-probs, the pair entries and ``upd`` in one probe pass (one
        forward, one activation backward, `dynamics.core.probe_pass`); func and autograd (oracles) by
        a no-grad forward, the (2n)² Gram and a jvp."""
        cfg, step, lr = self.cfg, p["step"], p["lr"]
        if cfg.impl == "ghost":
            pp = self.analyzer.probe_pass(self.probe, delta=None if cfg.cross else delta)
            st = self._state(pp.logps)
            ip = dict(ip_wl=pp.ip_wl, sq_w=pp.sq_w, sq_l=pp.sq_l, cos_wl=pp.cos_wl)
            upd = pp.upd
        else:
            st = self._state()
            ip = {k: v.double().cpu() for k, v in self.analyzer.pair_inner_products(self.probe).items()}
            seqs = self.probe.chosen + self.probe.rejected
            upd = None if cfg.cross else self.analyzer.update_effects(seqs, delta).double().cpu()
        rw, rl = self.ref_w.double(), self.ref_l.double()
        lo = compute_loss(self.loss, st["lw"], st["ll"], rw, rl, st["nw"], st["nl"], **self.loss_params)
        pred = conditions.predict(lo.d_w, lo.d_l, ip["ip_wl"], ip["sq_w"], ip["sq_l"], lr=lr)
        p.update(st=st, lo=lo, ip=ip, pred=pred, upd=upd, cross=None)
        if cfg.whatif:
            wi = conditions.what_if(st["lw"], st["ll"], rw, rl, st["nw"], st["nl"], ip["ip_wl"], ip["sq_w"],
                                    ip["sq_l"], lr=lr, pair_ids=self.probe.pair_ids)
            wi = wi.rename(columns={"pair": "pair_id"})
            wi.insert(0, "step", step)
            p["whatif"] = wi
        p["token"] = [self._token(step, k, lo, lr) for k in range(min(cfg.token_pairs, len(self.probe)))]
        p["probes"] = self._probe_rows(step)
        if cfg.cross:
            p["cross"] = training_pair_contributions(self.model, self.probe.chosen + self.probe.rejected, p["batch"],
                                                     umap, delta, params=self.analyzer.params, impl=cfg.impl,
                                                     chunk_size=cfg.token_chunk)
            p["upd"] = p["cross"].upd

    def _probe_rows(self, step: int) -> list[dict]:
        """Learning-dynamics probe metrics (`dynamics.core.probes.METRICS`) of every probe set."""
        if not self.cfg.probes:
            return []
        rows = []
        for pid, probes in self.probe_sets.items():
            for r in self.analyzer.probe_metrics(None, probes):
                rows.append(dict(step=step, pair_id=pid, probe=r.pop("name"),
                                 **{k: v for k, v in r.items() if k not in ("prompt", "response")}))
        return rows

    def _token(self, step: int, k: int, lo, lr: float) -> list[dict]:
        """Token Grams of probe pair k and the Theorem 3 decomposition of the predicted change."""
        w, l = self.probe.chosen[k], self.probe.rejected[k]
        dec = self.analyzer.token_decomposition(w, l, float(lo.d_w[k]), float(lo.d_l[k]), lr)
        wl, m = dec["grams"][1], dec["m"]
        pid = self.probe.pair_ids[k]
        save_token_gram(self.run.path / "token_grams" / f"step{step:06d}_{safe_name(pid)}.npz", wl, pid, step)
        return [dict(step=step, pair_id=pid, response=side, m=m, token=t, token_str=toks[t],
                     segment="before" if t < m else "at" if t == m else "after", pred=float(v))
                for side, toks, tok in (("chosen", w.tokens, dec["tok_w"]), ("rejected", l.tokens, dec["tok_l"]))
                for t, v in enumerate(tok)]

    # ------------------------------------------------------------------ after the update
    @_no_autocast
    def after_update(self, optimizer=None) -> dict[str, float]:
        """Measure θ_s and θ_{s+1}; write the rows of step s. Returns scalar summaries for loggers.

        θ_s (the snapshot of `before_update`) is put back into the model for the measurements of
        `_measure`, ``upd = ⟨g(θ_s), Δθ⟩`` with Δθ = θ_{s+1} − θ_s among them, and θ_{s+1} is restored
        bit for bit; then one no-grad forward at θ_{s+1} gives the actual changes. The training's
        ``.grad`` and the optimizer state are not touched. ``optimizer`` (needed with ``cfg.cross``):
        the optimizer that has just made the step, before any lr scheduler step (its state gives U,
        §4.1)."""
        if self._pending is None:
            raise RuntimeError("after_update() without before_update()")
        if self.cfg.cross and optimizer is None:
            self._pending = None
            raise InputError("cross=True: after_update needs optimizer= (the optimizer that made the step; "
                             "its state gives the update map of the per-training-pair split)")
        p, self._pending = self._pending, None
        delta = self.analyzer.delta({n: p["snapshot"][n] for n in self.analyzer.params})
        umap = update_map(optimizer, self.analyzer.params) if self.cfg.cross else None
        with parameters_at(self.model, p.pop("snapshot")):                      # θ_s; θ_{s+1} back after
            self._measure(p, delta, umap)
        B = len(self.probe)
        new = self._state()
        upd, cross = p["upd"], p["cross"]
        act_dw, act_dl = new["lw"] - p["st"]["lw"], new["ll"] - p["st"]["ll"]
        changes = dict(upd_dw=upd[:B], upd_dl=upd[B:], act_dw=act_dw, act_dl=act_dl)
        if cross is not None:
            total = cross.contrib.sum(1)
            changes.update(contrib_sum_w=total[:B], contrib_sum_l=total[B:], contrib_resid_w=cross.residual[:B],
                           contrib_resid_l=cross.residual[B:])
        rows = self._rows(p, **changes)
        self.run.append("records", rows)
        if cross is not None:
            self.run.append("contributions", self._contribution_rows(p["step"], p["batch"], cross))
        if "whatif" in p:
            self.run.append("whatif", p["whatif"].to_dict("records"))
        tok_rows = [r for rows_k in p["token"] for r in rows_k]
        if tok_rows:
            self.run.append("token_decomp", tok_rows)
        if p["probes"]:
            self.run.append("probes", p["probes"])
        return probe_summary(rows)

    def _contribution_rows(self, step: int, batch: TrainingBatch, cross) -> list[dict]:
        """One row per probe pair × response × training pair (``contributions.parquet``)."""
        n, B = len(self.probe), len(batch)
        rows = []
        for o in range(2 * n):
            pid, response = self.probe.pair_ids[o % n], "chosen" if o < n else "rejected"
            for u, tid in enumerate(batch.pairs.pair_ids):
                rows.append(dict(step=step, pair_id=pid, response=response, train_pair=str(tid),
                                 k_w=float(cross.K[o, u]), k_l=float(cross.K[o, B + u]), c_w=float(cross.c_w[u]),
                                 c_l=float(cross.c_l[u]), contribution=float(cross.contrib[o, u])))
        return rows

    @_no_autocast
    def final(self, step: int) -> None:
        """Rows for the final state (log-probs only; no update follows)."""
        self._pending = None
        st = self._state()
        cfg = self.cfg
        lo = compute_loss(self.loss, st["lw"], st["ll"], self.ref_w.double(), self.ref_l.double(), st["nw"],
                          st["nl"], **self.loss_params)
        self.run.append("records", self._rows(dict(step=step, lr=self.lr, st=st, lo=lo, ip=None, pred=None)))
        if cfg.probes:
            self.run.append("probes", self._probe_rows(step))

    def _rows(self, p: dict, **changes) -> list[dict]:
        st, lo = p["st"], p["lo"]
        rw, rl = self.ref_w.double(), self.ref_l.double()
        margin = (st["lw"] - rw) - (st["ll"] - rl)
        obs = conditions.case(changes["act_dw"], changes["act_dl"]) if changes else None
        rows = []
        for k, pid in enumerate(self.probe.pair_ids):
            row = dict(step=p["step"], pair_id=pid, loss=self.loss, loss_value=float(lo.loss[k]),
                       logp_w=float(st["lw"][k]), logp_l=float(st["ll"][k]),
                       logp_w_norm=float(st["lw_norm"][k]), logp_l_norm=float(st["ll_norm"][k]),
                       ref_w=float(rw[k]), ref_l=float(rl[k]), len_w=int(st["nw"][k]), len_l=int(st["nl"][k]),
                       margin=float(margin[k]), reward_acc=bool(margin[k] > 0),
                       d_w=float(lo.d_w[k]), d_l=float(lo.d_l[k]), lr=p["lr"])
            if p["ip"] is not None:
                ip, pred = p["ip"], p["pred"]
                row.update(ip_wl=float(ip["ip_wl"][k]), sq_w=float(ip["sq_w"][k]), sq_l=float(ip["sq_l"][k]),
                           cos_wl=float(ip["cos_wl"][k]), pred_dw=float(pred["dlogp_w"][k]),
                           pred_dl=float(pred["dlogp_l"][k]), thr_w=float(pred["thr_w"][k]),
                           thr_l=float(pred["thr_l"][k]), case_pred=int(pred["case"][k]))
            if changes:
                row.update({k2: float(v[k]) for k2, v in changes.items()}, case_obs=int(obs[k]))
            rows.append(row)
        return rows


def probe_summary(rows: list[dict]) -> dict[str, float]:
    """Scalar summaries for loggers of one recorded step's ``records`` rows (`Recorder.after_update`):
    means over the probe pairs (``dyn/cos_wl``, ``dyn/logp_w``, ...; ``dyn/contrib_*`` with ``cross``)."""
    df = pd.DataFrame(rows)
    out = {"dyn/cos_wl": float(df.cos_wl.mean()), "dyn/logp_w": float(df.logp_w.mean()),
           "dyn/logp_l": float(df.logp_l.mean()), "dyn/act_dw": float(df.act_dw.mean()),
           "dyn/act_dl": float(df.act_dl.mean()), "dyn/upd_dw": float(df.upd_dw.mean()),
           "dyn/frac_case2": float((df.case_obs == 2).mean())}
    if "contrib_sum_w" in df:
        out.update({"dyn/contrib_sum_w": float(df.contrib_sum_w.mean()),
                    "dyn/contrib_resid_w": float(df.contrib_resid_w.mean())})
    return out


def in_run_summary(rows: list[dict]) -> dict[str, float]:
    """Scalar summaries for loggers of one step's ``train_records`` rows (`InRunRecorder.end_step`):
    means over its pairs, NaN entries skipped."""
    df = pd.DataFrame(rows)
    return {"inrun/cos_wl": float(df.cos_wl.mean()), "inrun/margin": float(df.margin.mean()),
            "inrun/pred_dw": float(df.pred_dw.mean()), "inrun/pred_dl": float(df.pred_dl.mean()),
            "inrun/frac_case2": float((df.case_pred == 2).mean()),
            "inrun/frac_missing": float(df.missing_reason.notna().mean())}


TRAIN_RECORD_COLUMNS = ["step", "micro", "pair_id", "loss", "lr", "loss_value", "logp_w", "logp_l", "logp_w_norm",
                        "logp_l_norm", "ref_w", "ref_l", "len_w", "len_l", "margin", "reward_acc", "d_w", "d_l",
                        "c_w", "c_l", "ip_wl", "sq_w", "sq_l", "cos_wl", "pred_dw", "pred_dl", "thr_w", "thr_l",
                        "case_pred", "missing_reason"]
"""Columns of ``train_records.parquet`` (`InRunRecorder`); ``in_run_update`` appends ``upd_dw, upd_dl``."""


class InRunRecorder:
    """Diagnostics of the pairs actually trained on, at every optimizer step, from the training
    backward (`dynamics.core.inrun`): one row per step × training pair in ``train_records.parquet``.

    Per micro-batch (the trainer's loop; chosen rows 0..B-1 and rejected B..2B-1 of the forward)::

        with inrun.micro_batch() as cap:
            out = pair_logprobs(model, sub)
            lw, ll = out.chosen.logp, out.rejected.logp
            cap.watch(lw, ll)
            loss = compute_loss(...).loss.sum() / B_opt
            loss.backward()
        inrun.add(step, sub.pair_ids, lw=lw, ll=ll, len_w=..., len_l=..., ref_w=..., ref_l=..., lr=lr)

    and `end_step` after the optimizer step. Rows are buffered and appended every ``flush_every``
    steps and by `flush` (the trainer flushes before writing a checkpoint, so the rows of every
    step up to a checkpoint are on disk before it exists, and in a ``finally`` at the end): the
    table is rewritten whole on every append, which at every step would grow quadratically with
    the run. Rows of steps after the last flush are lost with a crash; resuming from the
    checkpoint redoes them. The rows hold the state at θ_s as the training forward
    saw it (train mode): ``logp_w, logp_l`` (+ ``_norm``), ``ref_w, ref_l``, ``margin``,
    ``loss_value``, ``d_w, d_l`` of the run's loss; the captured scales ``c_w = ∂L/∂lw``,
    ``c_l = ∂L/∂ll`` of the step's loss L (``−d_w/B_opt``, ``+d_l/B_opt`` for a batch-mean loss);
    ``ip_wl, sq_w, sq_l, cos_wl``; the SGD-form prediction of this pair stepped alone with the
    step's η (`dynamics.core.inrun.predict_with_missing`: ``pred_dw, pred_dl, thr_w, thr_l,
    case_pred``, −1 when unavailable); ``missing_reason`` (None, or why an entry is NaN: a zero
    coefficient, e.g. an inactive hinge); ``micro``: the micro-batch index within the step.

    ``cfg.in_run_update``: also ``upd_dw = ⟨g_w(θ_s), Δθ⟩``, ``upd_dl`` for the real update
    Δθ = θ_{s+1} − θ_s of the step (any optimizer, the whole batch): call `begin_step` before the
    first micro-batch (it snapshots θ_s: one copy of the trainable parameters) and pass ``pairs``
    to `add`. With ``cfg.in_run_update_from="jvp"`` `end_step` puts θ_s back into the model for one
    forward-mode jvp over the step's 2B sequences (`dynamics.core.conditions.update_prediction`,
    eval mode, ≈ 3 forward passes; the gradient at θ_s, as the backward's) and restores θ_{s+1}
    bit for bit. With ``"factors"`` the capture keeps every micro-batch's factors (`KeptUses`) and
    `end_step` contracts them with Δθ (≈ one forward of matrix products, ⟨G_i, ΔW⟩ for a book-kept
    layer; the gradient of the training backward itself, train mode); a pair whose backward
    carried no gradient to a response (c = 0) gets the jvp for its micro-batch instead.
    """

    TABLE = "train_records"

    def __init__(self, model, run: RunDir, cfg: RecorderConfig, *, loss: str = "dpo", loss_params: dict | None = None,
                 flush_every: int = 20):
        if isinstance(flush_every, bool) or not isinstance(flush_every, int) or flush_every < 1:
            raise ValueError(f"flush_every must be an integer >= 1, got {flush_every!r}")
        self.run, self.cfg, self.flush_every = run, cfg, flush_every
        self.loss, self.loss_params = loss, resolve_hyper(loss, loss_params)
        self.capture = InRunCapture(model, cfg.params, bookkeeping=cfg.in_run_bookkeeping,
                                    keep_uses=cfg.in_run_update and cfg.in_run_update_from == "factors")
        self.model = model
        self._rows: list[dict] = []       # rows of the step being recorded
        self._seqs: list = []             # (pairs, pad_id) of the step's micro-batches (in_run_update)
        self._kept: list = []             # the micro-batches' `KeptUses` (in_run_update from factors)
        self._snapshot: dict | None = None
        self._buffer: list[dict] = []     # rows of finished steps not yet on disk
        self._steps_buffered = 0

    def micro_batch(self):
        """Context manager around one micro-batch's forward and backward (yields the capture,
        whose ``watch(lw, ll)`` must be called before the backward)."""
        return self.capture.capture()

    def begin_step(self) -> None:
        """Snapshot θ_s (``in_run_update`` only; a no-op otherwise). Call before the step's first micro-batch."""
        if self.cfg.in_run_update:
            self._snapshot = conditions.snapshot_params(self.model, self.capture.params)

    def add(self, step: int, pair_ids, *, lw, ll, len_w, len_l, ref_w, ref_l, lr: float, micro: int = 0,
            lw_norm=None, ll_norm=None, pairs: TokenizedPairs | None = None, b_opt: float | None = None) -> None:
        """Rows of the micro-batch just captured; ``lw, ll, len_w, len_l, ref_w, ref_l``: (B,) in pair
        order; ``pairs``: the micro-batch's pairs (needed by ``in_run_update``). ``b_opt``: when
        given, ``d_w = −c_w·b_opt, d_l = c_l·b_opt`` from the captured scales (the coefficients the
        trainer's own loss applied, L = Σ_k ℓ_k / b_opt) instead of those of the run's ``loss``."""
        if self.cfg.in_run_update:
            if pairs is None or self._snapshot is None:
                raise RuntimeError("in_run_update: call begin_step() before the step and pass add(..., pairs=)")
            self._seqs.append(pairs)
        prod = self.capture.result()
        if self.capture.keep_uses:
            self._kept.append(self.capture.kept())
        as64 = lambda t: torch.as_tensor(t).detach().double().cpu()
        lw, ll, nw, nl, rw, rl = (as64(t) for t in (lw, ll, len_w, len_l, ref_w, ref_l))
        lo = compute_loss(self.loss, lw, ll, rw, rl, nw, nl, **self.loss_params)
        d_w, d_l = (lo.d_w, lo.d_l) if b_opt is None else (-prod.c_w * b_opt, prod.c_l * b_opt)
        pred = predict_with_missing(d_w, d_l, prod.ip_wl, prod.sq_w, prod.sq_l, lr=lr)
        lw_norm = lw / nw if lw_norm is None else as64(lw_norm)
        ll_norm = ll / nl if ll_norm is None else as64(ll_norm)
        margin = (lw - rw) - (ll - rl)
        for k, pid in enumerate(pair_ids):
            self._rows.append(dict(
                step=step, micro=micro, pair_id=str(pid), loss=self.loss, lr=float(lr), loss_value=float(lo.loss[k]),
                logp_w=float(lw[k]), logp_l=float(ll[k]), logp_w_norm=float(lw_norm[k]), logp_l_norm=float(ll_norm[k]),
                ref_w=float(rw[k]), ref_l=float(rl[k]), len_w=int(nw[k]), len_l=int(nl[k]), margin=float(margin[k]),
                reward_acc=bool(margin[k] > 0), d_w=float(d_w[k]), d_l=float(d_l[k]),
                c_w=float(prod.c_w[k]), c_l=float(prod.c_l[k]), ip_wl=float(prod.ip_wl[k]), sq_w=float(prod.sq_w[k]),
                sq_l=float(prod.sq_l[k]), cos_wl=float(prod.cos_wl[k]), pred_dw=float(pred["dlogp_w"][k]),
                pred_dl=float(pred["dlogp_l"][k]), thr_w=float(pred["thr_w"][k]), thr_l=float(pred["thr_l"][k]),
                case_pred=int(pred["case"][k]), missing_reason=prod.missing[k]))

    def end_step(self) -> dict[str, float]:
        """Close the step whose micro-batches were added (call after the optimizer step); appends
        to the table every ``flush_every`` steps. Returns scalar summaries of the step for loggers
        (means over its pairs, NaN entries skipped)."""
        rows, self._rows = self._rows, []
        if self._snapshot is not None:
            self._update_effects(rows)
        if not rows:
            return {}
        self._buffer += rows
        self._steps_buffered += 1
        if self._steps_buffered >= self.flush_every:
            self.flush()
        return in_run_summary(rows)

    def _update_effects(self, rows: list[dict]) -> None:
        """``upd_dw, upd_dl`` of the step's rows, ⟨g(θ_s), Δθ⟩: from the kept factors of each
        micro-batch (``in_run_update_from="factors"``), and by one jvp at θ_s (θ_{s+1} restored after)
        for the micro-batches without factors or with a pair the factors cannot give (c = 0)."""
        before, self._snapshot = self._snapshot, None
        seqs, self._seqs = self._seqs, []
        kept, self._kept = self._kept, []
        delta = conditions.param_delta(self.model, before)
        params = self.capture.params
        by_id = {id(p): delta[n] for n, p in params.items()}
        upd = [torch.stack(k.dots(by_id)) for k in kept] if kept else [None] * len(seqs)     # (2, B) each
        todo = [i for i, u in enumerate(upd) if u is None or bool(u.isnan().any())]
        if todo:
            after = {n: p.detach().clone() for n, p in params.items()}
            try:
                with torch.no_grad():
                    for n, p in params.items():
                        p.copy_(before[n])
                for i in todo:  # micro-batch by micro-batch, in the order of the rows
                    tp = seqs[i]
                    d = conditions.update_prediction(self.model, tp.chosen + tp.rejected, tp.pad_id, delta, params)
                    d = d.double().cpu().reshape(2, len(tp))
                    upd[i] = d if upd[i] is None else torch.where(upd[i].isnan(), d, upd[i])
            finally:
                with torch.no_grad():
                    for n, p in params.items():
                        p.copy_(after[n])
        upd = torch.cat(upd, dim=1) if upd else torch.zeros(2, 0)
        for k, row in enumerate(rows):
            row.update(upd_dw=float(upd[0, k]), upd_dl=float(upd[1, k]))

    def flush(self) -> None:
        """Append the rows of the finished steps to ``train_records.parquet`` (atomic rewrite)."""
        if self._buffer:
            self.run.append(self.TABLE, self._buffer)
        self._buffer, self._steps_buffered = [], 0
