"""Tests for dynamics.core.losses: hand-computed values, finite differences, closed forms, TRL oracles."""
from __future__ import annotations

import math
import warnings
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from dynamics.core.losses import (
    LOSSES, _CLOSED_FORMS, closed_form_coefficients, compute_loss, general_form_table,
    get_loss, register, resolve_hyper,
)

D = torch.float64


def t(*xs):
    return torch.tensor(xs, dtype=D)


def softplus(x):  # -log σ(-x)
    return math.log1p(math.exp(x))


def sig(x):
    return 1.0 / (1.0 + math.exp(-x))


# Two pairs. Pair 0: lw=-3, ll=-5, rw=-4, rl=-4.5, |y_w|=2, |y_l|=4.
# Pair 1: lw=-6 (below its reference -4: DPOP penalty active), ll=-5, rw=-4, rl=-4.5, |y|=3, 5.
LW, LL, RW, RL, NW, NL = t(-3, -6), t(-5, -5), t(-4, -4), t(-4.5, -4.5), t(2, 3), t(4, 5)


def value(name, **hyper):
    return compute_loss(name, LW, LL, RW, RL, NW, NL, **hyper).loss.tolist()


# ----------------------------------------------------------------- hand-computed values
def test_dpo_value():
    # margins: (-3+4)-(-5+4.5) = 1.5 ; (-6+4)-(-0.5) = -1.5 ; β=0.1
    assert value("dpo") == pytest.approx([softplus(-0.15), softplus(0.15)], rel=1e-12)


def test_rdpo_value():
    # paper: β·margin + α(|y_w|-|y_l|) = 0.15 + 0.2·(2-4) = -0.25 ; -0.15 + 0.2·(3-5) = -0.55
    assert value("rdpo") == pytest.approx([softplus(0.25), softplus(0.55)], rel=1e-12)
    # table2: β(lw-ll) - c_ref - α(|y_w|-|y_l|) = 0.2 - 0.5 + 0.4 = 0.1 ; -0.1 - 0.5 + 0.4 = -0.2
    assert value("rdpo", variant="table2") == pytest.approx([softplus(-0.1), softplus(0.2)], rel=1e-12)


def test_simpo_value():
    # β(lw/|y_w| - ll/|y_l|) - γ = 2(-1.5 + 1.25) - 0.5 = -1.0 ; 2(-2 + 1) - 0.5 = -2.5
    assert value("simpo") == pytest.approx([softplus(1.0), softplus(2.5)], rel=1e-12)


def test_ipo_values():
    # (margin - 1/(2β))² = (1.5 - 5)², (-1.5 - 5)²
    assert value("ipo") == pytest.approx([12.25, 42.25], rel=1e-12)
    # averaged: (1/2 - (-0.5)/4 - 5)² = (-4.375)² ; (-2/3 + 0.5/5 - 5)²
    assert value("ipo_avg") == pytest.approx([4.375**2, (-2 / 3 + 0.1 - 5) ** 2], rel=1e-12)


def test_rrhf_value():
    # relu(ll/|y_l| - lw/|y_w|) = relu(-1.25 + 1.5) = 0.25 ; relu(-1 + 2) = 1 ; NLL sum: 3, 6
    assert value("rrhf") == pytest.approx([3.25, 7.0], rel=1e-12)
    assert value("rrhf", nll="mean", lam=0.5) == pytest.approx([0.25 + 0.5 * 1.5, 1 + 0.5 * 2], rel=1e-12)


def test_slic_value():
    # δ=3: relu(3 - (lw - ll)) = relu(3 - 2) = 1 ; relu(3 + 1) = 4 ; + λ·(-lw)
    assert value("slic", delta=3.0) == pytest.approx([1 + 3, 4 + 6], rel=1e-12)
    assert value("slic") == pytest.approx([0 + 3, 2 + 6], rel=1e-12)  # δ=1: pair 0 past margin
    assert value("slic", nll="mean") == pytest.approx([0 + 1.5, 2 + 2], rel=1e-12)


def test_cpo_value():
    # -log σ(β(lw - ll)) - λ lw: β(lw-ll) = 0.2, -0.1
    assert value("cpo") == pytest.approx([softplus(-0.2) + 3, softplus(0.1) + 6], rel=1e-12)
    assert value("cpo", nll="mean") == pytest.approx([softplus(-0.2) + 1.5, softplus(0.1) + 2], rel=1e-12)


