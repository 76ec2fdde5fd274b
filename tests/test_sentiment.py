"""Seed 004 section 4.2 pipeline on a tiny model: the three style runs, the combined records,
token Grams, figures with their config sidecars, the claims, and the CLI routes."""
import json

import numpy as np
import pytest

from analyses.plots import plot_token_heatmap
from analyses.sentiment import (STYLE_ORDER, claims, claims_markdown, load_token_gram, run_sentiment,
                                token_cosines, write_figures)
from dynamics.cli import main

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


def test_claims_and_figures(sentiment_out, tmp_path):
    out, _ = sentiment_out
    cl = claims(out)
    assert len(cl) == 4 and all(isinstance(c["held"], bool) for c in cl.values())
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

    from dynamics.statements import NEGATIVE, POSITIVE

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
    from dynamics.train import TrainConfig, split_config_pairs

    import pandas as pd
    pd.DataFrame([("a", "I love it", "positive")], columns=["textID", "text", "sentiment"]).to_csv(tmp_path / "t.csv", index=False)
    cfg = TrainConfig(data=None, eval_data=str(tmp_path / "t.csv"), n_probe=2)
    with pytest.raises(ValueError, match="fewer than n_probe=2"):
        split_config_pairs(cfg)
