"""The TL;DR experiment (analyses/tldr.py): post split, nine runs, index, claims, figures, resume.

The pipeline runs on tiny models with synthetic comparisons in the OpenAI format (no shared data
needed); the claim logic is checked on synthetic records whose verdicts are known.
"""
import json

import numpy as np
import pandas as pd
import pytest

from analyses import tldr
from analyses.cli import main
from dynamics.errors import InputError

TINY = dict(steps=2, eval_every=1, n_probe=2, n_train=8, batch_size=4, lr=1e-3, max_length=64)
WORDS = "the cat dog sat ran on a mat up hill today felt happy sad big small".split()


def write_comparisons(path, n_posts=8, per_post=2, seed=0):
    """OpenAI comparisons (JSON lines) with ``per_post`` pairs on each of ``n_posts`` posts."""
    rng = np.random.default_rng(seed)
    say = lambda k: " " + " ".join(rng.choice(WORDS, k))
    with open(path, "w") as f:
        for post in range(n_posts):
            for j in range(per_post):
                row = dict(info=dict(id=f"p{post}", post=say(12), title=say(4), subreddit="test"),
                           split="valid1", summaries=[dict(text=say(6 + j)), dict(text=say(5 + j))],
                           choice=int(rng.integers(2)), worker="w", batch="b", extra={})
                f.write(json.dumps(row) + "\n")
    return path


@pytest.fixture(scope="module")
def tldr_out(tmp_path_factory):
    d = tmp_path_factory.mktemp("tldr")
    data = write_comparisons(d / "comparisons.json")
    out = d / "run"
    tldr.run_tldr(out, model="tiny-gpt2", data=data, overrides=TINY, progress=False)
    return out, data


def test_split_keeps_posts_apart(tmp_path):
    pairs = tldr.load_comparisons(write_comparisons(tmp_path / "c.json"))
    train, held = tldr.split_by_post(pairs, n_train=10, n_probe=3, seed=1)
    post = lambda p: p.metadata["post_id"]
    assert len(held) == 3 and len(train) == 10 and len({post(p) for p in held}) == 3
    assert not {post(p) for p in train} & {post(p) for p in held}
    again = tldr.split_by_post(pairs, n_train=10, n_probe=3, seed=1)
    assert [p.id for p in again[1]] == [p.id for p in held]  # deterministic
    with pytest.raises(InputError, match="fewer than n_train"):
        tldr.split_by_post(pairs, n_train=100, n_probe=3, seed=1)


def test_nine_runs_index_and_figures(tldr_out, tmp_path):
    out, _ = tldr_out
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["losses"] == list(tldr.LOSSES) and cfg["settings"]["steps"] == 2
    rec = pd.read_parquet(out / "records.parquet")
    assert list(dict.fromkeys(rec["loss"])) == list(tldr.LOSSES)
    assert set(rec["pair_id"]) == set(cfg["split"]["eval_pairs"])   # the same evaluation pairs for every loss
    for name in tldr.LOSSES:
        run_cfg = json.loads((out / name / "config.json").read_text())
        assert run_cfg["loss"] == name and run_cfg["eval_data"].endswith("eval.jsonl")
    assert (out / "dpo" / "probes.parquet").is_file() and list((out / "dpo" / "token_grams").glob("*.npz"))
    # in-run rows of every loss: every step's training pairs (Fig. 7)
    tr = pd.read_parquet(out / "train_records.parquet")
    assert list(dict.fromkeys(tr["loss"])) == list(tldr.LOSSES)
    assert set(tr["step"]) == {0, 1} and (tr.groupby(["loss", "step"]).size() == TINY["batch_size"]).all()
    assert not set(tr["pair_id"]) & set(cfg["split"]["eval_pairs"])
    dpo = tr[tr["loss"] == "dpo"]
    assert dpo["cos_wl"].notna().all() and dpo["cos_wl"].between(-1, 1).all()
    fig7 = tldr.make_figure(out, "fig7")
    assert {t.get_text() for t in fig7.legends[0].get_texts()} == {"training (every step)", "evaluation"}
    assert len(fig7.legends) == 1 and all(ax.get_legend() is None for ax in fig7.axes)   # one, above the grid
    paths = tldr.write_figures(out, tmp_path / "fig")
    for name in tldr.FIGURES:
        assert (tmp_path / "fig" / f"{name}.png").is_file()
        assert json.loads((tmp_path / "fig" / f"{name}.json").read_text())["source"] == str(out)
    cl = json.loads((tmp_path / "fig" / "claims.json").read_text())
    assert {r["loss"] for r in cl["per_loss"]} == set(tldr.LOSSES)
    assert "| DPO |" in (tmp_path / "fig" / "README.md").read_text() and len(paths) == 3 * len(tldr.FIGURES) + 2


