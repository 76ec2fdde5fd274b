"""Seed 004 section 4.2 pipeline on a tiny model: the three style runs, the combined records,
token Grams, figures with their config sidecars, the claims, and the CLI routes."""
import json

import numpy as np
import pytest

from dynamics.tools.plots import plot_token_heatmap
from analyses.sentiment import (STYLE_ORDER, claims, claims_markdown, load_token_gram, run_sentiment,
                                token_cosines, write_figures)
from analyses.cli import main

TINY = dict(sft_steps=2, steps=4, eval_every=2, n_probe=2, n_pairs=12, batch_size=4, lr=1e-3)


@pytest.fixture(scope="module")
def sentiment_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("sentiment")
    runs = run_sentiment(out, model="tiny-llama", data="builtin", overrides=TINY, progress=False)
    return out, runs


def test_runs_and_combined_records(sentiment_out):
    out, runs = sentiment_out
    assert list(runs) == list(STYLE_ORDER)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["settings"]["steps"] == 4 and cfg["settings"]["lr"] == 1e-3 and cfg["data"] is None
    import pandas as pd
    rec = pd.read_parquet(out / "records.parquet")
    assert {"style", "step", "pair_id", "logp_w", "logp_l", "cos_wl"} <= set(rec.columns)
    assert list(dict.fromkeys(rec["style"])) == list(STYLE_ORDER)
    for style in STYLE_ORDER:  # steps 0, 2 recorded with gradients, 4 the final state; 2 probe pairs
        sub = rec[rec["style"] == style]
        assert sorted(sub.step.unique()) == [0, 2, 4] and len(sub) == 3 * 2
        assert sub[sub.step < 4].cos_wl.between(-1, 1).all()
        assert len(list((out / style / "token_grams").glob("step*.npz"))) == 2  # token_pairs=1, 2 steps


def test_token_gram_and_cosines(sentiment_out):
    out, _ = sentiment_out
    g = load_token_gram(out, "last")
    assert int(g["step"]) == 2 and g["cos"].shape == (len(g["tokens_w"]), len(g["tokens_l"]))
    tc = token_cosines(g)
    tw, tl = list(g["tokens_w"]), list(g["tokens_l"])
    assert tw[:tc["m"]] == tl[:tc["m"]] and tw[tc["m"]] != tl[tc["m"]]
    assert tc["cos_differing"] == pytest.approx(g["cos"][tc["m"], tc["m"]])


def test_token_cosines_on_a_hand_made_gram():
    tw, tl = ["a", "pos", "b", "c"], ["a", "neg", "b", "c"]
    cos = np.eye(4) * 0.9
    cos[1, 1] = -0.3
    tc = token_cosines(dict(cos=cos, tokens_w=np.array(tw), tokens_l=np.array(tl), step=np.array(3), pair_id=np.array("p")))
    assert tc["m"] == 1 and tc["cos_differing"] == pytest.approx(-0.3)
    assert tc["n_shared"] == 3 and tc["cos_shared_mean"] == pytest.approx(0.9)


def write_claim_run(out, changes, cos, gram_last, gram_first=(0.5, 0.1)):
    """A synthetic sentiment output dir with known answers: per style, the chosen log-prob of each
    pair moves by ``changes[style][i]`` from step 0 to step 4; ``cos[style]`` is the recorded cos_wl
    (steps 0, 2; none at the final step, as the recorder writes); long-suffix token Grams at steps 0
    and 2 whose differing token (m = 1) and shared tokens have cosines ``gram_first``/``gram_last``
    = (cos at the differing token, cos of every shared token)."""
    import pandas as pd
    rows = []
    for style, deltas in changes.items():
        for i, dlt in enumerate(deltas):
            for step, lp, c in ((0, -10.0, cos[style]), (2, -10.0 + dlt / 2, cos[style]), (4, -10.0 + dlt, np.nan)):
                rows.append(dict(style=style, step=step, pair_id=f"p{i}", logp_w=lp, cos_wl=c))
    out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(out / "records.parquet", index=False)
    grams = out / "long_suffix" / "token_grams"
    grams.mkdir(parents=True)
    for step, (diff, shared) in ((0, gram_first), (2, gram_last)):
        c = np.full((4, 4), 0.05)
        np.fill_diagonal(c, shared)
        c[1, 1] = diff
        np.savez(grams / f"step{step:06d}_p0.npz", cos=c, tokens_w=np.array(["a", " pos", "b", "c"]),
                 tokens_l=np.array(["a", " neg", "b", "c"]), step=np.array(step), pair_id=np.array("p0"))


