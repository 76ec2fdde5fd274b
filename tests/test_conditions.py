"""Predictions from gradient inner products: cases and thresholds on hand-made numbers, first-order
theory against real SGD / AdamW steps on a float64 tiny model (error O(η)), the jvp prediction
against explicit gradients to 1e-10, the what-if table, and Theorem 3's token decomposition (an
exact oracle in the learnable-logits setting, sums = sentence level on a transformer).

Float64 exactness: transformers' Llama computes the eager attention softmax, rotary cos/sin and
RMSNorm in float32 whatever the model dtype; `float64_exact` patches them (as tests/test_grads.py).
"""
import copy
from types import SimpleNamespace

import pytest
import torch
from transformers.models.llama import modeling_llama as llama_mod

from dynamics.core.conditions import (CASES, case, first_difference, pair_token_decomposition, param_delta, predict,
                                 snapshot_params, summarize, token_decomposition, token_predictions,
                                 update_prediction, what_if)
from dynamics.core.grads import flat_grads, pair_inner_products, select_params
from dynamics.core.logprobs import pair_logprobs, sequence_logprobs, tokenize_pairs
from dynamics.core.losses import LOSSES, compute_loss
from dynamics.inputs.models import tiny_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("float64_exact")

TOL = 1e-10
PAIRS = [("The movie was wonderful.", " It has a positive sentiment.", " It has a negative sentiment."),
         ("I hate waiting", " in long lines at the airport", " at the beach"),
         ("TL;DR: friend ignores me", " and I feel bad about it", " the weather is cold")]


# ------------------------------------------------------------------ float64-faithful Llama

@pytest.fixture(scope="module")
def pairs():
    raw = [SimpleNamespace(id=i, prompt=p, chosen=w, rejected=l) for i, (p, w, l) in enumerate(PAIRS)]
    return tokenize_pairs(tiny_tokenizer(), raw)


@pytest.fixture
def model():
    return tiny_model("llama", seed=0, dtype=torch.float64)


def t(*x):
    return torch.tensor(x, dtype=torch.float64)


def rel_err(pred, actual):
    return ((pred - actual).abs() / actual.abs()).max().item()


# ------------------------------------------------------------------ predict / case

def test_predict_cases_by_hand():
    # DPO-like d_w = d_l = 1, ‖g_w‖² = 2, ‖g_l‖² = 3; ⟨g_w,g_l⟩ picks the case (Table 1)
    d = t(1, 1, 1)
    ip = t(1.0, 2.5, -0.5)                                                        # case 1, 2, 1
    p = predict(d, d, ip, t(2, 2, 2), t(3, 3, 3), lr=0.1)
    assert torch.allclose(p["dlogp_w"], 0.1 * (t(2, 2, 2) - ip))
    assert torch.allclose(p["dlogp_l"], 0.1 * (ip - t(3, 3, 3)))
    assert torch.allclose(p["dmargin"], 0.1 * (t(2, 2, 2) - 2 * ip + t(3, 3, 3)))
    assert p["case"].tolist() == [1, 2, 1]
    assert torch.equal(p["thr_w"], t(2, 2, 2)) and torch.equal(p["thr_l"], t(3, 3, 3))  # DPO: eq. 7
    # case 3: ‖g_l‖² ≤ ip ≤ ‖g_w‖²
    p = predict(t(1), t(1), t(2.5), t(3), t(2))
    assert p["case"].item() == 3 and p["dlogp_w"].item() > 0 and p["dlogp_l"].item() > 0
    # case 4 needs a negative coefficient (IPO past its target): d_w = d_l = -1
    p = predict(t(-1), t(-1), t(0.0), t(2), t(3))
    assert p["case"].item() == 4 and p["dmargin"].item() < 0
    # conditions (9), (10) ⇔ signs of the predicted changes, for unequal positive coefficients;
    # Gram entries from real vectors (Cauchy-Schwarz holds)
    g = torch.Generator().manual_seed(0)
    gw = torch.randn(400, 3, generator=g, dtype=torch.float64) * torch.rand(400, 1, generator=g, dtype=torch.float64)
    gl = torch.randn(400, 3, generator=g, dtype=torch.float64) * torch.rand(400, 1, generator=g, dtype=torch.float64)
    sw, sl, ip = (gw * gw).sum(1), (gl * gl).sum(1), (gw * gl).sum(1)
    dw, dl = torch.rand(400, generator=g, dtype=torch.float64) + 0.1, torch.rand(400, generator=g, dtype=torch.float64) + 0.1
    p = predict(dw, dl, ip, sw, sl, lr=1e-3)
    # the two forms may disagree only within round-off of the boundary: each side is ≤ 4 roundings
    # (u = 2^-53) on |d_w‖g_w‖²| + |d_l⟨g_w,g_l⟩|, so compare the pairs farther from it than 2·4u·that
    u = 2.0 ** -53
    far_w = (dw * sw - dl * ip).abs() > 8 * u * (dw * sw + dl * ip.abs())
    far_l = (dw * ip - dl * sl).abs() > 8 * u * (dw * ip.abs() + dl * sl)
    assert far_w.sum() >= 390 and far_l.sum() >= 390
    assert torch.equal((p["dlogp_w"] >= 0)[far_w], (ip <= p["thr_w"])[far_w])
    assert torch.equal((p["dlogp_l"] <= 0)[far_l], (ip <= p["thr_l"])[far_l])
    # d_w, d_l > 0: never case 4 (Δw < 0 < Δl would need ⟨g_w,g_l⟩² > ‖g_w‖²‖g_l‖²), but with
    # d_w ≠ d_l the margin itself can fall (case 2 or 3 in the wrong order)
    assert set(p["case"].tolist()) == {1, 2, 3} and (p["dmargin"] < 0).any()
    p = predict(dw, dw, ip, sw, sl)                       # DPO-like d_w = d_l: eq. 6, margin never falls
    assert set(p["case"].tolist()) == {1, 2, 3} and (p["dmargin"] >= 0).all()


