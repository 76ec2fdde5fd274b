"""Gradient Grams: torch.func == the autograd loop to 1e-10 (float64) on three layouts, sentence
and token level; Σ_ts M = ⟨g_a, g_b⟩; tied weights; LoRA; Theorem 1 of seed 004 exactly; errors.

Float64 exactness needs a patch. transformers' Llama and GPT-NeoX compute some ops in float32
whatever the model dtype: the eager attention softmax (``dtype=torch.float32``), the rotary
cos/sin (``.float()``) and Llama's RMSNorm (``.to(torch.float32)``). A float64 model is then only
float32-accurate (func vs autograd differ by ~1e-7: vmap batches the float32 ops differently),
so the fixture `float64_exact` replaces those three forwards by dtype-preserving copies.
"""
from types import SimpleNamespace

import pytest
import torch
from transformers.models.gpt_neox import modeling_gpt_neox as neox_mod
from transformers.models.llama import modeling_llama as llama_mod

from dynamics.core.analyzer import Analyzer
from dynamics.core.grads import (IMPLS, TokenGram, flat_grads, pair_inner_products, select_params,
                            sentence_gram, token_gram)
from dynamics.core.logprobs import tokenize_pairs, tokenize_response
from dynamics.inputs.models import TINY_ARCHS, tiny_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("float64_exact")

TOL = 1e-10
TEXTS = [("The movie was", " wonderful and I loved every minute."),
         ("I hate", " waiting"),
         ("TL;DR: friend ignores me", " and I feel bad about it"),
         ("Hi", " It has a positive sentiment.")]


# ------------------------------------------------------------------ float64-faithful transformers

# ------------------------------------------------------------------ helpers

@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def seqs(tok):
    return [tokenize_response(tok, p, r) for p, r in TEXTS]


@pytest.fixture(scope="module", params=TINY_ARCHS)
def model(request):
    return tiny_model(request.param, seed=0, dtype=torch.float64)


def assert_rel(a, b, tol=TOL):
    """``max|a - b| ≤ tol · max|b|`` (relative to the largest entry: Grams have tiny off-diagonals)."""
    err = (a - b).abs().max().item()
    scale = b.abs().max().item()
    assert scale > 0 and err <= tol * scale, f"max err {err:.3e} vs scale {scale:.3e}"


# ------------------------------------------------------------------ func == autograd

@pytest.mark.parametrize("impl", ["func", "ghost"])
def test_sentence_matches_autograd(model, seqs, impl):
    assert len({s.length for s in seqs}) == len(seqs)  # different lengths: padding happens
    G_ref = sentence_gram(model, seqs, 0, impl="autograd")
    G = sentence_gram(model, seqs, 0, impl=impl)
    assert G.shape == (4, 4) and G.dtype == torch.float64
    assert_rel(G, G_ref)
    assert_rel(sentence_gram(model, seqs, 0, impl=impl, chunk_size=2), G_ref)
    assert_rel(sentence_gram(model, seqs[1:2], 0, impl=impl), G_ref[1:2, 1:2])  # batch of one
    assert torch.allclose(G, G.T, rtol=0, atol=TOL * G.abs().max().item())
    assert (torch.linalg.eigvalsh(G) > -TOL * G.abs().max()).all()  # a Gram matrix is PSD


@pytest.mark.parametrize("impl", ["func", "ghost"])
def test_token_matches_autograd(model, seqs, impl):
    a, b = seqs[0], seqs[2]
    ref = token_gram(model, a, b, 0, impl="autograd")
    out = token_gram(model, a, b, 0, impl=impl, chunk_size=3)
    La, Lb = len(a.response_ids), len(b.response_ids)
    assert out.M.shape == (La, Lb) and out.sq_a.shape == (La,) and out.sq_b.shape == (Lb,)
    assert out.tokens_a == a.tokens and out.tokens_b == b.tokens
    for x, y in [(out.M, ref.M), (out.sq_a, ref.sq_a), (out.sq_b, ref.sq_b)]:
        assert_rel(x, y)
    assert (out.cos.abs() <= 1 + 1e-12).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_token_sums_to_sentence(model, seqs, impl):
    """Σ_t g^t = g, so Σ_{t,s} M[t,s] = ⟨g_a, g_b⟩ and Σ_{t,s} M_aa[t,s] = ‖g_a‖²."""
    a, b = seqs[0], seqs[3]
    G = sentence_gram(model, [a, b], 0, impl=impl)
    ab = token_gram(model, a, b, 0, impl=impl)
    aa = token_gram(model, a, a, 0, impl=impl)
    scale = G.abs().max()
    assert abs(ab.M.sum() - G[0, 1]) <= TOL * scale
    assert abs(aa.M.sum() - G[0, 0]) <= TOL * scale
    assert torch.allclose(aa.M.diagonal(), aa.sq_a, rtol=0, atol=TOL * scale)
    assert torch.allclose(aa.cos.diagonal(), torch.ones(len(a.response_ids), dtype=torch.float64))


