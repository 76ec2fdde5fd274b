"""Pair screening (`dynamics.core.screen`): CHES and the hidden-state scores against a per-sequence
forward oracle summed by a loop, CHES's exact structure (a last-token change gives 0, the swap
identity), float64 accumulation where float32 overflows, the sequence comparisons against plain
dynamic programmes, the gradient/prediction columns against the functions they come from, the
Spearman correlation against hand values, and the input errors."""
import math
import random

import pandas as pd
import pytest
import torch

from dynamics.core.analyzer import Analyzer
from dynamics.core.conditions import CASES, predict
from dynamics.core.logprobs import TokenizedPairs, TokenizedSequence, logprobs_table
from dynamics.core.losses import compute_loss, resolve_hyper
from dynamics.core.screen import (RANK_SCORES, SCREEN_COLUMNS, edit_distance, prefix_suffix, rank_correlation,
                                  screen_pairs, screen_summary, spearman)
from dynamics.errors import InputError
from dynamics.inputs.data import shared_prefix_suffix
from dynamics.inputs.models import tiny_model

pytestmark = pytest.mark.usefixtures("float64_exact", "one_thread")
TOL = 1e-10


def S(prompt, response):
    return TokenizedSequence(tuple(prompt), tuple(response), tuple(f"<{i}>" for i in response))


# prompts of 1-4 tokens, responses of 1-7 tokens, the rejected one sometimes longer: padding differs per row
PAIRS = TokenizedPairs(
    ["a", "b", "c", "d", "e"],
    [S([1, 2, 3], [4, 5, 6, 7]), S([9, 3], [4, 8]), S([5], [7, 7, 7, 7, 7, 2]), S([1, 2, 3, 4], [6]),
     S([8, 8], [3, 1, 4, 1, 5, 9, 2])],
    [S([1, 2, 3], [4, 5, 9]), S([9, 3], [11, 12, 13]), S([5], [7, 7, 7, 7, 7, 3]), S([1, 2, 3, 4], [20, 21, 22]),
     S([8, 8], [3, 1, 4, 10, 5, 9, 2])],
    0)


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", seed=1, vocab_size=32, dtype=torch.float64)


def rel(a, b):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def col(df, name):
    return torch.tensor(df[name].to_numpy(), dtype=torch.float64)


def oracle(model, seq):
    """``(Σ_k h_{x,y<k}, h at the final token, log π(y|x))`` from a plain forward of the unpadded
    sequence alone (``output_hidden_states``), summed by a loop in float64."""
    ids = torch.tensor([list(seq.prompt_ids + seq.response_ids)])
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    h = out.hidden_states[-1][0].double()                                       # (T, d)
    logits = out.logits[0].double()                                             # (T, V)
    P = len(seq.prompt_ids)
    s, lp = torch.zeros(h.shape[-1], dtype=torch.float64), 0.0
    for k, tok in enumerate(seq.response_ids):                                  # h at P-1+k predicts token k
        s += h[P - 1 + k]
        lp += float(torch.log_softmax(logits[P - 1 + k], -1)[tok])
    return s, h[-1], lp


def oracle_scores(model, pairs):
    rows = []
    for w, l in zip(pairs.chosen, pairs.rejected):
        sw, hw, lw = oracle(model, w)
        sl, hl, ll = oracle(model, l)
        nw, nl = len(w.response_ids), len(l.response_ids)
        rows.append(dict(ches=float(sw @ sl - sw @ sw),
                         ches_norm=float((sw / nw) @ (sl / nl) - (sw / nw) @ (sw / nw)),
                         h_ip=float(hw @ hl), logp_w=lw, logp_l=ll, sw=sw, sl=sl))
    return rows


# ------------------------------------------------------------------ CHES and hidden states vs the oracle