def test_dpop_value():
    # pair 0: rw - lw = -1 -> no penalty, equals DPO ; pair 1: rw - lw = 2 -> penalty 2·λ = 100
    assert value("dpop") == pytest.approx([softplus(-0.15), softplus(-0.1 * (-1.5 - 100))], rel=1e-12)
    assert value("dpop", variant="outside") == pytest.approx([softplus(-0.15), softplus(0.15) + 100], rel=1e-12)


def test_kto_value():
    # z=0.2: λ_w(1 - σ(β(lw-rw) - z)) + λ_l(1 - σ(z - β(ll-rl))), lw-rw = 1, -2 ; ll-rl = -0.5
    want = [2 * (1 - sig(0.1 - 0.2)) + 0.5 * (1 - sig(0.2 + 0.05)),
            2 * (1 - sig(-0.2 - 0.2)) + 0.5 * (1 - sig(0.2 + 0.05))]
    assert value("kto", z_ref=0.2, lam_w=2.0, lam_l=0.5) == pytest.approx(want, rel=1e-12)


def test_sppo_value():
    # hard, τ = 1/(2β) = 5: (1-5)² + (-0.5+5)² ; (-2-5)² + (-0.5+5)²
    assert value("sppo") == pytest.approx([16 + 20.25, 49 + 20.25], rel=1e-12)
    # table2 / A.1: (lw - 10)² + (ll + 10)², no reference
    assert value("sppo", variant="table2") == pytest.approx([169 + 25, 256 + 25], rel=1e-12)
    out = compute_loss("sppo", LW, LL, variant="table2")  # refs not needed
    assert out.loss.tolist() == pytest.approx([194, 281], rel=1e-12)


def test_orpo_value():
    def logodds(a):
        return a - math.log(1 - math.exp(a))
    want = [1.5 - 0.1 * -softplus(-(logodds(-1.5) - logodds(-1.25))),
            2.0 - 0.1 * -softplus(-(logodds(-2.0) - logodds(-1.0)))]
    assert value("orpo") == pytest.approx(want, rel=1e-12)


def test_sft_value():
    assert value("sft") == pytest.approx([3, 6], rel=1e-12)
    assert value("sft", nll="mean") == pytest.approx([1.5, 2], rel=1e-12)


def test_every_loss_has_a_value_test():
    tested = {"dpo", "rdpo", "simpo", "ipo", "ipo_avg", "rrhf", "slic", "cpo", "dpop", "kto",
              "sppo", "orpo", "sft"}
    assert set(LOSSES) == tested


# ----------------------------------------------------------------- finite differences
# Written out, not built from LOSSES: a loss added to (or dropped from) the registry without a
# finite-difference case here fails `test_cases_cover_every_loss`.
CASES = [(name, {}) for name in ("cpo", "dpo", "dpop", "ipo", "ipo_avg", "kto", "orpo", "rdpo", "rrhf", "simpo",
                                 "slic", "sft", "sppo")] + [
    ("rdpo", {"variant": "table2"}), ("rrhf", {"nll": "mean"}), ("slic", {"nll": "mean"}),
    ("cpo", {"nll": "mean", "lam": 0.7}), ("dpop", {"variant": "outside"}),
    ("dpop", {"lam": 2.0}), ("kto", {"z_ref": 0.3, "lam_w": 1.3, "lam_l": 0.8}),
    ("sppo", {"variant": "table2"}), ("sft", {"nll": "mean"}), ("orpo", {"lam": 1.0}),
]
CASE_IDS = [n + "".join(f"-{k}={v}" for k, v in h.items()) for n, h in CASES]


def random_batch(seed, B=64):
    g = torch.Generator().manual_seed(seed)
    nw = torch.randint(1, 30, (B,), generator=g).to(D)
    nl = torch.randint(1, 30, (B,), generator=g).to(D)
    lw = -nw * torch.rand(B, generator=g, dtype=D) * 3 - 0.05  # mean token log-prob in (-3, 0)
    ll = -nl * torch.rand(B, generator=g, dtype=D) * 3 - 0.05
    rw = lw + torch.randn(B, generator=g, dtype=D) * 4
    rl = ll + torch.randn(B, generator=g, dtype=D) * 4
    return lw, ll, rw, rl, nw, nl