CLAIM_NAMES = ("chosen_rises_only_single_token", "long_suffix_falls_more", "cosine_grows_with_suffix",
               "token_cosine_sign")
ALL_HOLD = dict(changes=dict(single_token=[1.0, 0.5], short_suffix=[-1.0, -0.5], long_suffix=[-3.0, -2.0]),
                cos=dict(single_token=0.1, short_suffix=0.4, long_suffix=0.8), gram_last=(-0.3, 0.9))


@pytest.mark.parametrize("change,expected", [
    ({}, (True, True, True, True)),
    # single token falls: claim 1 fails; the others are untouched
    (dict(changes=dict(ALL_HOLD["changes"], single_token=[-1.0, 0.5])), (False, True, True, True)),
    # the short suffix rises too: claim 1 fails (it rises *only* in the single-token case)
    (dict(changes=dict(ALL_HOLD["changes"], short_suffix=[1.0, 0.0])), (False, True, True, True)),
    # the long suffix falls less than the short one: claim 2 fails
    (dict(changes=dict(ALL_HOLD["changes"], long_suffix=[-0.5, -0.5])), (True, False, True, True)),
    # equal cosines are not "growing"; nor is long < short
    (dict(cos=dict(single_token=0.1, short_suffix=0.4, long_suffix=0.4)), (True, True, False, True)),
    (dict(cos=dict(single_token=0.5, short_suffix=0.4, long_suffix=0.8)), (True, True, False, True)),
    # token cosines: the differing token not negative; shared tokens not above SHARED_COS_MIN = 0.5
    (dict(gram_last=(0.2, 0.9)), (True, True, True, False)),
    (dict(gram_last=(-0.3, 0.5)), (True, True, True, False)),
    # only the last saved Gram counts (the first one would hold)
    (dict(gram_last=(0.2, 0.9), gram_first=(-0.3, 0.9)), (True, True, True, False)),
])
def test_claim_verdicts_on_synthetic_records(tmp_path, change, expected):
    write_claim_run(tmp_path / "out", **{**ALL_HOLD, **change})
    cl = claims(tmp_path / "out")
    assert tuple(cl) == CLAIM_NAMES
    assert tuple(cl[n]["held"] for n in CLAIM_NAMES) == expected
    md = claims_markdown(cl)
    assert md.count("**held**") == sum(expected) and md.count("**did not hold**") == 4 - sum(expected)


