"""In-run diagnostics (`dynamics.core.inrun`, `InRunRecorder`, ``TrainConfig(in_run=True)``):
⟨g_w,g_l⟩, ‖g_w‖², ‖g_l‖² of the training pairs read off the training backward, against an
independent oracle — per-sequence gradients by an autograd loop (`flat_grads`) on the same
sequences — to 1e-10 (float64; fixture `float64_exact`), on the three tiny layouts, with padding
of unequal lengths, both contraction forms, tied weights, LoRA, gradient accumulation and
inactive hinges; the training itself unchanged; mixed precision to its rounding; refusals."""
import copy

import pytest
import torch

from dynamics.core import conditions
from dynamics.core.grads import flat_grads
from dynamics.core.inrun import CONTRACTIONS, MISSING_REASONS, InRunCapture, predict_with_missing
from dynamics.core.logprobs import pair_logprobs, tokenize_pairs
from dynamics.core.losses import compute_loss
from dynamics.errors import InputError
from dynamics.inputs.models import TINY_ARCHS, tiny_model, tiny_tokenizer
from dynamics.runs.recorder import TRAIN_RECORD_COLUMNS
from dynamics.runs.rundir import read_table
from dynamics.runs.train import TrainConfig, split_config_pairs, train, train_command
from toys import uneven_pairs

pytestmark = pytest.mark.usefixtures("float64_exact", "one_thread")

TOL = 1e-10
# unequal prompt and response lengths: right padding inside every batch
PAIRS = uneven_pairs(3, id_prefix="")


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def pairs(tok):
    return tokenize_pairs(tok, PAIRS)


def oracle(model, tp, params="trainable"):
    """(ip_wl, sq_w, sq_l) from one autograd gradient per unpadded sequence."""
    B = len(tp)
    G = flat_grads(model, tp.chosen + tp.rejected, tp.pad_id, params)          # (2B, P)
    gw, gl = G[:B], G[B:]
    return (gw * gl).sum(1), (gw * gw).sum(1), (gl * gl).sum(1)


def assert_rel(a, b, tol=TOL):
    err, scale = (a - b).abs().max().item(), b.abs().max().item()
    assert scale > 0 and err <= tol * scale, f"max err {err:.3e} vs scale {scale:.3e}"


def step_products(model, tp, *, params="trainable", loss="dpo", loss_params=None, batch=None, contraction="auto",
                  refs=None, bookkeeping=False, keep=None):
    """One training forward/backward of ``tp`` (train mode) under a capture: (PairProducts, LossOutput);
    ``keep``: a list that receives the capture's `KeptUses` (the capture keeps its uses)."""
    B = len(tp)
    model.train()
    cap = InRunCapture(model, params, contraction=contraction, bookkeeping=bookkeeping, keep_uses=keep is not None)
    with cap.capture():
        out = pair_logprobs(model, tp)
        lw, ll = out.chosen.logp, out.rejected.logp
        cap.watch(lw, ll)
        g = torch.Generator().manual_seed(1)
        rw, rl = refs if refs is not None else (lw.detach() + torch.randn(B, generator=g, dtype=lw.dtype),
                                                ll.detach() + torch.randn(B, generator=g, dtype=lw.dtype))
        lo = compute_loss(loss, lw, ll, rw, rl, out.chosen.lengths.to(lw.dtype), out.rejected.lengths.to(lw.dtype),
                          **(loss_params or {}))
        (lo.loss.sum() / (batch or B)).backward()
    model.eval()
    prod = cap.result()
    if keep is not None:
        keep.append(cap.kept())
    return prod, lo


def update_oracle(model, tp, delta, params="trainable"):
    """(⟨g_w, Δ⟩, ⟨g_l, Δ⟩) (B,) from one autograd gradient per unpadded sequence; ``delta``
    {name: Δ} over the selected parameters (in `flat_grads`' order)."""
    from dynamics.core.grads import select_params
    B = len(tp)
    G = flat_grads(model, tp.chosen + tp.rejected, tp.pad_id, params)
    d = torch.cat([delta[n].reshape(-1) for n in select_params(model, params)])
    return G[:B] @ d, G[B:] @ d


# ------------------------------------------------------------------ the identity, against the oracle