def test_case_function_and_edges():
    dw = t(1, -1, 1, -1, 0, 0, 1, 0)
    dl = t(-1, -2, 2, 1, 0, -1, 0, 1)
    assert case(dw, dl).tolist() == [1, 2, 3, 4, 0, 1, 1, 3]
    assert set(CASES) == {0, 1, 2, 3, 4}
    # d_l = 0 (SFT): the chosen always rises, thr_w = +inf; thr_l = (0/d_w)‖g_l‖² = 0
    p = predict(t(1), t(0), t(5.0), t(2), t(3))
    assert p["thr_w"].item() == float("inf") and p["thr_l"].item() == 0.0
    assert p["dlogp_w"].item() > 0 and p["case"].item() == 3                     # ip > 0: rejected rises
    # d_w = 0: thr_l = +inf (rejected always falls), thr_w = 0
    p = predict(t(0), t(1), t(-1.0), t(2), t(3))
    assert p["thr_l"].item() == float("inf") and p["thr_w"].item() == 0.0 and p["case"].item() == 1
    # d_w < 0 = d_l: Δw = d_w‖g_w‖² < 0 whatever ip: thr_w = -inf
    p = predict(t(-1), t(0), t(0.0), t(2), t(3))
    assert p["thr_w"].item() == float("-inf") and p["dlogp_w"].item() < 0
    # no coefficient at all: both thresholds +inf, no change
    p = predict(t(0), t(0), t(1.0), t(0), t(0))
    assert p["thr_w"].item() == p["thr_l"].item() == float("inf") and p["case"].item() == 0
    assert not torch.isnan(torch.stack(list(p.values())).double()).any()


# ------------------------------------------------------------------ first-order theory on a real model

def _logps(model, pairs):
    out = pair_logprobs(model, pairs)
    return out.chosen.logp, out.rejected.logp


