"""`dynamics.tools.diagnose`: the verdict, drivers, token and what-if tables on a synthetic run whose
answer is known by construction (`diagnose_fixtures.SCENARIO`); the remedy thresholds against the
exact oracle (the modified loss through `compute_loss`, then `predict`); the HTML (sections,
embedded figures, nothing external) and, when a Chromium binary is on PATH, the page as a real
browser renders it; and the input errors."""
import ast
import html
import math
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import diagnose_fixtures as F
from dynamics.core.conditions import predict
from dynamics.core.losses import compute_loss, resolve_hyper
from dynamics.errors import InputError
from dynamics.runs.rundir import RunDir
from dynamics.tools import diagnose as D
from dynamics.tools import report_html as H

pytestmark = pytest.mark.usefixtures("one_thread")
E = F.SCENARIO["expected"]


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    return F.write_scenario(tmp_path_factory.mktemp("diag") / "run")


@pytest.fixture(scope="module")
def records(scenario):
    return RunDir(scenario).table("records")


@pytest.fixture(scope="module")
def report_html(scenario):
    """The full report of the scenario, figures included (built once: figures are the slow part)."""
    return D.diagnose(scenario)


# ------------------------------------------------------------------ the verdict, known by construction

def test_verdict_matches_the_construction(records):
    v = D.verdict(records)
    assert v["steps"] == list(range(11)) and v["n_pairs"] == 3
    assert v["falls"] is True and v["mean_change"] == pytest.approx(E["mean_change"], abs=1e-12)
    assert v["pairs_fell"] == E["pairs_fell"]
    assert v["falling_ranges"] == E["falling_ranges"]
    assert v["falling_act_steps"] == E["falling_act_steps"]
    assert (v["n_grad"], v["n_entangled"], v["frac_entangled"]) == (30, 3, pytest.approx(0.1))
    assert v["n_fell"] == E["n_fell"] and v["causes"] == E["causes"]
    assert v["cause_steps"] == E["cause_steps"]
    for c, share in E["cause_share"].items():
        assert v["cause_share"][c] == pytest.approx(share, abs=1e-12), c
    assert v["primary_cause"] == "own"
    assert v["margin_change"] == pytest.approx(E["margin_change"], abs=1e-12)
    assert v["frac_case2_pred"] == pytest.approx(3 / 30) and v["frac_case2_obs"] == pytest.approx(8 / 30)
    # upd_dw has the sign of act_dw except at the two curvature pair-steps
    assert v["upd_sign_agrees"] == pytest.approx(28 / 30) and v["sufficient"]
    text = " ".join(v["conclusions"])
    for piece in ("fell for 2/3 (67%) pairs", "4→8", "3/30 (10%)", "3 to the pair's own gradient (68%",
                  "3 to the rest of the update (27%", "2 to higher order (5%",
                  "steps [4, 5, 6, 7]"):
        assert piece in text, piece


def test_pair_steps_threshold_in_inner_product_and_cosine_units(records):
    ps = D.pair_steps(records)
    assert len(ps) == 30
    ent = {(r.pair_id, r.step) for r in ps[ps["entangled"]].itertuples()}
    assert ent == F.SCENARIO["entangled"]
    # DPO: thr_w = ‖g_w‖² = 1, and ‖g_w‖‖g_l‖ = 2, so the eq. 9 threshold on the cosine is 0.5
    assert np.allclose(ps["thr_w"], 1.0) and np.allclose(ps["cos_thr_w"], 0.5)
    assert ((ps["cos_wl"] > ps["cos_thr_w"]) == ps["entangled"]).all()
    assert (ps["entangled"] == (ps["pred_dw"] < 0)).all()


def test_entanglement_flips_with_a_negative_rejected_coefficient():
    """IPO past its target (margin > 1/(2β)): d_w = d_l < 0, eq. 9 reads ⟨g_w,g_l⟩ ≥ thr_w."""
    lw, ll = [-10.0, -10.0, -10.0, -10.0], [-20.0, -20.0, -20.0, -20.0]
    rows = F.state_rows(0, ["a", "b", "c", "d"], lw, ll, [-11.0] * 4, [-11.0] * 4, [5] * 4, [5] * 4, "ipo",
                        {"beta": 1.0}, 1.0)
    assert all(r["d_w"] < 0 and r["d_l"] < 0 for r in rows)
    F.gradient_columns(rows, [0.5, 1.5, -0.2, 0.99], [1.0] * 4, [4.0] * 4)
    ps = D.pair_steps(pd.DataFrame(rows))
    assert ps["entangled"].tolist() == (ps["pred_dw"] < 0).tolist() == [True, False, True, True]


def test_intervals_match_the_one_step_changes(records):
    iv = D.intervals(records)
    assert iv["step"].tolist() == list(range(10)) and iv["next_step"].tolist() == list(range(1, 11))
    fall = iv[iv["dlogp_w"] < 0]
    assert fall["step"].tolist() == [4, 5, 6, 7]
    assert np.allclose(fall["dlogp_w"], (-1.0 - 0.1 + 0.2) / 3)
    assert np.allclose(iv["dlogp_w"], iv["act_dw"])                      # eval_every = 1
    assert fall["pairs_fell"].tolist() == [2, 2, 2, 2]
    gaps = pd.DataFrame(dict(step=[0, 1, 2, 5, 6], next_step=[1, 2, 5, 6, 9], dlogp_w=[1.0, -1, -1, 2, -3]))
    assert D.falling_ranges(gaps) == [(1, 5), (6, 9)]


def test_sparse_recording_uses_the_state_change_between_recorded_steps(records):
    """Recorded every 3 steps: the mean falls over 3→6 and 6→9 (state differences), while the one
    optimizer step recorded at 3 (act_dw) still rose: both are reported, for what they are."""
    v = D.verdict(records[records["step"].isin([0, 3, 6, 9, 10])])
    assert v["falling_ranges"] == [(3, 9)] and v["falling_act_steps"] == [6]
    assert v["mean_change"] == pytest.approx(E["mean_change"])