@pytest.mark.parametrize("contraction", [*CONTRACTIONS, "bookkeeping"])
@pytest.mark.parametrize("n_pairs", [1, 3])
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_pair_products_match_autograd(arch, n_pairs, contraction, pairs):
    model = tiny_model(arch, seed=0, dtype=torch.float64)
    tp = pairs.subset(range(n_pairs))
    mode = dict(bookkeeping=True, contraction="materialize") if contraction == "bookkeeping" else dict(contraction=contraction)
    prod, lo = step_products(model, tp, loss_params={"beta": 1.0}, **mode)
    ip, sq_w, sq_l = oracle(model, tp)
    assert_rel(prod.ip_wl, ip)
    assert_rel(prod.sq_w, sq_w)
    assert_rel(prod.sq_l, sq_l)
    assert_rel(prod.cos_wl, ip / (sq_w * sq_l).sqrt())
    # the captured scales are ∂L/∂log π of the batch-mean loss
    assert_rel(prod.c_w, -lo.d_w / n_pairs)
    assert_rel(prod.c_l, lo.d_l / n_pairs)
    assert prod.missing == [None] * n_pairs


@pytest.mark.parametrize("contraction", [*CONTRACTIONS, "bookkeeping"])
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_kept_uses_give_the_update_effect(arch, contraction, pairs):
    """``keep_uses``: every use the backward delivered (linear factors, embedding ids, norm weights,
    the tied head, a book-kept layer's per-sequence gradients), contracted with an update Δ after
    the backward, gives ⟨g_i, Δ⟩ of each pair's responses (in_run_update from factors)."""
    model = tiny_model(arch, seed=0, dtype=torch.float64)
    mode = dict(bookkeeping=True, contraction="materialize") if contraction == "bookkeeping" else dict(contraction=contraction)
    kept = []
    step_products(model, pairs, loss_params={"beta": 1.0}, keep=kept, **mode)
    g = torch.Generator().manual_seed(3)
    delta = {n: torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in model.named_parameters()}
    by_id = {id(p): delta[n] for n, p in model.named_parameters()}
    upd_w, upd_l = kept[0].dots(by_id)
    want_w, want_l = update_oracle(model, pairs, delta)
    assert_rel(upd_w, want_w)
    assert_rel(upd_l, want_l)


def test_tied_embedding_uses_both(pairs):
    """Tiny Llama ties lm_head and embed_tokens: θ = that one matrix gets its embedding use, its
    head use and the cross terms between them (dropping any of the three breaks the match)."""
    model = tiny_model("llama", seed=0, dtype=torch.float64)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    prod, _ = step_products(model, pairs, params=["embed_tokens"])
    ip, sq_w, sq_l = oracle(model, pairs, ["embed_tokens"])
    assert_rel(prod.ip_wl, ip)
    assert_rel(prod.sq_w, sq_w)
    assert_rel(prod.sq_l, sq_l)


