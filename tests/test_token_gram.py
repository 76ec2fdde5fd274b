"""The token-level ghost Gram (`dynamics.core.ghost.ghost_token_gram`, docs/math.md §6.3) against
the autograd loop (one backward per token, flattened) in float64, on the three tiny layouts: Llama
(tied embedding/lm_head, RMSNorm, GQA), GPT-2 (``Conv1D``, tied ``wte``, position embedding
``wpe``, LayerNorm with bias) and GPT-NeoX (untied ``embed_in``/``embed_out``, biases).

Every path of the engine is exercised: the QR factor over the union of the two sequences' rows
with the shared prefix counted once (a common prompt; responses that share their first tokens;
unrelated prompts), R square (T < d_in) and trapezoidal (T > d_in: the 40-token prompts against
hidden size 32), row blocks and causal item skipping (`_ROW_BLOCK` set to 5 so that every
sequence spans several blocks), token chunks of the batched backward (chunk 3, lengths not
multiples of 3), one stream for ``a == b``, the padding id inside a sequence (Llama's embedding
has ``padding_idx=0``: no gradient reaches that row), the norms in closed form, and the exact
fallbacks of each shortcut (forced).

Tolerance: entries are compared relative to the largest entry of the oracle (a Gram has tiny
off-diagonal entries). In float64 (ε = 2.2e-16) an entry is a sum of at most ~10⁴ rounded products
per parameter (T ≤ 50 positions, widths ≤ 96, ≤ 40 parameters), so either side is within ~1e-12 of
the exact value even with a cancellation factor of 10; the measured differences are ≤ 2e-14.
1e-10 keeps that margin and still catches a missing or doubled term (every term is ≥ 1e-6 of the
largest entry here). Also run with ATEN_CPU_CAPABILITY=default (other kernels, other summation
orders: the same bound holds).
"""
import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from dynamics.core import ghost
from dynamics.core.grads import token_gram
from dynamics.core.logprobs import TokenizedSequence
from dynamics.inputs.models import TINY_ARCHS, tiny_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("float64_exact")

TOL = 1e-10


def assert_rel(a, b, tol=TOL):
    """``max|a - b| ≤ tol · max|b|``."""
    err, scale = (a - b).abs().max().item(), b.abs().max().item()
    assert scale > 0 and err <= tol * scale, f"max err {err:.3e} vs scale {scale:.3e}"


def seq(prompt, response) -> TokenizedSequence:
    return TokenizedSequence(tuple(prompt), tuple(response), tuple(str(i) for i in response))