def test_claim_numbers_on_synthetic_records(tmp_path):
    """Claim 1 is judged on the mean over pairs; the per-pair median and the fraction that fell are
    reported beside it: here the mean falls (one large drop) while most pairs rise."""
    changes = dict(single_token=[1.0, 1.0, -10.0], short_suffix=[-1.0, -1.0, -1.0], long_suffix=[-2.0, -4.0, -6.0])
    write_claim_run(tmp_path / "out", changes, ALL_HOLD["cos"], (-0.3, 0.9))
    cl = claims(tmp_path / "out")
    one = cl["chosen_rises_only_single_token"]["numbers"]["single_token"]
    assert one["first"] == -10.0 and one["last"] == pytest.approx(-10.0 - 8.0 / 3, rel=1e-15)
    assert (one["first_step"], one["last_step"], one["n_pairs"]) == (0, 4, 3)
    assert one["change"] == pytest.approx(-8.0 / 3, rel=1e-14)
    assert one["median_pair_change"] == 1.0 and one["frac_pairs_fell"] == pytest.approx(1 / 3)
    assert not cl["chosen_rises_only_single_token"]["held"]
    assert cl["long_suffix_falls_more"]["numbers"]["drop"] == pytest.approx(dict(short_suffix=1.0, long_suffix=4.0))
    assert cl["cosine_grows_with_suffix"]["numbers"]["long_suffix"]["mean"] == pytest.approx(0.8)
    tc = cl["token_cosine_sign"]["numbers"]["last"]
    assert (tc["step"], tc["m"], tc["n_shared"]) == (2, 1, 3)
    assert tc["cos_differing"] == -0.3 and tc["cos_shared_mean"] == pytest.approx(0.9)


def test_claims_without_token_grams_do_not_hold(tmp_path):
    write_claim_run(tmp_path / "out", **ALL_HOLD)
    import shutil
    shutil.rmtree(tmp_path / "out" / "long_suffix")
    cl = claims(tmp_path / "out")
    assert cl["token_cosine_sign"]["held"] is False and cl["token_cosine_sign"]["numbers"] is None
    assert cl["chosen_rises_only_single_token"]["held"] is True


def test_claims_and_figures(sentiment_out, tmp_path):
    out, _ = sentiment_out
    cl = claims(out)
    assert tuple(cl) == CLAIM_NAMES and all(isinstance(c["held"], bool) for c in cl.values())  # verdicts: above
    lp = cl["chosen_rises_only_single_token"]["numbers"]
    assert set(lp) == set(STYLE_ORDER) and lp["long_suffix"]["first_step"] == 0 and lp["long_suffix"]["last_step"] == 4
    import pandas as pd
    rec = pd.read_parquet(out / "records.parquet")
    for style in STYLE_ORDER:  # per-pair statistics against a direct loop over the pairs
        sub = rec[rec["style"] == style]
        d = [sub[(sub.pair_id == p) & (sub.step == 4)].logp_w.item() - sub[(sub.pair_id == p) & (sub.step == 0)].logp_w.item()
             for p in sub.pair_id.unique()]
        assert lp[style]["n_pairs"] == 2 and lp[style]["median_pair_change"] == pytest.approx(np.median(d))
        assert lp[style]["frac_pairs_fell"] == pytest.approx(np.mean(np.array(d) < 0))
    md = claims_markdown(cl)
    assert md.count("- **") == 4
    paths = write_figures(out, tmp_path / "figs")
    for name in ("fig3", "fig4a", "fig4b"):
        for ext in ("png", "pdf", "json"):
            f = tmp_path / "figs" / f"{name}.{ext}"
            assert f in paths and f.stat().st_size > 0
        assert json.loads((tmp_path / "figs" / f"{name}.json").read_text())["config"]["model"] == "tiny-llama"
    assert (tmp_path / "figs" / "README.md").read_text() == md


def test_plot_cli_figures(sentiment_out):
    out, _ = sentiment_out
    assert main(["plot", str(out), "--figure", "fig4a"]) == 0 and (out / "fig4a.png").is_file()
    assert main(["plot", str(out / "long_suffix"), "--figure", "fig4b"]) == 0
    assert (out / "long_suffix" / "fig4b.pdf").is_file()
    assert main(["plot", str(out / "long_suffix"), "--figure", "logprobs"]) == 0
    assert main(["plot", str(out / "long_suffix"), "--figure", "fig3"]) == 2  # a single run has no style column