def linear_names(model) -> list[str]:
    """The plain ``nn.Linear`` modules of ``model`` (qualified names), its output layer excluded."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    return [n for n, m in base.named_modules() if type(m) is torch.nn.Linear and m is not head]


def grads_of(model) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def batch_backward(model, tp, capture=None):
    """The DPO loss of ``tp`` (β = 1, zero references) backpropagated, under ``capture`` if given."""
    model.train()
    with capture.capture() if capture is not None else torch.enable_grad():
        out = pair_logprobs(model, tp)
        lw, ll = out.chosen.logp, out.rejected.logp                             # (a property: a new tensor per read)
        if capture is not None:
            capture.watch(lw, ll)
        zero = torch.zeros(len(tp), dtype=lw.dtype)
        (compute_loss("dpo", lw, ll, zero, zero, beta=1.0).loss.sum() / len(tp)).backward()
    model.eval()


@pytest.mark.parametrize("arch", ["llama", "neox"])
def test_bookkeeping_trains_on_the_summed_per_sequence_gradients(arch, pairs):
    """Book-keeping: every plain linear layer but the head is run by `_PerSequenceLinear`, and the
    weight gradient it returns, Σ_i G_i, is the batch gradient of a backward without in_run up to
    the reordering of float64 sums (bound: 64 ulps of the largest entry; a dropped or doubled
    sequence is off by O(1)). The forward is untouched, and the layers are restored afterwards."""
    model = tiny_model(arch, seed=0, dtype=torch.float64)
    plain = copy.deepcopy(model)
    batch_backward(plain, pairs)
    cap = InRunCapture(model, bookkeeping=True, contraction="materialize")
    batch_backward(model, pairs, cap)
    assert cap.bookkept == linear_names(model) and len(cap.bookkept) >= 8        # 2 blocks × 4 or more
    assert not any("forward" in m.__dict__ for m in model.modules())
    g, ref = grads_of(model), grads_of(plain)
    assert g.keys() == ref.keys()
    for n in ref:
        tol = 64 * torch.finfo(torch.float64).eps * ref[n].abs().max()
        assert (g[n] - ref[n]).abs().max() <= tol, n
    ip, sq_w, sq_l = oracle(model, pairs)
    prod = cap.result()
    assert_rel(prod.ip_wl, ip)
    assert_rel(prod.sq_w, sq_w)
    assert_rel(prod.sq_l, sq_l)


def test_bookkeeping_only_where_the_per_sequence_form_is_cheaper(tok):
    """With contraction "auto" a layer is book-kept where the cost model materializes its entries:
    tiny Llama's layers (32 × 32 … 64 × 32) cross over at T ≈ 11–15, so 5-token sequences keep the
    ghost form beside autograd's product and 48-token ones book-keep every layer; exact either way."""
    from dynamics.tools.bench_instrument import synthetic_pairs

    model = tiny_model("llama", seed=0, dtype=torch.float64)
    for (prompt, n), want in (((3, 2), []), ((40, 8), linear_names(model))):
        tp = synthetic_pairs(tok, 2, prompt_len=prompt, len_w=n, len_l=n)
        cap = InRunCapture(model, bookkeeping=True)
        batch_backward(model, tp, cap)
        assert cap.bookkept == want
        prod, (ip, sq_w, sq_l) = cap.result(), oracle(model, tp)
        assert_rel(prod.ip_wl, ip)
        assert_rel(prod.sq_w, sq_w)
    with pytest.raises(ValueError, match="contraction='ghost'"):
        InRunCapture(model, bookkeeping=True, contraction="ghost")


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_lora_adapters(arch, pairs):
    from peft import LoraConfig, get_peft_model

    base = tiny_model(arch, seed=0, dtype=torch.float64)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, init_lora_weights=False,
                     fan_in_fan_out=arch == "gpt2")
    model = get_peft_model(base, cfg)
    ip, sq_w, sq_l = oracle(model, pairs, "trainable")
    for bookkeeping in (False, True):                                          # book-keeping: the adapters' lora_A/B
        prod, _ = step_products(model, pairs, bookkeeping=bookkeeping)          # θ = the trainable adapters
        assert_rel(prod.ip_wl, ip)
        assert_rel(prod.sq_w, sq_w)
        assert_rel(prod.sq_l, sq_l)
    cap = InRunCapture(model, bookkeeping=True, contraction="materialize")
    batch_backward(model, pairs, cap)
    adapters = [n for n in linear_names(model) if ".lora_" in n]
    assert cap.bookkept == adapters and len(adapters) >= 8
    with pytest.raises(InputError, match="do not require grad"):
        InRunCapture(model, "all")                                               # frozen base weights


