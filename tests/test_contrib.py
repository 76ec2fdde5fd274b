"""The real update of one optimizer step split over its training pairs (`dynamics.core.contrib`,
``RecorderConfig(cross=True)``, docs/math.md §4.1), against float64 oracles on tiny models (fixture
`float64_exact`): per-sequence gradients by an autograd loop (`flat_grads`) at θ_s, the optimizer's
state read independently before and after the step, Δθ from the parameters themselves.

- SGD: contrib = −η (c_w K_w + c_l K_l), Σ_u contrib = upd = ⟨g_o, θ_{s+1} − θ_s⟩, residual ≈ 0;
- AdamW at its first step without weight decay: residual ≈ 0;
- later steps (Adam, AdamW, amsgrad, SGD with momentum / Nesterov / weight decay / two groups, a θ
  wider than the trained parameters): contrib = ⟨g_o, U(G_u)⟩ and residual = ⟨g_o, R⟩;
- the trainer end to end: the table's shape, grad accumulation, training unchanged bit for bit;
- refusals.
"""
import copy
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from dynamics.core import conditions
from dynamics.core.contrib import (TrainingBatch, parameters_at, training_pair_contributions, update_map)
from dynamics.core.grads import flat_grads, resolve_params
from dynamics.core.logprobs import pair_logprobs, tokenize_pairs
from dynamics.core.losses import compute_loss
from dynamics.errors import InputError
from dynamics.inputs.models import tiny_model, tiny_tokenizer
from dynamics.runs.recorder import Recorder, RecorderConfig
from dynamics.runs.rundir import RunDir, read_table
from dynamics.runs.train import TrainConfig, split_config_pairs, train, train_command
from toys import uneven_pairs

pytestmark = pytest.mark.usefixtures("float64_exact", "one_thread")

TOL = 1e-10
EPS = torch.finfo(torch.float64).eps
PAIRS = uneven_pairs(5)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def pairs(tok):
    tp = tokenize_pairs(tok, PAIRS)
    return tp.subset([0, 1, 2]), tp.subset([3, 4])                             # (training, probe)


def assert_rel(a, b, tol=TOL):
    err, scale = (a - b).abs().max().item(), b.abs().max().item()
    assert scale > 0 and err <= tol * scale, f"max err {err:.3e} vs scale {scale:.3e}"


def flat(tensors: dict, names) -> torch.Tensor:
    return torch.cat([tensors[n].detach().reshape(-1).double() for n in names])


def sgd_step_batch(model, train_tp, micro=None):
    """One training forward/backward as the trainer does it (train mode, batch-mean loss over the
    whole optimizer batch, ``micro`` pairs per micro-batch): the step's `TrainingBatch` per micro-batch."""
    B = len(train_tp)
    micro = micro or B
    model.train()
    out_batches = []
    for lo in range(0, B, micro):
        sub = train_tp.subset(range(lo, min(lo + micro, B)))
        out = pair_logprobs(model, sub)
        lw, ll = out.chosen.logp, out.rejected.logp
        g = torch.Generator().manual_seed(lo)
        rw = lw.detach() + torch.randn(len(sub), generator=g, dtype=lw.dtype)
        rl = ll.detach() + torch.randn(len(sub), generator=g, dtype=lw.dtype)
        lo_ = compute_loss("dpo", lw, ll, rw, rl, beta=1.0)
        (lo_.loss.sum() / B).backward()
        out_batches.append(TrainingBatch(sub, -lo_.d_w.detach() / B, lo_.d_l.detach() / B))
    model.eval()
    return out_batches


def run_steps(model, opt, train_tp, steps, params):
    """``steps`` optimizer steps on ``train_tp``. Returns what the oracles need about the last one:
    its TrainingBatch, θ_s (a model copy and a snapshot), the optimizer state before it (clones),
    the trainer's gradient and .grad after it."""
    for s in range(steps):
        opt.zero_grad(set_to_none=True)
        batch = TrainingBatch.concat(sgd_step_batch(model, train_tp))
        theta_s = copy.deepcopy(model)
        snap = conditions.snapshot_params(model, params)
        before = {id(p): {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in opt.state[p].items()}
                  for g in opt.param_groups for p in g["params"] if p in opt.state}
        opt.step()
    grads = {id(p): p.grad.clone() for p in model.parameters() if p.grad is not None}
    return SimpleNamespace(batch=batch, theta_s=theta_s, snap=snap, before=before, grads=grads)


