"""Kernels and the A·K·G decomposition: the log-prob kernel is a Gram block; the logit eNTK equals
an autograd loop over logits (and ⟨h_o, h_u⟩ I for the output layer alone); the A·K·G prediction
equals the first-order change ⟨∇log π(y_o^t), -η ∇L_u⟩ from flat gradients to 1e-10 (SFT and DPO,
three layouts); the residual against a real SGD step is O(η²).

Float64 exactness: the fixture `float64_exact` (copied from tests/test_grads.py) makes
transformers' Llama / GPT-NeoX keep float64 in attention softmax, rotary and RMSNorm.
"""
import pytest
import torch
from transformers.models.gpt_neox import modeling_gpt_neox as neox_mod
from transformers.models.llama import modeling_llama as llama_mod

from dynamics.core.grads import resolve_params, flat_grads, sentence_gram, token_flat_grads, token_gram
from dynamics.core.kernels import akg_prediction, akg_residual, logit_ntk, logprob_kernel, vocab_subset
from dynamics.core.logprobs import TokenizedSequence, body_and_head
from dynamics.inputs.models import TINY_ARCHS, tiny_model

pytestmark = pytest.mark.usefixtures("float64_exact")

TOL = 1e-10
V = 48  # a small vocabulary keeps the full-vocabulary Jacobians (|y|·V·P) small


# ------------------------------------------------------------------ float64-faithful transformers

# ------------------------------------------------------------------ helpers

def S(prompt, response):
    return TokenizedSequence(tuple(prompt), tuple(response), tuple(f"<{i}>" for i in response))


O = S([1, 2, 3], [4, 5, 6, 7])          # observed example
U = S([9, 3], [4, 8, 6])                 # update example (y⁺ for DPO), shares tokens 4 and 6 with O
L_ = S([9, 3], [11, 12])                 # y⁻


@pytest.fixture(scope="module", params=TINY_ARCHS)
def model(request):
    return tiny_model(request.param, seed=0, vocab_size=V, dtype=torch.float64)


def assert_rel(a, b, tol=TOL):
    err, scale = (a - b).abs().max().item(), b.abs().max().item()
    assert scale > 0 and err <= tol * scale, f"max err {err:.3e} vs scale {scale:.3e}"


def oracle_logit_jacobian(model, seq, pos, vocab=None):
    """(S, P) rows ∂z[v]/∂θ at the row predicting response token ``pos``: one autograd.grad per v."""
    ps = list(resolve_params(model, "all").values())
    ids = torch.tensor([seq.prompt_ids + seq.response_ids])
    z = model(input_ids=ids).logits[0, len(seq.prompt_ids) + pos - 1]            # (V,)
    vs = range(z.shape[0]) if vocab is None else vocab.tolist()
    rows = []
    for v in vs:
        g = torch.autograd.grad(z[v], ps, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(x if x is not None else torch.zeros_like(p)).reshape(-1) for x, p in zip(g, ps)]))
    return torch.stack(rows)


# ------------------------------------------------------------------ log-prob kernel

@pytest.mark.parametrize("impl", ["ghost", "func", "autograd"])
def test_logprob_kernel_is_the_cross_gram(model, impl):
    a, b = [O, L_], [U, O, S([5], [3, 3, 2])]
    K = logprob_kernel(model, a, b, 0, impl=impl)
    ga, gb = flat_grads(model, a, 0), flat_grads(model, b, 0)                    # (2, P), (3, P)
    assert K.shape == (2, 3) and K.dtype == torch.float64
    assert_rel(K, ga @ gb.T)
    assert_rel(K[0, 1:2], sentence_gram(model, [O], 0, impl="autograd")[0])      # ⟨g_O, g_O⟩ = ‖g_O‖²
    with pytest.raises(ValueError, match="at least one"):
        logprob_kernel(model, [], b, 0)


# ------------------------------------------------------------------ logit eNTK

def test_logit_ntk_matches_autograd_loop(model):
    K = logit_ntk(model, O, 2, U, 1, None)                                       # (V, V)
    Jo, Ju = oracle_logit_jacobian(model, O, 2), oracle_logit_jacobian(model, U, 1)
    assert K.shape == (V, V)
    assert_rel(K, Jo @ Ju.T)
    sub = torch.tensor([0, 4, 6, 8, 30])
    assert_rel(logit_ntk(model, O, 2, U, 1, sub), K[sub][:, sub])                # a restriction is a sub-block
    other = torch.tensor([1, 2])
    assert_rel(logit_ntk(model, O, 2, U, 1, (sub, other), chunk_size=3), K[sub][:, other])
    Koo = logit_ntk(model, O, 0, O, 0, sub)
    assert_rel(Koo, Koo.T)
    assert (torch.linalg.eigvalsh(Koo) > -TOL * Koo.abs().max()).all()            # PSD on the diagonal
    with pytest.raises(ValueError, match="out of range"):
        logit_ntk(model, O, 4, U, 0, sub)


