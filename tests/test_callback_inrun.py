"""In-run rows of `DynamicsCallback` under TRL's DPOTrainer (``RecorderConfig(in_run=True)``, LoRA).

A tiny float64 Llama with LoRA adapters trains 2 optimizer steps with gradient accumulation 1 and
2; every row of ``train_records.parquet`` is checked against independent computations at θ_s
(adapters snapshotted at every step begin):

- ``ip_wl, sq_w, sq_l`` against per-sequence autograd gradients (`flat_grads`, the ordinary
  float64 forward) of the pair as TRL tokenized it, looked up by its ``pair_id`` fingerprint;
- ``c_w, c_l`` against the gradient of TRL's own ``DPOTrainer._compute_loss`` (divided by the
  accumulation steps, as transformers' Trainer does) w.r.t. the recorded summed log-probs;
  ``d = ∓c·B·GA``;
- ``ref_w, ref_l`` (precomputed by TRL, or read from the reference forward) against the base
  model; ``upd_dw, upd_dl`` (``in_run_update``) against G(θ_s)·(θ_{s+1} − θ_s).

Tolerances. TRL's fused LM head computes the log-softmax and its backward in float32 whatever the
model dtype, so the output gradient the in-run engine contracts is c·(onehot − p) with p =
exp(z − lse) formed in float32; with the float64 backbone (fixture ``float64_exact``) that is the
only rounding between the rows and the float64 oracle. The log-sum-exp over V logits has
magnitude ≈ log V and a float32 error of a few eps32·log V, which shifts every p of a position by
the same relative amount, so g is perturbed by ≲ 4·eps32·log V relative and a squared norm by
twice that: TOL32 = 8·eps32·log V = 5.7e-6 for the tiny vocabulary (measured: 4.6e-7 for
sq_w/sq_l, 2.3e-7 for ip_wl against √(sq_w·sq_l), 1.1e-7 for the log-probs). ``c_w, c_l`` are
TRL's float32 loss gradient recomputed by TRL's own code from the same float32 inputs: equal bit
for bit in practice, asserted to 4·eps32. Quantities that are float64 on both sides (``upd`` by the
jvp: a float64 forward of our own against float64 gradients; d = −c·b_opt) use 1e-10 or 1e-15;
``upd`` from the kept factors is read off TRL's backward, so it carries the fused head's float32
rounding: TOL32, relative to its largest value (measured 5.8e-8).
"""
import math
import copy
import warnings
from collections import defaultdict
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("peft")

from datasets import Dataset  # noqa: E402
from peft import LoraConfig  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from dynamics.core.grads import flat_grads, resolve_params  # noqa: E402
from dynamics.core.inrun import NONCONSTANT_REASON, InRunCapture, predict_with_missing  # noqa: E402
from dynamics.core.logprobs import pair_fingerprints, sequence_logprobs, tokenize_pairs  # noqa: E402
from dynamics.core.losses import compute_loss  # noqa: E402
from dynamics.errors import InputError  # noqa: E402
from dynamics.inputs.models import tiny_model, tiny_tokenizer  # noqa: E402
from dynamics.runs.callbacks import DynamicsCallback  # noqa: E402
from dynamics.runs.recorder import TRAIN_RECORD_COLUMNS, RecorderConfig  # noqa: E402
from dynamics.runs.rundir import read_table  # noqa: E402

pytestmark = pytest.mark.usefixtures("float64_exact", "one_thread")

EPS32 = torch.finfo(torch.float32).eps
TOL32 = 8 * EPS32 * math.log(len(tiny_tokenizer()))     # float32 fused head (module docstring)
TOL64 = 1e-10
BETA = 0.1
# unequal prompt and response lengths: right padding inside every batch
PAIRS = [SimpleNamespace(id=str(i), prompt=p, chosen=c, rejected=r) for i, (p, c, r) in enumerate([
    ("The movie was", " wonderful and I loved every minute.", " bad"),
    ("I hate", " waiting", " waiting in long lines at the bank on mondays"),
    ("TL;DR: my friend ignores me", " and I feel bad about it", " so what"),
    ("Happy mothers day", " mum, what a lovely morning", " whatever"),
])]
PROBE = [SimpleNamespace(id="p", prompt="The food was", chosen=" good", rejected=" cold")]
LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0)