def kinks(lw, ll, rw, rl, nw, nl):
    """Distances to the hinge kinks of RRHF, SLiC-HF (δ=1) and DPOP."""
    return torch.stack([ll / nl - lw / nw, 1 - (lw - ll), rw - lw]).abs().min()


@pytest.mark.parametrize("name,hyper", CASES, ids=CASE_IDS)
def test_coefficients_match_finite_differences(name, hyper):
    lw, ll, rw, rl, nw, nl = batch = random_batch(0)
    assert kinks(*batch) > 1e-4
    out = compute_loss(name, lw, ll, rw, rl, nw, nl, **hyper)
    h = 1e-6

    def f(a, b):
        return compute_loss(name, a, b, rw, rl, nw, nl, **hyper).loss

    fd_w = (f(lw + h, ll) - f(lw - h, ll)) / (2 * h)
    fd_l = (f(lw, ll + h) - f(lw, ll - h)) / (2 * h)
    torch.testing.assert_close(out.d_w, -fd_w, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.d_l, fd_l, rtol=1e-6, atol=1e-7)


def test_cases_cover_every_loss():
    assert {n for n, _ in CASES} == set(LOSSES)


# ----------------------------------------------------------------- closed forms and signs
CF_CASES = [(n, h) for n, h in CASES if n in _CLOSED_FORMS] + [("cpo", {"nll": "mean"})]