@pytest.mark.parametrize("arch", ["llama", "gpt2", "neox"])
def test_hidden_scores_match_per_sequence_oracle(arch):
    model = tiny_model(arch, seed=2, vocab_size=32, dtype=torch.float64)
    ref = oracle_scores(model, PAIRS)
    one = screen_pairs(model, PAIRS, batch_size=1, params=["lm_head"])
    three = screen_pairs(model, PAIRS, batch_size=3, params=["lm_head"])
    assert list(one.columns) == SCREEN_COLUMNS and one.pair_id.tolist() == PAIRS.pair_ids
    for name in ("ches", "ches_norm", "h_ip", "logp_w", "logp_l"):
        want = torch.tensor([r[name] for r in ref], dtype=torch.float64)
        # relative error. CHES = ⟨s⁺,s⁻⟩ − ‖s⁺‖² is a difference of two terms: the round-off of the
        # hidden states (batched vs one-sequence forwards) and of the float64 sums is relative to the
        # terms, |⟨s⁺,s⁻⟩| + ‖s⁺‖² ≤ ‖s⁺‖(‖s⁺‖ + ‖s⁻‖), not to CHES itself, which is exactly 0 for pair
        # c (last token changed); so the error is measured against |CHES| + ‖s⁺‖(‖s⁺‖ + ‖s⁻‖)
        # (divided by the length products for the normalized version).
        term = torch.tensor([float(r["sw"].norm() * (r["sw"].norm() + r["sl"].norm()))
                             / (len(w.response_ids) * min(len(w.response_ids), len(l.response_ids))
                                if name == "ches_norm" else 1)
                             for r, w, l in zip(ref, PAIRS.chosen, PAIRS.rejected)])
        scale = want.abs() + (term if name in ("ches", "ches_norm") else 0.0)
        for df in (one, three):
            got = col(df, name)
            assert float(((got - want).abs() / scale).max()) < TOL, (name, got, want)
        assert rel(col(one, name), col(three, name)) < 1e-12                       # batch size / padding
    assert one.len_w.tolist() == [4, 2, 6, 1, 7] and one.len_l.tolist() == [3, 3, 6, 3, 7]


def test_ches_exact_structure(llama):
    """Only the states h_{x,y<k}, k ≤ |y|, enter: y⁻ = y⁺ with the *last* token changed shares all of
    them, so CHES = CHES_norm = 0 (a sum that included the final token's state, or the states at the
    response tokens themselves, would not vanish), while a change in the middle does not give 0.
    Swap identity: CHES(w,l) + CHES(l,w) = −‖s⁺ − s⁻‖² < 0, so at least one order is negative."""
    df = screen_pairs(llama, PAIRS, params=["lm_head"])
    ref = oracle_scores(llama, PAIRS)
    c = PAIRS.pair_ids.index("c")                                                # last token changed
    e = PAIRS.pair_ids.index("e")                                                # middle token changed
    sq = float(ref[c]["sw"] @ ref[c]["sw"])
    assert abs(df.ches[c]) <= 1e-13 * sq and abs(df.ches_norm[c]) <= 1e-13 * sq / 36
    assert abs(df.ches[e]) > 1e-6 * float(ref[e]["sw"] @ ref[e]["sw"])
    swapped = TokenizedPairs(PAIRS.pair_ids, PAIRS.rejected, PAIRS.chosen, 0)
    dfs = screen_pairs(llama, swapped, params=["lm_head"])
    for k, r in enumerate(ref):
        diff = r["sw"] - r["sl"]
        nw, nl = df.len_w[k], df.len_l[k]
        mdiff = r["sw"] / nw - r["sl"] / nl
        assert abs(df.ches[k] + dfs.ches[k] + float(diff @ diff)) < TOL * float(r["sw"] @ r["sw"])
        assert abs(df.ches_norm[k] + dfs.ches_norm[k] + float(mdiff @ mdiff)) < TOL * float(r["sw"] @ r["sw"])
        if k != c:
            assert df.ches[k] + dfs.ches[k] < 0 and min(df.ches[k], dfs.ches[k]) < 0
    assert rel(col(dfs, "h_ip"), col(df, "h_ip")) < 1e-12                        # symmetric score