class Snapshots(TrainerCallback):
    """θ_s of the trainable parameters at every step begin, and the final θ."""

    def __init__(self):
        self.theta = []

    def _take(self, model):
        self.theta.append({n: p.detach().clone() for n, p in resolve_params(model, "trainable").items()})

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self._take(model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._take(model)


def make_trainer(path, *, ga=1, peft=True, in_run=True, update=False, attach=True, loss_params=None, bookkeeping=False,
                 update_from="jvp", **config):
    tok, model = tiny_tokenizer(), tiny_model("llama", seed=0, dtype=torch.float64)
    ds = Dataset.from_dict({k: [getattr(p, k) for p in PAIRS] for k in ("prompt", "chosen", "rejected")})
    args = DPOConfig(output_dir=str(path / "trl"), per_device_train_batch_size=2, gradient_accumulation_steps=ga,
                     max_steps=2, learning_rate=1e-2, beta=BETA, logging_steps=1, report_to=[], use_cpu=True,
                     save_strategy="no", bf16=False, fp16=False, seed=0, disable_tqdm=True,
                     **{"activation_checkpointing": False, **config})
    snaps = Snapshots()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=[snaps],
                        peft_config=LoraConfig(**LORA) if peft else None,
                        ref_model=None if peft else copy.deepcopy(model))
    cb = DynamicsCallback(PROBE, path / "dyn", RecorderConfig(eval_every=1000, in_run=in_run, in_run_update=update,
                                                              in_run_update_from=update_from,
                                                              in_run_bookkeeping=bookkeeping, whatif=False,
                                                              token_pairs=0),
                          loss="dpo", loss_params=loss_params or {"beta": BETA})
    if attach:
        cb.attach(tr)
    else:
        tr.add_callback(cb)
    return tr, cb, snaps, tok


def train(tr):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr.train()


def load(model, theta):
    with torch.no_grad():
        for n, p in resolve_params(model, "trainable").items():
            p.copy_(theta[n])


def rel_err(a, b, scale=None):
    def t(x):
        return torch.as_tensor(x.to_numpy().copy() if isinstance(x, pd.Series) else x, dtype=torch.float64)
    a, b = t(a), t(b)
    scale = b.abs() if scale is None else t(scale)
    return ((a - b).abs() / scale).max().item()


def trl_scales(tr, rows, ga):
    """∂(L/GA)/∂(chosen, rejected summed log-probs) of one micro-batch, L = TRL's own
    ``DPOTrainer._compute_loss`` on the recorded float32 sums (one position per sequence holds the
    whole sum, so TRL's float32 sum over positions reproduces it exactly)."""
    B = len(rows)
    f32 = lambda c: torch.tensor(rows[c].to_numpy().copy(), dtype=torch.float32)  # noqa: E731
    per_token = torch.cat([f32("logp_w"), f32("logp_l")])[:, None].requires_grad_(True)       # (2B, 1)
    ids = torch.ones(2 * B, 2, dtype=torch.long)
    mask = torch.tensor([[0, 1]] * (2 * B))
    ident = lambda x: x  # noqa: E731
    fake = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=SimpleNamespace(device=torch.device("cpu"),
                                                                          gather_for_metrics=ident, gather=ident),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True, f_divergence_type=tr.f_divergence_type,
        f_alpha_divergence_coef=tr.f_alpha_divergence_coef, loss_types=tr.loss_types, loss_weights=tr.loss_weights,
        beta=tr.beta, label_smoothing=tr.label_smoothing, use_weighting=tr.use_weighting, args=tr.args,
        _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1)
    z = torch.zeros_like(per_token)
    model = lambda **kw: SimpleNamespace(log_probs=per_token, entropy=z, mean_logits=z,  # noqa: E731
                                         is_top1=torch.zeros_like(per_token, dtype=torch.bool))
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), completion_mask=mask,
                  ref_chosen_logps=f32("ref_w"), ref_rejected_logps=f32("ref_l"))
    (DPOTrainer._compute_loss(fake, model, inputs, False) / ga).backward()
    g = per_token.grad[:, 0].double()
    return g[:B], g[B:]


# ------------------------------------------------------------------ the rows against independent computations