def test_heatmap_small_matrix():
    cos = np.array([[0.9, 0.1, -0.2], [-0.5, 0.8, 0.0]])
    fig = plot_token_heatmap(cos, ["a", "b"], ["x", "y", "z"], title="t")
    ax = fig.axes[0]
    im = ax.get_images()[0]
    assert im.get_clim() == (-1, 1) and im.get_cmap().name == "RdBu_r"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["x", "y", "z"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "b"]
    assert len(fig.axes) == 2  # the colorbar
    with pytest.raises(ValueError, match="shape"):
        plot_token_heatmap(cos, ["a"], ["x", "y", "z"])


def test_eval_pairs_come_from_test_csv_beside_train_csv(tmp_path):
    import pandas as pd

    from dynamics.inputs.statements import NEGATIVE, POSITIVE

    rows = [(f"p{i}", t, "positive") for i, t in enumerate(POSITIVE[:20])] + \
           [(f"n{i}", t, "negative") for i, t in enumerate(NEGATIVE[:20])]
    df = pd.DataFrame(rows, columns=["textID", "text", "sentiment"])
    test_ids = set(df.textID[::4])
    df[~df.textID.isin(test_ids)].to_csv(tmp_path / "train.csv", index=False)
    df[df.textID.isin(test_ids)].to_csv(tmp_path / "test.csv", index=False)
    out = tmp_path / "run"
    run_sentiment(out, model="tiny-gpt2", data=tmp_path / "train.csv", styles=("single_token",),
                  overrides={**TINY, "n_probe": 3, "steps": 2}, progress=False)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["eval_data"] == str(tmp_path / "test.csv")
    rec = pd.read_parquet(out / "records.parquet")
    assert rec.pair_id.nunique() == 3 and set(rec.pair_id) <= test_ids
    # all n_pairs=12 pairs read from train.csv train (none is split off as a probe)
    ref_train = pd.read_parquet(out / "single_token" / "ref_train.parquet")
    assert len(ref_train) == TINY["n_pairs"] and not set(ref_train.pair_id.astype(str)) & test_ids
    # explicit None: split off the training data instead
    out2 = tmp_path / "run2"
    run_sentiment(out2, model="tiny-gpt2", data=tmp_path / "train.csv", eval_data=None, styles=("single_token",),
                  overrides={**TINY, "n_probe": 3, "steps": 2}, progress=False)
    rec2 = pd.read_parquet(out2 / "records.parquet")
    assert json.loads((out2 / "config.json").read_text())["eval_data"] is None and not set(rec2.pair_id) & test_ids


def test_eval_data_smaller_than_n_probe_is_an_error(tmp_path):
    from dynamics.runs.train import TrainConfig, split_config_pairs

    import pandas as pd
    pd.DataFrame([("a", "I love it", "positive")], columns=["textID", "text", "sentiment"]).to_csv(tmp_path / "t.csv", index=False)
    cfg = TrainConfig(data=None, eval_data=str(tmp_path / "t.csv"), n_probe=2)
    with pytest.raises(ValueError, match="fewer than n_probe=2"):
        split_config_pairs(cfg)


def test_existing_experiment_is_refused_then_moved_aside(tmp_path):
    """A second `run_sentiment` into the same directory never mixes runs: refused (files untouched)
    unless ``overwrite``, which moves the old experiment aside intact."""
    import hashlib

    from dynamics.errors import InputError

    out = tmp_path / "exp"
    kw = dict(model="tiny-gpt2", data="builtin", styles=("single_token",), overrides={**TINY, "steps": 2},
              progress=False)
    run_sentiment(out, **kw)
    digest = lambda d: {p.relative_to(d): hashlib.sha256(p.read_bytes()).hexdigest()
                        for p in sorted(d.rglob("*")) if p.is_file()}
    before = digest(out)
    with pytest.raises(InputError, match="already holds an experiment"):
        run_sentiment(out, **{**kw, "loss": "simpo"})
    assert digest(out) == before
    run_sentiment(out, **{**kw, "loss": "simpo"}, overwrite=True)
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("exp.old-")]
    assert len(aside) == 1 and digest(aside[0]) == before
    assert json.loads((out / "config.json").read_text())["loss"] == "simpo"