def test_sgd_step_matches_first_order(model, pairs):
    """One SGD step on ONE pair's DPO loss: predicted vs actual Δlog π, relative error O(η)."""
    ips = pair_inner_products(model, pairs, impl="autograd")
    with torch.no_grad():
        lw0, ll0 = _logps(model, pairs)
    d = compute_loss("dpo", lw0, ll0, lw0, ll0)
    assert torch.allclose(d.d_w, torch.full_like(d.d_w, 0.05)) and torch.equal(d.d_w, d.d_l)  # β σ(0)
    errs = {}
    for i in range(2):
        for lr in (1e-4, 1e-5):
            m = copy.deepcopy(model)
            opt = torch.optim.SGD(m.parameters(), lr=lr)
            lw, ll = _logps(m, pairs)
            compute_loss("dpo", lw, ll, lw0, ll0).loss[i].backward()
            opt.step()
            with torch.no_grad():
                lw1, ll1 = _logps(m, pairs)
            p = predict(d.d_w, d.d_l, ips["ip_wl"], ips["sq_w"], ips["sq_l"], lr)
            actual = torch.stack([lw1[i] - lw0[i], ll1[i] - ll0[i]])
            pred = torch.stack([p["dlogp_w"][i], p["dlogp_l"][i]])
            errs[i, lr] = rel_err(pred, actual)
            assert case(actual[0], actual[1]) == p["case"][i]
        assert errs[i, 1e-5] < 5e-3
        assert 5 < errs[i, 1e-4] / errs[i, 1e-5] < 20                            # error ∝ η: first order
    print("SGD relative errors", errs)


def test_update_prediction_equals_flat_grads(model, pairs):
    seqs = pairs.chosen + pairs.rejected
    params = select_params(model)
    g = torch.Generator().manual_seed(1)
    delta = {n: torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in params.items()}
    G = flat_grads(model, seqs, pairs.pad_id, params)                            # (N, P)
    ref = G @ torch.cat([delta[n].reshape(-1) for n in params])
    out = update_prediction(model, seqs, pairs.pad_id, delta)
    assert out.shape == (len(seqs),) and out.dtype == torch.float64
    assert (out - ref).abs().max() <= TOL * ref.abs().max()
    assert torch.allclose(update_prediction(model, seqs, pairs.pad_id, delta, batch_size=2), out, atol=0, rtol=TOL)
    # a subset of parameters: Δθ of the others counts as 0
    sub = select_params(model, [r"layers\.0\."])
    ref_sub = flat_grads(model, seqs, pairs.pad_id, sub) @ torch.cat([delta[n].reshape(-1) for n in sub])
    out_sub = update_prediction(model, seqs, pairs.pad_id, delta, params=sub)
    assert (out_sub - ref_sub).abs().max() <= TOL * ref_sub.abs().max()
    # the tied weight under its alias name; sdpa model switched to eager and restored
    sdpa = tiny_model("llama", seed=0, dtype=torch.float64, attn_implementation="sdpa")
    tied = {"lm_head.weight": delta["model.embed_tokens.weight"]}
    ref_tied = flat_grads(model, seqs, pairs.pad_id, ["embed_tokens"]) @ tied["lm_head.weight"].reshape(-1)
    out_tied = update_prediction(sdpa, seqs, pairs.pad_id, tied)
    assert (out_tied - ref_tied).abs().max() <= TOL * ref_tied.abs().max()
    assert sdpa.config._attn_implementation == "sdpa" and not sdpa.training
    with pytest.raises(ValueError, match="not parameters"):
        update_prediction(model, seqs, pairs.pad_id, {"nope": torch.zeros(1)})
    with pytest.raises(ValueError, match="without an entry"):
        update_prediction(model, seqs, pairs.pad_id, tied, params="all")


def test_update_prediction_after_adamw(model, pairs):
    """AdamW step on the batch DPO loss: ⟨g_i, Δθ⟩ predicts every sequence's change to O(η)."""
    seqs = pairs.chosen + pairs.rejected
    with torch.no_grad():
        lw0, ll0 = _logps(model, pairs)
    errs = {}
    for lr in (1e-5, 1e-6):
        m = copy.deepcopy(model)
        opt = torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.1)
        before = snapshot_params(m, "all")
        lw, ll = _logps(m, pairs)
        compute_loss("dpo", lw, ll, lw0, ll0).loss.mean().backward()
        opt.step()
        delta = param_delta(m, before)
        pred = update_prediction(model, seqs, pairs.pad_id, delta)             # ⟨g(θ_t), θ_{t+1} - θ_t⟩
        with torch.no_grad():
            actual = sequence_logprobs(m, seqs, pairs.pad_id).logp - torch.cat([lw0, ll0])
        errs[lr] = rel_err(pred, actual)
    assert errs[1e-6] < 1e-3 and errs[1e-5] > errs[1e-6]
    print("AdamW relative errors", errs)


