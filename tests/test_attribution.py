"""Token attributions (`dynamics.core.attribution`) against an independent integrated-gradients oracle.

The oracle, written here: the straight path from the baseline embeddings to the input embeddings on
a 129-point grid, one batched ``model(inputs_embeds=...)`` forward (no mask, default positions) and
one ``torch.autograd.grad``; trapezoid sums at h = 1/16 … 1/128 and Romberg extrapolation give the
integral with an error estimate. captum's Gauss-Legendre attributions must match it within that
estimate plus the float32 rounding of captum's quadrature weights (a bound derived from the
integrand), and their error must shrink with ``n_steps``. Completeness, the margin's linearity,
mode / grad hygiene and the input errors are checked on tiny float64 GPT-2 and Llama models.

`float64_exact` (tests/conftest.py) keeps Llama's attention softmax, rotary and RMSNorm in float64.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import dynamics.core.attribution as attribution_mod
from dynamics.core.attribution import ATTRIBUTION_COLUMNS, attribution_frame, token_attributions
from dynamics.core.logprobs import TokenizedSequence, sequence_logprobs, tokenize_pairs
from dynamics.errors import InputError
from dynamics.inputs.models import tiny_model

pytestmark = pytest.mark.usefixtures("float64_exact", "one_thread")

V = 32
PAD = 31           # not 0: tiny Llama's embedding has padding_idx 0 (a zero row), so pad would be zeros
EPS32 = 2.0 ** -24  # float32 unit round-off (captum casts its quadrature weights to float32)
ARCHS = ("gpt2", "llama")


def S(prompt, response):
    return TokenizedSequence(tuple(prompt), tuple(response), tuple(f"<{i}>" for i in response))


W = S([1, 2, 3, 4], [5, 6, 7, 8, 9])       # chosen
L = S([1, 2, 3, 4], [10, 11])              # rejected, shorter: the margin batch is padded
L_LONG = S([1, 2, 3, 4], [12, 13, 14, 15, 16, 17, 18])


@pytest.fixture(scope="module", params=ARCHS)
def model(request):
    return tiny_model(request.param, seed=0, vocab_size=V, dtype=torch.float64)


@pytest.fixture(scope="module")
def gpt2():
    return tiny_model("gpt2", seed=1, vocab_size=V, dtype=torch.float64)


# ------------------------------------------------------------------ the oracle

def baseline_vector(model, baseline):
    e = model.get_input_embeddings().weight
    return torch.zeros_like(e[0]) if baseline == "zeros" else e[PAD].detach()


def oracle_integrand(model, seq, baseline, n=128):
    """``((e − e') · ∂f/∂e)(α_k)`` at α_k = k/n, k = 0..n: (n+1, T); plus f at α = 0 and α = 1."""
    ids = torch.tensor([seq.prompt_ids + seq.response_ids])
    e = model.get_input_embeddings()(ids).detach()                               # (1, T, d)
    e0 = baseline_vector(model, baseline).expand_as(e)
    alpha = torch.linspace(0, 1, n + 1, dtype=torch.float64)
    path = (e0 + alpha[:, None, None] * (e - e0)).requires_grad_()               # (n+1, T, d)
    P, y = len(seq.prompt_ids), torch.tensor(seq.response_ids)
    logits = model(inputs_embeds=path).logits[:, P - 1: -1]                      # (n+1, |y|, V)
    f = F.log_softmax(logits, -1).gather(-1, y.expand(n + 1, -1)[..., None])[..., 0].sum(-1)  # (n+1,)
    (g,) = torch.autograd.grad(f.sum(), path)
    f = f.detach()
    return (g * (e - e0)).sum(-1).detach(), float(f[0]), float(f[-1])


def romberg(integrand):
    """The integral over [0, 1] of samples on a uniform grid of 2^m + 1 points, by Romberg from the
    trapezoid sums at h = 8/n, 4/n, 2/n, 1/n; returns (value, error estimate, finest trapezoid)."""
    n = integrand.shape[0] - 1
    trap = []
    for stride in (8, 4, 2, 1):
        x = integrand[::stride]
        trap.append(((x[0] + x[-1]) / 2 + x[1:-1].sum(0)) * stride / n)
    R = [trap]
    for j in range(1, len(trap)):
        prev = R[-1]
        R.append([(4 ** j * prev[i + 1] - prev[i]) / (4 ** j - 1) for i in range(len(prev) - 1)])
    value = R[-1][0]
    return value, (value - R[-2][1]).abs(), trap[-1]


def oracle(model, seq, baseline="pad"):
    """(attributions (T,), per-token error bound of the oracle (T,), float32-weight bound (T,), f(x'), f(x))."""
    integrand, f0, f1 = oracle_integrand(model, seq, baseline)
    value, est, _ = romberg(integrand)
    w32 = EPS32 * integrand.abs().max(0).values                  # Σ_k |fl32(w_k) − w_k|·|·| ≤ ε max_k |·|
    return value, est, w32, f0, f1


# ------------------------------------------------------------------ accuracy

def test_oracle_is_converged(model):
    """The oracle itself: Romberg moves the trapezoid sum by far more than its own error estimate."""
    integrand, _, _ = oracle_integrand(model, W, "pad")
    value, est, trap = romberg(integrand)
    assert float(est.max()) < 1e-9 * float(value.abs().max())
    assert float((trap - value).abs().max()) > 100 * float(est.max())


def test_gauss_legendre_matches_the_oracle(model):
    ref, est, w32, _, _ = oracle(model, W)
    a = token_attributions(model, W, PAD, n_steps=64)
    err = np.abs(a.attributions - ref.numpy())
    tol = (est + w32).numpy() + 1e-13
    assert a.attributions.shape == (W.length,) and a.attributions.dtype == np.float64
    assert (err <= tol).all(), f"err {err.max():.2e} vs tol {tol.min():.2e}"
    assert a.attributions[-1] == 0.0       # the last response token conditions nothing


@pytest.mark.parametrize("method", ["gausslegendre", "riemann_middle"])
def test_quadrature_error_shrinks_with_n_steps(model, method):
    """Gauss-Legendre: the error falls monotonically and by > 1e5 from 2 to 16 steps (measured: to
    ~1e-10, the float32 floor of captum's weights); midpoint rule: second order, 4x per doubling."""
    ref, _, _, _, _ = oracle(model, W)
    steps = (2, 4, 8, 16) if method == "gausslegendre" else (8, 16, 32)
    errs = [float(np.abs(token_attributions(model, W, PAD, n_steps=n, method=method).attributions
                         - ref.numpy()).max()) for n in steps]
    if method == "gausslegendre":
        assert all(e1 > e2 for e1, e2 in zip(errs, errs[1:])) and errs[-1] < 1e-5 * errs[0], errs
    else:
        ratios = [e1 / e2 for e1, e2 in zip(errs, errs[1:])]
        assert all(3.8 < r < 4.2 for r in ratios), (errs, ratios)


@pytest.mark.parametrize("baseline", ["pad", "zeros"])
def test_completeness(model, baseline):
    """f(x) is the library's log-prob, f(baseline) the oracle's value at α = 0, captum's delta is
    Σ attributions − (f(x) − f(x')), and it is below 1e-6 of f(x) − f(x') at 64 Gauss-Legendre steps
    (for the zeros baseline only on GPT-2: on a pre-norm rotary model its path is nearly singular,
    the quadrature needs hundreds of steps, see the module docstring; the rest holds there too)."""
    a = token_attributions(model, W, PAD, n_steps=64, baseline=baseline)
    _, _, _, f0, f1 = oracle(model, W, baseline)
    with torch.no_grad():
        logp = float(sequence_logprobs(model, [W], PAD).logp[0])
    assert abs(a.value - logp) <= 1e-12 * abs(logp)
    assert abs(a.value - f1) <= 1e-12 * abs(f1)
    assert abs(a.baseline_value - f0) <= 1e-12 * abs(f0)
    gap = a.value - a.baseline_value
    assert abs(a.total - gap - a.delta) <= 1e-12 * abs(gap)
    if baseline == "pad" or model.config.model_type == "gpt2":
        assert abs(a.delta) < 1e-6 * abs(gap), (a.delta, gap)


def test_zeros_baseline_differs_from_pad(model):
    """The baseline is really applied: the two baselines give different f(x') but the same f(x)."""
    p = token_attributions(model, W, PAD, n_steps=4, baseline="pad")
    z = token_attributions(model, W, PAD, n_steps=4, baseline="zeros")
    assert p.value == pytest.approx(z.value, rel=1e-14)
    assert abs(p.baseline_value - z.baseline_value) > 1e-3


@pytest.mark.parametrize("other", [L, L_LONG], ids=["rejected-shorter", "rejected-longer"])
def test_margin_is_chosen_minus_rejected(model, other):
    kw = dict(n_steps=16)
    m = token_attributions(model, W, PAD, target="margin", seq_other=other, **kw)
    c = token_attributions(model, W, PAD, target="chosen", **kw)
    r = token_attributions(model, W, PAD, target="rejected", seq_other=other, **kw)
    tol = 1e-12 * max(np.abs(c.attributions).max(), np.abs(r.attributions).max())
    assert r.token_ids == other.prompt_ids + other.response_ids and r.response_start == 4
    np.testing.assert_allclose(m.prompt_attributions, c.prompt_attributions - r.prompt_attributions, rtol=0, atol=tol)
    np.testing.assert_allclose(m.response_attributions, c.response_attributions, rtol=0, atol=tol)
    np.testing.assert_allclose(m.other_attributions, -r.response_attributions, rtol=0, atol=tol)
    assert m.other_token_ids == other.response_ids and len(m.other_tokens) == len(other.response_ids)
    with torch.no_grad():
        lp = sequence_logprobs(model, [W, other], PAD).logp
    assert m.value == pytest.approx(float(lp[0] - lp[1]), rel=1e-12)
    assert m.baseline_value == pytest.approx(c.baseline_value - r.baseline_value, rel=1e-12)
    assert m.delta == pytest.approx(c.delta - r.delta, abs=1e-12)
    assert m.total == pytest.approx(m.value - m.baseline_value + m.delta, rel=1e-12)


def test_internal_batch_size_changes_nothing(gpt2):
    a = token_attributions(gpt2, W, PAD, target="margin", seq_other=L, n_steps=12)
    b = token_attributions(gpt2, W, PAD, target="margin", seq_other=L, n_steps=12, internal_batch_size=6)
    np.testing.assert_allclose(a.attributions, b.attributions, rtol=0, atol=1e-14)
    np.testing.assert_allclose(a.other_attributions, b.other_attributions, rtol=0, atol=1e-14)


# ------------------------------------------------------------------ hygiene

def _state(model):
    return (model.training, [p.requires_grad for p in model.parameters()],
            [p.grad for p in model.parameters()], dict(model.get_input_embeddings()._forward_hooks))


def _prepare(model):
    """Train mode, a sentinel .grad on every parameter, one frozen parameter; returns the sentinels' values."""
    model.train()
    ps = list(model.parameters())
    for p in ps:
        p.grad = torch.full_like(p, 0.5)
    ps[-1].requires_grad_(False)
    return [p.grad.clone() for p in ps]


def test_mode_and_grads_restored(model):
    seen = []
    emb = model.get_input_embeddings()
    handle = emb.register_forward_pre_hook(lambda mod, args: seen.append(model.training))
    try:
        values = _prepare(model)
        before = _state(model)
        a = token_attributions(model, W, PAD, target="margin", seq_other=L, n_steps=4)
        after = _state(model)
        assert seen and not any(seen)                                            # eval mode throughout
        assert after[0] is True and after[1] == before[1]
        assert all(g1 is g2 for g1, g2 in zip(after[2], before[2]))
        assert all(torch.equal(p.grad, v) for p, v in zip(model.parameters(), values))
        assert after[3].keys() == before[3].keys()                               # the swap hook is gone
        assert np.isfinite(a.attributions).all()
    finally:
        handle.remove()
        model.eval()
        for p in model.parameters():
            p.grad = None
            p.requires_grad_(True)


def test_state_restored_after_an_error(gpt2, monkeypatch):
    calls = []

    def failing(model, batch):
        calls.append(1)
        raise RuntimeError("boom")

    monkeypatch.setattr(attribution_mod, "batch_logprobs", failing)
    _prepare(gpt2)
    before = _state(gpt2)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            token_attributions(gpt2, W, PAD, baseline="zeros", n_steps=4)
        after = _state(gpt2)
        assert calls and after[0] is True and after[1] == before[1] and after[3].keys() == before[3].keys()
    finally:
        gpt2.eval()
        for p in gpt2.parameters():
            p.grad = None
            p.requires_grad_(True)


def test_peft_model(gpt2):
    """A LoRA wrapper (B = 0: the same function) gives the base model's attributions; the adapter's
    requires_grad flags survive."""
    peft = pytest.importorskip("peft")
    import copy
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], lora_dropout=0.0, fan_in_fan_out=True)
    wrapped = peft.get_peft_model(copy.deepcopy(gpt2), cfg)
    flags = [p.requires_grad for p in wrapped.parameters()]
    a = token_attributions(wrapped, W, PAD, n_steps=8)
    b = token_attributions(gpt2, W, PAD, n_steps=8)
    np.testing.assert_allclose(a.attributions, b.attributions, rtol=0, atol=1e-13)
    assert [p.requires_grad for p in wrapped.parameters()] == flags and any(flags) and not all(flags)