def oracle_grads(theta_s, probe, batch, params):
    """(Go (2n, P), Gt (2B, P), names) at θ_s, one autograd gradient per unpadded sequence."""
    names = list(resolve_params(theta_s, params))
    Go = flat_grads(theta_s, probe.chosen + probe.rejected, probe.pad_id, params)
    Gt = flat_grads(theta_s, batch.pairs.chosen + batch.pairs.rejected, probe.pad_id, params)
    return Go, Gt, names


def contributions(model, probe, batch, opt, snap, params, **kw):
    """The split as the recorder computes it: U after the step, the model at θ_s meanwhile."""
    params = resolve_params(model, params)
    delta = conditions.param_delta(model, snap)
    umap = update_map(opt, params)
    with parameters_at(model, snap):
        return training_pair_contributions(model, probe.chosen + probe.rejected, batch, umap, delta,
                                           params=params, **kw)


def residual_tolerance(res, Go, theta_next):
    """|residual| bound for an exact split: 1e-10 of the summed magnitudes plus the rounding of
    θ_{s+1} = θ_s + Δθ (≤ one ulp of each θ_{s+1} entry) seen through |g_o|."""
    return TOL * (res.contrib.abs().sum(1) + res.upd.abs()) + 2 * EPS * (Go.abs() @ theta_next.abs())


# ------------------------------------------------------------------ SGD: K, contrib, upd exactly

