"""Probes: names and deterministic construction; metrics against hand-computed values on a 3-token
bigram model (every formula of `METRICS`, including ‖A‖₂ against a matrix norm); y* is the argmax
of the teacher-forced logits; greedy decoding and its skip reason; a tiny transformers model."""
import math
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from dynamics.inputs.data import PreferencePair
from dynamics.core.logprobs import sequence_logprobs, tokenize_response
from dynamics.inputs.models import tiny_model, tiny_tokenizer
from dynamics.core.probes import METRICS, Probe, model_probes, probe_metrics, probe_set

from toys import Bigram, CharTok

PAIR = PreferencePair("p0", "The movie was", " wonderful and I loved every minute.", " terrible and cold.")
OTHERS = [PreferencePair("p1", "I hate", " waiting in long lines at the airport", " the beach"),
          PreferencePair("p2", "TL;DR:", " friend ignores me", " I feel bad")]
HELD = PreferencePair("h0", "The capital of France is", " Paris.", " cold and rainy")


# ------------------------------------------------------------------ construction

def test_probe_names_and_construction():
    probes = probe_set(PAIR, others=[PAIR] + OTHERS, held_out=HELD, rephrases=[" I loved it.", " Great film."], seed=3)
    names = [p.name for p in probes]
    assert names == ["chosen", "rejected", "other_chosen", "held_out_chosen", "chosen_shuffled",
                     "other_shuffled", "rephrase_0", "rephrase_1"]
    by = {p.name: p for p in probes}
    assert all(p.prompt == PAIR.prompt for p in probes) and probes.skipped == []
    assert by["chosen"].response == PAIR.chosen and by["rejected"].response == PAIR.rejected
    assert by["other_chosen"].response in {o.chosen for o in OTHERS}                # never the pair itself
    assert by["held_out_chosen"].response == HELD.chosen
    assert by["rephrase_1"].response == " Great film."
    for name, src in [("chosen_shuffled", PAIR.chosen), ("other_shuffled", by["other_chosen"].response)]:
        shuffled = by[name].response
        assert shuffled != src and sorted(shuffled.split()) == sorted(src.split()) and shuffled.startswith(" ")
    again = probe_set(PAIR, others=[PAIR] + OTHERS, held_out=HELD, rephrases=[" I loved it.", " Great film."], seed=3)
    assert again == probes                                                       # deterministic from the seed
    shuffles = {probe_set(PAIR, others=OTHERS, seed=s)[3].response for s in range(6)}
    assert len(shuffles) > 1                                                     # the seed matters


def test_missing_and_invalid_inputs():
    one_word = PreferencePair("p3", "Hi", " positive", " negative")
    probes = probe_set(one_word, others=[], held_out=None)
    assert [p.name for p in probes] == ["chosen", "rejected"]
    assert dict(probes.skipped).keys() == {"other_chosen", "held_out_chosen", "chosen_shuffled", "other_shuffled"}
    assert "fewer than two distinct words" in dict(probes.skipped)["chosen_shuffled"]
    with pytest.raises(ValueError, match="no pair in others"):
        probe_set(PAIR, others=[PAIR])
    with pytest.raises(ValueError, match="not held out"):
        probe_set(PAIR, others=OTHERS, held_out=OTHERS[0])


# ------------------------------------------------------------------ hand-checked metrics

TABLE = [[0.0, 1.0, 2.0], [1.0, 0.0, 0.0], [math.log(3), 0.0, math.log(2)]]


def softmax(row):
    e = [math.exp(v) for v in TABLE[row]]
    return [x / sum(e) for x in e]