@pytest.mark.parametrize("name,hyper", CF_CASES, ids=[c[0] + str(c[1]) for c in CF_CASES])
def test_closed_forms_equal_autograd(name, hyper):
    lw, ll, rw, rl, nw, nl = random_batch(1)
    out = compute_loss(name, lw, ll, rw, rl, nw, nl, **hyper)
    d_w, d_l = closed_form_coefficients(name, lw, ll, rw, rl, nw, nl, **hyper)
    torch.testing.assert_close(d_w, out.d_w, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(d_l, out.d_l, rtol=1e-12, atol=1e-14)


def test_closed_forms_cover_the_papers():
    assert {"dpo", "simpo", "sppo", "cpo"} <= set(_CLOSED_FORMS)
    with pytest.raises(ValueError, match="no closed form.*available: cpo, dpo"):
        closed_form_coefficients("orpo", *random_batch(0))


def test_dpo_coefficients_are_beta_sigmoid():
    out = compute_loss("dpo", LW, LL, RW, RL, beta=0.3)
    want = [0.3 * sig(-0.3 * 1.5), 0.3 * sig(0.3 * 1.5)]  # β σ(-β margin)
    assert out.d_w.tolist() == pytest.approx(want, rel=1e-12)
    assert out.d_l.tolist() == pytest.approx(want, rel=1e-12)


def test_simpo_coefficient_ratio_is_length_ratio():
    lw, ll, rw, rl, nw, nl = random_batch(2)
    out = compute_loss("simpo", lw, ll, None, None, nw, nl)
    torch.testing.assert_close(out.d_w / out.d_l, nl / nw, rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", ["dpo", "rdpo", "simpo", "cpo", "kto", "dpop", "orpo"])
def test_coefficients_positive_where_papers_say(name):
    lw, ll, rw, rl, nw, nl = random_batch(3)
    out = compute_loss(name, lw, ll, rw, rl, nw, nl)
    assert (out.d_w > 0).all() and (out.d_l > 0).all()


def test_sign_flips_ipo_sppo_and_hinges():
    # IPO: positive below the target margin 1/(2β)=5, negative above it
    out = compute_loss("ipo", t(-1.0, -1.0), t(-3.0, -9.0), t(0.0, 0.0), t(0.0, 0.0))
    assert out.d_w[0] > 0 and out.d_l[0] > 0 and out.d_w[1] < 0 and out.d_l[1] < 0
    # SPPO: d_w < 0 once lw-rw > 5 ; d_l < 0 once ll-rl < -5
    out = compute_loss("sppo", t(1.0, 7.0), t(-1.0, -7.0), t(0.0, 0.0), t(0.0, 0.0))
    assert out.d_w.tolist() == pytest.approx([8.0, -4.0]) and out.d_l.tolist() == pytest.approx([8.0, -4.0])
    # hinges: past the margin only the NLL term is left (d_w = λ, d_l = 0)
    out = compute_loss("slic", t(-1.0), t(-9.0), lam=0.5)
    assert out.d_w.tolist() == [0.5] and out.d_l.tolist() == [0.0]
    out = compute_loss("rrhf", t(-1.0), t(-9.0), None, None, t(1.0), t(1.0), lam=0.5)
    assert out.d_w.tolist() == [0.5] and out.d_l.tolist() == [0.0]


# ----------------------------------------------------------------- API behaviour
def test_loss_stays_differentiable_and_matches_coefficients():
    lw = t(-3.0, -6.0).requires_grad_(True)
    ll = t(-5.0, -5.0).requires_grad_(True)
    out = compute_loss("dpop", lw, ll, RW, RL)
    out.loss.sum().backward()
    torch.testing.assert_close(lw.grad, -out.d_w)
    torch.testing.assert_close(ll.grad, out.d_l)
    assert not out.d_w.requires_grad and not out.d_l.requires_grad


def test_coefficients_under_no_grad():
    with torch.no_grad():
        out = compute_loss("dpo", LW, LL, RW, RL)
    assert out.d_w.tolist() == pytest.approx([0.1 * sig(-0.15), 0.1 * sig(0.15)], rel=1e-12)


def test_unknown_loss_lists_known_names():
    with pytest.raises(ValueError, match=r"unknown loss 'dpoo'; known: cpo, dpo, dpop, ipo"):
        get_loss("dpoo")
    with pytest.raises(ValueError, match="unknown loss"):
        compute_loss("dpoo", LW, LL)


def test_hyper_resolution():
    assert resolve_hyper("dpo", {"beta": 0.5}) == {"beta": 0.5}
    assert resolve_hyper("simpo") == {"beta": 2.0, "gamma": 0.5}
    with pytest.raises(ValueError, match=r"\['gama'\].*valid: \['beta', 'gamma'\]"):
        resolve_hyper("simpo", {"gama": 1.0})
    with pytest.raises(ValueError, match="unknown hyper"):
        compute_loss("dpo", LW, LL, RW, RL, gamma=1.0)
    with pytest.raises(ValueError, match="variant='nope'"):
        compute_loss("dpop", LW, LL, RW, RL, variant="nope")


def test_defaults_are_read_only_and_paper_values():
    with pytest.raises(TypeError):
        LOSSES["dpo"].defaults["beta"] = 1.0
    assert LOSSES["dpo"].defaults["beta"] == 0.1
    assert (LOSSES["slic"].defaults["delta"], LOSSES["slic"].defaults["lam"]) == (1.0, 1.0)
    assert (LOSSES["rdpo"].defaults["alpha"], LOSSES["dpop"].defaults["lam"]) == (0.2, 50.0)
    assert LOSSES["simpo"].defaults["gamma"] == 0.5


def test_missing_inputs_raise():
    with pytest.raises(ValueError, match="'dpo' needs reference"):
        compute_loss("dpo", LW, LL)
    with pytest.raises(ValueError, match="'simpo' needs response lengths"):
        compute_loss("simpo", LW, LL)
    with pytest.raises(ValueError, match="1-D"):
        compute_loss("cpo", LW[None], LL[None])
    with pytest.raises(ValueError, match="shape"):
        compute_loss("dpo", LW, LL, RW[:1], RL)


def test_nonfinite_raises_unless_disabled():
    lw = t(-3.0, float("nan"), -1.0)
    with pytest.raises(ValueError, match=r"loss 'dpo' produced NaN in the loss for pairs \[1\]"):
        compute_loss("dpo", lw, t(-1, -1, -1), t(0, 0, 0), t(0, 0, 0))
    out = compute_loss("dpo", lw, t(-1, -1, -1), t(0, 0, 0), t(0, 0, 0), check_finite=False)
    assert math.isnan(out.loss[1]) and math.isfinite(out.loss[0])
    with pytest.raises(ValueError, match="produced inf"):  # zero length
        compute_loss("simpo", t(-1.0), t(-2.0), None, None, t(0.0), t(1.0))


def test_registry_rejects_duplicates_and_table_lists_all():
    with pytest.raises(ValueError, match="already registered"):
        register("dpo", defaults={}, formula="", needs_ref=False, reference="")(lambda *a: a[0])
    rows = general_form_table()
    assert [r["name"] for r in rows] == sorted(LOSSES)
    assert all(r["formula"] and isinstance(r["defaults"], dict) for r in rows)
    assert {r["name"] for r in rows if r["length_normalized"]} == {"simpo", "ipo_avg", "rrhf", "orpo"}
    assert {r["name"] for r in rows if not r["needs_ref"]} == {"simpo", "rrhf", "slic", "cpo", "orpo", "sft"}


# ----------------------------------------------------------------- TRL oracles
def _import(path, attr):
    mod = pytest.importorskip(path, reason=f"TRL module {path} not installed")
    if not hasattr(mod, attr):
        pytest.skip(f"{path}.{attr} not in this TRL version")
    return getattr(mod, attr)


def _accelerator():
    ident = lambda x: x  # noqa: E731
    return SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=ident, gather=ident)


def _fake_model(per_token):
    """Stands in for a causal LM called with ``fused_lm_head=True``: returns fixed token log-probs."""
    def model(**kwargs):
        z = torch.zeros_like(per_token)
        return SimpleNamespace(log_probs=per_token, entropy=z, mean_logits=z,
                               is_top1=torch.zeros_like(per_token, dtype=torch.bool))
    return model


def _sequences(logps, lens, prompt=3):
    """input_ids/completion_mask/per-token log-probs (N, T) whose completion sums are ``logps``."""
    N, T = len(logps), prompt + int(max(lens))
    mask = torch.zeros(N, T, dtype=torch.long)
    per_token = torch.zeros(N, T - 1, dtype=D)
    for i, (lp, n) in enumerate(zip(logps.tolist(), lens.tolist())):
        mask[i, prompt:prompt + int(n)] = 1
        per_token[i, prompt - 1:prompt - 1 + int(n)] = lp / n  # shifted: position t predicts t+1
    return torch.ones(N, T, dtype=torch.long), mask, per_token


def _trl_dpo(loss_type, beta, lw, ll, rw, rl, nw, nl):
    """Per-pair loss from TRL's DPOTrainer._compute_loss (trl/trainer/dpo_trainer.py), one pair per call."""
    DPOTrainer = _import("trl.trainer.dpo_trainer", "DPOTrainer")
    out = []
    for i in range(len(lw)):
        ids, mask, per_token = _sequences(torch.stack([lw[i], ll[i]]), torch.stack([nw[i], nl[i]]))
        fake = SimpleNamespace(
            model=SimpleNamespace(training=True), accelerator=_accelerator(), aux_loss_enabled=False,
            ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
            loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=0.0,
            use_weighting=False, _metrics=defaultdict(lambda: defaultdict(list)),
            _total_train_tokens=0, _tp_size=1)
        inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), completion_mask=mask,
                      ref_chosen_logps=rw[i:i + 1], ref_rejected_logps=rl[i:i + 1])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out.append(DPOTrainer._compute_loss(fake, _fake_model(per_token), inputs, False))
    return torch.stack(out)