def test_case_table(records):
    tab = D.case_table(records)
    assert tab.loc[2, 2] == 3 and tab.loc[1, 2] == 5 and tab.loc[1, 1] == 22
    assert int(tab.to_numpy().sum()) == 30 and list(tab.index) == list(tab.columns) == [0, 1, 2, 3, 4]


def test_drivers_one_pair_dominates(records, scenario):
    screen = RunDir(scenario).table("screen")
    dr = D.drivers(records, k=5, screen=screen)
    assert dr["pair_id"].tolist() == ["A", "B"]                          # C rose: not a driver
    assert np.allclose(dr["dlogp_w"], [-3.4, -0.1])
    assert np.allclose(dr["share_of_fall"], [3.4 / 3.5, 0.1 / 3.5])
    assert np.allclose(dr["mean_cos_wl"], [(3 * 0.75 + 7 * 0.25) / 10, 0.25])
    assert np.allclose(dr["frac_case2"], [0.4, 0.4]) and np.allclose(dr["frac_entangled"], [0.3, 0.0])
    assert dr["ches"].tolist() == [3.0, 2.0] and dr["edit_distance"].tolist() == [1, 5]
    assert D.drivers(records, k=1)["pair_id"].tolist() == ["A"]
    assert "ches" not in D.drivers(records, k=1).columns


def test_screen_correlations(records, scenario):
    sc = D.screen_correlations(RunDir(scenario).table("screen"), records).set_index("score")
    # realized A −3.4, B −0.1, C +2.0; ches 3, 2, 1 (a perfect displacement score), edit distance 1, 5, 9
    assert sc.loc["ches", "spearman"] == pytest.approx(-1.0)
    assert sc.loc["edit_distance", "spearman"] == pytest.approx(1.0)
    assert (sc["n_pairs"] == 3).all()


def test_token_segments(scenario):
    seg = D.token_segments(RunDir(scenario).table("token_decomp"))
    assert len(seg) == 2 * F.STEPS
    ch = seg[seg["response"] == "chosen"]
    assert np.allclose(ch["before"], 0.01) and np.allclose(ch["at"], 0.05) and np.allclose(ch["after"], -0.05)
    rj = seg[seg["response"] == "rejected"]
    assert np.allclose(rj["total"], -0.08) and (seg["m"] == 1).all()


def test_whatif_summary():
    wi = pd.DataFrame(dict(loss=["dpo"] * 4 + ["sft"] * 4, dlogp_w=[1, -1, -2, 3, 1, 1, 1, np.nan],
                           case=[1, 2, 2, 1, 3, 3, 1, 1]))
    s = D.whatif_summary(wi).set_index("loss")
    assert s.index.tolist() == ["sft", "dpo"]
    assert s.loc["dpo", "frac_rise"] == 0.5 and s.loc["sft", "frac_rise"] == 1.0 and s.loc["sft", "n"] == 3
    assert s.loc["dpo", "frac_case2"] == 0.5 and s.loc["sft", "frac_case1"] == pytest.approx(1 / 3)


def test_whatif_of_the_runs_loss_agrees_with_the_records(records, scenario):
    """whatif.parquet's dpo rows (default β = the run's β) are the records' own prediction."""
    s = D.whatif_summary(RunDir(scenario).table("whatif")).set_index("loss")
    assert s.loc["dpo", "frac_rise"] == pytest.approx((D.pair_steps(records)["pred_dw"] > 0).mean()) == 27 / 30
    assert s.loc["sft", "frac_rise"] == 1.0


# ------------------------------------------------------------------ training pairs (in-run), known by construction

T, X = F.TRAIN["expected"], F.CROSS["expected"]


@pytest.fixture(scope="module")
def train_records(scenario):
    return RunDir(scenario).table("train_records")


@pytest.fixture(scope="module")
def contributions(scenario):
    return RunDir(scenario).table("contributions")


def test_training_pairs_summary(train_records):
    s = D.train_summary(train_records)
    for key in ("n_rows", "n_pred", "n_own_fall", "n_case", "n_case2", "n_cos", "n_missing", "regime"):
        assert s[key] == T[key], key
    assert s["n_entangled"] == 8 and s["n_steps"] == 10
    assert s["mean_cos_wl"] == pytest.approx((30 * 0.25 + sum(F.TRAIN["entangled_ip"].values()) / 2) / 38)
    assert s["mean_cos_thr_w"] == pytest.approx(0.5)                       # DPO: thr_w = ‖g_w‖² = 1, ‖g_w‖‖g_l‖ = 2
    assert s["reasons"] == {"no gradient to rejected (d_l=0)": 1, F.NONCONSTANT_REASON: 1}
    assert not s["has_upd"] and s["upd_sentence"] is None
    assert s["sentence"].startswith("Some training pairs are in the gradient-entanglement case, most are not")
    assert "8/39 (21%)" in s["sentence"] and "8/38 (21%)" in s["sentence"]


def test_training_pairs_per_step(train_records):
    st = D.train_step_table(train_records).set_index("step")
    assert st.index.tolist() == list(range(10)) and (st["n_pairs"] == 4).all()
    fall = list(F.FALL)
    assert np.allclose(st.loc[fall, "frac_case2"], 0.5) and np.allclose(st.drop(fall)["frac_case2"], 0.0)
    assert np.allclose(st.loc[fall, "frac_own_fall"], 0.5) and np.allclose(st.loc[fall, "frac_above_thr"], 0.5)
    assert st.loc[4, "mean_cos_wl"] == pytest.approx((0.6 + 0.65 + 0.25 + 0.25) / 4)
    assert np.allclose(st["mean_cos_thr_w"], 0.5)
    assert (st.loc[9, "n_missing"], st.loc[9, "n_case"], st.loc[9, "frac_case1"]) == (2, 2, 1.0)
    assert "frac_upd_fall" not in st
    cd = D.train_cos_distribution(train_records)
    excess = cd.iloc[2]
    assert excess["n"] == 38 and excess["frac_positive"] == pytest.approx(8 / 38)
    assert excess["max"] == pytest.approx(0.95 - 0.5) and cd.loc["cos_thr_w", "median"] == pytest.approx(0.5)