# ------------------------------------------------------------------ what-if

def test_what_if(model, pairs):
    ips = pair_inner_products(model, pairs, impl="ghost")
    with torch.no_grad():
        lw, ll = _logps(model, pairs)
    lens = pair_logprobs(model, pairs)
    nw, nl = lens.chosen.lengths.double(), lens.rejected.lengths.double()
    ref_w, ref_l = lw - 0.3, ll + 0.2                                            # a non-trivial margin
    df = what_if(lw, ll, ref_w, ref_l, nw, nl, ips["ip_wl"], ips["sq_w"], ips["sq_l"], lr=1e-3,
                 hyper={"dpo": {"beta": 0.2}})
    assert list(df.columns) == ["pair", "loss", "d_w", "d_l", "dlogp_w", "dlogp_l", "dmargin", "case", "thr_w", "thr_l"]
    assert set(df["loss"]) == set(LOSSES) and len(df) == len(LOSSES) * len(pairs)
    dpo = df[df["loss"] == "dpo"].sort_values("pair")
    c = compute_loss("dpo", lw, ll, ref_w, ref_l, beta=0.2)
    p = predict(c.d_w, c.d_l, ips["ip_wl"], ips["sq_w"], ips["sq_l"], 1e-3)
    for k in ("dlogp_w", "dlogp_l", "dmargin", "thr_w", "thr_l"):
        assert torch.allclose(torch.tensor(dpo[k].to_numpy()), p[k], rtol=1e-12, atol=0)
    assert dpo["case"].tolist() == p["case"].tolist() and torch.allclose(torch.tensor(dpo["d_w"].to_numpy()), c.d_w)
    simpo = df[df["loss"] == "simpo"].sort_values("pair")
    assert torch.allclose(torch.tensor((simpo["d_w"] / simpo["d_l"]).to_numpy()), nl / nw, rtol=1e-12)
    s = summarize(df)
    assert set(s.index) == set(LOSSES) and torch.allclose(torch.tensor(s.filter(like="case_").sum(axis=1).to_numpy()),
                                                          torch.ones(len(LOSSES), dtype=torch.float64))
    sub = what_if(lw, ll, None, None, nw, nl, ips["ip_wl"], ips["sq_w"], ips["sq_l"], 1e-3,
                  losses=["simpo", "cpo"], pair_ids=["a", "b", "c"])
    assert list(sub["pair"][:3]) == ["a", "b", "c"] and set(sub["loss"]) == {"simpo", "cpo"}
    with pytest.raises(ValueError, match="need ref_w"):
        what_if(lw, ll, None, None, nw, nl, ips["ip_wl"], ips["sq_w"], ips["sq_l"], 1e-3)
    with pytest.raises(ValueError, match="unknown loss"):
        what_if(lw, ll, lw, ll, nw, nl, ips["ip_wl"], ips["sq_w"], ips["sq_l"], 1e-3, losses=["dpoo"])
    with pytest.raises(ValueError, match="not selected"):
        what_if(lw, ll, lw, ll, nw, nl, ips["ip_wl"], ips["sq_w"], ips["sq_l"], 1e-3, losses=["dpo"],
                hyper={"ipo": {"beta": 1.0}})


# ------------------------------------------------------------------ token level (Theorem 3)

def test_first_difference():
    assert first_difference([1, 2, 3, 4], [1, 2, 5, 4]) == 2
    assert first_difference([7], [8]) == 0
    assert first_difference([1, 2], [1, 2, 3]) == 2                             # prefix: m = shorter length
    with pytest.raises(ValueError, match="identical"):
        first_difference([1, 2], [1, 2])