@pytest.mark.parametrize("trl_type,ours,hyper", [
    ("sigmoid", "dpo", {"beta": 0.1}),
    ("ipo", "ipo_avg", {"beta": 0.1}),
    ("sppo_hard", "sppo", {"beta": 0.1}),
])
def test_trl_dpo_trainer_losses(trl_type, ours, hyper):
    lw, ll, rw, rl, nw, nl = random_batch(4, B=6)
    want = _trl_dpo(trl_type, hyper["beta"], lw, ll, rw, rl, nw, nl)
    got = compute_loss(ours, lw, ll, rw, rl, nw, nl, **hyper).loss
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_trl_dpo_trainer_hinge_and_sft():
    lw, ll, rw, rl, nw, nl = random_batch(5, B=6)
    zero = torch.zeros_like(lw)
    beta = 0.5  # TRL hinge relu(1 - β·(lw-ll)) = β · relu(1/β - (lw-ll)) = β · slic(δ=1/β, λ=0)
    want = _trl_dpo("hinge", beta, lw, ll, zero, zero, nw, nl)
    got = beta * compute_loss("slic", lw, ll, delta=1 / beta, lam=0.0).loss
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    # TRL "sft": token-mean NLL of the chosen response (per pair, since one pair per call)
    want = _trl_dpo("sft", 0.1, lw, ll, rw, rl, nw, nl)
    got = compute_loss("sft", lw, ll, None, None, nw, nl, nll="mean").loss
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_trl_kto_trainer_loss():
    KTOTrainer = _import("trl.trainer.kto_trainer", "KTOTrainer")
    lw, ll, rw, rl, nw, nl = random_batch(6, B=5)
    beta, lam_w, lam_l = 0.1, 1.3, 0.7
    kl_policy, kl_ref = t(-4.0, -6.0), t(-5.0, -7.5)  # kl = mean(policy - ref) = 1.25
    for i in range(len(lw)):
        ids, mask, per_token = _sequences(torch.stack([lw[i], ll[i]]), torch.stack([nw[i], nl[i]]))
        fake = SimpleNamespace(
            model=SimpleNamespace(training=True), accelerator=_accelerator(), aux_loss_enabled=False,
            precompute_ref_logps=True, calculate_KL=True, loss_type="kto", beta=beta,
            desirable_weight=lam_w, undesirable_weight=lam_l,
            _compute_kl_logps=lambda model, batch: kl_policy,
            _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1)
        batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), completion_mask=mask,
                     label=torch.tensor([True, False]), ref_logps=torch.stack([rw[i], rl[i]]), ref_KL_logps=kl_ref)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trl_loss = KTOTrainer._compute_loss(fake, _fake_model(per_token), batch, False)
        ours = compute_loss("kto", lw[i:i + 1], ll[i:i + 1], rw[i:i + 1], rl[i:i + 1],
                            beta=beta, lam_w=lam_w, lam_l=lam_l, z_ref=beta * 1.25).loss
        # TRL averages the two (desirable, undesirable) losses of the pair
        torch.testing.assert_close(ours[0], 2 * trl_loss, rtol=1e-10, atol=1e-12)