@pytest.mark.parametrize("ga,bookkeeping,peft,update_from", [(1, False, True, None), (2, False, True, "jvp"),
                                                             (2, True, True, "factors"), (2, False, False, "factors"),
                                                             (1, True, False, None)])
def test_rows_match_autograd_and_trl_loss(tmp_path, ga, bookkeeping, peft, update_from):
    """GA=1: TRL precomputes the reference log-probs; GA=2: the reference forward (PEFT's disabled
    adapter, or the ref_model) inside each micro-batch is read, and ``in_run_update`` adds upd_dw,
    upd_dl (by the jvp, or from the kept factors: the book-kept LoRA layers' per-sequence gradients,
    the fused head's rebuilt use); also with book-keeping (the layers' gradients formed per
    sequence, the trained ``.grad`` their sum). LoRA, and full fine-tuning: every parameter, the
    tied embedding / lm_head whose head use TRL's fused head makes outside the module included."""
    tr, cb, snaps, tok = make_trainer(tmp_path, ga=ga, update=ga == 2, precompute_ref_log_probs=ga == 1,
                                      bookkeeping=bookkeeping, peft=peft, update_from=update_from or "jvp")
    train(tr)
    assert bool(cb.inrun.capture.bookkept) == bookkeeping          # LoRA: every lora_A / lora_B when on
    assert not peft or len(resolve_params(tr.model, "trainable")) < len(dict(tr.model.named_parameters()))
    df = read_table(tmp_path / "dyn", "train_records")
    assert list(df.columns) == TRAIN_RECORD_COLUMNS + (["upd_dw", "upd_dl"] if ga == 2 else [])
    B = 2
    assert len(df) == 2 * B * ga and sorted(df.step.unique()) == [0, 1]
    assert sorted(df.micro.unique()) == list(range(ga)) and (df.groupby(["step", "micro"]).size() == B).all()
    assert df.missing_reason.isna().all() and df.notna().drop(columns="missing_reason").all().all()
    assert len(snaps.theta) == 3

    # pair ids: the fingerprint of the pair as TRL tokenized it (= ours with EOS appended)
    tp = tokenize_pairs(tok, PAIRS, append_eos=True)
    for i, row in enumerate(tr.train_dataset):
        w, l = tp.chosen[i], tp.rejected[i]
        assert list(w.prompt_ids) == row["prompt_ids"] and list(w.response_ids) == row["chosen_ids"]
        assert list(l.response_ids) == row["rejected_ids"]
    index = {f: i for i, f in enumerate(pair_fingerprints(tp))}
    assert set(df.pair_id) == set(index)                        # 4 pairs: GA=1 one epoch, GA=2 one per step
    if ga == 2:
        assert all(set(g.pair_id) == set(index) for _, g in df.groupby("step"))

    model = tr.model
    for s, rows in df.groupby("step"):
        k = [index[p] for p in rows.pair_id]
        seqs = [tp.chosen[i] for i in k] + [tp.rejected[i] for i in k]
        n = len(k)
        load(model, snaps.theta[s])
        G = flat_grads(model, seqs, tp.pad_id, "trainable")                           # (2n, P) at θ_s
        gw, gl = G[:n], G[n:]
        sq_w, sq_l, ip = (gw * gw).sum(1), (gl * gl).sum(1), (gw * gl).sum(1)
        assert rel_err(rows.sq_w, sq_w) < TOL32 and rel_err(rows.sq_l, sq_l) < TOL32
        assert rel_err(rows.ip_wl, ip, (sq_w * sq_l).sqrt()) < TOL32
        assert rel_err(rows.cos_wl, ip / (sq_w * sq_l).sqrt(), 1.0) < TOL32
        # the state the training forward saw: log-probs, lengths; the reference = the base model
        logp = sequence_logprobs(model, seqs, tp.pad_id)
        assert rel_err(rows.logp_w, logp.logp[:n]) < TOL32 and rel_err(rows.logp_l, logp.logp[n:]) < TOL32
        assert rows.len_w.tolist() == [len(tp.chosen[i].response_ids) for i in k]
        assert rows.len_l.tolist() == [len(tp.rejected[i].response_ids) for i in k]
        if peft:
            with model.disable_adapter():
                ref = sequence_logprobs(model, seqs, tp.pad_id).logp
        else:
            ref = sequence_logprobs(tr.ref_model, seqs, tp.pad_id).logp
        assert rel_err(rows.ref_w, ref[:n]) < TOL32 and rel_err(rows.ref_l, ref[n:]) < TOL32
        if ga == 2:   # ⟨g(θ_s), θ_{s+1} − θ_s⟩, both float64
            names = list(resolve_params(model, "trainable"))
            delta = torch.cat([(snaps.theta[s + 1][m] - snaps.theta[s][m]).reshape(-1) for m in names])
            tol = TOL64 if update_from == "jvp" else TOL32
            assert rel_err(rows.upd_dw, gw @ delta, (gw @ delta).abs().max()) < tol
            assert rel_err(rows.upd_dl, gl @ delta, (gl @ delta).abs().max()) < tol
    load(model, snaps.theta[-1])

    for _, rows in df.groupby(["step", "micro"]):
        # c = ∂L/∂logp of the loss TRL backpropagated (its own _compute_loss, divided by GA)
        cw, cl = trl_scales(tr, rows, ga)
        assert rel_err(rows.c_w, cw) <= 4 * EPS32 and rel_err(rows.c_l, cl) <= 4 * EPS32
        # d = −c·b_opt, b_opt = B_micro × GA; equal to the zoo's DPO d at the recorded state
        b_opt = len(rows) * ga
        assert rel_err(rows.d_w, -rows.c_w * b_opt) < 1e-15 and rel_err(rows.d_l, rows.c_l * b_opt) < 1e-15
        t = lambda c: torch.tensor(rows[c].to_numpy())  # noqa: E731
        lo = compute_loss("dpo", t("logp_w"), t("logp_l"), t("ref_w"), t("ref_l"), beta=BETA)
        assert rel_err(rows.d_w, lo.d_w) < TOL32 and rel_err(rows.d_l, lo.d_l) < TOL32
        lr = float(rows.lr.iloc[0])
        pred = predict_with_missing(t("d_w"), t("d_l"), t("ip_wl"), t("sq_w"), t("sq_l"), lr=lr)
        assert torch.allclose(t("pred_dw"), pred["dlogp_w"], rtol=1e-12, atol=0)
        assert t("case_pred").tolist() == pred["case"].tolist()
    assert df.lr.tolist() == sorted(df.lr, reverse=True) and df.lr.iloc[0] == pytest.approx(1e-2)
    logged = [h for h in tr.state.log_history if "inrun/cos_wl" in h]
    assert len(logged) == 2