def test_float64_accumulation_where_float32_overflows():
    """A float32 model whose final hidden states are ~3e36 (final norm weight ×1e36, bias 2.5e36;
    head ×1e-30 so logits and gradients stay finite) over responses of 140-150 tokens: every state
    is finite in float32 but their float32 sum overflows (and ‖Σh‖² ≈ 1e77 anyway); the float64
    accumulation stays finite and equals a float64 recomputation of the float32 states."""
    model = tiny_model("neox", seed=3, vocab_size=32, dtype=torch.float32)
    with torch.no_grad():
        model.gpt_neox.final_layer_norm.weight.mul_(1e36)
        model.gpt_neox.final_layer_norm.bias.fill_(2.5e36)
        model.get_output_embeddings().weight.mul_(1e-30)
    rng = random.Random(0)
    w = S([1, 2], [rng.randrange(1, 32) for _ in range(150)])
    l = S([1, 2], [rng.randrange(1, 32) for _ in range(140)])
    pairs = TokenizedPairs(["long"], [w], [l], 0)
    df = screen_pairs(model, pairs, params=["layers.1"])
    sw, hw, lw = oracle(model, w)
    sl, hl, _ = oracle(model, l)
    # the test is meaningful: the states are finite in float32, their float32 sum is not
    ids = torch.tensor([list(w.prompt_ids + w.response_ids)])
    with torch.no_grad():
        h32 = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0, 1:-1]   # (150, d) float32
    assert h32.dtype == torch.float32 and torch.isfinite(h32).all() and not torch.isfinite(h32.sum(0)).all()
    assert torch.isfinite(sw).all() and float(sw.norm()) > 3.5e38
    for c in SCREEN_COLUMNS[1:]:
        assert math.isfinite(df[c][0]), c
    assert abs(df.ches[0] - float(sw @ sl - sw @ sw)) < 1e-5 * float(sw.norm() * (sw.norm() + sl.norm()))
    mw, ml = sw / 150, sl / 140
    assert abs(df.ches_norm[0] - float(mw @ ml - mw @ mw)) < 1e-5 * float(mw.norm() * (mw.norm() + ml.norm()))
    assert abs(df.h_ip[0] - float(hw @ hl)) < 1e-5 * float(hw.norm() * hl.norm())
    assert abs(df.logp_w[0] - lw) < 1e-4 * abs(lw)


# ------------------------------------------------------------------ sequence comparisons