def test_existing_experiment_refused_and_resume_keeps_finished_runs(tldr_out):
    out, data = tldr_out
    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet")}
    with pytest.raises(InputError, match="already holds an experiment"):
        tldr.run_tldr(out, model="tiny-gpt2", data=data, overrides=TINY, progress=False)
    with pytest.raises(InputError, match="other settings"):
        tldr.run_tldr(out, model="tiny-gpt2", data=data, overrides={**TINY, "lr": 1e-2}, resume=True, progress=False)
    tldr.run_tldr(out, model="tiny-gpt2", data=data, overrides=TINY, resume=True, progress=False)
    # every loss had finished: no run was redone (only the combined records are rewritten)
    assert all(p.stat().st_mtime_ns == t for p, t in stamp.items() if p.parent != out)


def test_cli_quick_figures_only_and_plot(tldr_out, tmp_path, capsys):
    out, _ = tldr_out
    assert main(["reproduce", "tldr", "--out", str(out), "--figures", str(tmp_path / "f"), "--figures-only"]) == 0
    assert "SPPO raises the chosen" in capsys.readouterr().out
    assert main(["plot", str(out), "--figure", "fig7"]) == 0 and (out / "fig7.png").is_file()


def _records(changes: dict, cos: dict) -> pd.DataFrame:
    """Two steps × two pairs per loss with the given mean changes of (w, l, w_norm, l_norm)."""
    rows = []
    for name, (dw, dl, dwn, dln) in changes.items():
        for step, k in ((0, 0.0), (10, 1.0)):
            for pair, off in (("a", -0.5), ("b", 0.5)):
                rows.append(dict(loss=name, step=step, pair_id=pair, logp_w=-50 + off + k * dw, logp_l=-60 + off + k * dl,
                                 logp_w_norm=-2 + off + k * dwn, logp_l_norm=-3 + off + k * dln, cos_wl=cos[name]))
    return pd.DataFrame(rows)


PAPER = {"cpo": (1, -2, .1, -.1), "dpop": (1, -2, .1, -.1), "rrhf": (1, -2, .1, -.1), "slic": (1, -2, .1, -.1),
         "dpo": (-1, -3, -.1, -.2), "rdpo": (-1, -3, -.1, -.2), "simpo": (-1, -3, -.1, -.2),
         "ipo_avg": (-1, -3, -.1, -.2), "sppo": (.2, -2, .01, -.1)}