@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_sgd_split_is_minus_lr_times_cross_gram(arch, pairs):
    train_tp, probe = pairs
    lr = 0.05
    model = tiny_model(arch, seed=0, dtype=torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    st = run_steps(model, opt, train_tp, 1, "trainable")
    after = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    res = contributions(model, probe, st.batch, opt, st.snap, "trainable")            # from K (scalar U)
    res_jvp = contributions(model, probe, st.batch, opt, st.snap, "trainable", method="jvp")

    Go, Gt, names = oracle_grads(st.theta_s, probe, st.batch, "trainable")
    B = len(st.batch)
    K = Go @ Gt.T
    assert res.K.shape == (4, 2 * B) and res.contrib.shape == (4, B) and res.residual.shape == (4,)
    assert_rel(res.K, K)
    expect = -lr * (st.batch.c_w * K[:, :B] + st.batch.c_l * K[:, B:])
    assert_rel(res.contrib, expect)
    assert_rel(res_jvp.contrib, expect)                                            # one backward + jvp per pair
    live = resolve_params(model, "trainable")
    theta_next = flat({n: p for n, p in live.items()}, names)
    delta = theta_next - flat(st.snap, names)
    assert_rel(res.upd, Go @ delta)                                                # ⟨g_o(θ_s), θ_{s+1} − θ_s⟩
    assert (res.residual.abs() <= residual_tolerance(res, Go, theta_next)).all(), res.residual
    assert (res_jvp.residual.abs() <= residual_tolerance(res_jvp, Go, theta_next)).all(), res_jvp.residual
    # θ_{s+1} back bit for bit, the trainer's .grad untouched
    for n, p in model.named_parameters():
        assert torch.equal(p, after[n]), n
        if n in grads:
            assert torch.equal(p.grad, grads[n]), n


# ------------------------------------------------------------------ Adam: the first step has no rest

def adam_factor(opt, p, lr):
    """U's element-wise factor of parameter p from the optimizer's state after the step."""
    g = next(g for g in opt.param_groups if any(q is p for q in g["params"]))
    b1, b2 = g["betas"]
    st = opt.state[p]
    t = float(st["step"])
    v = st["max_exp_avg_sq"] if g["amsgrad"] else st["exp_avg_sq"]
    D = v.sqrt() / (1 - b2 ** t) ** 0.5 + g["eps"]
    return -lr * (1 - b1) / (1 - b1 ** t) / D, D, t


def test_adamw_first_step_residual_vanishes(pairs):
    train_tp, probe = pairs
    lr = 1e-3
    model = tiny_model("llama", seed=0, dtype=torch.float64)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    st = run_steps(model, opt, train_tp, 1, "trainable")
    res = contributions(model, probe, st.batch, opt, st.snap, "trainable")
    live = resolve_params(model, "trainable")
    Go, Gt, names = oracle_grads(st.theta_s, probe, st.batch, "trainable")
    B = len(st.batch)
    f = torch.cat([adam_factor(opt, live[n], lr)[0].reshape(-1) for n in names])
    Gu = st.batch.c_w[:, None] * Gt[:B] + st.batch.c_l[:, None] * Gt[B:]           # (B, P) G_u
    assert_rel(res.contrib, Go @ (f * Gu).T)                                        # ⟨g_o, U(G_u)⟩
    theta_next = flat(live, names)
    assert_rel(res.upd, Go @ (theta_next - flat(st.snap, names)))
    assert (res.residual.abs() <= residual_tolerance(res, Go, theta_next)).all(), res.residual
    assert res.upd.abs().max() > 1e3 * res.residual.abs().max()


# ------------------------------------------------------------------ later steps: the residual is ⟨g_o, R⟩

def make_variant(name, model):
    """(optimizer, params of θ) of each case; η is 1e-3 (Adam) or 0.05 (SGD)."""
    ps = list(model.parameters())
    if name == "adamw_wd":
        return torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.1), "trainable"
    if name == "adam_coupled_wd":
        return torch.optim.Adam(ps, lr=1e-3, weight_decay=0.1), "trainable"
    if name == "adam_amsgrad":
        return torch.optim.Adam(ps, lr=1e-3, amsgrad=True, betas=(0.8, 0.9)), "trainable"
    if name == "sgd_momentum_wd":
        return torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=0.1), "trainable"
    if name == "sgd_nesterov_wd":
        return torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1), "trainable"
    if name == "sgd_two_groups":
        head = [p for n, p in model.named_parameters() if "h.1." in n]
        rest = [p for n, p in model.named_parameters() if "h.1." not in n]
        return torch.optim.SGD([dict(params=rest), dict(params=head, lr=0.02)], lr=0.05, momentum=0.5,
                               weight_decay=0.1), "trainable"
    if name == "theta_wider_than_trained":                                          # frozen embeddings in θ
        model.transformer.wte.requires_grad_(False)
        return torch.optim.AdamW([p for p in ps if p.requires_grad], lr=1e-3, weight_decay=0.1), "all"
    raise ValueError(name)


def rest_of_step(opt, p, before, theta_s):
    """R of parameter p (its shape) from the optimizer's state before and after the step (§4.1)."""
    g = next(g for g in opt.param_groups if any(q is p for q in g["params"]))
    lr, wd = g["lr"], g["weight_decay"]
    if isinstance(opt, torch.optim.SGD):
        mu = g["momentum"]
        buf = before.get(id(p), {}).get("momentum_buffer")
        buf = torch.zeros_like(p) if buf is None else buf
        if g["nesterov"]:
            return -lr * (1 + mu) * wd * theta_s - lr * mu * mu * buf
        return -lr * wd * theta_s - lr * mu * buf
    f, D, t = adam_factor(opt, p, lr)
    b1 = g["betas"][0]
    m_prev = before[id(p)]["exp_avg"]
    R = -lr * b1 * m_prev / ((1 - b1 ** t) * D)
    if g["decoupled_weight_decay"]:
        return R - lr * wd * theta_s
    return R + f * wd * theta_s                                                     # coupled: λθ_s through U


@pytest.mark.parametrize("variant", ["adamw_wd", "adam_coupled_wd", "adam_amsgrad", "sgd_momentum_wd",
                                     "sgd_nesterov_wd", "sgd_two_groups", "theta_wider_than_trained"])