def test_inactive_hinge_is_missing_not_wrong(pairs):
    """SLiC-HF past its margin sends no gradient to the rejected response (d_l = 0, c_l = 0): its
    entries are NaN with a reason, the chosen side stays exact; with λ = 0 neither side is seen."""
    from dynamics.core.logprobs import TokenizedPairs

    model = tiny_model("llama", seed=0, dtype=torch.float64)
    with torch.no_grad():
        out = pair_logprobs(model, pairs)
    up = (out.chosen.logp > out.rejected.logp).tolist()                         # orient every pair lw > ll
    pairs = TokenizedPairs(pairs.pair_ids, [w if u else l for w, l, u in zip(pairs.chosen, pairs.rejected, up)],
                           [l if u else w for w, l, u in zip(pairs.chosen, pairs.rejected, up)], pairs.pad_id)
    gap = (out.chosen.logp - out.rejected.logp).abs().sort().values
    delta = float((gap[0] + gap[1]) / 2)                                        # the pair with the smallest gap active
    kept = []
    prod, lo = step_products(model, pairs, loss="slic", loss_params={"delta": delta, "lam": 1.0}, keep=kept)
    active = lo.d_l != 0
    assert active.sum() == 1 and (~active).sum() == 2
    ip, sq_w, sq_l = oracle(model, pairs)
    assert_rel(prod.sq_w, sq_w)                                                 # c_w = −λ/B ≠ 0 everywhere
    assert_rel(prod.ip_wl[active], ip[active])
    assert_rel(prod.sq_l[active], sq_l[active])
    assert prod.ip_wl[~active].isnan().all() and prod.sq_l[~active].isnan().all() and prod.cos_wl[~active].isnan().all()
    assert [m is None for m in prod.missing] == active.tolist()
    assert {m for m in prod.missing if m} == {MISSING_REASONS[(False, True)]}
    # the kept factors give ⟨g_w, Δ⟩ everywhere and ⟨g_l, Δ⟩ only where the rejected had a gradient
    delta = {n: torch.ones_like(p) for n, p in model.named_parameters()}
    upd_w, upd_l = kept[0].dots({id(p): delta[n] for n, p in model.named_parameters()})
    want_w, want_l = update_oracle(model, pairs, delta)
    assert_rel(upd_w, want_w)
    assert_rel(upd_l[active], want_l[active])
    assert upd_l[~active].isnan().all()
    # the SGD-form prediction keeps what does not need the missing values
    pred = predict_with_missing(lo.d_w, lo.d_l, prod.ip_wl, prod.sq_w, prod.sq_l, lr=0.1)
    full = conditions.predict(lo.d_w, lo.d_l, ip, sq_w, sq_l, lr=0.1)
    for key in ("dlogp_w", "thr_w", "thr_l"):
        assert_rel(pred[key][torch.isfinite(full[key])], full[key][torch.isfinite(full[key])])
        assert torch.equal(pred[key].isinf(), full[key].isinf())
    assert_rel(pred["dlogp_l"][active], full["dlogp_l"][active])
    assert pred["dlogp_l"][~active].isnan().all() and (pred["case"][~active] == -1).all()
    assert torch.equal(pred["case"][active], full["case"][active])
    # λ = 0 and every hinge inactive: no gradient at all reaches this step
    prod0, lo0 = step_products(model, pairs, loss="slic", loss_params={"delta": float(gap[0]) / 2, "lam": 0.0})
    assert (lo0.d_w == 0).all() and (lo0.d_l == 0).all()
    assert prod0.sq_w.isnan().all() and prod0.missing == [MISSING_REASONS[(True, True)]] * 3


def test_predict_with_missing_is_predict_when_complete():
    g = torch.Generator().manual_seed(0)
    d_w, d_l, ip, sw, sl = (torch.randn(6, generator=g, dtype=torch.float64) for _ in range(5))
    sw, sl = sw.abs(), sl.abs()
    a, b = predict_with_missing(d_w, d_l, ip, sw, sl, lr=0.3), conditions.predict(d_w, d_l, ip, sw, sl, lr=0.3)
    for k in b:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_mixed_precision_to_its_rounding(arch, pairs):
    """bf16 autocast (TRL's bf16=True) and bf16 weights: the factors are the half-precision
    backward's, the contraction float32; within bf16 rounding of the float64 oracle."""
    for mode in ("autocast", "bf16", "autocast bookkeeping"):
        model = tiny_model(arch, seed=0, dtype=torch.bfloat16 if mode == "bf16" else torch.float32)
        ctx = torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode != "bf16")
        with ctx:
            book = mode.endswith("bookkeeping")
            prod, _ = step_products(model, pairs, refs=(torch.zeros(3), torch.zeros(3)), bookkeeping=book,
                                    contraction="materialize" if book else "auto")
        ip, sq_w, sq_l = oracle(copy.deepcopy(model).double(), pairs)
        for a, b in ((prod.ip_wl, ip), (prod.sq_w, sq_w), (prod.sq_l, sq_l)):
            assert_rel(a, b, 2e-2)


