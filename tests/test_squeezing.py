"""The squeezing effect (seed 000) on a linear softmax, and the digits warm-up, as numbers."""

import numpy as np
import pandas as pd
import pytest
import torch

from analyses import squeezing as sq


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def toy():
    df = sq.run_toy(V_list=(50, 1000), eta=2.0)
    return df, sq.toy_summary(df).set_index(["V", "case"])


@pytest.fixture(scope="module")
def digits():
    return sq.run_digits(etas=(0.1, 0.03, 0.01), n_update_per_class=3)


# ----------------------------------------------------------------------------- toy
def test_toy_distributions_are_what_the_cases_say(toy):
    df, s = toy
    for V in (50, 1000):
        assert s.loc[(V, "negative_flat"), "p_argmax_before"] < 2.0 / V           # near-uniform
        assert s.loc[(V, "negative_valley"), "p_argmax_before"] > 0.7               # peaky
        assert s.loc[(V, "negative_valley"), "p_target_before"] < 1e-3              # valley label
        g = df[(df.V == V) & (df.case == "negative_peak")]
        assert g[g.is_target].is_argmax.item()                                     # y = argmax
        for _, g in df[df.V == V].groupby("case"):
            assert np.isclose(g.p_before.sum(), 1) and np.isclose(g.p_after.sum(), 1)


@pytest.mark.parametrize("V", [50, 1000])
def test_negative_gradient_on_valley_squeezes_mass_to_argmax(toy, V):
    r = toy[1].loc[(V, "negative_valley")]
    assert r.p_target_after < r.p_target_before
    assert r.p_argmax_after > r.p_argmax_before + 0.1       # 0.80 -> 0.95 (V=50), 0.82 -> 0.96 (V=1000)
    assert r.entropy_after < r.entropy_before - 0.5         # 1.14 -> 0.35 nats (V=50)
    assert r.argmax_after_is_same


@pytest.mark.parametrize("V", [50, 1000])
def test_other_cases(toy, V):
    s = toy[1]
    pos = s.loc[(V, "positive_valley")]
    assert pos.p_target_after > 10 * pos.p_target_before                # positive gradient: p(y) up
    peak = s.loc[(V, "negative_peak")]
    assert peak.p_argmax_after < peak.p_argmax_before and peak.entropy_after > peak.entropy_before
    flat = s.loc[(V, "negative_flat")]                                   # mass spread ~uniformly
    assert flat.p_target_after < flat.p_target_before / 5
    assert abs(flat.entropy_after - flat.entropy_before) < 0.02