def dp_levenshtein(a, b):
    """Textbook O(|a||b|) table."""
    D = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            D[i][j] = min(D[i - 1][j] + 1, D[i][j - 1] + 1, D[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
    return D[-1][-1]


def test_edit_distance_and_prefix_suffix():
    kitten, sitting = [ord(c) for c in "kitten"], [ord(c) for c in "sitting"]
    assert edit_distance(kitten, sitting) == edit_distance(sitting, kitten) == 3
    assert edit_distance([ord(c) for c in "flaw"], [ord(c) for c in "lawn"]) == 2
    assert edit_distance([1, 2], [2, 1]) == 2 and edit_distance([1, 2, 3], []) == 3
    assert edit_distance([], []) == 0 and edit_distance([5, 6, 7], [5, 6, 7]) == 0
    assert edit_distance([1, 2, 3, 4], [1, 9, 3, 4, 5]) == 2                       # substitute + insert
    rng = random.Random(1)
    for _ in range(200):
        a = [rng.randrange(4) for _ in range(rng.randrange(0, 12))]
        b = [rng.randrange(4) for _ in range(rng.randrange(0, 12))]
        assert edit_distance(a, b) == dp_levenshtein(a, b), (a, b)
        assert prefix_suffix(a, b) == shared_prefix_suffix(a, b), (a, b)
    assert prefix_suffix([1, 2, 3, 4], [1, 2, 9, 4]) == (2, 1)
    assert prefix_suffix([1, 2, 1], [1, 2, 1, 2, 1]) == (3, 0)                     # non-overlapping
    assert prefix_suffix([7, 1, 2], [8, 1, 2]) == (0, 2)


# ------------------------------------------------------------------ gradient and prediction columns

def test_gradient_loss_and_prediction_columns(llama):
    """ip/sq/cos equal `Analyzer.pair_inner_products` on the whole set; logp equal `logprobs_table`;
    d_w, d_l equal `compute_loss` with ref = logp (SimPO: depends on logp and lengths); the predicted
    changes and case equal `conditions.predict` on the same numbers; DPO at margin 0: d = β/2."""
    params = ["layers.0", "lm_head"]
    df = screen_pairs(llama, PAIRS, loss="simpo", loss_params={"beta": 1.5}, lr=0.3, params=params,
                      impl="ghost", batch_size=2)
    ip = Analyzer(llama, 0, params=params, impl="autograd").pair_inner_products(PAIRS)
    for name in ("ip_wl", "sq_w", "sq_l", "cos_wl"):
        assert rel(col(df, name), ip[name].detach()) < TOL, name
    tab = logprobs_table(llama, PAIRS, batch_size=1)
    assert rel(col(df, "logp_w"), col(tab, "logp_w")) < TOL and rel(col(df, "logp_l"), col(tab, "logp_l")) < TOL
    lw, ll = col(tab, "logp_w"), col(tab, "logp_l")
    out = compute_loss("simpo", lw, ll, lw, ll, col(tab, "len_w"), col(tab, "len_l"),
                       **resolve_hyper("simpo", {"beta": 1.5}))
    assert rel(col(df, "d_w"), out.d_w) < TOL and rel(col(df, "d_l"), out.d_l) < TOL
    assert not torch.allclose(out.d_w, out.d_w[0].expand_as(out.d_w))           # SimPO's d varies per pair
    pred = predict(col(df, "d_w"), col(df, "d_l"), col(df, "ip_wl"), col(df, "sq_w"), col(df, "sq_l"), lr=0.3)
    assert rel(col(df, "pred_dw"), pred["dlogp_w"]) < 1e-14 and rel(col(df, "pred_dl"), pred["dlogp_l"]) < 1e-14
    assert df.case_pred.tolist() == pred["case"].tolist()
    assert df.edit_distance.tolist() == [2, 3, 1, 3, 1]
    assert list(zip(df.prefix, df.suffix)) == [(2, 0), (0, 0), (5, 0), (0, 0), (3, 3)]
    dpo = screen_pairs(llama, PAIRS.subset([0, 1]), params=["lm_head"], loss_params={"beta": 0.2})
    assert dpo.d_w.tolist() == dpo.d_l.tolist() == [0.1, 0.1]                    # β σ(0)


def test_mode_restored_and_no_grad_left(llama):
    llama.train()
    try:
        screen_pairs(llama, PAIRS.subset([0]), params=["lm_head"])
        assert llama.training
        assert all(p.grad is None for p in llama.parameters())
    finally:
        llama.eval()
    screen_pairs(llama, PAIRS.subset([0]), params=["lm_head"])
    assert not llama.training


# ------------------------------------------------------------------ Spearman and the summary

def score_table(ids, **cols):
    base = {s: [0.0] * len(ids) for s in RANK_SCORES}
    base.update(cols)
    return pd.DataFrame(dict(pair_id=ids, **base))


def test_spearman_hand_values_and_alignment():
    # x ranks (1, 2.5, 2.5, 4), y ranks (1, 3, 2, 4): Σdxdy = 4.5, Σdx² = 4.5, Σdy² = 5 -> 3/√10
    ids = ["p", "q", "r", "s"]
    x, y = [1.0, 2.0, 2.0, 3.0], [10.0, 30.0, 20.0, 40.0]
    assert abs(spearman(pd.Series(x), pd.Series(y)) - 3 / math.sqrt(10)) < 1e-15
    df = score_table(ids, ches=x, ches_norm=[math.exp(v) for v in y], h_ip=[-v for v in y])
    realized = pd.Series(y, index=ids)[::-1]                                    # another order: matched by id
    rc = rank_correlation(df, realized)
    assert set(rc) == set(RANK_SCORES)
    assert abs(rc["ches"] - 3 / math.sqrt(10)) < 1e-15
    assert rc["ches_norm"] == pytest.approx(1.0, abs=1e-15)                      # monotone, nonlinear
    assert rc["h_ip"] == pytest.approx(-1.0, abs=1e-15)
    assert math.isnan(rc["edit_distance"])                                       # constant score
    # ties in realized too: x = (1,2,3,4), y ranks (1.5, 1.5, 3, 4): Σdxdy = 4.5, Σdx² = 5, Σdy² = 4.5
    rc2 = rank_correlation(score_table(ids, ches=[1.0, 2.0, 3.0, 4.0]), pd.Series([0.0, 0.0, 1.0, 2.0], index=ids))
    assert abs(rc2["ches"] - 3 / math.sqrt(10)) < 1e-15
    # pairs absent from realized (or NaN there) are left out
    extra = score_table(ids + ["t"], ches=x + [-100.0])
    rc3 = rank_correlation(extra, pd.Series(y + [float("nan")], index=ids + ["t"]))
    assert abs(rc3["ches"] - 3 / math.sqrt(10)) < 1e-15


def test_screen_summary(llama):
    df = screen_pairs(llama, PAIRS, params=["lm_head"])
    s = screen_summary(df, top=3)
    assert s["n_pairs"] == 5
    assert [c["case"] for c in s["cases"]] == list(CASES) and sum(c["count"] for c in s["cases"]) == 5
    assert {c["case"]: c["count"] for c in s["cases"]} == df.case_pred.value_counts().to_dict() | \
        {c: 0 for c in CASES if c not in set(df.case_pred)}
    q = s["quantiles"]["ches_norm"]
    assert q["min"] == df.ches_norm.min() and q["max"] == df.ches_norm.max() and q["median"] == df.ches_norm.median()
    assert set(s["quantiles"]) == {"ches", "ches_norm", "cos_wl"}
    top = [r["pair_id"] for r in s["top"]]
    assert top == df.sort_values("ches_norm", ascending=False).pair_id.tolist()[:3]
    assert all(type(r["edit_distance"]) is int and type(r["ches"]) is float for r in s["top"])
    assert screen_summary(df, top=0)["top"] == []


# ------------------------------------------------------------------ errors

class NotACausalLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Linear(4, 4)

    def forward(self, input_ids, **kw):
        return self.w(torch.zeros(*input_ids.shape, 4))


def test_bad_input(llama):
    with pytest.raises(InputError, match="empty"):
        screen_pairs(llama, TokenizedPairs([], [], [], 0))
    with pytest.raises(InputError, match="TokenizedPairs"):
        screen_pairs(llama, [("x", "y", "z")])
    with pytest.raises(InputError, match="unknown loss"):
        screen_pairs(llama, PAIRS, loss="nope")
    with pytest.raises(InputError, match="beta"):
        screen_pairs(llama, PAIRS, loss_params={"beta": -1.0})
    with pytest.raises(InputError, match="impl"):
        screen_pairs(llama, PAIRS, impl="magic")
    with pytest.raises(InputError, match="batch_size"):
        screen_pairs(llama, PAIRS, batch_size=0)
    for lr in (0.0, float("nan"), "1e-6"):
        with pytest.raises(InputError, match="lr"):
            screen_pairs(llama, PAIRS, lr=lr)
    with pytest.raises(InputError, match="matched no parameter"):
        screen_pairs(llama, PAIRS, params=["no_such_layer"])
    with pytest.raises(InputError, match="NotACausalLM is not of that form"):
        screen_pairs(NotACausalLM(), PAIRS)
    with pytest.raises(InputError, match="identical"):
        screen_pairs(llama, TokenizedPairs(["z"], [S([1], [2, 3])], [S([1], [2, 3])], 0))
    with pytest.raises(InputError, match="rejected response is empty"):
        screen_pairs(llama, TokenizedPairs(["z"], [S([1], [2, 3])], [S([1], [])], 0))
    with pytest.raises(InputError, match="prompt is empty"):
        screen_pairs(llama, TokenizedPairs(["z"], [S([], [2, 3])], [S([], [4])], 0))
    with pytest.raises(InputError, match="context"):
        screen_pairs(llama, TokenizedPairs(["z"], [S([1] * 250, [2] * 10)], [S([1] * 250, [3])], 0))
    df = score_table(["a", "b"], ches=[1.0, 2.0])
    with pytest.raises(InputError, match="no pair_id"):
        rank_correlation(df, pd.Series([1.0, 2.0], index=[0, 1]))
    with pytest.raises(InputError, match="Series"):
        rank_correlation(df, [1.0, 2.0])
    with pytest.raises(InputError, match="duplicated"):
        rank_correlation(df, pd.Series([1.0, 2.0], index=["a", "a"]))
    with pytest.raises(InputError, match="lacks column"):
        rank_correlation(df.drop(columns="cos_wl"), pd.Series([1.0, 2.0], index=["a", "b"]))
    with pytest.raises(InputError, match="lacks column"):
        screen_summary(df)
    with pytest.raises(InputError, match="top"):
        screen_summary(screen_pairs(llama, PAIRS.subset([0]), params=["lm_head"]), top=-1)