def test_bookkeeping_under_autocast_trains_as_autocast(pairs):
    """Under bf16 autocast a book-kept layer casts as autocast does: float32 weight gradients
    within bf16 rounding (2⁻⁸, a few roundings) of autocast's own backward, not float32 ones."""
    model = tiny_model("llama", seed=0, dtype=torch.float32)
    plain = copy.deepcopy(model)
    cap = InRunCapture(model, bookkeeping=True, contraction="materialize")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        batch_backward(plain, pairs)
        batch_backward(model, pairs, cap)
    assert cap.bookkept == linear_names(model)
    fp32 = copy.deepcopy(plain)
    fp32.zero_grad()
    batch_backward(fp32, pairs)
    g, ref, exact = grads_of(model), grads_of(plain), grads_of(fp32)
    worst = 0.0
    for n in ref:
        assert g[n].dtype == torch.float32, n
        scale = ref[n].abs().max()
        assert (g[n] - ref[n]).abs().max() <= 2e-2 * scale, n
        worst = max(worst, float((ref[n] - exact[n]).abs().max() / scale))
    assert worst > 1e-4        # autocast really ran in bf16 (else the comparison above proves nothing)


# ------------------------------------------------------------------ refusals

def test_refuses_gradient_checkpointing(pairs):
    model = tiny_model("llama", seed=0, dtype=torch.float64)
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    cap = InRunCapture(model)
    with pytest.raises(InputError, match="gradient checkpointing"):
        with cap.capture():
            pass


def test_refuses_two_forwards_in_one_capture(pairs):
    model = tiny_model("llama", seed=0, dtype=torch.float64)
    cap = InRunCapture(model)
    with pytest.raises(InputError, match="2 forwards"):
        with cap.capture():
            a, b = pair_logprobs(model, pairs), pair_logprobs(model, pairs)
            cap.watch(a.chosen.logp, a.rejected.logp)
            (a.chosen.logp.sum() + b.rejected.logp.sum()).backward()


def test_config_refuses_bookkeeping_without_in_run(tmp_path):
    with pytest.raises(InputError, match="in_run_bookkeeping needs in_run"):
        TrainConfig.from_flat(out=str(tmp_path / "r"), model="tiny-llama", in_run_bookkeeping=True)


def test_config_refuses_frozen_selection_with_lora(tmp_path):
    with pytest.raises(InputError, match="adapters"):
        TrainConfig.from_flat(out=str(tmp_path / "r"), model="tiny-llama", lora_r=2, in_run=True, params="all")


# ------------------------------------------------------------------ the trainer

def tiny_cfg(tmp_path, name, **kw):
    base = dict(out=str(tmp_path / name), model="tiny-llama", n_pairs=24, n_probe=4, steps=2, batch_size=4,
                eval_every=100, lr=1e-2, progress=False, dtype="float64", optimizer="sgd", loss_params={"beta": 1.0})
    return TrainConfig.from_flat(**{**base, **kw})