def test_metrics_on_bigram_by_hand():
    model, tok = Bigram(TABLE), CharTok()
    probes = [Probe("chosen", "a", "bc"), Probe("rejected", "a", "cab")]
    recs = probe_metrics(model, tok, None, probes)
    assert [r["name"] for r in recs] == ["chosen", "rejected"] and set(METRICS) <= set(recs[0])
    for rec, (prompt, resp) in zip(recs, [("a", "bc"), ("a", "cab")]):
        ctx = [prompt[-1]] + list(resp[:-1])                                     # the previous char
        dists = [softmax("abc".index(c)) for c in ctx]
        ys = ["abc".index(c) for c in resp]
        n = len(resp)
        p_y = [d[y] for d, y in zip(dists, ys)]
        p_star = [max(d) for d in dists]
        want = dict(
            logp=sum(map(math.log, p_y)), logp_mean=sum(map(math.log, p_y)) / n,
            argmax_logp=sum(map(math.log, p_star)), argmax_log1m=sum(math.log(1 - p) for p in p_star),
            argmax_mass=sum(p_star) / n,
            a_norm=sum(math.sqrt(3 * sum(x * x for x in d)) for d in dists) / n,
            g_norm=sum(math.sqrt(sum((x - (k == y)) ** 2 for k, x in enumerate(d))) for d, y in zip(dists, ys)) / n,
            one_minus_p=sum(1 - p for p in p_y) / n,
            entropy=sum(-sum(x * math.log(x) for x in d) for d in dists) / n,
        )
        assert rec["n_tokens"] == n
        for k, v in want.items():
            assert rec[k] == pytest.approx(v, abs=1e-12), k
    # spelled out: after "c" the distribution is (3, 1, 2)/6, so log π(a | c) = log 1/2, argmax mass 1/2
    assert softmax(2) == pytest.approx([0.5, 1 / 6, 1 / 3])
    # ‖A‖₂ of A = I - 1πᵀ is √V ‖π‖₂ (an oblique projector): check against the matrix 2-norm
    pi = torch.tensor(softmax(0), dtype=torch.float64)
    A = torch.eye(3, dtype=torch.float64) - torch.ones(3, 1, dtype=torch.float64) * pi[None]
    assert torch.linalg.matrix_norm(A, ord=2).item() == pytest.approx(math.sqrt(3) * pi.norm().item(), abs=1e-12)
    # one shared prompt for all probes; batching does not change numbers
    shared = probe_metrics(model, tok, "c", probes, batch_size=1)
    assert shared[0]["prompt"] == "c"
    assert shared[0]["logp"] == pytest.approx(math.log(softmax(2)[1]) + math.log(softmax(1)[2]), abs=1e-12)


def test_model_probes_on_bigram():
    model = Bigram(TABLE)
    pair = SimpleNamespace(prompt="a", chosen="bcb")
    probes = model_probes(model, CharTok(), pair, max_new_tokens=4)
    by = {p.name: p for p in probes}
    # teacher forcing on "bcb": contexts a, b, c -> argmax c, a, a
    assert by["argmax_teacher"].response == "caa" and by["argmax_teacher"].response_ids == (2, 0, 0)
    # greedy from "a": a -> c -> a -> c ... (no EOS): stops at max_new_tokens
    assert by["greedy"].response == "caca"
    # EOS = "c" is the first greedy token: empty response, skipped with the reason
    skipped = model_probes(model, CharTok(eos=2), pair, max_new_tokens=4)
    assert [p.name for p in skipped] == ["argmax_teacher"]
    assert "EOS was the first greedy token" in dict(skipped.skipped)["greedy"]
    # EOS later: the response stops before it
    model2 = Bigram([[0.0, 2.0, 0.0], [0.0, 0.0, 2.0], [0.0, 0.0, 0.0]])       # a -> b -> c(EOS)
    assert {p.name: p for p in model_probes(model2, CharTok(eos=2), pair)}["greedy"].response == "b"


# ------------------------------------------------------------------ a tiny transformers model

@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_tiny_model_probes_and_metrics(arch):
    model, tok = tiny_model(arch, seed=0, dtype=torch.float64), tiny_tokenizer()
    model.train()
    probes = probe_set(PAIR, others=OTHERS, held_out=HELD, rephrases=[" I loved it."])
    mp = model_probes(model, tok, PAIR, max_new_tokens=6)
    assert model.training                                                        # the caller's mode is restored
    ystar = {p.name: p for p in mp}["argmax_teacher"]
    seq = tokenize_response(tok, PAIR.prompt, PAIR.chosen)
    with torch.no_grad():
        ids = torch.tensor([seq.prompt_ids + seq.response_ids])
        model.eval()
        logits = model(input_ids=ids).logits[0, len(seq.prompt_ids) - 1:-1]
        model.train()
    assert list(ystar.response_ids) == logits.argmax(-1).tolist() and len(ystar.response_ids) == len(seq.response_ids)
    probes.extend(mp)
    recs = probe_metrics(model, tok, None, probes, batch_size=4)
    df = pd.DataFrame(recs)
    assert list(df["name"]) == [p.name for p in probes] and df[list(METRICS)].notna().all().all()
    model.eval()
    with torch.no_grad():
        want = sequence_logprobs(model, [tokenize_response(tok, PAIR.prompt, p.response) for p in probes[:-2]], 0).logp
    assert df["logp"].iloc[:-2].tolist() == pytest.approx(want.tolist(), abs=1e-10)
    chosen = df.set_index("name").loc["chosen"]
    # per-prompt metrics teacher-forced on y⁺: Σ_t log π(y*_t) is the log of the row maxima
    assert chosen["argmax_logp"] == pytest.approx(torch.log_softmax(logits, -1).max(-1).values.sum().item(), abs=1e-10)
    assert (df["argmax_mass"] <= 1).all() and (df["one_minus_p"] >= 0).all() and (df["entropy"] > 0).all()