def test_pair_inner_products(tok):
    model = tiny_model("gpt2", seed=0, dtype=torch.float64)
    pairs = tokenize_pairs(tok, [SimpleNamespace(id=i, prompt=p, chosen=r, rejected=r + " again")
                                 for i, (p, r) in enumerate(TEXTS[:3])])
    G = sentence_gram(model, pairs.chosen + pairs.rejected, pairs.pad_id, impl="autograd")
    B = 3
    for impl, k in [(impl, k) for impl in ("func", "ghost") for k in range(B)]:
        out = pair_inner_products(model, pairs, impl=impl)
        assert set(out) == {"ip_wl", "sq_w", "sq_l", "cos_wl"} and all(v.shape == (3,) for v in out.values())
        assert abs(out["ip_wl"][k] - G[k, B + k]) <= TOL * G.abs().max()
        assert abs(out["sq_w"][k] - G[k, k]) <= TOL * G.abs().max()
        assert abs(out["sq_l"][k] - G[B + k, B + k]) <= TOL * G.abs().max()
        cos = G[k, B + k] / (G[k, k] * G[B + k, B + k]).sqrt()
        assert abs(out["cos_wl"][k] - cos) <= 1e-10


# ------------------------------------------------------------------ parameters

def test_select_params_all_dedups_tied_weights():
    model = tiny_model("llama", dtype=torch.float64)
    sel = select_params(model, "all")
    assert "model.embed_tokens.weight" in sel and "lm_head.weight" not in sel
    assert sel["model.embed_tokens.weight"] is model.lm_head.weight  # one tensor, two uses
    assert len({id(p) for p in sel.values()}) == len(sel) == len(list(model.parameters()))
    # a pattern matching the alias selects the tied tensor under its canonical name
    assert list(select_params(model, [r"^lm_head"])) == ["model.embed_tokens.weight"]
    sel = select_params(model, [r"layers\.0\.self_attn\.q_proj", r"^model\.norm\.weight$"])
    assert list(sel) == ["model.layers.0.self_attn.q_proj.weight", "model.norm.weight"]
    model.model.norm.weight.requires_grad_(False)
    assert "model.norm.weight" not in select_params(model, "trainable")


def test_select_params_errors():
    model = tiny_model("neox", dtype=torch.float64)
    assert list(select_params(model, ["lm_head"])) == ["lm_head.weight"]  # NeoX's head is `lm_head`
    with pytest.raises(ValueError, match=r"no_such.*embed_out|embed_out.*no_such"):
        select_params(model, ["lm_head", "no_such", "embed_out"])
    with pytest.raises(ValueError, match="LoRA"):
        select_params(model, "lora")
    with pytest.raises(ValueError, match="trainable"):
        select_params(model, "everything")
    with pytest.raises(ValueError, match="not a parameter"):
        sentence_gram(model, [], 0, params={"w": torch.nn.Parameter(torch.zeros(2))}, impl="func")


def test_tied_weights_sum_both_uses(seqs):
    """The gradient of a tied embedding/lm_head counts both uses (functional_call tie_weights)."""
    model = tiny_model("gpt2", dtype=torch.float64)
    name = "transformer.wte.weight"
    G_func = sentence_gram(model, seqs, 0, params=[name], impl="func")
    g = flat_grads(model, seqs, 0, [name])
    assert_rel(G_func, g @ g.T)
    assert_rel(sentence_gram(model, seqs, 0, params=[name], impl="ghost"), g @ g.T)  # cross terms
    for m in (model, tiny_model("llama", dtype=torch.float64)):  # tied, token level, ghost
        tied = [n for n in select_params(m) if "wte" in n or "embed_tokens" in n]
        ref = token_gram(m, seqs[0], seqs[1], 0, params=tied, impl="autograd")
        assert_rel(token_gram(m, seqs[0], seqs[1], 0, params=tied, impl="ghost").M, ref.M)
    alias = {"lm_head.weight": model.lm_head.weight}  # a dict under the alias name works too
    assert_rel(sentence_gram(model, seqs, 0, params=alias, impl="func"), g @ g.T)
    # the autograd oracle itself: the embedding use alone (input-side) differs from the total
    ids = torch.tensor([seqs[0].prompt_ids + seqs[0].response_ids])
    emb = model.transformer.wte(ids).detach().requires_grad_(True)
    lp = torch.log_softmax(model(inputs_embeds=emb).logits[0, :-1], -1)
    P = len(seqs[0].prompt_ids)
    logp = lp[P - 1:].gather(-1, ids[0, P:, None]).sum()
    head_only = torch.autograd.grad(logp, model.lm_head.weight)[0]  # = the lm_head use alone
    assert not torch.allclose(head_only.flatten(), g[0], atol=1e-6)