def test_later_step_residual_is_the_rest_of_the_update(variant, pairs):
    train_tp, probe = pairs
    model = tiny_model("gpt2", seed=0, dtype=torch.float64)
    opt, sel = make_variant(variant, model)
    st = run_steps(model, opt, train_tp, 3, sel)
    res = contributions(model, probe, st.batch, opt, st.snap, sel)
    Go, Gt, names = oracle_grads(st.theta_s, probe, st.batch, sel)
    live = resolve_params(model, sel)
    B = len(st.batch)
    Gu = st.batch.c_w[:, None] * Gt[:B] + st.batch.c_l[:, None] * Gt[B:]          # (B, P)
    f, R = [], []
    for n in names:
        p = live[n]
        if not p.requires_grad:                                                    # not trained: U = 0, R = 0
            f.append(torch.zeros(p.numel(), dtype=torch.float64))
            R.append(torch.zeros(p.numel(), dtype=torch.float64))
            continue
        g = next(g for g in opt.param_groups if any(q is p for q in g["params"]))
        if isinstance(opt, torch.optim.SGD):
            fac = -g["lr"] * (1 + g["momentum"] if g["nesterov"] else 1.0)
            f.append(torch.full((p.numel(),), fac, dtype=torch.float64))
        else:
            f.append(adam_factor(opt, p, g["lr"])[0].reshape(-1))
        R.append(rest_of_step(opt, p, st.before, st.snap[n]).reshape(-1))
    f, R = torch.cat(f), torch.cat(R)
    assert_rel(res.contrib, Go @ (f * Gu).T)                                        # ⟨g_o, U(G_u)⟩
    theta_next = flat(live, names)
    delta = theta_next - flat(st.snap, names)
    assert_rel(res.upd, Go @ delta)
    # the decomposition itself: Δθ = U(∇L) + R with the trainer's ∇L (materialized, float64)
    grad = torch.cat([st.grads[id(live[n])].reshape(-1) if id(live[n]) in st.grads else
                      torch.zeros(live[n].numel(), dtype=torch.float64) for n in names])
    assert_rel(f * grad + R, delta)
    tol = residual_tolerance(res, Go, theta_next) + TOL * (Go.abs() @ R.abs())
    assert ((res.residual - Go @ R).abs() <= tol).all(), (res.residual, Go @ R)
    assert (Go @ R).abs().max() > 1e3 * tol.max()                                  # a real rest, not 0


# ------------------------------------------------------------------ the trainer end to end

def tiny_cfg(tmp_path, name, **kw):
    base = dict(out=str(tmp_path / name), model="tiny-llama", n_pairs=24, n_probe=4, steps=2, batch_size=4,
                eval_every=1, lr=1e-2, progress=False, dtype="float64", optimizer="sgd", loss_params={"beta": 1.0},
                whatif=False, token_pairs=0)
    return TrainConfig.from_flat(**{**base, **kw})


CONTRIB_COLUMNS = ["step", "pair_id", "response", "train_pair", "k_w", "k_l", "c_w", "c_l", "contribution"]
KEY = ["step", "pair_id", "response", "train_pair"]