@pytest.mark.parametrize("bookkeeping", [False, True])
def test_trainer_records_every_step_exactly_and_trains_the_same(tmp_path, tok, bookkeeping):
    """grad_accum 2: two micro-batches of 2 per step, each with the step's scaling (÷4). Rows of
    steps 0 and 1 match the oracle at θ_0 and θ_1; the parameters equal those of a run without
    in_run: bit for bit, or with book-keeping to the float64 rounding of reordered sums."""
    theta0 = tiny_model("llama", seed=0, dtype=torch.float64)
    on = copy.deepcopy(theta0)
    cfg = tiny_cfg(tmp_path, "on", in_run=True, grad_accum=2, in_run_bookkeeping=bookkeeping)
    run = train(cfg, model=on, tokenizer=tok)
    off = copy.deepcopy(theta0)
    train(tiny_cfg(tmp_path, "off", grad_accum=2), model=off, tokenizer=tok)
    same = []
    for (n, p), (_, q) in zip(on.named_parameters(), off.named_parameters()):
        if bookkeeping:
            assert (p - q).abs().max() <= 1e-13 * q.abs().max(), n            # lr·(64 ulps of a gradient) ≪ 1e-13
        else:
            assert torch.equal(p, q), n                                        # training unchanged
        same.append(torch.equal(p, q))
    assert all(same) != bookkeeping       # book-keeping reached the trainer: its reordered sums show in the last bits
    theta1 = copy.deepcopy(theta0)
    train(tiny_cfg(tmp_path, "one", steps=1, grad_accum=2), model=theta1, tokenizer=tok)

    rec = read_table(run.path, "train_records")
    assert list(rec.columns) == TRAIN_RECORD_COLUMNS
    assert rec.groupby("step").size().tolist() == [4, 4] and sorted(rec.micro.unique()) == [0, 1]
    assert rec.missing_reason.isna().all() and rec.lr.eq(1e-2).all()
    assert_rel(torch.tensor(rec.c_w.to_numpy()), torch.tensor(-rec.d_w.to_numpy() / 4))
    train_pairs, _ = split_config_pairs(cfg)
    tp = tokenize_pairs(tok, train_pairs)
    where = {pid: i for i, pid in enumerate(tp.pair_ids)}
    for step, model in ((0, theta0), (1, theta1)):
        rows = rec[rec.step == step]
        sub = tp.subset([where[p] for p in rows.pair_id])
        ip, sq_w, sq_l = oracle(model, sub)
        col = lambda c: torch.tensor(rows[c].to_numpy())
        assert_rel(col("ip_wl"), ip)
        assert_rel(col("sq_w"), sq_w)
        assert_rel(col("sq_l"), sq_l)
        out = pair_logprobs(model, sub)
        assert_rel(col("logp_w"), out.chosen.logp.detach())
        pred = conditions.predict(col("d_w"), col("d_l"), ip, sq_w, sq_l, lr=1e-2)
        assert_rel(col("pred_dw"), pred["dlogp_w"])
        assert_rel(col("pred_dl"), pred["dlogp_l"])
        assert col("case_pred").tolist() == pred["case"].tolist()


def test_resume_truncates_train_records(tmp_path):
    """A run stopped after step 3 with its checkpoint at 2 resumes at 2: step 2's rows are redone, not doubled."""
    cfg = tiny_cfg(tmp_path, "r", in_run=True, steps=3, save_every=2, dtype="float32")
    train(cfg)
    assert sorted(read_table(cfg.out, "train_records").step.unique()) == [0, 1, 2]
    run = train(tiny_cfg(tmp_path, "r", in_run=True, steps=4, save_every=2, dtype="float32", resume=True))
    rec = run.table("train_records")
    assert rec.groupby("step").size().to_dict() == {0: 4, 1: 4, 2: 4, 3: 4}
    assert "--in-run" in train_command(cfg).split()


def test_failed_step_keeps_the_rows_before_it(tmp_path):
    """Rows are buffered between flushes; a step that fails (NaN loss) still leaves every finished step's rows."""
    cfg = tiny_cfg(tmp_path, "nan", in_run=True, lr=1e30, steps=4, dtype="float32", loss_params={})
    with pytest.raises(ValueError, match=r"step (\d+): ") as err:
        train(cfg)
    failed = int(err.value.args[0].split()[1].rstrip(":"))
    rec = read_table(cfg.out, "train_records")
    assert failed >= 1 and sorted(rec.step.unique()) == list(range(failed))


def test_generic_module_fallback(pairs, monkeypatch):
    """Norm weights without the closed form go through one vmapped vjp per item, which runs the
    module again inside the backward: still exact, and not recorded as a training call."""
    from dynamics.core import ghost

    monkeypatch.setattr(ghost, "_elementwise_param_uses", lambda *a: None)
    model = tiny_model("llama", seed=0, dtype=torch.float64)
    prod, _ = step_products(model, pairs)
    ip, sq_w, sq_l = oracle(model, pairs)
    assert_rel(prod.ip_wl, ip)
    assert_rel(prod.sq_w, sq_w)


def test_refuses_a_head_used_outside_its_module(pairs):
    """A fused LM head (TRL's ``fused_lm_head``) multiplies by lm_head.weight without calling the
    module: the head's share of the gradient would be missed silently, so it is refused."""
    import torch.nn.functional as F

    model = tiny_model("gpt2", seed=0, dtype=torch.float64)
    cap = InRunCapture(model)
    batch_ids = torch.tensor([list(pairs.chosen[0].prompt_ids + pairs.chosen[0].response_ids)])
    with pytest.raises(InputError, match="fused LM head"):
        with cap.capture():
            h = model.transformer(input_ids=batch_ids).last_hidden_state
            lp = F.log_softmax(F.linear(h, model.lm_head.weight), -1)[0, :-1].gather(1, batch_ids[0, 1:, None]).sum()
            cap.watch(lp[None], lp[None], rows_w=[0], rows_l=[0])
            lp.backward()