def _ids(n: int, seed: int) -> list[int]:
    V = len(tiny_tokenizer())
    return torch.randint(1, V, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


P40, P12, R7 = _ids(40, 1), _ids(12, 2), _ids(7, 3)
CASES = {
    # shared 40-token prompt (T > hidden 32: R trapezoidal), responses of different lengths
    "shared prompt, long": (seq(P40, R7), seq(P40, _ids(5, 4))),
    # responses equal except at index 2 (Theorem 3's shape): the shared prefix runs into them
    "edit distance 1": (seq(P12, R7), seq(P12, R7[:2] + [R7[2] % 50 + 1] + R7[3:])),
    # unrelated prompts: no shared prefix, the union rows are both sequences
    "different prompts": (seq(_ids(9, 5), _ids(4, 6)), seq(_ids(15, 7), _ids(6, 8))),
    # the padding id 0 inside the prompt (Llama: padding_idx 0, no gradient into that row)
    "pad id in prompt": (seq(P12[:5] + [0] + P12[5:], R7[:4]), seq(P12[:5] + [0] + P12[5:], _ids(3, 9))),
    # one stream: a == b
    "same sequence": (seq(P40, R7), seq(P40, R7)),
}


@pytest.fixture(scope="module", params=TINY_ARCHS)
def model(request):
    return tiny_model(request.param, seed=0, dtype=torch.float64)


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(ghost, "_ROW_BLOCK", 5)


@pytest.mark.parametrize("case", list(CASES))
def test_matches_autograd(model, case, small_blocks):
    a, b = CASES[case]
    assert CASES["edit distance 1"][0].response_ids[2] != CASES["edit distance 1"][1].response_ids[2]
    ref = token_gram(model, a, b, 0, impl="autograd")
    out = token_gram(model, a, b, 0, impl="ghost", chunk_size=3)
    assert out.M.shape == ref.M.shape and out.M.dtype == torch.float64
    for x, y in [(out.M, ref.M), (out.sq_a, ref.sq_a), (out.sq_b, ref.sq_b)]:
        assert_rel(x, y)
    if a == b:                                                # one stream: M symmetric, its diagonal the norms
        assert_rel(out.M, out.M.T)
        assert_rel(out.M.diagonal(), out.sq_a)


def test_fast_paths_taken(model, monkeypatch):
    """No parameter of the three layouts falls back to the generic contraction or to a vjp per
    token: every weight is a QR-projected linear use, an embedding/lm_head, or a closed-form norm."""
    def forbidden(*args, **kwargs):
        raise AssertionError("generic token-level path taken")
    monkeypatch.setattr(ghost, "gram_from_uses", forbidden)
    orig = ghost._uses_of_call
    positionwise = (torch.nn.Linear, torch.nn.Embedding, ghost._conv1d_type())
    monkeypatch.setattr(ghost, "_uses_of_call",
                        lambda c, g, shared: orig(c, g, shared) if isinstance(c.module, positionwise) else forbidden())
    a, b = CASES["shared prompt, long"]
    assert token_gram(model, a, b, 0, impl="ghost").M.abs().max() > 0


@pytest.mark.parametrize("force", ["no shared prefix", "no causal skipping", "generic contraction", "norm by vjp"])
def test_forced_fallbacks_exact(model, force, small_blocks, monkeypatch):
    """Each shortcut has an exact fallback, taken when its check fails; forcing it changes nothing."""
    if force == "no shared prefix":        # _rows_agree failing: b's prompt rows kept apart from a's
        monkeypatch.setattr(ghost, "_rows_agree", lambda xa, xb: False)
    elif force == "no causal skipping":    # _causal_last failing: every row of every item kept
        monkeypatch.setattr(ghost, "_causal_last", lambda ys, last: [ys[0].shape[1] - 1] * len(last))
    elif force == "generic contraction":   # no QR projection: two-step ghost / materialized (§6.2)
        monkeypatch.setattr(ghost, "_dense_chunks", lambda uses, T: None)
    else:                                  # norms through the vmapped per-token vjp
        monkeypatch.setattr(ghost, "_unscaled", lambda module, names, x: None)
    a, b = CASES["edit distance 1"]
    ref = token_gram(model, a, b, 0, impl="autograd")
    out = token_gram(model, a, b, 0, impl="ghost", chunk_size=3)
    for x, y in [(out.M, ref.M), (out.sq_a, ref.sq_a), (out.sq_b, ref.sq_b)]:
        assert_rel(x, y)


def test_causal_last_detects_a_noncausal_gradient():
    last = [3, 4, 5]
    y = torch.zeros(3, 8, 2, dtype=torch.float64)
    for i, p in enumerate(last):
        y[i, :p + 1] = 1.0
    assert ghost._causal_last([y[:2], y[2:]], last) == last
    y[0, 5, 1] = 1e-300                                       # item 0: a nonzero row past its position
    assert ghost._causal_last([y[:2], y[2:]], last) == [7, 7, 7]


def test_unscaled_recognizes_norms_only():
    x = torch.randn(1, 6, 4, dtype=torch.float64)
    rms = LlamaRMSNorm(4).double()
    with torch.no_grad():
        rms.weight.uniform_(0.5, 2.0)
    f = ghost._unscaled(rms, [("weight", rms.weight)], x)
    assert f is not None and torch.equal(rms.weight * f, rms(x))
    ln = torch.nn.LayerNorm(4, dtype=torch.float64)
    f = ghost._unscaled(ln, [("weight", ln.weight), ("bias", ln.bias)], x)
    assert torch.allclose(ln.weight * f + ln.bias, ln(x), rtol=0, atol=1e-14)

    class Shifted(torch.nn.Module):      # y = γ ⊙ x + c with c not selected: not γ ⊙ f(x)
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.full((4,), 2.0, dtype=torch.float64))
            self.c = torch.nn.Parameter(torch.ones(4, dtype=torch.float64))

        def forward(self, h):
            return self.weight * h + self.c
    m = Shifted()
    assert ghost._unscaled(m, [("weight", m.weight)], x) is None
    lin = torch.nn.Linear(4, 4, dtype=torch.float64)
    assert ghost._unscaled(lin, [("weight", lin.weight)], x) is None          # a 2-D weight


def test_bench_reports_the_floor():
    """`dynamics bench grads` times one forward of each sequence in the same run and reports the
    token Gram's floor (|y_w|·t_fwd(w) + |y_l|·t_fwd(l)) and the ratios to it."""
    from dynamics.core.logprobs import TokenizedPairs
    from dynamics.tools.bench import bench_grads, summarize
    model = tiny_model("llama", seed=0)
    a, b = CASES["shared prompt, long"]
    lines = []
    df = bench_grads(model, {"tiny": TokenizedPairs(["p"], [a], [b], 0)}, n_small=2, progress=lines.append)
    tok = df[df.level == "token"].set_index("impl")
    assert set(tok.index) == {"ghost", "func", "autograd"}
    g = tok.loc["ghost"]
    assert g.floor_s == pytest.approx(7 * g.fwd_w_s + 5 * g.fwd_l_s) and g.floor_s > 0
    assert g.ratio_to_floor == pytest.approx(g.s_per_pair / g.floor_s)
    assert g.cpu_ratio_to_floor == pytest.approx(g.cpu_s_per_pair / g.floor_cpu_s)
    assert any("x its floor" in line for line in lines)
    s = summarize(df).set_index(["level", "impl"])
    assert s.loc[("token", "ghost"), "ratio_to_floor"] == pytest.approx(g.ratio_to_floor)
    assert s.loc[("sentence", "ghost"), "ratio_to_floor"] != s.loc[("sentence", "ghost"), "ratio_to_floor"]  # NaN