def test_output_layer_ntk_is_feature_inner_product_times_identity():
    """Only an untied, bias-free output layer W learns: ∂z[v]/∂W = e_v hᵀ, so K = ⟨h_o, h_u⟩ I."""
    m = tiny_model("neox", seed=1, vocab_size=V, dtype=torch.float64)
    K = logit_ntk(m, O, 1, U, 2, None, params=["^lm_head"])
    body, _ = body_and_head(m)
    with torch.no_grad():
        ho = body(input_ids=torch.tensor([O.prompt_ids + O.response_ids])).last_hidden_state[0, len(O.prompt_ids)]
        hu = body(input_ids=torch.tensor([U.prompt_ids + U.response_ids])).last_hidden_state[0, len(U.prompt_ids) + 1]
    assert_rel(K, (ho @ hu) * torch.eye(V, dtype=torch.float64))


def test_vocab_subset_holds_response_and_top_k(model):
    vs = vocab_subset(model, [O, U], k=3)
    assert vs.tolist() == sorted(set(vs.tolist()))
    assert set(O.response_ids + U.response_ids) <= set(vs.tolist())
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([O.prompt_ids + O.response_ids])).logits[0, 2:6]
    assert set(logits.topk(3, -1).indices.flatten().tolist()) <= set(vs.tolist())
    assert len(vs) <= len(O.response_ids) * 4 + len(U.response_ids) * 4


# ------------------------------------------------------------------ A·K·G

def test_akg_sft_equals_first_order_change(model):
    lr = 1e-3
    r = akg_prediction(model, O, U, lr)
    go = token_flat_grads(model, O, "all")                                       # (Lo, P)
    gu = flat_grads(model, [U], 0)[0]                                            # (P,)
    want = lr * go @ gu                                                          # ⟨∇log π(y_o^t), -η ∇L_u⟩
    assert_rel(r["pred"], want)
    assert_rel(r["contrib"], lr * token_gram(model, O, U, 0, impl="ghost").M)    # -η a K G = η M[t, s]
    assert_rel(r["contrib"].sum(1), r["pred"])
    assert_rel((r["A"] * r["delta_z"]).sum(-1), r["pred"])                       # Δlog π = (e_y - π)ᵀ Δz
    Lo, Lu = len(O.response_ids), len(U.response_ids)
    assert r["K"].shape == (Lo, V, Lu, V) and r["G"].shape == (Lu, V) and r["A"].shape == (Lo, V)
    assert r["K_norm"].shape == (Lo, Lu) and r["G_norm"].shape == (Lu,) and r["A_norm"].shape == (Lo,)
    # A and G rows are e_y - π and π - e_y: they sum to 0 and have ‖·‖² = 1 - 2π_y + ‖π‖²
    assert r["A"].sum(-1).abs().max() < 1e-12 and r["G"].sum(-1).abs().max() < 1e-12
    assert_rel(r["K"][1, :, 0, :], logit_ntk(model, O, 1, U, 0, None))


def test_akg_dpo_equals_first_order_change(model):
    lr, d_w, d_l = 1e-3, 0.05, 0.08
    r = akg_prediction(model, O, U, lr, loss="dpo", seq_u_rejected=L_, d_w=d_w, d_l=d_l)
    go = token_flat_grads(model, O, "all")
    gw, gl = flat_grads(model, [U, L_], 0)
    want = lr * (d_w * go @ gw - d_l * go @ gl)                                  # ∇L = -(d_w g_w - d_l g_l)
    assert_rel(r["pred"], want)
    assert_rel(r["contrib_w"].sum(1), lr * d_w * go @ gw)
    assert_rel(r["contrib_l"].sum(1), -lr * d_l * go @ gl)
    assert {"K_w", "K_l", "G_w", "G_l", "G_w_norm", "K_l_norm"} <= set(r)


def test_residual_is_second_order():
    m = tiny_model("llama", seed=0, vocab_size=V, dtype=torch.float64, hidden=16, layers=1)
    base = akg_prediction(m, O, U, 1.0)                                          # linear in lr: reuse
    res = {}
    for lr in (1e-4, 1e-5):
        pred = dict(base, pred=lr * base["pred"])
        out = akg_residual(m, O, U, lr, prediction=pred)
        assert out["actual"].shape == out["pred"].shape == (len(O.response_ids),)
        res[lr] = out["residual"].abs().max().item()
        assert res[lr] < 1e-2 * out["actual"].abs().max().item()
    assert 60 < res[1e-4] / res[1e-5] < 160, res                                 # O(η²): ×100 for η×10
    # DPO and a parameter subset, through the full path
    out = akg_residual(m, O, U, 1e-5, loss="dpo", seq_u_rejected=L_, d_w=0.05, d_l=0.08, params=["layers.0.mlp"])
    assert out["residual"].abs().max() < 1e-2 * out["actual"].abs().max()


def test_akg_argument_errors(model):
    with pytest.raises(ValueError, match="unknown loss 'ipo'; known: sft, dpo"):
        akg_prediction(model, O, U, 1e-3, loss="ipo")
    with pytest.raises(ValueError, match="needs seq_u_rejected"):
        akg_prediction(model, O, U, 1e-3, loss="dpo", d_w=0.1, d_l=0.1)
    with pytest.raises(ValueError, match="takes no"):
        akg_residual(model, O, U, 1e-3, d_w=0.1)