def test_training_unchanged_bit_for_bit(tmp_path):
    """The in-run capture (and in_run_update's jvp at θ_s) leaves the training exactly as without it."""
    finals = []
    for on in (True, False):
        tr, cb, snaps, _ = make_trainer(tmp_path / str(on), ga=2, in_run=on, update=on)
        train(tr)
        finals.append(snaps.theta[-1])
        assert (tmp_path / str(on) / "dyn" / "train_records.parquet").exists() == on
    assert finals[0].keys() == finals[1].keys()
    for n in finals[0]:
        assert torch.equal(finals[0][n], finals[1][n]), n
    assert any((p != 0).any() for p in finals[0].values())


def test_mismatched_loss_warns_once(tmp_path):
    """The rows' d are TRL's (from the backward); a callback loss that differs is said, once."""
    tr, cb, _, _ = make_trainer(tmp_path, loss_params={"beta": 0.5})
    with pytest.warns(UserWarning, match="does not match the loss TRL trains with") as rec:
        tr.train()
    assert sum("does not match" in str(w.message) for w in rec) == 1
    df = read_table(tmp_path / "dyn", "train_records")
    assert rel_err(df.d_w[df.step == 0], BETA / 2) < TOL32      # TRL's β = 0.1 at margin 0, not 0.5


# ------------------------------------------------------------------ refusals, before any step