@pytest.mark.parametrize("change, broken", [
    ({}, None),
    ({"rrhf": (-1, -2, -.1, -.1)}, "chosen_term_raises_chosen"),
    ({"dpo": (-3, -1, -.1, -.2)}, "dpo_lowers_both"),          # rejected falls less than chosen
    ({"rdpo": (1, -3, .1, -.2)}, "dpo_lowers_both"),            # chosen rises
    ({"simpo": (-1, -3, .1, -.2)}, "simpo_ipo_lower_both_normalized"),
    ({"sppo": (-.2, -2, -.01, -.1)}, "sppo_raises_chosen"),
])
def test_claim_verdicts_on_known_records(tmp_path, change, broken):
    out = tmp_path / "exp"
    out.mkdir()
    cos = {n: 0.8 for n in PAPER}
    _records({**PAPER, **change}, cos).to_parquet(out / "records.parquet")
    sent = tmp_path / "sent.parquet"
    pd.DataFrame(dict(style=["single_token"] * 2, cos_wl=[-0.5, -0.3])).to_parquet(sent)
    cl = tldr.claims(out, sentiment_records=sent)
    for key in ("chosen_term_raises_chosen", "dpo_lowers_both", "simpo_ipo_lower_both_normalized", "sppo_raises_chosen"):
        assert cl[key]["held"] is (key != broken), key
    assert cl["cosine_positive_large"]["held"] is True
    assert cl["squeezing_under_dpo"]["held"] is None          # no probes recorded here: not evaluated
    assert cl["dpo_lowers_both"]["numbers"]["dpo"]["chosen"] == pytest.approx({**PAPER, **change}["dpo"][0])


@pytest.mark.parametrize("cos_dpo, sent_cos, held", [(0.8, -0.4, True), (0.4, -0.4, False), (0.8, 0.9, False)])
def test_cosine_claim(tmp_path, cos_dpo, sent_cos, held):
    out = tmp_path / "exp"
    out.mkdir()
    _records(PAPER, {**{n: 0.8 for n in PAPER}, "dpo": cos_dpo}).to_parquet(out / "records.parquet")
    sent = tmp_path / "sent.parquet"
    pd.DataFrame(dict(style=["single_token"], cos_wl=[sent_cos])).to_parquet(sent)
    assert tldr.claims(out, sentiment_records=sent)["cosine_positive_large"]["held"] is held


@pytest.mark.parametrize("train_cos, held", [(0.8, True), (0.3, False)])
def test_cosine_claim_judged_on_training_pairs(tmp_path, train_cos, held):
    # with in-run rows, Fig. 7's claim is about the pairs being trained on, not the evaluation pairs
    out = tmp_path / "exp"
    out.mkdir()
    _records(PAPER, {n: 0.1 for n in PAPER}).to_parquet(out / "records.parquet")
    pd.DataFrame([dict(loss=n, step=s, pair_id="t", cos_wl=train_cos) for n in PAPER for s in range(3)]).to_parquet(
        out / "train_records.parquet")
    sent = tmp_path / "sent.parquet"
    pd.DataFrame(dict(style=["single_token"], cos_wl=[-0.4])).to_parquet(sent)
    c = tldr.claims(out, sentiment_records=sent)["cosine_positive_large"]
    assert c["held"] is held and c["numbers"]["judged_on"].startswith("training pairs")
    assert c["numbers"]["mean_cos_evaluation_pairs"]["dpo"] == pytest.approx(0.1)
    assert tldr.claims_markdown(tldr.claims(out, sentiment_records=sent)).count(f"{train_cos:.3f} |") == len(PAPER)


@pytest.mark.parametrize("teacher, other, held", [(1.0, -1.0, True), (-1.0, -1.0, False), (1.0, 0.5, False)])
def test_squeezing_claim(tmp_path, teacher, other, held):
    out = tmp_path / "exp"
    (out / "dpo").mkdir(parents=True)
    _records(PAPER, {n: 0.8 for n in PAPER}).to_parquet(out / "records.parquet")
    delta = dict(argmax_teacher=teacher, chosen=-0.5, rejected=-3.0, other_chosen=other, chosen_shuffled=-2.0,
                 other_shuffled=-2.0)
    rows = [dict(step=s, pair_id="a", probe=p, logp=-40 + (s / 10) * d, argmax_mass=0.5 + 0.01 * s)
            for s in (0, 10) for p, d in delta.items()]
    pd.DataFrame(rows).to_parquet(out / "dpo" / "probes.parquet")
    assert tldr.claims(out)["squeezing_under_dpo"]["held"] is held