# ------------------------------------------------------------------ input errors

@pytest.mark.parametrize("kwargs, match", [
    (dict(target="logp"), "unknown attribution target 'logp'"),
    (dict(target="margin"), "target 'margin' needs the rejected sequence"),
    (dict(target="rejected"), "target 'rejected' needs the rejected sequence"),
    (dict(n_steps=0), "n_steps must be an integer >= 1"),
    (dict(n_steps=2.5), "n_steps must be an integer >= 1"),
    (dict(n_steps=1, method="riemann_middle"), "needs n_steps >= 2"),
    (dict(baseline="mask"), "unknown baseline 'mask'"),
    (dict(method="simpson"), "unknown integration method 'simpson'"),
    (dict(method="riemann_trapezoid"), r"sum to \(n-1\)/n"),
    (dict(internal_batch_size=0), "internal_batch_size must be None or an integer >= 1"),
    (dict(target="margin", seq_other=S([1, 2], [5])), "same prompt"),
    (dict(seq=S([], [5, 6])), "0 prompt and 2 response tokens"),
    (dict(seq=S([1, 2], [5, V])), rf"token ids \[{V}\] are outside the model's vocabulary of {V}"),
    (dict(pad_id=V), rf"pad_id must be a token id in \[0, {V}\)"),
    (dict(pad_id=None), "pad_id must be a token id"),
    (dict(seq=S([1] * 250, [5] * 10)), "longer than the model's context of 256 tokens"),
])
def test_bad_input_names_the_problem(gpt2, kwargs, match):
    kw = dict(seq=W, pad_id=PAD) | kwargs
    seq, pad = kw.pop("seq"), kw.pop("pad_id")
    with pytest.raises(InputError, match=match):
        token_attributions(gpt2, seq, pad, **kw)


