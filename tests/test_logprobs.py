"""Log-probs: batched == unbatched loop == a plain unpadded forward; padding side and batch
composition do not matter; hand-checked values on a 3-token bigram model; clear errors."""
import math
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from dynamics.runs.rundir import cached_reference_logprobs
from dynamics.core.logprobs import (pair_logprobs, reference_logprobs,
                               sequence_logprobs, tokenize_pairs, tokenize_response)
from dynamics.inputs.models import TINY_ARCHS, tiny_model, tiny_tokenizer

from toys import Bigram, CharTok


def P(i, prompt, chosen, rejected):
    return SimpleNamespace(id=str(i), prompt=prompt, chosen=chosen, rejected=rejected)


PAIRS = [
    P(0, "The movie was wonderful\nSentiment:", " It has a positive sentiment.", " It has a negative sentiment."),
    P(1, "I hate waiting in long lines at the airport, the flight was delayed again.\nSentiment:",
      " negative", " positive"),
    P(2, "Hi", " It has a positive sentiment based on my judgement.", " It has a negative sentiment based on my judgement."),
    P(3, "TL;DR:", " friend ignores me", " I feel bad about it and the weather today is cold"),
]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def oracle_logp(model, seq):
    """Unpadded single-sequence forward, full log-softmax, sum over response positions."""
    ids = torch.tensor([seq.prompt_ids + seq.response_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    lp = torch.log_softmax(logits.double(), -1)
    P_ = len(seq.prompt_ids)
    return sum(lp[P_ + j - 1, t].item() for j, t in enumerate(seq.response_ids))


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("side", ["left", "right"])
def test_batched_equals_loop_and_oracle(tok, arch, side):
    model = tiny_model(arch, seed=1)
    tp = tokenize_pairs(tok, PAIRS)
    with torch.no_grad():
        out = pair_logprobs(model, tp, padding_side=side)
        loop = [pair_logprobs(model, tp.subset([i]), padding_side=side) for i in range(len(tp))]
    for i in range(len(tp)):
        for got, single, seq in [(out.chosen, loop[i].chosen, tp.chosen[i]), (out.rejected, loop[i].rejected, tp.rejected[i])]:
            ref = oracle_logp(model, seq)
            assert got.logp[i].item() == pytest.approx(single.logp[0].item(), rel=1e-6, abs=1e-6)
            assert got.logp[i].item() == pytest.approx(ref, rel=1e-6, abs=1e-6)
            assert got.lengths[i] == len(seq.response_ids)
            assert got.logp_norm[i].item() == pytest.approx(ref / len(seq.response_ids), rel=1e-6, abs=1e-6)
            assert torch.all(got.token_logps[i, got.lengths[i]:] == 0)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_padding_side_and_batch_composition_invariance(tok, arch):
    model = tiny_model(arch, seed=2)
    tp = tokenize_pairs(tok, PAIRS)
    with torch.no_grad():
        left = pair_logprobs(model, tp, padding_side="left")
        right = pair_logprobs(model, tp, padding_side="right")
        perm = [3, 1, 0, 2]
        shuffled = pair_logprobs(model, tp.subset(perm), padding_side="left")
        pairs_12 = pair_logprobs(model, tp.subset([1, 2]), padding_side="right")
    torch.testing.assert_close(left.chosen.token_logps, right.chosen.token_logps, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(left.rejected.logp, right.rejected.logp, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(shuffled.chosen.logp, left.chosen.logp[perm], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(pairs_12.rejected.logp, left.rejected.logp[[1, 2]], rtol=1e-6, atol=1e-6)


def test_gradients_flow_and_match_loop(tok):
    """The batched log-prob is differentiable, and its gradient equals the per-example one (float64)."""
    model = tiny_model("gpt2", seed=3, dtype=torch.float64)
    tp = tokenize_pairs(tok, PAIRS[:2])
    out = pair_logprobs(model, tp)
    g_batch = torch.autograd.grad(out.chosen.logp[1] - out.rejected.logp[0], list(model.parameters()))
    one = pair_logprobs(model, tp.subset([1])).chosen.logp[0]
    zero = pair_logprobs(model, tp.subset([0])).rejected.logp[0]
    g_loop = torch.autograd.grad(one - zero, list(model.parameters()))
    for a, b in zip(g_batch, g_loop):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_hand_checked_three_token_vocabulary():
    table = [[0.0, 1.0, 2.0], [1.0, 0.0, 0.0], [math.log(3), 0.0, math.log(2)]]
    model = Bigram(table)
    tp = tokenize_pairs(CharTok(), [P("x", "a", "bc", "ca"), P("y", "ab", "a", "bba")])

    def lsm(row, k):
        z = [math.exp(v) for v in table[row]]
        return math.log(z[k] / sum(z))

    # pair x chosen: a→b, b→c ; rejected: a→c, c→a ; pair y chosen: b→a ; rejected: b→b, b→b, b→a
    want_w = [lsm(0, 1) + lsm(1, 2), lsm(1, 0)]
    want_l = [lsm(0, 2) + lsm(2, 0), lsm(1, 1) + lsm(1, 1) + lsm(1, 0)]
    # spelled out: softmax of row 2 = (3, 1, 2)/6, so log π(a | c) = log(1/2)
    assert lsm(2, 0) == pytest.approx(math.log(0.5))
    for side in ("left", "right"):
        out = pair_logprobs(model, tp, padding_side=side)
        assert out.chosen.logp.tolist() == pytest.approx(want_w, abs=1e-12)
        assert out.rejected.logp.tolist() == pytest.approx(want_l, abs=1e-12)
        assert out.rejected.logp_norm.tolist() == pytest.approx([want_l[0] / 2, want_l[1] / 3], abs=1e-12)
    assert tp.rejected[1].tokens == ("b", "b", "a")


def test_separate_tokenization_keeps_response_tokens(tok):
    """Concatenated ids: the response tokens are the response's own, whatever the prompt ends with."""
    a = tokenize_response(tok, "It has a", " positive sentiment.")
    b = tokenize_response(tok, "completely different prompt", " positive sentiment.")
    assert a.response_ids == b.response_ids == tuple(tok(" positive sentiment.", add_special_tokens=False)["input_ids"])
    assert "".join(a.tokens) == " positive sentiment."


def test_errors_name_the_problem(tok):
    with pytest.raises(ValueError, match="empty response"):
        tokenize_pairs(tok, [P(0, "x", "", " no")])
    with pytest.raises(ValueError, match="identical"):
        tokenize_pairs(tok, [P(0, "x", " same", " same")])
    with pytest.raises(ValueError, match="max_length"):
        tokenize_pairs(tok, [P(0, "a long prompt with many words", " yes", " no")], max_length=4, truncation="error")
    with pytest.raises(ValueError, match="responses are never cut"):  # auto: the prompt only is cut
        tokenize_pairs(tok, [P(0, "a prompt", " a response of several words", " no")], max_length=2)
    with pytest.raises(ValueError, match="unknown truncation"):
        tokenize_pairs(tok, PAIRS, truncation="cut")
    notok = tiny_tokenizer()
    notok.pad_token = None
    with pytest.raises(ValueError, match="no pad token"):
        tokenize_pairs(notok, PAIRS)
    model = tiny_model("llama")  # context of 256 positions
    long = tokenize_pairs(tok, [P(0, "word " * 300, " yes", " no")])
    with pytest.raises(ValueError, match="longer than the model's context"):
        sequence_logprobs(model, long.chosen, long.pad_id)


def test_prompt_left_truncation_is_recorded_and_keeps_response(tok):
    full = tokenize_pairs(tok, [PAIRS[1]])
    n = full.chosen[0].length
    cut = tokenize_pairs(tok, [PAIRS[1]], max_length=n - 3, truncation="prompt_left")
    assert cut.chosen[0].n_prompt_truncated == 3
    assert cut.chosen[0].response_ids == full.chosen[0].response_ids
    assert cut.chosen[0].prompt_ids == full.chosen[0].prompt_ids[3:]
    auto = tokenize_pairs(tok, [PAIRS[1]], max_length=n - 3)                       # "auto" with a limit
    assert auto.truncation == "prompt_left" and auto.chosen[0] == cut.chosen[0]
    assert tokenize_pairs(tok, [PAIRS[1]]).truncation == "error"                    # "auto" without one
    with pytest.raises(ValueError, match="never cut"):
        tokenize_pairs(tok, [PAIRS[2]], max_length=5, truncation="prompt_left")


def test_reference_logprobs_and_cache(tok, tmp_path):
    model = tiny_model("neox", seed=4)
    tp = tokenize_pairs(tok, PAIRS)
    ref = reference_logprobs(model, tp, batch_size=3)
    with torch.no_grad():
        out = pair_logprobs(model, tp)
    assert ref["ref_w"].tolist() == pytest.approx(out.chosen.logp.tolist(), rel=1e-6)
    assert ref["len_l"].tolist() == out.rejected.lengths.tolist()
    path = tmp_path / "ref.parquet"
    first = cached_reference_logprobs(model, tp.subset([0, 1]), path)
    assert len(pd.read_parquet(path)) == 2
    # the same model reuses the cache for known pairs (only the two new pairs are computed) ...
    again = cached_reference_logprobs(model, tp, path)
    assert again["ref_w"].iloc[:2].tolist() == first["ref_w"].tolist()
    assert again["pair_id"].tolist() == tp.pair_ids and len(pd.read_parquet(path)) == 4
    # ... but another model (other weights) never reuses it: all recomputed, the cache replaced
    other = tiny_model("neox", seed=5)
    with torch.no_grad():
        assert cached_reference_logprobs(other, tp, path)["ref_w"].tolist() == pytest.approx(
            pair_logprobs(other, tp).chosen.logp.tolist(), rel=1e-6)
    assert len(pd.read_parquet(path)) == 4
    # ... and a pair whose tokens changed is recomputed (stale fingerprint)
    changed = tokenize_pairs(tok, [P(0, "another prompt", " It has a positive sentiment.", " no")])
    fresh = cached_reference_logprobs(other, changed, path)
    with torch.no_grad():
        assert fresh["ref_w"].iloc[0] == pytest.approx(pair_logprobs(other, changed).chosen.logp[0].item(), rel=1e-6)


def test_body_and_head_refuses_scaled_logits():
    """A model whose config scales or soft-caps its logits after the head is not ``head(body(x))``:
    the analytic head (ghost engine, probe pass, TRL's fused head in-run) would be wrong, so None."""
    from dynamics.core.logprobs import LOGIT_SCALINGS, body_and_head
    from dynamics.inputs.models import tiny_model

    model = tiny_model("llama", seed=0)
    body, head = body_and_head(model)
    assert head is model.lm_head
    for attr in LOGIT_SCALINGS:
        setattr(model.config, attr, 1.0)                                    # unscaled: still the plain form
        assert body_and_head(model) is not None, attr
        setattr(model.config, attr, 0.5)
        assert body_and_head(model) is None, attr
        setattr(model.config, attr, None)


def test_pair_prompt_cut_once_by_the_longer_response(tok):
    """prompt_left cuts a pair's prompt once: chosen and rejected keep the same prompt ids (the
    longer sequence fills max_length, the shorter is shorter), whichever of the two is longer."""
    pair = PAIRS[3]                                                     # chosen short, rejected long
    full = tokenize_pairs(tok, [pair])
    lw, ll = (len(s.response_ids) for s in (full.chosen[0], full.rejected[0]))
    assert ll > lw + 2
    n = len(full.chosen[0].prompt_ids) + ll
    for p in (pair, P(3, pair.prompt, pair.rejected, pair.chosen)):       # the longer as rejected, then as chosen
        cut = tokenize_pairs(tok, [p], max_length=n - 2)
        w, l = cut.chosen[0], cut.rejected[0]
        assert w.prompt_ids == l.prompt_ids == full.chosen[0].prompt_ids[2:]
        assert w.n_prompt_truncated == l.n_prompt_truncated == 2
        assert max(w.length, l.length) == n - 2 and min(w.length, l.length) == n - 2 - (ll - lw)
    # the same cut as the longer sequence alone, never one per sequence
    alone = tokenize_response(tok, pair.prompt, pair.rejected, max_length=n - 2)
    assert alone.prompt_ids == tokenize_pairs(tok, [pair], max_length=n - 2).chosen[0].prompt_ids
    with pytest.raises(ValueError, match="rejected.*never cut"):        # the longer response names the error
        tokenize_pairs(tok, [pair], max_length=ll)