@pytest.mark.parametrize("arch", ["llama", "neox"])
def test_fused_head_declared_to_watch_tokens(arch, pairs):
    """A fused LM head (as TRL's: log-probs from h and lm_head.weight, the module never called)
    declared with ``watch_tokens(..., fused_head=(h, y))``: the head's use is rebuilt from ∂L/∂log π
    per token and recomputed logits, and joins the tied embedding's use (tiny Llama) or stands
    alone (tiny GPT-NeoX, untied); every parameter of the model trained, against the oracle."""
    import torch.nn.functional as F

    from dynamics.core.logprobs import body_and_head, collate

    model = tiny_model(arch, seed=0, dtype=torch.float64)
    body, head = body_and_head(model)
    B = len(pairs)
    batch = collate(pairs.chosen + pairs.rejected, pairs.pad_id, "right")
    tgt, rmask = batch.response_positions()
    mask = torch.zeros(2 * B, batch.input_ids.shape[1] - 1, dtype=torch.bool)      # as TRL's label_mask
    mask.scatter_(1, tgt - 1, rmask)
    y = batch.input_ids[:, 1:]

    def fused_step(cap, declare):
        model.zero_grad()
        model.train()
        with cap.capture():
            h = body(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                     position_ids=batch.position_ids).last_hidden_state[:, :-1]                # (2B, T-1, d)
            lp = F.log_softmax(F.linear(h, head.weight, head.bias), -1).gather(2, y[..., None])[..., 0] * mask
            cap.watch_tokens(lp, mask, fused_head=(h.detach(), y) if declare else None)
            seq = lp.sum(1)
            compute_loss("ipo", seq[:B], seq[B:], torch.zeros(B, dtype=torch.float64),
                         torch.zeros(B, dtype=torch.float64)).loss.mean().backward()
        model.eval()

    with pytest.raises(InputError, match="fused LM head"):
        fused_step(InRunCapture(model), declare=False)                          # undeclared: refused, not missed
    cap = InRunCapture(model)
    fused_step(cap, declare=True)
    prod = cap.result()
    ip, sq_w, sq_l = oracle(model, pairs)
    assert_rel(prod.ip_wl, ip)
    assert_rel(prod.sq_w, sq_w)
    assert_rel(prod.sq_l, sq_l)
    assert prod.missing == [None] * B


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_full_sequence_head(arch, pairs):
    """The model's own forward (logits at every position, as a non-fused TRL step): the lm_head
    sees every position but only response positions carry gradient; those are packed before
    contracting (`compact_positions`), the values unchanged."""
    from dynamics.core.logprobs import collate

    model = tiny_model(arch, seed=0, dtype=torch.float64)
    model.train()
    B = len(pairs)
    batch = collate(pairs.chosen + pairs.rejected, pairs.pad_id, "right")
    tgt, mask = batch.response_positions()
    cap = InRunCapture(model)
    with cap.capture():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       position_ids=batch.position_ids).logits                      # (2B, T, V)
        lp = torch.log_softmax(logits, -1).gather(2, batch.input_ids[:, 1:, None])[..., 0]   # (2B, T-1)
        logp = (lp.gather(1, tgt - 1) * mask).sum(1)
        cap.watch(logp[:B], logp[B:])                                            # not the tensors of the loss
        lw, ll = logp[:B], logp[B:]
        compute_loss("ipo", lw, ll, torch.zeros(B, dtype=torch.float64),
                     torch.zeros(B, dtype=torch.float64)).loss.mean().backward()
    with pytest.raises(RuntimeError, match="very tensors"):
        cap.result()
    model.zero_grad()
    with cap.capture():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       position_ids=batch.position_ids).logits
        lp = torch.log_softmax(logits, -1).gather(2, batch.input_ids[:, 1:, None])[..., 0]
        logp = (lp.gather(1, tgt - 1) * mask).sum(1)
        lw, ll = logp[:B], logp[B:]
        cap.watch(lw, ll)
        compute_loss("ipo", lw, ll, torch.zeros(B, dtype=torch.float64),
                     torch.zeros(B, dtype=torch.float64)).loss.mean().backward()
    prod = cap.result()
    ip, sq_w, sq_l = oracle(model, pairs)
    assert_rel(prod.ip_wl, ip)
    assert_rel(prod.sq_w, sq_w)
    assert_rel(prod.sq_l, sq_l)