def test_theorem3_learnable_logits_oracle():
    """Seed 004 B.2: learnable logits, edit distance 1 at m; gradients placed row-wise as in the
    proof (rows ≤ m shared, g^i = e_{j_i} - s[i]). Per-token predictions (η = 1, d_w = d_l = 1):
    eq. 11 (t < m: 0), eq. 21 (t = m: 1 + s[k*] - s[j*]), eq. 22 (t > m)."""
    L, V, m = 6, 7, 2
    g = torch.Generator().manual_seed(0)
    s_w = torch.softmax(torch.randn(L, V, generator=g, dtype=torch.float64), -1)
    s_l = s_w.clone()
    s_l[m + 1:] = torch.softmax(torch.randn(L - m - 1, V, generator=g, dtype=torch.float64), -1)  # contexts differ after m
    y_w = torch.randint(V, (L,), generator=g)
    y_l = y_w.clone()
    y_l[m] = (y_w[m] + 1) % V
    eye = torch.eye(V, dtype=torch.float64)

    def grads(s, y):                                                             # (L, L·V): token i lives in row i
        G = torch.zeros(L, L, V, dtype=torch.float64)
        for i in range(L):
            G[i, i] = eye[y[i]] - s[i]
        return G.reshape(L, L * V)

    Gw, Gl = grads(s_w, y_w), grads(s_l, y_l)
    out = token_decomposition(Gw @ Gw.T, Gw @ Gl.T, Gl @ Gl.T, 1.0, 1.0, m=first_difference(y_w.tolist(), y_l.tolist()))
    tok = out["tok_w"]
    assert out["m"] == m
    assert tok[:m].abs().max() < 1e-14 and out["w_before"].abs() < 1e-14        # eq. 11
    j, k = y_w[m], y_l[m]
    assert abs(tok[m] - (1 + s_w[m, k] - s_w[m, j])) < 1e-14                     # eq. 21 (eq. 12 swaps the sign)
    for i in range(m + 1, L):                                                    # eq. 22
        ji = y_w[i]
        others = torch.arange(V) != ji
        want = (1 - s_w[i, ji]) * (s_l[i, ji] - s_w[i, ji]) - (s_w[i, others] * (s_l[i, others] - s_w[i, others])).sum()
        assert abs(tok[i] - want) < 1e-14
    assert abs(out["w_before"] + out["w_at"] + out["w_after"] - out["dlogp_w"]) < 1e-14


def test_token_decomposition_sums_to_sentence(model, pairs):
    w, l = pairs.chosen[0], pairs.rejected[0]                                    # " positive" vs " negative"
    m = first_difference(w.response_ids, l.response_ids)
    assert w.tokens[m] == " positive" and l.tokens[m] == " negative"
    d_w, d_l, lr = 0.07, 0.03, 1e-3
    out = pair_token_decomposition(model, w, l, pairs.pad_id, d_w, d_l, lr)
    assert out["m"] == m and out["tokens_w"][m] == " positive"
    assert out["tok_w"].shape == (len(w.response_ids),) and out["tok_l"].shape == (len(l.response_ids),)
    ips = pair_inner_products(model, pairs.subset([0]), impl="autograd")
    p = predict(t(d_w), t(d_l), ips["ip_wl"], ips["sq_w"], ips["sq_l"], lr)
    scale = lr * (d_w * ips["sq_w"] + d_l * ips["sq_l"] + (d_w + d_l) * ips["ip_wl"].abs())[0]  # before cancellation
    for side in ("w", "l"):
        total = p[f"dlogp_{side}"][0]
        assert abs(out[f"dlogp_{side}"] - total) <= TOL * scale                  # ghost tokens vs autograd sentence
        parts = out[f"{side}_before"] + out[f"{side}_at"] + out[f"{side}_after"]
        assert abs(parts - out[f"dlogp_{side}"]) <= TOL * scale
    assert out["w_at"] == out["tok_w"][m]
    ww, wl, ll = out["grams"]
    tw, tl = token_predictions(ww.M, wl.M, ll.M, d_w, d_l, lr)
    assert torch.equal(tw, out["tok_w"]) and torch.equal(tl, out["tok_l"])
    with pytest.raises(ValueError, match="inconsistent"):
        token_predictions(ww.M, wl.M, ww.M[:2, :2], d_w, d_l)