# ------------------------------------------------------------------ the report table

def test_frame(gpt2):
    m = token_attributions(gpt2, W, PAD, target="margin", seq_other=L, n_steps=8)
    df = attribution_frame(m)
    assert list(df.columns) == ATTRIBUTION_COLUMNS and len(df) == W.length + len(L.response_ids)
    assert df.groupby(["side", "segment"]).size().to_dict() == {
        ("shared", "prompt"): 4, ("chosen", "response"): 5, ("rejected", "response"): 2}
    assert df.attribution.sum() == pytest.approx(m.total, rel=1e-12)
    rej = df[df.side == "rejected"]
    assert rej.position.tolist() == [4, 5] and rej.token_id.tolist() == [10, 11]
    assert rej.token.tolist() == ["<10>", "<11>"]
    r = attribution_frame(token_attributions(gpt2, W, PAD, target="rejected", seq_other=L, n_steps=8))
    alone = token_attributions(gpt2, S([7, 8], [10, 11]), PAD, target="rejected", seq_other=L_LONG, n_steps=8)
    assert alone.response_start == 4 and alone.token_ids == L_LONG.prompt_ids + L_LONG.response_ids
    assert set(r.side) == {"rejected"} and r.segment.tolist() == ["prompt"] * 4 + ["response"] * 2
    assert r.token.tolist()[:4] == ["<1>", "<2>", "<3>", "<4>"]