def test_squeezing_is_proportional_to_probability():
    """Negative step on y: Δz_j = η‖x‖²π_j for j ≠ y, so every other label's log-odds against the
    argmax fall; the argmax gains the most logit."""
    W, x = sq.toy_model(50, 4, "peaky", seed=3)
    pi = torch.softmax(W @ x, -1)
    y = int(pi.argmin())
    z0, z1 = sq.sgd_step_logits(W, x, y, 2.0, -1.0)
    dz = z1 - z0
    others = torch.arange(50) != y
    assert int(dz.argmax()) == int(pi.argmax())
    torch.testing.assert_close(dz[others], 2.0 * pi[others], rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape", ["flat", "peaky"])
@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("eta", [1e-3, 0.5, 3.0])
def test_autograd_step_matches_closed_form(shape, sign, eta):
    for V, seed in ((50, 0), (1000, 1)):
        W, x = sq.toy_model(V, 4, shape, seed=seed)
        x = 1.7 * x                                     # ‖x‖² ≠ 1, so the factor is checked
        pi = torch.softmax(W @ x, -1)
        for y in (int(pi.argmax()), int(pi.argmin()), 7):
            z0, z1 = sq.sgd_step_logits(W, x, y, eta, sign)
            cf = sq.closed_form_logit_change(pi, y, x, eta, sign)
            assert (z1 - z0 - cf).abs().max() < 1e-12


def test_toy_model_logits_are_the_target():
    W, x = sq.toy_model(1000, 4, "peaky", seed=0)
    torch.testing.assert_close(W @ x, sq.toy_logits(1000, "peaky", seed=0), rtol=0, atol=1e-12)
    assert abs(x.norm().item() - 1) < 1e-15
    with pytest.raises(ValueError, match="known: flat, peaky"):
        sq.toy_logits(5, "spiky")


def test_plot_toy_reads_data_only(toy):
    fig = sq.plot_toy(toy[0], V=1000)
    assert len(fig.axes) == 2 * len(sq.TOY_CASES)
    assert fig.axes[1].get_yscale() == "log"


# ----------------------------------------------------------------------------- digits
def test_digits_model_is_trained(digits):
    assert digits.acc.iloc[0] > 0.93
    assert set(digits.u_class) == set(range(10)) and set(digits.o_class) == set(range(10))


def test_digits_first_order_prediction(digits):
    r = sq.digits_residuals(digits).set_index("eta")
    assert r.loc[0.01, "rel_resid_true"] < 0.05              # ~1.4%
    assert r.loc[0.01, "rel_resid_c"] < 0.05
    # first-order: the relative residual is O(η); it shrinks ~linearly with η
    assert r.loc[0.01, "rel_resid_true"] < r.loc[0.03, "rel_resid_true"] < r.loc[0.1, "rel_resid_true"]
    ratio = r.loc[0.1, "rel_resid_true"] / r.loc[0.01, "rel_resid_true"]
    assert 5 < ratio < 15
    # and the absolute residual is O(η²)
    abs_res = digits.assign(e=(digits.d_true - digits.pred_true).abs()).groupby("eta").e.max()
    assert 50 < abs_res[0.1] / abs_res[0.01] < 150


def test_per_example_grads_match_autograd_loop():
    """The kernel behind pred = η⟨∇log π(y_o|x_o), ∇log π(c|x_u)⟩ uses vmapped per-example grads."""
    Xtr, ytr, Xte, yte = sq.load_digits_split()
    model = sq.train_digits(Xtr, ytr)
    params = {k: v.detach() for k, v in model.named_parameters()}
    G = sq._flat_grads(model, params, Xte[:3], yte[:3])
    for i in range(3):                      # vmapped per-example grads equal plain autograd
        model.zero_grad()
        torch.log_softmax(model(Xte[i:i + 1]), -1)[0, yte[i]].backward()
        ref = torch.cat([p.grad.flatten() for p in model.parameters()])
        torch.testing.assert_close(G[i], ref, rtol=0, atol=1e-12)


def test_digits_heatmap_diagonal_positive(digits):
    for normalize in (False, True):
        H = sq.digits_heatmap(digits, "d_true", eta=0.01, normalize=normalize).values
        assert H.shape == (10, 10)
        diag, off = np.diag(H), H[~np.eye(10, dtype=bool)]
        assert diag.mean() > 0 and diag.mean() > off.mean()
    Hn = sq.digits_heatmap(digits, "d_true", eta=0.01, normalize=True).values
    assert (np.diag(Hn) > 0).all()
    # on the diagonal the update's class is the observed example's label: the two columns agree
    same = digits[digits.u_class == digits.o_class]
    np.testing.assert_array_equal(same.d_true.values, same.d_c.values)


def test_reproduce_writes_files(tmp_path):
    paths = sq.reproduce_toy_and_digits(tmp_path, quick=True)  # no wall-clock assertion: speed is the benchmark's job
    names = {p.name for p in paths}
    for stem in ("toy_squeezing_V50", "toy_squeezing_V1000", "digits_heatmap", "digits_first_order"):
        assert {f"{stem}.png", f"{stem}.pdf"} <= names
    assert {"toy_squeezing.parquet", "toy_squeezing_summary.csv", "digits_dynamics.parquet",
            "digits_residuals.csv"} <= names
    for p in paths:
        assert p.exists() and p.stat().st_size > 0
    toy = pd.read_parquet(tmp_path / "toy_squeezing.parquet")
    assert {"case", "label", "p_before", "p_after", "is_target", "is_argmax"} <= set(toy.columns)
    summ = pd.read_csv(tmp_path / "toy_squeezing_summary.csv")
    assert {"p_argmax_before", "p_argmax_after", "entropy_before", "entropy_after"} <= set(summ.columns)
