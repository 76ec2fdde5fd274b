"""The three gradient engines on the real SmolLM2-135M (slow: loads the model twice).

float64 is the oracle (there all three agree to ~1e-14). In float32, ghost and torch.func stay
within ~1e-5 of it; the autograd loop drifts to ~1.2e-4 (float32 rounding of the summed weight
gradients), so it gets a looser bound — measured, not assumed (see the issue note).
"""
import pytest
import torch

from dynamics.inputs.data import builtin_sentiment_pairs
from dynamics.core.grads import pair_inner_products, sentence_gram, token_gram
from dynamics.core.logprobs import tokenize_pairs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2_64():
    from dynamics.inputs.models import load_model
    return load_model("smollm2-135m", dtype=torch.float64)


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def test_sentence_level_three_engines_agree(smollm2, smollm2_64):
    model, tok = smollm2
    pairs = tokenize_pairs(tok, builtin_sentiment_pairs("long_suffix", n=2) + builtin_sentiment_pairs("short_suffix", n=1))
    seqs = pairs.chosen + pairs.rejected
    oracle = sentence_gram(smollm2_64[0], seqs, pairs.pad_id, impl="autograd")           # (6, 6) float64
    G = {impl: sentence_gram(model, seqs, pairs.pad_id, impl=impl) for impl in ("ghost", "func", "autograd")}
    assert rel(G["ghost"], oracle) < 1e-4 and rel(G["func"], oracle) < 1e-4
    assert rel(G["ghost"], G["func"]) < 1e-4
    assert rel(G["autograd"], oracle) < 1e-3
    assert rel(sentence_gram(smollm2_64[0], seqs, pairs.pad_id, impl="ghost"), oracle) < 1e-10
    ip = pair_inner_products(model, pairs, impl="ghost")
    assert (ip["cos_wl"] > 0.5).all()  # chosen and rejected share most tokens: large positive cosine


def test_token_level_ghost_matches_oracle(smollm2, smollm2_64):
    model, tok = smollm2
    pairs = tokenize_pairs(tok, builtin_sentiment_pairs("long_suffix", n=1))
    w, l = pairs.chosen[0], pairs.rejected[0]
    # The float64 oracle materializes |y| x P per response: restrict it to the tied embedding /
    # lm_head, three blocks and the norms (~40M parameters) to fit in memory.
    sub = [r"embed_tokens", r"layers\.(0|15|29)\.", r"norm"]
    oracle = token_gram(smollm2_64[0], w, l, pairs.pad_id, params=sub, impl="autograd")
    ghost = token_gram(model, w, l, pairs.pad_id, params=sub, impl="ghost", chunk_size=4)
    assert rel(ghost.M, oracle.M) < 1e-4 and rel(ghost.sq_a, oracle.sq_a) < 1e-4
    full = token_gram(model, w, l, pairs.pad_id, impl="ghost")                   # all parameters
    G = sentence_gram(model, [w, l], pairs.pad_id, impl="ghost")
    assert abs(full.M.sum().item() - G[0, 1].item()) < 1e-4 * G.abs().max().item()