def test_lora_params(seqs):
    from peft import LoraConfig, get_peft_model
    base = tiny_model("llama", seed=0, dtype=torch.float64)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                     init_lora_weights=False)
    model = get_peft_model(base, cfg)
    sel = select_params(model, "lora")
    assert len(sel) == 2 * 2 * 2 and all("lora_" in n for n in sel)      # 2 layers × {q,v} × {A,B}
    assert set(select_params(model, "trainable")) == set(sel)
    G_ref = sentence_gram(model, seqs, 0, params="lora", impl="autograd")
    assert G_ref.abs().max() > 0
    T_ref = token_gram(model, seqs[0], seqs[1], 0, params="lora", impl="autograd")
    for impl in ("func", "ghost"):
        assert_rel(sentence_gram(model, seqs, 0, params="lora", impl=impl), G_ref)
        assert_rel(token_gram(model, seqs[0], seqs[1], 0, params="lora", impl=impl).M, T_ref.M)
    # frozen base weights can still be analysed (requires_grad is switched on temporarily)
    q = [r"layers\.0\.self_attn\.q_proj\.base_layer"]
    for impl in ("func", "ghost"):
        assert_rel(sentence_gram(model, seqs, 0, params=q, impl=impl),
                   sentence_gram(model, seqs, 0, params=q, impl="autograd"))
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


def test_mode_and_attention_restored(seqs):
    model = tiny_model("llama", seed=0, dtype=torch.float64, attn_implementation="sdpa").train()
    G = sentence_gram(model, seqs[:2], 0, impl="func")
    assert model.training and model.config._attn_implementation == "sdpa"
    G_ref = sentence_gram(model, seqs[:2], 0, impl="autograd")
    assert model.training
    assert_rel(G, G_ref)  # sdpa (autograd) vs eager (func)
    assert_rel(sentence_gram(model, seqs[:2], 0, impl="ghost"), G_ref)  # ghost under sdpa
    assert model.training and all(p.requires_grad for p in model.parameters())


# ------------------------------------------------------------------ Theorem 1 of seed 004

@pytest.mark.parametrize("M", [2, 5, 17])
@pytest.mark.parametrize("impl", IMPLS)
def test_theorem1_single_token(tok, M, impl):
    """Last linear layer learnable, single-token responses, prediction uniform on M tokens:
    ⟨g_w, g_l⟩ = -‖h‖²/M and ‖g_w‖² = ‖g_l‖² = (M-1)/M ‖h‖² (seed 004 §4.1, Theorem 1)."""
    model = tiny_model("neox", seed=0, dtype=torch.float64)
    assert model.lm_head.bias is None and model.lm_head.weight is not model.gpt_neox.embed_in.weight
    prompt = tuple(tok("The movie was")["input_ids"])
    with torch.no_grad():
        h = model.gpt_neox(input_ids=torch.tensor([prompt])).last_hidden_state[0, -1]   # (d,)
        hh = h @ h
        support = torch.arange(10, 10 + 3 * M, 3)                               # M tokens
        W = model.lm_head.weight                                                 # (V, d)
        W.copy_((-1000.0 / hh) * h.expand_as(W))                                 # logits -1000 elsewhere
        W[support] = h                                                           # logits ‖h‖² on the support
        p = torch.softmax(model(input_ids=torch.tensor([prompt])).logits[0, -1], -1)
    mask = torch.zeros_like(p, dtype=torch.bool)
    mask[support] = True
    assert (p[~mask] == 0).all()                                                 # underflow: exactly 0
    assert torch.allclose(p[mask], torch.full((M,), 1.0 / M, dtype=torch.float64), rtol=0, atol=1e-14)
    w_id, l_id = int(support[0]), int(support[-1])
    seq = lambda y: SimpleNamespace(prompt_ids=prompt, response_ids=(y,), tokens=(tok.decode([y]),),
                                    length=len(prompt) + 1)
    G = sentence_gram(model, [seq(w_id), seq(l_id)], 0, params=["lm_head"], impl=impl)
    ip, sq = -hh / M, (M - 1) / M * hh
    assert abs(G[0, 1] - ip) <= TOL * abs(ip)
    assert abs(G[0, 0] - sq) <= TOL * sq and abs(G[1, 1] - sq) <= TOL * sq


# ------------------------------------------------------------------ errors and small pieces

def test_unknown_impl(seqs):
    model = tiny_model("gpt2", dtype=torch.float64)
    for call in (lambda: sentence_gram(model, seqs, 0, impl="jax"),
                 lambda: token_gram(model, seqs[0], seqs[1], 0, impl="jax"),
                 lambda: Analyzer(model, 0, impl="jax")):
        with pytest.raises(ValueError, match="unknown impl 'jax'; known: " + ", ".join(IMPLS)):
            call()


def test_token_gram_cos_zero_norm():
    tg = TokenGram(M=torch.tensor([[2.0, 0.0]]), sq_a=torch.tensor([4.0]), sq_b=torch.tensor([1.0, 0.0]),
                   tokens_a=("a",), tokens_b=("b", "c"))
    assert tg.cos.tolist() == [[1.0, 0.0]]