@pytest.mark.parametrize("case,match", [
    ("scaled_logits", "scales or soft-caps"),
    ("ld_alpha", "ld_alpha"),
    ("checkpointing", "gradient \\(activation\\) checkpointing"),
    ("not_attached", "attach"),
])
def test_refused_at_train_begin(tmp_path, case, match):
    kw = dict(scaled_logits=dict(peft=False), ld_alpha=dict(ld_alpha=0.5),
              checkpointing=dict(activation_checkpointing=True), not_attached=dict(attach=False))[case]
    tr, cb, snaps, _ = make_trainer(tmp_path, **kw)
    if case == "scaled_logits":       # full fine-tuning of a model whose fused head scales the logits
        tr.model.config.logit_scale = 2.0
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    with pytest.raises(InputError, match=match):
        train(tr)
    assert tr.state.global_step == 0 and snaps.theta == []
    assert all(torch.equal(p, before[n]) for n, p in tr.model.named_parameters())
    assert not (tmp_path / "dyn" / "train_records.parquet").exists()
    assert not (tmp_path / "dyn" / "config.json").exists()


# ------------------------------------------------------------------ watch_tokens

def test_watch_tokens_reads_scales_and_flags_token_weights():
    """A per-token log-prob tensor summed per row gives the scales of `watch`; a row whose tokens
    are weighted (as TRL's ld_alpha) is missing with a reason, the other pairs unchanged."""
    from peft import get_peft_model
    from trl.trainer.utils import add_fused_lm_head

    tok = tiny_tokenizer()
    base = tiny_model("llama", seed=0, dtype=torch.float64)
    add_fused_lm_head(base)
    model = get_peft_model(base, LoraConfig(**LORA, init_lora_weights=False))
    tp = tokenize_pairs(tok, PAIRS[:3], append_eos=True)
    seqs = tp.chosen + tp.rejected
    T = max(s.length for s in seqs)
    ids = torch.full((len(seqs), T), tp.pad_id)
    labels = torch.full((len(seqs), T), -100)
    for i, s in enumerate(seqs):
        full = torch.tensor(s.prompt_ids + s.response_ids)
        ids[i, :len(full)] = full
        labels[i, len(s.prompt_ids):len(full)] = full[len(s.prompt_ids):]
    att = (torch.arange(T)[None] < torch.tensor([s.length for s in seqs])[:, None]).long()

    def run(weight_row=None):
        cap = InRunCapture(model, "trainable")
        model.train()
        with cap.capture():
            out = model(input_ids=ids, attention_mask=att, labels=labels, fused_lm_head=True)
            cap.watch_tokens(out.log_probs, out.label_mask)
            w = torch.ones_like(out.log_probs)
            if weight_row is not None:                                      # weight its last response token
                w[weight_row, out.label_mask[weight_row].nonzero()[-1]] = 0.5
            logp = (out.log_probs * w).sum(1)
            lo = compute_loss("dpo", logp[:3], logp[3:], logp[:3].detach() + 1, logp[3:].detach(), beta=1.0)
            (lo.loss.sum() / 3).backward()
        model.eval()
        model.zero_grad()
        return cap.result(), lo

    prod, lo = run()
    assert prod.missing == [None] * 3
    assert rel_err(prod.c_w, -lo.d_w / 3) < 1e-15 and rel_err(prod.c_l, lo.d_l / 3) < 1e-15
    G = flat_grads(model, seqs, tp.pad_id, "trainable")
    gw, gl = G[:3], G[3:]
    assert rel_err(prod.sq_w, (gw * gw).sum(1)) < TOL32
    assert rel_err(prod.ip_wl, (gw * gl).sum(1), ((gw * gw).sum(1) * (gl * gl).sum(1)).sqrt()) < TOL32
    bad, _ = run(weight_row=4)                                               # the rejected response of pair 1
    assert bad.missing == [None, NONCONSTANT_REASON, None]
    assert bad.ip_wl[1].isnan() and bad.sq_l[1].isnan() and bad.sq_w[1].isfinite()
    keep = [0, 2]
    assert rel_err(bad.ip_wl[keep], prod.ip_wl[keep], prod.sq_w[keep]) < 1e-12


def test_cross_refused_at_construction(tmp_path):
    """The probe × training-pair split needs the step's training pairs and the optimizer, which a
    callback is not handed: refused when the callback is built, before any training."""
    with pytest.raises(InputError, match="dynamics train --cross"):
        DynamicsCallback(PAIRS[:2], tmp_path / "dyn", RecorderConfig(cross=True))
    assert not (tmp_path / "dyn" / "config.json").exists()
