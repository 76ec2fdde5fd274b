"""`Analyzer` binds θ and the engine once; each method equals an independent computation on a
tiny float64 model: autograd flat gradients (Grams, kernel), the first-order change of a real
parameter update (update effects), a plain forward (log-probs)."""
import pytest
import torch

from dynamics.core.analyzer import Analyzer
from dynamics.core.grads import flat_grads, select_params, token_flat_grads
from dynamics.core.logprobs import TokenizedPairs, TokenizedSequence, sequence_logprobs
from dynamics.inputs.models import tiny_model

pytestmark = pytest.mark.usefixtures("float64_exact")
TOL = 1e-10


def S(prompt, response):
    return TokenizedSequence(tuple(prompt), tuple(response), tuple(f"<{i}>" for i in response))


W = [S([1, 2, 3], [4, 5, 6, 7]), S([9, 3], [4, 8])]
L = [S([1, 2, 3], [4, 5, 9]), S([9, 3], [11, 12, 13])]
PAIRS = TokenizedPairs(["a", "b"], W, L, 0)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", seed=1, vocab_size=32, dtype=torch.float64)


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


@pytest.mark.parametrize("impl", ["ghost", "func", "autograd"])
def test_grams_and_kernel_equal_autograd(model, impl):
    an = Analyzer(model, 0, params=["layers.0", "lm_head"], impl=impl, chunk_size=2)
    seqs = W + L
    g = flat_grads(model, seqs, 0, an.params)                                     # (4, P) oracle
    G = g @ g.T
    assert rel(an.sentence_gram(seqs), G) < TOL
    assert rel(an.kernel(W, L), G[:2, 2:]) < TOL
    ip = an.pair_inner_products(PAIRS)
    assert rel(ip["ip_wl"], torch.stack([G[0, 2], G[1, 3]])) < TOL
    assert rel(ip["cos_wl"], G[[0, 1], [2, 3]] / (G[[0, 1], [0, 1]] * G[[2, 3], [2, 3]]).sqrt()) < TOL
    ta, tb = token_flat_grads(model, W[0], an.params), token_flat_grads(model, L[0], an.params)
    tg = an.token_gram(W[0], L[0])
    assert rel(tg.M, ta @ tb.T) < TOL and rel(tg.sq_a, ta.pow(2).sum(1)) < TOL


def test_params_resolved_once(model):
    """θ is fixed at construction: freezing a parameter later does not change the Gram."""
    an = Analyzer(model, 0, params="trainable")
    before = an.sentence_gram(W[:1])
    head = model.lm_head.weight
    head.requires_grad_(False)
    try:
        assert set(an.params) == set(select_params(model, "all"))
        assert rel(an.sentence_gram(W[:1]), before) < TOL
        assert "lm_head.weight" not in select_params(model, "trainable")
    finally:
        head.requires_grad_(True)


def test_update_effects_is_the_first_order_change(model):
    """⟨g_i, Δθ⟩ from a snapshot/delta of a real in-place update equals flat-gradient · Δθ (both at
    the current θ), and the actual change minus it is O(‖Δθ‖²)."""
    an = Analyzer(model, 0, params="all")
    seqs = W + L
    before = an.snapshot()
    lp0 = sequence_logprobs(model, seqs, 0).logp.detach()
    torch.manual_seed(0)
    direction = {n: torch.randn_like(p) for n, p in an.params.items()}
    try:
        residuals = []
        for eps in (1e-3, 1e-4):
            with torch.no_grad():
                for n, p in an.params.items():
                    p.copy_(before[n] + eps * direction[n])
            delta = an.delta(before)
            g = flat_grads(model, seqs, 0, an.params)                               # (4, P) at θ + Δθ
            eff = an.update_effects(seqs, delta)
            flat = torch.cat([delta[n].reshape(-1) for n in an.params])
            assert rel(eff, g @ flat) < TOL
            actual = sequence_logprobs(model, seqs, 0).logp.detach() - lp0
            residuals.append(float((actual - eff).abs().max()))
        assert residuals[1] < residuals[0] / 50                                     # second order: ×100
    finally:
        with torch.no_grad():
            for n, p in an.params.items():
                p.copy_(before[n])


def test_probe_pass_equals_the_separate_measurements(model):
    """`Analyzer.probe_pass` with θ = a subset: log-probs, pair entries and ⟨g_i, Δθ⟩ of a real
    in-place update equal `logprobs`, the autograd Gram and `update_effects` (the jvp)."""
    an = Analyzer(model, 0, params=["layers.0", "lm_head"], impl="autograd")
    before = an.snapshot()
    torch.manual_seed(1)
    try:
        with torch.no_grad():
            for n, p in an.params.items():
                p.add_(1e-3 * torch.randn_like(p))
        delta = an.delta(before)
        out = an.probe_pass(PAIRS, delta)
        assert rel(out.logps.chosen.logp, an.logprobs(PAIRS).chosen.logp) < TOL
        ip = an.pair_inner_products(PAIRS)                                          # from the (4, 4) Gram
        for k in ("ip_wl", "sq_w", "sq_l", "cos_wl"):
            assert rel(getattr(out, k), ip[k]) < TOL
        assert rel(out.upd, an.update_effects(W + L, delta)) < TOL
    finally:
        with torch.no_grad():
            for n, p in an.params.items():
                p.copy_(before[n])


def test_logprobs_and_table_agree(model):
    an = Analyzer(model, 0)
    out = an.logprobs(PAIRS)
    tab = an.logprobs_table(PAIRS, batch_size=1, tokens=True)
    ref = sequence_logprobs(model, W, 0).logp
    assert rel(out.chosen.logp, ref) < TOL
    assert rel(torch.tensor(tab.logp_w.to_numpy()), ref.detach()) < TOL
    assert tab.len_l.tolist() == [3, 3] and tab.tokens_w[0] == ["<4>", "<5>", "<6>", "<7>"]
    assert abs(sum(tab.token_logps_l[1]) - tab.logp_l[1]) < 1e-12


def test_token_decomposition_sums_to_sentence_prediction(model):
    """Theorem 3's per-token predictions sum to the sentence-level SGD prediction
    η(d_w ‖g_w‖² - d_l ⟨g_w,g_l⟩) for the chosen response."""
    an = Analyzer(model, 0, params=["lm_head"])
    d_w, d_l, lr = 0.7, 0.4, 0.1
    dec = an.token_decomposition(W[0], L[0], d_w, d_l, lr)
    G = an.sentence_gram([W[0], L[0]])
    assert abs(float(dec["tok_w"].sum()) - lr * (d_w * G[0, 0] - d_l * G[0, 1])) < TOL * float(G.abs().max())
    assert len(dec["grams"]) == 3


def test_bad_arguments(model):
    with pytest.raises(ValueError, match="chunk_size"):
        Analyzer(model, 0, chunk_size=0)
    with pytest.raises(ValueError, match="matched no parameter"):
        Analyzer(model, 0, params=["no_such_layer"])
    with pytest.raises(ValueError, match="needs the tokenizer"):
        Analyzer(model, 0).probe_metrics(None, [])