def test_compact_positions_packs_rows():
    inp = torch.arange(2 * 5, dtype=torch.float64).reshape(2, 5, 1)
    grad = torch.zeros(2, 5, 3, dtype=torch.float64)
    grad[0, 1], grad[0, 3], grad[1, 4] = 1.0, 2.0, 3.0
    from dynamics.core.ghost import compact_positions
    a, b = compact_positions(inp, grad)
    assert a[..., 0].tolist() == [[1.0, 3.0], [9.0, 0.0]]
    assert b[:, :, 0].tolist() == [[1.0, 2.0], [3.0, 0.0]]


@pytest.mark.parametrize("source,loss", [("jvp", "dpo"), ("factors", "dpo"), ("factors", "slic")])
def test_in_run_update_is_the_real_update_at_theta_s(tmp_path, tok, source, loss, monkeypatch):
    """``upd_dw, upd_dl`` = ⟨g(θ_s), θ_{s+1} − θ_s⟩ for the step's own pairs (AdamW, grad_accum 2),
    against flattened autograd gradients at θ_s, by the jvp or from the kept factors (SLiC-HF with
    δ ≈ 0: its inactive hinges carry no gradient to the rejected, whose upd then comes from the
    jvp); the update itself unchanged by the jvp's θ swap or the kept factors."""
    theta0 = tiny_model("gpt2", seed=0, dtype=torch.float64)
    model = copy.deepcopy(theta0)
    hyper = {"beta": 1.0} if loss == "dpo" else {"delta": 1e-6, "lam": 1.0}
    common = dict(steps=1, grad_accum=2, optimizer="adamw", model="tiny-gpt2", loss=loss, loss_params=hyper)
    cfg = tiny_cfg(tmp_path, "upd", in_run=True, in_run_update=True, in_run_update_from=source, **common)
    jvps = []
    jvp = conditions.update_prediction
    monkeypatch.setattr(conditions, "update_prediction", lambda *a, **k: jvps.append(1) or jvp(*a, **k))
    run = train(cfg, model=model, tokenizer=tok)
    # micro-batches that ran the jvp: all (jvp), none (factors, DPO), those with an inactive hinge (SLiC)
    if loss == "slic":
        assert 1 <= len(jvps) <= 2
    else:
        assert len(jvps) == (2 if source == "jvp" else 0)
    off = copy.deepcopy(theta0)
    train(tiny_cfg(tmp_path, "upd_off", **common), model=off, tokenizer=tok)
    for (n, p), (_, q) in zip(model.named_parameters(), off.named_parameters()):
        assert torch.equal(p, q), n
    rec = run.table("train_records")
    assert list(rec.columns) == TRAIN_RECORD_COLUMNS + ["upd_dw", "upd_dl"]
    train_pairs, _ = split_config_pairs(cfg)
    tp = tokenize_pairs(tok, train_pairs)
    sub = tp.subset([tp.pair_ids.index(p) for p in rec.pair_id])
    delta = torch.cat([(p - q).reshape(-1) for p, q in zip(model.parameters(), theta0.parameters())])
    G = flat_grads(theta0, sub.chosen + sub.rejected, sub.pad_id, "trainable")    # at θ_s
    B = len(sub)
    assert_rel(torch.tensor(rec.upd_dw.to_numpy()), G[:B] @ delta)
    assert_rel(torch.tensor(rec.upd_dl.to_numpy()), G[B:] @ delta)
    if loss == "slic":                                   # the fallback ran: some rejected had no gradient
        assert rec.missing_reason.notna().any() and rec.upd_dl.notna().all()
    with pytest.raises(InputError, match="needs in_run"):
        tiny_cfg(tmp_path, "x", in_run_update=True)
    with pytest.raises(InputError, match="unknown in_run_update_from"):
        tiny_cfg(tmp_path, "x", in_run=True, in_run_update=True, in_run_update_from="adjoint")

# DynamicsCallback(in_run=True) under TRL's DPOTrainer: tests/test_callback_inrun.py