def _trl_cpo(loss_type, beta, chosen, rejected, gamma=0.5):
    CPOTrainer = _import("trl.experimental.cpo.cpo_trainer", "CPOTrainer")
    fake = SimpleNamespace(alpha=0.0, loss_type=loss_type, beta=beta, simpo_gamma=gamma,
                           label_smoothing=0.0, accelerator=_accelerator())
    return CPOTrainer.cpo_loss(fake, chosen, rejected)[0]


def test_trl_cpo_trainer_losses():
    lw, ll, rw, rl, nw, nl = random_batch(7, B=16)
    # CPO sigmoid = our cpo's preference part (λ=0); TRL adds cpo_alpha·NLL outside cpo_loss,
    # as a token mean over the whole chosen batch (our nll="mean" per pair).
    torch.testing.assert_close(compute_loss("cpo", lw, ll, lam=0.0).loss,
                               _trl_cpo("sigmoid", 0.1, lw, ll), rtol=1e-12, atol=1e-12)
    # SimPO: TRL feeds average log-probs (average_log_prob=True for "simpo")
    torch.testing.assert_close(compute_loss("simpo", lw, ll, None, None, nw, nl, beta=2.0, gamma=0.5).loss,
                               _trl_cpo("simpo", 2.0, lw / nw, ll / nl, gamma=0.5), rtol=1e-12, atol=1e-12)
    # IPO in CPOTrainer: reference-free and averaged = our ipo_avg with zero references
    zero = torch.zeros_like(lw)
    torch.testing.assert_close(compute_loss("ipo_avg", lw, ll, zero, zero, nw, nl, beta=0.2).loss,
                               _trl_cpo("ipo", 0.2, lw / nw, ll / nl), rtol=1e-12, atol=1e-12)
    # hinge: relu(1 - β(lw-ll)) = β · slic(δ=1/β, λ=0)
    torch.testing.assert_close(0.25 * compute_loss("slic", lw, ll, delta=4.0, lam=0.0).loss,
                               _trl_cpo("hinge", 0.25, lw, ll), rtol=1e-12, atol=1e-12)


def test_trl_orpo_odds_ratio_loss():
    ORPOTrainer = _import("trl.experimental.orpo.orpo_trainer", "ORPOTrainer")
    lw, ll, rw, rl, nw, nl = random_batch(8, B=16)
    lw[0], nw[0] = -1e-4, 1.0  # near-certain response: log(1 - p) needs the stable branch
    fake = SimpleNamespace(beta=0.1, accelerator=_accelerator())
    trl_or = ORPOTrainer.odds_ratio_loss(fake, lw / nw, ll / nl)[0]  # = λ·log σ(log odds ratio)
    # ORPO = SFT + λ·L_OR; TRL's SFT term is over prompt+response, so add the response NLL here.
    want = -(lw / nw) - trl_or.to(D)
    got = compute_loss("orpo", lw, ll, None, None, nw, nl, lam=0.1).loss
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)  # TRL casts to float32