def test_trainer_sgd_contributions(tmp_path, tok):
    """SGD, 2 steps of 4 pairs, 4 probes: 2 × 8 × 4 rows; step 0's K and contributions against the
    autograd oracle at θ_0; Σ contributions = upd; grad accumulation 2 gives the same rows; the
    training is the same bit for bit as without cross."""
    theta0 = tiny_model("llama", seed=0, dtype=torch.float64)
    on, acc, off = copy.deepcopy(theta0), copy.deepcopy(theta0), copy.deepcopy(theta0)
    cfg = tiny_cfg(tmp_path, "on", cross=True)
    run = train(cfg, model=on, tokenizer=tok)
    run_acc = train(tiny_cfg(tmp_path, "acc", cross=True, grad_accum=2), model=acc, tokenizer=tok)
    run_off = train(tiny_cfg(tmp_path, "off"), model=off, tokenizer=tok)
    for (n, p), (_, q) in zip(on.named_parameters(), off.named_parameters()):
        assert torch.equal(p, q), n                                                # training unchanged
    a, b = run.table("train"), run_off.table("train")
    assert a.loss.tolist() == b.loss.tolist() and a.step.tolist() == b.step.tolist()

    con = read_table(run.path, "contributions")
    assert list(con.columns) == CONTRIB_COLUMNS
    assert len(con) == 2 * 8 * 4 and con.groupby("step").size().tolist() == [32, 32]
    assert sorted(con.response.unique()) == ["chosen", "rejected"]
    con_acc = read_table(run_acc.path, "contributions")
    x, y = con.sort_values(KEY).reset_index(drop=True), con_acc.sort_values(KEY).reset_index(drop=True)
    assert x[KEY].equals(y[KEY])
    for c in ("k_w", "k_l", "c_w", "c_l", "contribution"):
        assert_rel(torch.tensor(y[c].to_numpy()), torch.tensor(x[c].to_numpy()))

    # step 0 against the oracle at θ_0
    train_pairs, probe_pairs = split_config_pairs(cfg)
    tp, probe = tokenize_pairs(tok, train_pairs), tokenize_pairs(tok, probe_pairs)
    s0 = con[con.step == 0]
    tids = list(dict.fromkeys(s0.train_pair))
    sub = tp.subset([tp.pair_ids.index(t) for t in tids])
    Go = flat_grads(theta0, probe.chosen + probe.rejected, probe.pad_id, "trainable")
    Gt = flat_grads(theta0, sub.chosen + sub.rejected, probe.pad_id, "trainable")
    K = Go @ Gt.T                                                                  # (8, 8)
    rows = s0.assign(o=[probe.pair_ids.index(p) + (0 if r == "chosen" else 4) for p, r in zip(s0.pair_id, s0.response)],
                     u=[tids.index(t) for t in s0.train_pair])
    o, u = torch.tensor(rows.o.to_numpy()), torch.tensor(rows.u.to_numpy())
    assert_rel(torch.tensor(rows.k_w.to_numpy()), K[o, u])
    assert_rel(torch.tensor(rows.k_l.to_numpy()), K[o, 4 + u])
    expect = -1e-2 * (torch.tensor(rows.c_w.to_numpy()) * K[o, u] + torch.tensor(rows.c_l.to_numpy()) * K[o, 4 + u])
    assert_rel(torch.tensor(rows.contribution.to_numpy()), expect)

    rec = run.table("records")
    body = rec[rec.step < 2]
    for side in ("w", "l"):
        sums = con[con.response == ("chosen" if side == "w" else "rejected")].groupby(["step", "pair_id"]).contribution.sum()
        got = body.set_index(["step", "pair_id"])[f"contrib_sum_{side}"].reindex(sums.index)
        assert_rel(torch.tensor(got.to_numpy()), torch.tensor(sums.to_numpy()))
        upd, s, r = (torch.tensor(body[c].to_numpy()) for c in (f"upd_d{side}", f"contrib_sum_{side}",
                                                                  f"contrib_resid_{side}"))
        assert_rel(s + r, upd)
        assert (r.abs() <= TOL * upd.abs().max()).all()                           # SGD: no rest
    assert "--cross" in train_command(cfg).split()


def test_trainer_adamw_contributions(tmp_path, tok):
    """AdamW, grad accumulation 2: the first step's residual vanishes (m_0 = 0, no weight decay), the
    second step's is the momentum's share; the training is the same bit for bit as without cross."""
    theta0 = tiny_model("gpt2", seed=0, dtype=torch.float64)
    on, off = copy.deepcopy(theta0), copy.deepcopy(theta0)
    kw = dict(model="tiny-gpt2", optimizer="adamw", lr=1e-3, grad_accum=2)
    run = train(tiny_cfg(tmp_path, "on", cross=True, **kw), model=on, tokenizer=tok)
    train(tiny_cfg(tmp_path, "off", **kw), model=off, tokenizer=tok)
    for (n, p), (_, q) in zip(on.named_parameters(), off.named_parameters()):
        assert torch.equal(p, q), n
    rec = run.table("records")
    for step, vanishes in ((0, True), (1, False)):
        r = rec[rec.step == step]
        upd = torch.tensor(pd.concat([r.upd_dw, r.upd_dl]).to_numpy())
        resid = torch.tensor(pd.concat([r.contrib_resid_w, r.contrib_resid_l]).to_numpy())
        total = torch.tensor(pd.concat([r.contrib_sum_w, r.contrib_sum_l]).to_numpy())
        assert_rel(total + resid, upd)
        if vanishes:
            assert (resid.abs() <= TOL * (upd.abs().max() + total.abs().max())).all(), resid
        else:
            assert resid.abs().max() > 1e-3 * upd.abs().max()
    assert len(run.table("contributions")) == 2 * 8 * 4


