"""The probe pass (`dynamics.core.probe_pass`, docs/math.md §4.2): log-probs, ⟨g_w,g_l⟩, ‖g_w‖²,
‖g_l‖² and ⟨g_i, Δθ⟩ from one forward and one activation backward, against independent oracles on
tiny float64 models (fixture `float64_exact`): a no-grad forward (`pair_logprobs`), one autograd
gradient per unpadded sequence (`flat_grads`) dotted with each other and with Δθ, and the
forward-mode jvp (`conditions.update_prediction`) — on the three tiny layouts (GPT-2 and Llama with
tied embedding / lm_head), with padding of unequal lengths, LoRA, frozen parameters measured, and
the selection "trainable"; the model, its ``.grad`` and flags untouched; the `Recorder` built on it
trains bit for bit as without it and writes the rows of the oracle engines.

Tolerance. Every compared quantity is a float64 sum of ≲ 10⁴ products, formed in different orders
by the pass and by the oracle: |error| ≲ 10⁴ ε Σ|terms| with ε = 2.2e-16, i.e. ≲ 2e-12 of the
largest term, and the sums here cancel by less than a factor 10 (checked: the scale used is the
largest |value|); TOL = 1e-10 relative to that scale leaves a margin of ×5 or more.
"""
import copy

import numpy as np
import pandas as pd
import pytest
import torch

from dynamics.core import conditions
from dynamics.core.grads import flat_grads, pair_inner_products, resolve_params
from dynamics.core.logprobs import pair_logprobs, scoring_mode, tokenize_pairs
from dynamics.core.losses import compute_loss
from dynamics.core.probe_pass import probe_pass
from dynamics.inputs.models import tiny_model, tiny_tokenizer
from dynamics.runs.recorder import Recorder, RecorderConfig
from dynamics.runs.rundir import RunDir, read_table
from dynamics.runs.train import TrainConfig, train
from toys import uneven_pairs

pytestmark = pytest.mark.usefixtures("float64_exact", "one_thread")

TOL = 1e-10
# unequal prompt and response lengths: right padding inside the batch; pair 2 is a prefix case
PAIRS = uneven_pairs(3)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def pairs(tok):
    return tokenize_pairs(tok, PAIRS)


def assert_rel(a, b, tol=TOL):
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    err, scale = (a - b).abs().max().item(), b.abs().max().item()
    assert scale > 0 and err <= tol * scale, f"max err {err:.3e} vs scale {scale:.3e}"


def lora(arch: str):
    from peft import LoraConfig, get_peft_model

    base = tiny_model(arch, seed=0, dtype=torch.float64)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, init_lora_weights=False,
                     fan_in_fan_out=arch == "gpt2")
    return get_peft_model(base, cfg)


def model_of(case: str):
    """(model, params): the architectures and parameter selections under test."""
    if case.startswith("lora-"):                                                # "lora-gpt2-trainable", ...
        _, arch, params = case.split("-")
        return lora(arch), params
    arch, params = case.split("-")
    model = tiny_model(arch, seed=1, dtype=torch.float64)
    if params == "trainable":                                                   # a frozen block: not in θ
        for n, p in model.named_parameters():
            if ".0." in n:
                p.requires_grad_(False)
    return model, params


CASES = ["gpt2-all", "llama-all", "neox-all", "llama-trainable", "neox-trainable", "lora-gpt2-trainable",
         "lora-llama-trainable", "lora-llama-all"]