def test_tokens_from_a_tokenizer():
    from dynamics.inputs.data import PreferencePair
    from dynamics.inputs.models import tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_model("gpt2", seed=0, dtype=torch.float64)
    pairs = tokenize_pairs(tok, [PreferencePair("p", "The movie was", " wonderful.", " terrible.")])
    a = token_attributions(model, pairs.chosen[0], pairs.pad_id, target="margin", seq_other=pairs.rejected[0],
                           tokenizer=tok, n_steps=8)
    assert "".join(a.tokens) == "The movie was wonderful."
    assert "".join(a.other_tokens) == " terrible."
    assert a.tokens[a.response_start:] == pairs.chosen[0].tokens


def test_converged_flags_a_coarse_quadrature(model):
    """`Attribution.converged`: a 64-step attribution is converged (|δ| ≪ gap, test_completeness),
    a 1-step one on the zeros baseline of a pre-norm model is not (the nearly singular path of
    the module docstring), and the threshold is |δ| ≤ CONVERGED_REL·|gap|, both ways."""
    import dataclasses
    from dynamics.core.attribution import CONVERGED_REL
    good = token_attributions(model, W, PAD, n_steps=64, baseline="pad")
    assert good.converged()
    gap = good.value - good.baseline_value
    at = lambda d: dataclasses.replace(good, delta=d)
    assert at(0.99 * CONVERGED_REL * gap).converged() and not at(1.01 * CONVERGED_REL * gap).converged()
    assert not at(-1.01 * CONVERGED_REL * gap).converged()
    coarse = token_attributions(model, W, PAD, n_steps=1, baseline="zeros")
    rel = abs(coarse.delta) / abs(coarse.value - coarse.baseline_value)
    assert coarse.converged() is (rel <= CONVERGED_REL)