def test_resume_truncates_contributions(tmp_path):
    cfg = tiny_cfg(tmp_path, "r", cross=True, steps=3, save_every=2, dtype="float32")
    train(cfg)
    run = train(tiny_cfg(tmp_path, "r", cross=True, steps=4, save_every=2, dtype="float32", resume=True))
    assert run.table("contributions").groupby("step").size().to_dict() == {0: 32, 1: 32, 2: 32, 3: 32}


# ------------------------------------------------------------------ refusals

def test_recorder_refuses_cross_without_its_inputs(tmp_path, pairs):
    train_tp, probe = pairs
    model = tiny_model("llama", seed=0, dtype=torch.float64)
    ref = pd.DataFrame(dict(ref_w=[-5.0, -5.0], ref_l=[-5.0, -5.0]))
    rec = Recorder(model, probe, ref, RunDir(tmp_path / "rec"), RecorderConfig(cross=True, whatif=False, token_pairs=0),
                   loss="dpo", lr=0.05)
    with pytest.raises(InputError, match="train_batch"):
        rec.before_update(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    batch = sgd_step_batch(model, train_tp, micro=2)                                # two micro-batches
    rec.before_update(0, train_batch=batch)
    opt.step()
    with pytest.raises(InputError, match="optimizer="):
        rec.after_update()
    assert not rec.pending
    rec.before_update(0, train_batch=batch)
    logs = rec.after_update(optimizer=opt)
    assert "dyn/contrib_resid_w" in logs
    assert len(rec.run.table("contributions")) == 4 * 3
    with pytest.raises(InputError, match="cross must be true or false"):
        RecorderConfig(cross="yes")


class MyAdamW(torch.optim.AdamW):
    pass


@pytest.mark.parametrize("make, match", [
    (lambda ps: torch.optim.Adam(ps, lr=1e-3, maximize=True), "maximize"),
    (lambda ps: torch.optim.RMSprop(ps, lr=1e-3), "RMSprop"),
    (lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9, dampening=0.1), "dampening"),
    (lambda ps: MyAdamW(ps, lr=1e-3), "MyAdamW"),
])
def test_update_map_refuses_what_it_does_not_model(make, match):
    model = tiny_model("gpt2", seed=0, dtype=torch.float64)
    opt = make(model.parameters())
    with pytest.raises(InputError, match=match):
        update_map(opt, resolve_params(model, "trainable"))


def test_training_batch_checks(pairs):
    train_tp, _ = pairs
    with pytest.raises(InputError, match="c_w has 2 entries for 3 pairs"):
        TrainingBatch(train_tp, torch.zeros(2), torch.zeros(3))
    with pytest.raises(InputError, match="non-finite"):
        TrainingBatch(train_tp, torch.zeros(3), torch.tensor([0.0, float("nan"), 0.0]))
    a, b = TrainingBatch(train_tp.subset([0]), [1.0], [2.0]), TrainingBatch(train_tp.subset([1, 2]), [3.0, 4.0], [5.0, 6.0])
    ab = TrainingBatch.concat([a, b])
    assert ab.pairs.pair_ids == train_tp.pair_ids and ab.c_w.tolist() == [1.0, 3.0, 4.0]


def test_parameters_at_restores_after_an_error():
    model = tiny_model("llama", seed=0, dtype=torch.float64)
    now = {n: p.detach().clone() for n, p in model.named_parameters()}
    zeros = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    with pytest.raises(RuntimeError, match="boom"):
        with parameters_at(model, zeros):
            assert all((p == 0).all() for p in model.parameters())
            raise RuntimeError("boom")
    for n, p in model.named_parameters():
        assert torch.equal(p, now[n]), n