def random_delta(params: dict, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {n: 1e-3 * torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in params.items()}


@pytest.mark.parametrize("case", CASES)
def test_pass_equals_the_oracles(case, pairs):
    model, spec = model_of(case)
    params = resolve_params(model, spec)
    if spec == "all" and case.startswith("lora"):
        assert any(not p.requires_grad for p in params.values())                 # frozen base weights measured
    delta = random_delta(params)
    out = probe_pass(model, pairs, params, delta=delta)
    B = len(pairs)
    with scoring_mode(model):
        lp = pair_logprobs(model, pairs)
    assert_rel(out.logps.chosen.logp, lp.chosen.logp)
    assert_rel(out.logps.rejected.logp, lp.rejected.logp)
    assert torch.equal(out.logps.chosen.lengths, lp.chosen.lengths)
    assert torch.equal(out.logps.rejected.mask, lp.rejected.mask)
    G = flat_grads(model, pairs.chosen + pairs.rejected, pairs.pad_id, params)     # (2B, P) oracle
    gw, gl = G[:B], G[B:]
    assert_rel(out.ip_wl, (gw * gl).sum(1))
    assert_rel(out.sq_w, (gw * gw).sum(1))
    assert_rel(out.sq_l, (gl * gl).sum(1))
    assert_rel(out.cos_wl, (gw * gl).sum(1) / (gw.norm(dim=1) * gl.norm(dim=1)))
    flat = torch.cat([delta[n].reshape(-1) for n in params])
    assert_rel(out.upd, G @ flat)                                               # ⟨g_i, Δθ⟩
    jvp = conditions.update_prediction(model, pairs.chosen + pairs.rejected, pairs.pad_id, delta, params)
    assert_rel(out.upd, jvp)                                                    # the old path
    assert probe_pass(model, pairs, params).upd is None


@pytest.mark.parametrize("per_pass", [1, 2])
def test_pairs_split_across_passes(per_pass, pairs):
    """``pairs_per_pass`` (memory) changes no value: 3 pairs in passes of 1 or 2 (an uneven split,
    chunks of different response lengths) give the one-pass results, ``upd`` chosen then rejected."""
    model = tiny_model("llama", seed=3, dtype=torch.float64)
    params = resolve_params(model, "all")
    delta = random_delta(params, seed=1)
    one = probe_pass(model, pairs, params, delta=delta, pairs_per_pass=None)
    split = probe_pass(model, pairs, params, delta=delta, pairs_per_pass=per_pass)
    for side in ("chosen", "rejected"):
        a, b = getattr(split.logps, side), getattr(one.logps, side)
        assert a.token_logps.shape == b.token_logps.shape and torch.equal(a.mask, b.mask)
        assert torch.equal(a.lengths, b.lengths)
        assert_rel(a.token_logps, b.token_logps)
    for k in ("ip_wl", "sq_w", "sq_l", "cos_wl", "upd"):
        assert_rel(getattr(split, k), getattr(one, k))
    with pytest.raises(ValueError, match="pairs_per_pass"):
        probe_pass(model, pairs, params, pairs_per_pass=0)


def test_pair_inner_products_ghost_is_the_pass(pairs):
    """`grads.pair_inner_products` with the ghost engine forms the 3B entries of the pass; the
    autograd engine reads them off the (2B)² Gram."""
    model = tiny_model("llama", seed=2, dtype=torch.float64)
    ghost = pair_inner_products(model, pairs, impl="ghost")
    ref = pair_inner_products(model, pairs, impl="autograd")
    for k in ("ip_wl", "sq_w", "sq_l", "cos_wl"):
        assert ghost[k].dtype == torch.float64 and ghost[k].shape == (len(pairs),)
        assert_rel(ghost[k], ref[k])


def test_nothing_of_the_model_changes(pairs):
    """Parameters, their ``.grad``, ``requires_grad`` flags and the train/eval mode: bit for bit."""
    model = lora("llama")
    model.train()
    g = torch.Generator().manual_seed(3)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
    before = {n: (p.detach().clone(), None if p.grad is None else p.grad.clone(), p.requires_grad)
              for n, p in model.named_parameters()}
    params = resolve_params(model, "all")
    probe_pass(model, pairs, params, delta=random_delta(params))
    assert model.training
    for n, p in model.named_parameters():
        value, grad, flag = before[n]
        assert torch.equal(p.detach(), value) and p.requires_grad == flag
        assert (p.grad is None) == (grad is None) and (grad is None or torch.equal(p.grad, grad)), n


def test_refusals(pairs):
    from toys import Bigram

    with pytest.raises(NotImplementedError, match="linear lm_head"):
        probe_pass(Bigram([[0.0] * 3] * 3), pairs, "all")
    model = tiny_model("neox", seed=0, dtype=torch.float64)
    params = resolve_params(model, "all")
    delta = random_delta(params)
    delta.pop("lm_head.weight")
    with pytest.raises(ValueError, match="no entry"):
        probe_pass(model, pairs, params, delta=delta)


# ------------------------------------------------------------------ the recorder built on it

def dpo_step(model, tp, opt):
    opt.zero_grad(set_to_none=True)
    out = pair_logprobs(model, tp)
    lw, ll = out.chosen.logp, out.rejected.logp
    compute_loss("dpo", lw, ll, lw.detach() - 0.1, ll.detach() + 0.1).loss.mean().backward()


@pytest.mark.parametrize("impl", ["ghost", "autograd"])
def test_recording_leaves_training_bit_for_bit(tmp_path, pairs, impl):
    """The same AdamW steps with and without a `Recorder` around them: parameters, ``.grad`` and
    optimizer state identical bit for bit after every step (the recorder puts θ_s back for its
    measurements and restores θ_{s+1} exactly)."""
    from dynamics.core.logprobs import reference_logprobs

    train_tp, probe = pairs.subset([0, 1]), pairs.subset([2])
    a = tiny_model("llama", seed=4, dtype=torch.float64)
    b = copy.deepcopy(a)
    opt_a = torch.optim.AdamW(a.parameters(), lr=1e-2)
    opt_b = torch.optim.AdamW(b.parameters(), lr=1e-2)
    rec = Recorder(a, probe, reference_logprobs(a, probe), RunDir(tmp_path / impl),
                   RecorderConfig(impl=impl, token_pairs=1), loss="dpo", lr=1e-2)
    for step in range(3):
        for m, opt in ((a, opt_a), (b, opt_b)):
            m.train()
            dpo_step(m, train_tp, opt)
        rec.before_update(step)
        opt_a.step()
        opt_b.step()
        rec.after_update()
        assert a.training
        for (n, p), q in zip(a.named_parameters(), b.parameters()):
            assert torch.equal(p, q) and torch.equal(p.grad, q.grad), n
        for sa, sb in zip(opt_a.state.values(), opt_b.state.values()):
            assert all(torch.equal(sa[k], sb[k]) for k in sa)
    rows = read_table(rec.run.path, "records")
    assert len(rows) == 3 and rows[["ip_wl", "upd_dw", "act_dw"]].notna().all().all()


def test_trainer_records_equal_the_oracle_engines(tmp_path):
    """A run recorded with the probe pass (ghost) and one recorded with the oracles (autograd: a
    no-grad forward, the (2n)² Gram from per-sequence gradients, the jvp for ``upd``) train alike
    and write the same rows: records, what-if, token decomposition to 1e-10; the steps' training
    losses bit for bit."""
    base = dict(model="tiny-llama", n_pairs=16, n_probe=3, steps=3, batch_size=4, eval_every=1, lr=1e-2,
                progress=False, dtype="float64", optimizer="adamw", token_pairs=1)
    runs = {impl: train(TrainConfig.from_flat(out=str(tmp_path / impl), impl=impl, **base))
            for impl in ("ghost", "autograd")}
    ghost, oracle = ({t: read_table(runs[i].path, t) for t in ("records", "whatif", "token_decomp", "train")}
                     for i in ("ghost", "autograd"))
    assert np.array_equal(ghost["train"].loss.to_numpy(), oracle["train"].loss.to_numpy())
    keys = {"records": ["step", "pair_id"], "whatif": ["step", "pair_id", "loss"],
            "token_decomp": ["step", "pair_id", "response", "token"]}
    for table, key in keys.items():
        g, o = (d[table].sort_values(key).reset_index(drop=True) for d in (ghost, oracle))
        assert g[key].equals(o[key])
        for col in o.columns:
            if col in key or not pd.api.types.is_numeric_dtype(o[col]) or pd.api.types.is_bool_dtype(o[col]):
                assert g[col].equals(o[col]), (table, col)
                continue
            x, y = g[col].to_numpy(dtype=float), o[col].to_numpy(dtype=float)
            assert np.array_equal(np.isnan(x), np.isnan(y)), (table, col)
            ok = ~np.isnan(y) & ~np.isinf(y)
            if ok.any():
                scale = np.abs(y[ok]).max()
                assert np.abs(x[ok] - y[ok]).max() <= TOL * max(scale, 1e-300), (table, col)
            assert np.array_equal(x[np.isinf(y)], y[np.isinf(y)]), (table, col)


@pytest.mark.slow
def test_smollm2(smollm2):
    """The real model (tied embedding / lm_head, 30 layers): in float64 the pass equals the ghost
    sentence Gram's entries and the jvp to 1e-10; in float32 (as recorded) it is within float32
    rounding of them. Float32 tolerance: ε = 1.2e-7 accumulated over the 30 layers' forward and
    backward (≲ 10³ roundings) gives ≲ 1e-4 relative for the entries (measured 1.6e-5). ``upd`` is
    a sum over 273 uses u of terms of both signs, each within that relative rounding of its own
    |⟨g_u, Δ_u⟩| ≤ ‖g_u‖‖Δ_u‖, and Σ_u ‖g_u‖‖Δ_u‖ ≤ ‖g_i‖‖Δθ‖ (Cauchy–Schwarz): its bound is 1e-4 of
    ‖g_i‖‖Δθ‖, not of |upd| itself, which a random Δθ makes small (here the float32 jvp is 1e-5 of
    |upd| off, the pass 3e-4)."""
    from dynamics.core.grads import sentence_gram
    from dynamics.inputs.data import builtin_sentiment_pairs
    from dynamics.inputs.models import load_model

    model32, tok = smollm2
    model64, _ = load_model("smollm2-135m", dtype=torch.float64)
    pairs = tokenize_pairs(tok, builtin_sentiment_pairs("long_suffix", n=2))
    seqs, B = pairs.chosen + pairs.rejected, len(pairs)
    params64 = resolve_params(model64, "all")
    delta64 = random_delta(params64, seed=5)
    G = sentence_gram(model64, seqs, pairs.pad_id, impl="ghost")                  # (2B, 2B), exact in float64
    jvp = conditions.update_prediction(model64, seqs, pairs.pad_id, delta64, params64)
    norm_delta = torch.sqrt(sum(d.pow(2).sum() for d in delta64.values()))
    cs = G.diagonal().sqrt() * norm_delta                                         # ‖g_i‖ ‖Δθ‖ ≥ |upd_i|
    i = torch.arange(B)
    for model, tol in ((model64, TOL), (model32, 1e-4)):
        params = resolve_params(model, "all")
        out = probe_pass(model, pairs, params, delta={n: d.to(params[n].dtype) for n, d in delta64.items()})
        assert_rel(out.ip_wl, G[i, B + i], tol)
        assert_rel(out.sq_w, G[i, i], tol)
        assert_rel(out.sq_l, G[B + i, B + i], tol)
        if model is model64:
            assert_rel(out.upd, jvp, tol)
        else:
            assert ((out.upd - jvp).abs() <= tol * cs).all(), ((out.upd - jvp).abs() / cs).max()


@pytest.mark.parametrize("form", ["ghost", "materialized"])
def test_upd_from_either_form_of_the_entries(form, pairs, monkeypatch):
    """Where a use's entries are computed from its per-sequence gradients G_i, ``upd`` reads
    ⟨G_i, ΔW⟩ from the same G_i; else Σ_τ b·(ΔW a). Both forms forced (the cost model picks per
    use), against the oracle."""
    from dynamics.core import ghost, probe_pass as pp

    forced = {"ghost": (0.0, 1.0), "materialized": (1.0, 0.0)}[form]
    real = pp.entry_costs
    # where both forms exist (dense uses; an embedding is never materialized)
    monkeypatch.setattr(pp, "entry_costs", lambda ulist, B: forced if float("inf") not in real(ulist, B)
                        else real(ulist, B))
    formed = []
    monkeypatch.setattr(pp, "materialized", lambda u, n: formed.append(n) or ghost.materialized(u, n))
    model = tiny_model("llama", seed=3, dtype=torch.float64)
    params = resolve_params(model, "all")
    delta = random_delta(params, seed=2)
    out = probe_pass(model, pairs, params, delta=delta)
    assert bool(formed) == (form == "materialized")
    B = len(pairs)
    G = flat_grads(model, pairs.chosen + pairs.rejected, pairs.pad_id, params)
    assert_rel(out.upd, G @ torch.cat([delta[n].reshape(-1) for n in params]))
    assert_rel(out.ip_wl, (G[:B] * G[B:]).sum(1))
    assert_rel(out.sq_w, (G[:B] * G[:B]).sum(1))