def test_training_pairs_whose_own_step_lowers_the_chosen(train_records):
    top = D.train_top_falls(train_records, k=5)
    assert top["pair_id"].tolist() == T["top"]                             # ⟨g_w,g_l⟩ 1.9, 1.8, ...: largest fall first
    assert np.allclose(top["pred_dw"], [0.05 * (1 - ip) for ip in (1.9, 1.8, 1.7, 1.6, 1.5)])
    assert (top["case_pred"] == 2).all() and (top["cos_wl"] > top["cos_thr_w"]).all()
    assert len(D.train_top_falls(train_records, k=50)) == 8
    miss = D.missing_entries(train_records).set_index("missing_reason")
    assert miss.loc["no gradient to rejected (d_l=0)", "examples"] == "t9_2@9"
    assert miss.loc[F.NONCONSTANT_REASON, "n"] == 1


@pytest.mark.parametrize("ip, regime, phrase", [(1.5, "most", "training pairs themselves are in the gradient-entanglement case"),
                                                (0.5, "none", "NOT in the gradient-entanglement case")])
def test_training_pairs_regimes(train_records, ip, regime, phrase):
    """All training pairs entangled, or none: the verdict says which; the real update's effect when recorded."""
    tr = train_records[train_records["missing_reason"].isna()].copy()
    p = predict(torch.tensor(tr["d_w"].to_numpy()), torch.tensor(tr["d_l"].to_numpy()),
                torch.full((len(tr),), ip, dtype=torch.float64), torch.ones(len(tr), dtype=torch.float64),
                torch.full((len(tr),), 4.0, dtype=torch.float64), lr=1.0)
    tr = tr.assign(ip_wl=ip, cos_wl=ip / 2, pred_dw=p["dlogp_w"].numpy(), pred_dl=p["dlogp_l"].numpy(),
                   case_pred=p["case"].numpy(), upd_dw=[-0.1, 0.2] * (len(tr) // 2))
    s = D.train_summary(tr)
    assert s["regime"] == regime and phrase in s["sentence"] and s["n_missing"] == 0
    assert s["upd_sentence"] and f"{len(tr) // 2}/{len(tr)} (50%)" in s["upd_sentence"]
    assert np.allclose(D.train_step_table(tr)["frac_upd_fall"], 0.5)


def test_verdict_says_whether_the_training_pairs_are_entangled(records, train_records):
    v = D.verdict(records, train_records=train_records)
    line = [c for c in v["conclusions"] if c.startswith("Training pairs (train_records.parquet")]
    assert len(line) == 1 and "some training pairs are in the gradient-entanglement case" in line[0]
    assert v["train"]["n_own_fall"] == 8
    assert D.verdict(records)["train"] is None


# ------------------------------------------------------------------ which training pairs moved the probes

def test_probe_falls_split(records, contributions):
    f = D.probe_falls(contributions, records)
    assert list(zip(f["pair_id"], f["step"])) == [("A", s) for s in F.FALL] + [("B", s) for s in F.FALL]
    assert f["top_train_pair"].tolist() == [f"t{s}_0" for s in F.FALL] + ["t4_1", "t5_1", "t6_0", "t7_0"]
    a, b = f[f["pair_id"] == "A"], f[f["pair_id"] == "B"]
    assert np.allclose(a["sum_contrib"], -0.95) and np.allclose(a["residual"], -0.05)
    assert np.allclose(a["top_share"], 0.8) and np.allclose(a["higher_order"], 0.0)
    assert np.allclose(b["residual"], [-0.01, -0.01, 0.0, 0.0]) and np.allclose(b["higher_order"], [0, 0, -0.12, -0.12])
    assert (f["own"] == 0).all() and np.allclose(f["others"], f["sum_contrib"])
    assert np.allclose(f["sum_contrib"] + f["residual"], f["upd_dw"]) and (f["n_train"] == 4).all()
    # without the recorded residual column, upd − Σ gives the same
    g = D.probe_falls(contributions, records.drop(columns=["contrib_resid_w", "contrib_resid_l"]))
    assert np.allclose(g["residual"], f["residual"])


def test_fall_contributors_rank_the_training_pairs(records, contributions, train_records):
    fc = D.fall_contributors(contributions, records, k=3, train_records=train_records)
    a4 = fc[(fc["pair_id"] == "A") & (fc["step"] == 4)]
    assert a4["train_pair"].tolist() == ["t4_0", "t4_1", "t4_3"]           # most negative first: −0.8, −0.15, −0.05
    assert np.allclose(a4["contribution"], [-0.8, -0.15, -0.05]) and np.allclose(a4["share"], [0.8, 0.15, 0.05])
    # SGD, lr 1: contribution = −(c_w k_w + c_l k_l)
    assert np.allclose(fc["contribution"], -(fc["c_w"] * fc["k_w"] + fc["c_l"] * fc["k_l"]))
    assert a4["train_case"].tolist() == [2, 2, 1] and not fc["own"].any()   # the in-run rows of those pairs
    b4 = fc[(fc["pair_id"] == "B") & (fc["step"] == 4)]
    assert b4["train_pair"].iloc[0] == "t4_1" and b4["share"].iloc[0] == pytest.approx(0.8)
    assert len(fc) == 8 * 3 and "train_case" not in D.fall_contributors(contributions, records, k=3).columns


def test_training_pairs_that_push_the_probes_down(records, contributions):
    pu = D.train_pair_pushes(contributions, records, k=5)
    assert pu["train_pair"].tolist() == X["pushes"]
    assert np.allclose(pu["net"], [-0.77, -0.77, -0.75, -0.75, -0.19])
    assert pu["n_down"].tolist() == [2, 2, 1, 1, 2] and pu["n_top_fall"].tolist() == [2, 2, 1, 1, 1]
    # only pairs that lowered a probe's chosen log-prob: t{s}_0, _1, _3 at the fall steps, t4_2 and t5_2 (on B)
    every = D.train_pair_pushes(contributions, records, k=100)
    assert len(every) == 14 and (every["n_down"] > 0).all() and {"t4_2", "t5_2"} <= set(every["train_pair"])
    assert not {"t6_2", "t0_0"} & set(every["train_pair"])


def test_contribution_split_and_verdict(records, contributions):
    sp = D.contribution_split(contributions, records)
    assert sp["n_falls"] == 8 and sp["held_out"] and sp["n_uncovered"] == 0
    assert sp["act_sum"] == pytest.approx(X["act_sum"])
    for part in ("own", "others", "residual", "higher_order"):
        assert sp["parts"][part] == pytest.approx(X[part], abs=1e-12), part
    assert sum(sp["shares"].values()) == pytest.approx(1.0)
    assert sp["top"] == dict(step=4, pair_id="A", train_pair="t4_0", contribution=pytest.approx(-0.8),
                             share=pytest.approx(0.8))
    assert sp["net_top"]["train_pair"] == "t6_0"
    text = " ".join(D.verdict(records, contributions=contributions)["conclusions"])
    for piece in ("own step 0 (0%)", "the other training pairs of the step -3.94 (90%)", "(5%)",
                  "all of the first-order change comes from training pairs", "training pair t4_0 on probe A at step 4",
                  "Reading the causes above for held-out probe pairs"):
        assert piece in text, piece
    assert "needs the per-training-pair split" not in text and "not all within 0–100%" not in text
    # B's two curvature falls alone: the training pairs pushed up (+0.04), beyond first order −0.24
    b = D.contribution_split(contributions, records[(records["pair_id"] == "B") & records["step"].isin([6, 7])])
    assert b["shares"]["others"] == pytest.approx(-0.2) and b["shares"]["higher_order"] == pytest.approx(1.2)
    assert any("not all within 0–100%" in x for x in b["sentences"])
    assert "the other training pairs of the step 0.04 (-20%)" in b["sentences"][0]


def test_contribution_split_with_the_probe_trained_on(records, contributions):
    """A probe pair that is also a training pair of the step: its own share is its own step."""
    c = contributions.copy()
    c.loc[(c["step"] == 4) & (c["train_pair"] == "t4_0"), "train_pair"] = "A"
    sp = D.contribution_split(c, records)
    assert not sp["held_out"] and sp["parts"]["own"] == pytest.approx(-0.8)
    # only A@4's −0.8 moves from "others" to "own" (pair A's +0.01 on probe B at step 4 stays with the others)
    assert sp["parts"]["others"] == pytest.approx(X["others"] + 0.8)
    assert not any("held out" in x for x in sp["sentences"])
    f = D.probe_falls(c, records).set_index(["pair_id", "step"])
    assert f.loc[("A", 4), "own"] == pytest.approx(-0.8) and f.loc[("B", 4), "own"] == 0.0


# ------------------------------------------------------------------ attribution reliability

def test_attribution_reliability(scenario):
    a = RunDir(scenario).table("attributions")
    rel = D.attribution_reliability(a).set_index("target")
    assert rel.loc["chosen", "status"] == "converged" and rel.loc["chosen", "ratio"] == pytest.approx(0.002)
    assert rel.loc["margin", "status"] == "not converged" and rel.loc["margin", "ratio"] == pytest.approx(0.4)
    assert rel.loc["margin", "note"] == "not converged (|δ|/|gap| = 0.4): raise --n-steps"
    top = D.top_attributions(a, k=2)
    assert top["token"].tolist() == ["good", "movie", "good", "bad"]        # per (pair, target), by |attribution|
    old = D.attribution_reliability(a.drop(columns=["delta", "gap"]))
    assert (old["status"] == "unchecked").all()
    edge = pd.DataFrame(dict(pair_id=["p", "q"], target=["chosen"] * 2, token=["x", "y"], attribution=[1.0, 1.0],
                             delta=[0.0, 1e-3], gap=[0.0, 0.0]))
    assert D.attribution_reliability(edge)["status"].tolist() == ["converged", "not converged"]


def _between(text, start, end):
    return text[text.index(start):text.index(end, text.index(start))]


def test_report_shows_unconverged_attributions_as_unreliable(scenario):
    body = D.build_report(scenario, figures=False).section("tokens").body
    assert "pair A, target margin: not converged (|δ|/|gap| = 0.4): raise --n-steps" in body
    unreliable = _between(body, '<div class="unreliable">', "</div>")
    assert "NOT reliable" in unreliable and "<td>bad</td>" in unreliable
    reliable = _between(body, "Largest token attributions", '<div class="unreliable">')
    assert "<td>good</td>" in reliable and "<td>bad</td>" not in reliable and "margin" not in reliable
    assert body.count('<div class="unreliable">') == 1


# ------------------------------------------------------------------ the new sections in the report

def test_report_training_pair_sections(scenario):
    rep = D.build_report(scenario, figures=False, top_k=3)
    con, inrun = rep.section("contributions").body, rep.section("inrun").body
    assert "own step 0 (0%)" in con and "<td>t4_0</td>" in con and "train_pair_pushes" in con
    assert con.index("<td>t6_0</td>") < con.index("<td>t4_0</td>", con.index("train_pair_pushes"))
    assert "8/39 (21%)" in inrun and "<td>t7_1</td>" in inrun and "<td>t5_1</td>" not in inrun.split("train_top_falls")[1]
    assert "no gradient to rejected (d_l=0)" in inrun and "--in-run-update" in inrun
    assert rep.section("inrun").missing == [] and rep.section("contributions").missing == []


def test_damaged_or_incomplete_new_tables_are_notes(tmp_path):
    run = F.write_scenario(tmp_path / "dmg", whatif=False, tokens=False, screen=False, attributions=False)
    (run / "train_records.parquet").write_bytes(b"not parquet")
    RunDir(run).table("contributions").drop(columns=["contribution"]).to_parquet(run / "contributions.parquet")
    rep = D.build_report(run, figures=False)
    assert "--in-run" in rep.section("inrun").missing[0] and "not a readable Parquet" in rep.section("inrun").body
    assert "--cross" in rep.section("contributions").missing[0]
    assert html.escape("lacks the columns ['contribution']") in rep.section("contributions").body
    assert rep.section("contributions").missing[0].startswith("no usable contributions.parquet")
    assert rep.verdict["train"] is None and rep.verdict["contrib"] is None
    assert "lacks the columns" in rep.section("config").body


# ------------------------------------------------------------------ remedies against the exact oracle

def random_records(loss, loss_params, n=40, seed=0):
    """n pair-steps with random log-probs (chosen above or below its reference), lengths and
    gradients (Cauchy–Schwarz respected), the rows computed as the recorder does; row 0 has g_w = 0,
    row 1 its chosen log-prob exactly at the reference."""
    rng = np.random.default_rng(seed)
    lw = rng.uniform(-80, -20, n)
    ll = lw + rng.uniform(-5, 5, n)
    rw, rl = lw + rng.uniform(-1.5, 1.5, n), ll + rng.uniform(-1.5, 1.5, n)
    rw[1] = lw[1]                                                                # at the reference (as at step 0)
    nw, nl = rng.integers(3, 40, n), rng.integers(3, 40, n)
    rows = F.state_rows(0, [f"p{i}" for i in range(n)], lw.tolist(), ll.tolist(), rw.tolist(), rl.tolist(),
                        nw.tolist(), nl.tolist(), loss, loss_params, 1.0)
    sq_w, sq_l = rng.uniform(0.2, 1.0, n), rng.uniform(1.0, 5.0, n)
    ip = rng.uniform(-0.5, 0.99, n) * np.sqrt(sq_w * sq_l)
    sq_w[0], ip[0] = 0.0, 0.0
    with np.errstate(invalid="ignore", divide="ignore"):
        F.gradient_columns(rows, ip.tolist(), sq_w.tolist(), sq_l.tolist())
    return pd.DataFrame(rows)


def oracle_dlogp_w(r, loss, hp, add_sum=0.0, add_mean=0.0):
    """Predicted chosen change of row ``r`` under ``loss(**hp) − add_sum·lw − add_mean·lw/|y_w|``:
    the modified loss's coefficients by autograd through `compute_loss`, then `predict`."""
    t = lambda x: torch.tensor([float(x)], dtype=torch.float64)                  # noqa: E731
    lw, ll = t(r.logp_w).requires_grad_(True), t(r.logp_l).requires_grad_(True)
    out = compute_loss(loss, lw, ll, t(r.ref_w), t(r.ref_l), t(r.len_w), t(r.len_l), **hp)
    total = out.loss - add_sum * lw - add_mean * lw / r.len_w
    g_w, g_l = torch.autograd.grad(total.sum(), (lw, ll))
    return float(predict(-g_w, g_l, t(r.ip_wl), t(r.sq_w), t(r.sq_l), lr=1.0)["dlogp_w"][0])


def _scale(r, lam):
    return abs(r.d_w * r.sq_w) + abs(r.d_l * r.ip_wl) + abs(lam * r.sq_w) + 1e-300


@pytest.mark.parametrize("loss, hp", [("dpo", {"beta": 0.1}), ("simpo", {}), ("ipo", {"beta": 1.0}),
                                      ("kto", {}), ("cpo", {"lam": 0.01}), ("orpo", {"lam": 5.0})])
def test_nll_threshold_is_where_the_modified_loss_changes_sign(loss, hp):
    rec = random_records(loss, hp)
    ps = D.pair_steps(rec)
    lam = D.nll_lambda(rec)
    assert math.isnan(lam.iloc[0]) and (lam.iloc[1:] >= 0).all()           # g_w = 0: no λ helps
    positive = 0
    for i, r in enumerate(ps.itertuples()):
        if i == 0:
            continue
        hp_full = resolve_hyper(loss, hp)
        if lam.iloc[i] == 0:                                                 # already rising (or flat)
            assert oracle_dlogp_w(r, loss, hp_full) >= 0
            continue
        positive += 1
        at = oracle_dlogp_w(r, loss, hp_full, add_sum=lam.iloc[i])
        assert abs(at) <= 1e-12 * _scale(r, lam.iloc[i])
        assert oracle_dlogp_w(r, loss, hp_full, add_sum=lam.iloc[i] * (1 + 1e-6)) > 0
        assert oracle_dlogp_w(r, loss, hp_full, add_sum=lam.iloc[i] * (1 - 1e-6)) < 0
        # the token-mean NLL term needs |y_w| times as much
        mean = oracle_dlogp_w(r, loss, hp_full, add_mean=lam.iloc[i] * r.len_w)
        assert abs(mean) <= 1e-12 * _scale(r, lam.iloc[i])
    assert positive >= 5                                                    # the test exercised real thresholds


@pytest.mark.parametrize("nll", ["sum", "mean"])
def test_cpo_needed_lambda_is_the_total_weight(nll):
    """For a loss that already has the NLL term, `remedies` reports the total λ: CPO with that λ
    (compute_loss itself, no added term) has a zero predicted chosen change at each threshold."""
    hp = {"beta": 0.1, "lam": 0.02, "nll": nll}
    rec = random_records("cpo", hp, seed=1)
    ps, lam = D.pair_steps(rec), D.nll_lambda(rec)
    rm = D.remedies(rec, "cpo", hp).set_index("remedy")
    row = rm.loc[f"nll_{nll}"]
    assert row["current"] == 0.02 and rm.loc["nll_sum" if nll == "mean" else "nll_mean", "current"] == 0.0
    assert row["n_needing"] == int((lam > 0).sum()) and row["n_applicable"] == len(ps) - 1
    checked = 0
    for i, r in enumerate(ps.itertuples()):
        if i == 0 or lam.iloc[i] == 0:
            continue
        total = 0.02 + lam.iloc[i] * (r.len_w if nll == "mean" else 1.0)
        assert abs(oracle_dlogp_w(r, "cpo", {**hp, "lam": total})) <= 1e-12 * _scale(r, total)
        checked += 1
    assert checked >= 5
    # the summary: the share rising at the 90th-percentile λ, by the oracle
    p90 = row["needed_p90"]
    oracle = np.mean([oracle_dlogp_w(r, "cpo", {**hp, "lam": p90}) > 0 for r in ps.itertuples()])
    assert row["frac_rise_at_p90"] == pytest.approx(oracle)
    assert row["frac_rise_now"] == pytest.approx(np.mean([oracle_dlogp_w(r, "cpo", hp) > 0 for r in ps.itertuples()]))


def test_dpop_threshold_against_dpop_itself():
    rec = random_records("dpo", {"beta": 0.1}, seed=2)
    ps, lam = D.pair_steps(rec), D.dpop_lambda(rec)
    active = (ps["logp_w"] < ps["ref_w"]) & (ps["sq_w"] > 0)
    assert not active.iloc[1]                                                # logp_w = ref_w: DPOP's hinge is off
    assert lam[~active].isna().all() and (lam[active] >= 0).all()
    hp = resolve_hyper("dpop", {"beta": 0.1})
    checked = 0
    for i, r in enumerate(ps.itertuples()):
        if i == 0:
            continue
        if not active.iloc[i]:                                               # DPOP = DPO there, whatever λ
            assert (oracle_dlogp_w(r, "dpop", {**hp, "lam": 100.0}) > 0) == (r.pred_dw > 0)
        elif lam.iloc[i] > 0:
            assert abs(oracle_dlogp_w(r, "dpop", {**hp, "lam": lam.iloc[i]})) <= 1e-12 * _scale(r, lam.iloc[i])
            assert oracle_dlogp_w(r, "dpop", {**hp, "lam": lam.iloc[i] * (1 + 1e-6)}) > 0
            checked += 1
    assert checked >= 3
    row = D.remedies(rec, "dpo", {"beta": 0.1}).set_index("remedy").loc["dpop"]
    p90 = row["needed_p90"]
    oracle = np.mean([oracle_dlogp_w(r, "dpop", {**hp, "lam": p90}) > 0 for r in ps.itertuples()])
    assert row["applicable"] and row["frac_rise_at_p90"] == pytest.approx(oracle)
    unfixable = np.mean([not a and not (r.sq_w > r.ip_wl) for a, r in zip(active, ps.itertuples())])
    assert row["frac_unfixable"] == pytest.approx(unfixable)


@pytest.mark.parametrize("loss", ["dpo", "rdpo", "simpo"])
def test_no_beta_changes_the_sign(loss):
    rec = random_records(loss, {}, seed=3)
    ps = D.pair_steps(rec)
    now = ps["pred_dw"].to_numpy() > 0
    for beta in (0.01, 0.3, 3.0, 30.0):
        hp = resolve_hyper(loss, {"beta": beta})
        signs = np.array([oracle_dlogp_w(r, loss, hp) > 0 for r in ps.itertuples()])
        assert (signs == now).all(), beta
    row = D.remedies(rec, loss, {}).set_index("remedy").loc["beta"]
    assert row["applicable"] and row["frac_unfixable"] == pytest.approx(1 - now.mean())
    if loss == "dpo":
        k = int((ps["sq_w"] < ps["ip_wl"]).sum())
        assert f"in {k}/{len(ps)}" in row["note"]


def test_remedies_on_the_scenario(records):
    """DPO, d_w = d_l = d: only A@4..6 (⟨g_w,g_l⟩ = 1.5 > ‖g_w‖² = 1) fall, each needing an NLL weight
    λ* = 1.5d − d = d/2 and a DPOP λ* = 1.5/1 − 1 = 0.5 — but at A@4 the chosen log-prob is still above
    its reference (−49.6 > −50), where DPOP = DPO: that pair-step cannot be fixed by DPOP's λ."""
    rm = D.remedies(records, "dpo", {"beta": 0.1}).set_index("remedy")
    ps = D.pair_steps(records)
    d = ps[ps["entangled"]]["d_w"].to_numpy()
    nll = rm.loc["nll_sum"]
    assert (nll["n_needing"], nll["frac_rise_now"], nll["frac_unfixable"]) == (3, pytest.approx(0.9), 0.0)
    assert nll["needed_max"] == pytest.approx(d.max() / 2) and nll["needed_median"] == pytest.approx(np.median(d) / 2)
    # 27 rise already, the one below the median rises; the median pair-step sits at its threshold (zero up to rounding)
    assert round(nll["frac_rise_at_median"] * 30) in (28, 29) and nll["frac_rise_at_p90"] >= 29 / 30
    assert rm.loc["nll_mean", "needed_max"] == pytest.approx(10 * d.max() / 2)  # |y_w| = 10 for A
    dpop = rm.loc["dpop"]
    assert (dpop["n_applicable"], dpop["n_needing"]) == (sum(ps["logp_w"] < ps["ref_w"]), 2)
    assert dpop["needed_median"] == pytest.approx(0.5) and dpop["frac_unfixable"] == pytest.approx(1 / 30)
    assert rm.loc["beta", "frac_unfixable"] == pytest.approx(0.1) and "in 3/30" in rm.loc["beta", "note"]


def test_remedies_that_do_not_apply_say_why():
    rec = random_records("kto", {}, seed=4)
    rm = D.remedies(rec, "kto", {}).set_index("remedy")
    assert not rm.loc["beta", "applicable"] and "kto" in rm.loc["beta", "note"]
    assert not rm.loc["dpop", "applicable"] and "dpo" in rm.loc["dpop", "note"]
    assert rm.loc["nll_sum", "applicable"] and rm.loc["nll_sum", "n_applicable"] == 39


# ------------------------------------------------------------------ the HTML

class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs, self.ids, self.tags = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for k, v in attrs:
            if k in ("src", "href"):
                self.refs.append(v or "")
            if k == "id":
                self.ids.append(v)


def test_html_is_self_contained(report_html, scenario):
    assert report_html == scenario / "report.html"
    text = report_html.read_text(encoding="utf-8")                           # opens from disk as UTF-8
    p = _Links()
    p.feed(text)
    assert set(D.SECTION_IDS) <= set(p.ids) and p.ids.count("verdict") == 1
    imgs = [r for r in p.refs if r.startswith("data:image/png;base64,")]
    # verdict 3, in-run 1, tokens 1 heatmap, what-if 1
    assert len(imgs) == 6
    assert not [r for r in p.refs if re.match(r"(?i)\s*(https?:)?//", r)]
    assert all(r.startswith(("data:image/png;base64,", "#")) for r in p.refs)
    assert "script" not in p.tags and "link" not in p.tags and "iframe" not in p.tags
    assert "could not be drawn" not in text and "Traceback" not in text


def test_report_sections_and_their_numbers(scenario):
    rep = D.build_report(scenario, figures=False)
    assert rep.ids == list(D.SECTION_IDS)
    assert all(s.missing == [] for s in rep.sections), [s.missing for s in rep.sections]
    assert "3/30 (10%)" in rep.section("verdict").body
    assert "0.9714" in rep.section("drivers").body                           # A's share of the fall, 3.4/3.5
    assert "−0.05" in rep.section("tokens").body or "-0.05" in rep.section("tokens").body
    cfg = rep.section("config").body
    assert "dynamics train" in cfg and D._tool_version() in cfg and "upgraded" not in cfg
    with pytest.raises(KeyError):
        rep.section("nope")


def test_chromium_renders_the_report(report_html, tmp_path):
    if F.chromium_binary() is None:
        pytest.skip("no chromium, chromium-browser or google-chrome on PATH (e.g. apt-get install chromium)")
    # the capture itself works: a page with a script error, a console error and a missing image
    bad = tmp_path / "bad.html"
    bad.write_text('<html><body><section id="x"></section><img src="missing.png">'
                   '<script>console.error("boom"); nope();</script></body></html>')
    seen = F.render(bad, tmp_path / "profile_bad")
    assert any("boom" in e for e in seen["errors"]) and any("nope" in e for e in seen["errors"])
    assert any("missing.png" in e for e in seen["errors"]) and seen["images"] == [(True, 0)]
    shot = tmp_path / "report.png"
    seen = F.render(report_html, tmp_path / "profile", screenshot=shot)
    assert seen["errors"] == []
    assert seen["ids"] == list(D.SECTION_IDS)
    assert len(seen["images"]) == 6 and all(done and width > 100 for done, width in seen["images"])
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 50_000


# ------------------------------------------------------------------ bad and partial input

def _no_work(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("computed before the input was checked")
    monkeypatch.setattr(D, "verdict", boom)


@pytest.mark.parametrize("case", ["missing", "file", "no_config", "no_records", "empty_records", "newer",
                                  "not_json", "no_columns"])
def test_bad_input_is_an_input_error_before_any_work(case, tmp_path, monkeypatch):
    _no_work(monkeypatch)
    run = tmp_path / "run"
    expect = {"missing": "does not exist", "file": "is a file", "no_config": "not a run directory",
              "no_records": "no recorded step", "empty_records": "no recorded step", "newer": "newer",
              "not_json": "unreadable", "no_columns": "lacks the columns"}[case]
    if case == "file":
        run.write_text("x")
    elif case != "missing":
        run.mkdir()
    if case not in ("missing", "file", "no_config"):
        cfg = {"version": 3, "writer": "dynamics train"} if case == "newer" else {"version": 2, "loss": "dpo"}
        (run / "config.json").write_text("{not json" if case == "not_json" else __import__("json").dumps(cfg))
    if case == "empty_records":
        pd.DataFrame({"step": pd.Series([], dtype=int), "pair_id": pd.Series([], dtype=str)}).to_parquet(
            run / "records.parquet")
    if case == "no_columns":
        pd.DataFrame({"step": [0], "pair_id": ["a"]}).to_parquet(run / "records.parquet")
    if case in ("newer", "not_json"):
        F.write_scenario(tmp_path / "donor", whatif=False, tokens=False, screen=False, attributions=False)
        (run / "records.parquet").write_bytes((tmp_path / "donor" / "records.parquet").read_bytes())
    with pytest.raises(InputError, match=expect):
        D.diagnose(run)
    assert not (run / "report.html").exists() if run.is_dir() else True


def test_version1_config_is_upgraded_and_said_so(tmp_path):
    v1 = {"model": "synthetic", "loss": "dpo", "loss_params": {"beta": 0.1}, "lr": 1.0, "eval_every": 1,
          "impl": "ghost", "whatif": False, "token_pairs": 0, "steps": 10}
    run = F.write_scenario(tmp_path / "v1", config=v1, whatif=False, tokens=False, screen=False, attributions=False)
    rep = D.build_report(run, figures=False)
    cfg = rep.section("config").body
    assert "upgraded" in cfg and "version 1" in cfg and "writer: dynamics train" in cfg
    assert rep.verdict["causes"] == E["causes"]                               # the analysis is unaffected


def test_missing_optional_tables_are_named_with_the_fix(tmp_path):
    run = F.write_scenario(tmp_path / "bare", whatif=False, tokens=False, screen=False, attributions=False,
                           in_run=False, cross=False, writer="DynamicsCallback")
    out = D.diagnose(run, tmp_path / "elsewhere.html", figures=False)
    assert out == tmp_path / "elsewhere.html" and not (run / "report.html").exists()
    rep = D.build_report(run, figures=False)
    assert rep.ids == list(D.SECTION_IDS)
    assert "--whatif" in rep.section("whatif").missing[0]
    tokens = rep.section("tokens").missing
    assert len(tokens) == 3 and all("--token-pairs 1" in m for m in tokens[:2])
    assert "attributions.parquet" in tokens[2] and "dynamics attribute" in tokens[2]
    assert "screen.parquet" in rep.section("drivers").missing[0]
    (contrib,), (inrun,) = rep.section("contributions").missing, rep.section("inrun").missing
    assert "contributions.parquet" in contrib and "dynamics train --cross" in contrib
    assert "train_records.parquet" in inrun and "dynamics train --in-run" in inrun
    assert rep.section("verdict").missing == [] and rep.section("remedies").missing == []
    # the probes' "rest of the update" falls point to the flag that splits them over training pairs
    assert any("`dynamics train --cross`" in c for c in rep.verdict["conclusions"])
    assert rep.verdict["train"] is None and rep.verdict["contrib"] is None
    html = out.read_text()
    assert html.count('class="missing"') >= 7 and "Traceback" not in html
    assert "writer: DynamicsCallback" in html
    d = tmp_path / "dir_out"
    d.mkdir()
    assert D.diagnose(run, d, figures=False) == d / "report.html"


def test_one_recorded_step_is_insufficient_evidence(tmp_path):
    run = RunDir(tmp_path / "one")
    run.write_config(dict(loss="dpo", loss_params={"beta": 0.1}, lr=1.0), writer="dynamics train")
    run.append("records", F.state_rows(0, ["a", "b"], [-5.0, -6.0], [-7.0, -8.0], [-5.0, -6.0], [-7.0, -8.0],
                                        [3, 3], [3, 3], "dpo", {"beta": 0.1}, 1.0))
    rep = D.build_report(run.path, figures=False)
    assert rep.verdict["falls"] is None and not rep.verdict["sufficient"]
    assert rep.verdict["conclusions"][0].startswith("Insufficient evidence: only one recorded step")
    assert "no recorded gradients" in rep.section("remedies").missing[0]
    assert "Insufficient evidence" in rep.section("drivers").body


def test_no_gradients_no_cause(tmp_path):
    """States at two steps but no gradient columns: the fall is reported, its cause is not."""
    run = RunDir(tmp_path / "states")
    run.write_config(dict(loss="dpo", loss_params={"beta": 0.1}, lr=1.0), writer="dynamics train")
    for step, lw in ((0, [-5.0, -6.0]), (5, [-5.5, -6.5])):
        run.append("records", F.state_rows(step, ["a", "b"], lw, [-7.0, -8.0], [-5.0, -6.0], [-7.0, -8.0],
                                            [3, 3], [3, 3], "dpo", {"beta": 0.1}, 1.0))
    v = D.verdict(run.table("records"))
    assert v["falls"] and v["mean_change"] == pytest.approx(-0.5) and v["n_grad"] == 0 and not v["sufficient"]
    assert any(c.startswith("Insufficient evidence for a cause") for c in v["conclusions"])
    rep = D.build_report(run.path, figures=False)
    assert "no recorded gradients" in rep.section("verdict").missing[0]


def test_damaged_optional_table_is_a_note(tmp_path):
    run = F.write_scenario(tmp_path / "dmg", tokens=False, screen=False, attributions=False)
    (run / "whatif.parquet").write_bytes(b"not parquet")
    rep = D.build_report(run, figures=False)
    body = rep.section("config").body
    assert "whatif.parquet is not a readable Parquet table" in body and "unreadable" in body
    assert "<td>records.parquet</td>\n      <td>33</td>" in body
    assert rep.section("whatif").missing


def test_top_k_is_checked(scenario):
    with pytest.raises(InputError, match="top_k"):
        D.build_report(scenario, top_k=0)


@pytest.mark.parametrize("module", [D, H])
def test_layering(module):
    """dynamics.tools imports only the library (never analyses) and no private name of another module;
    the rendering module does not import the computation."""
    tree = ast.parse(Path(module.__file__).read_text())
    for node in ast.walk(tree):
        if module is H and isinstance(node, ast.ImportFrom) and node.module:
            assert node.module != "dynamics.tools.diagnose"
        if isinstance(node, ast.ImportFrom) and node.module:
            assert not node.module.startswith("analyses")
            if node.module.startswith("dynamics"):
                assert not [a.name for a in node.names if a.name.startswith("_")], node.module
        elif isinstance(node, ast.Import):
            assert not any(a.name.startswith("analyses") for a in node.names)


def test_report_does_not_import_captum():
    """The report reads attribution tables and shares the convergence threshold, but loading it
    does not import captum (nor torch's model code through it)."""
    import subprocess
    import sys
    code = ("import sys, dynamics.tools.diagnose, dynamics.tools.report_html; "
            "assert 'captum' not in sys.modules, 'captum imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_long_tables_are_capped():
    text = H.capped_table(pd.DataFrame({"a": range(100)}))
    assert "100 rows; the first and last 20" in text and text.count("<tr>") == 40    # body rows
    assert H.capped_table(pd.DataFrame({"a": range(40)})).count("<tr>") == 40
