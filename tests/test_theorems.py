"""Seed 004 §4.1 (Theorem 1, Corollary 2, Theorem 3; proofs in appendix B) checked numerically in
float64, each in its own setting, with the small models written out here (no transformers).

DPO: ``ℓ = -log σ(β[(log π_w − log π_w^ref) − (log π_l − log π_l^ref)])``. The reference is the
model before the step, so at that step the coefficient is ``d = d_w = d_l = β σ(0) = β/2`` and one
SGD step of size η moves ``Δθ = η d (g_w − g_l)`` with ``g = ∇_θ log π``. First order (eq. 5):
``Δlog π_w ≈ η d (‖g_w‖² − ⟨g_w,g_l⟩)`` and ``Δlog π_l ≈ η d (⟨g_w,g_l⟩ − ‖g_l‖²)``.

Corrections to the paper found here (each has a test below):
* Corollary 2 (responses differing only at the last token L, frozen hidden states ``h_i``): the
  sentence-level gradients also carry the shared positions i < L, which appendix B.1 drops ("WLOG"
  it differentiates only token L). In general ``‖g_w‖² − ‖g_l‖² = 2c`` with
  ``c = Σ_{i<L} (h_i·h_L) (e_{y^i} − s_i)·(e_w − e_l)``, so ``‖g_w‖² = ‖g_l‖²`` fails unless c = 0
  (e.g. h_i ⊥ h_L); once the norms are equal the inequality ``⟨g_w,g_l⟩ ≤ ‖g_w‖²`` is just
  Cauchy–Schwarz. The signs need ``‖h_L‖² > |c|`` and can both be negative (counterexample below).
* Theorem 3, eq. (12): the main text writes ``1 + (s[j*] − s[k*])``; the correct first-order value
  (and appendix eq. 21) is ``1 + (s[k*] − s[j*])`` with j* the chosen and k* the rejected token.
  Eqs. (12)-(13) also drop the factor ``η·β σ(−β·margin)`` (they set η = 1 and write ∝).
* Theorem 3 needs the rows i > m of the two responses to share parameters (the algebra of B.2 puts
  ``∇log s_w`` and ``∇log s_l`` in the same row). With separate variables ``s_{w,i}``, ``s_{l,i}``
  as §4.1 literally describes, the cross term vanishes and the chosen suffix tokens go *up*. The
  model used here: shared learnable logits ``φ_i`` plus a frozen context offset per response,
  ``s_{w,i} = softmax(φ_i + c_{w,i})``, ``s_{l,i} = softmax(φ_i + c_{l,i})``; for it eq. (11),
  (21) and (13) are exact first-order statements (and (11) holds exactly, not only ≈ 0).
"""
import pytest
import torch
import torch.nn.functional as F

DT = torch.float64
BETA = 0.1
D = BETA / 2            # d_w = d_l = β σ(0) at the first step (reference = current model)


pytestmark = pytest.mark.usefixtures("one_thread")


def dpo_loss(lw, ll, rw, rl, beta=BETA):
    return -F.logsigmoid(beta * ((lw - rw) - (ll - rl)))


def flat(*ts):
    return torch.cat([t.reshape(-1) for t in ts])


# ----------------------------------------------------------------------------- Theorem 1
def last_layer_theta(h, z, seed=0):
    """θ (d×V) with hᵀθ = z exactly on this h, generic elsewhere."""
    g = torch.Generator().manual_seed(seed)
    R = torch.randn(h.numel(), z.numel(), generator=g, dtype=DT)
    P = torch.eye(h.numel(), dtype=DT) - torch.outer(h, h) / (h @ h)
    return torch.outer(h, z) / (h @ h) + P @ R


def uniform_on(V, support):
    """Logits whose softmax is exactly 1/M on ``support`` and exactly 0 elsewhere (exp underflows)."""
    z = torch.full((V,), -1e4, dtype=DT)
    z[support] = 0.0
    return z


def grad_logp(theta, h, tok):
    theta = theta.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(torch.log_softmax(h @ theta, -1)[tok], theta)
    return g


def dpo_step_last_layer(theta, H, yw, yl, eta):
    """One real SGD step of DPO on θ with frozen hidden states H (L×d); returns θ' and log-probs."""
    def logp(th, y):
        return torch.log_softmax(H @ th, -1).gather(1, y[:, None]).sum()
    th = theta.detach().requires_grad_(True)
    lw, ll = logp(th, yw), logp(th, yl)
    (g,) = torch.autograd.grad(dpo_loss(lw, ll, lw.detach(), ll.detach()), th)
    th1 = theta - eta * g
    with torch.no_grad():
        return th1, (lw.detach(), ll.detach()), (logp(th1, yw), logp(th1, yl))


@pytest.mark.parametrize("V,M", [(50, 2), (50, 3), (50, 17), (50, 50), (1000, 40)])
def test_theorem1_inner_product_and_norms(V, M):
    g = torch.Generator().manual_seed(M)
    h = torch.randn(8, generator=g, dtype=DT) * 3
    support = torch.randperm(V, generator=g)[:M]
    w, l = int(support[0]), int(support[1])
    theta = last_layer_theta(h, uniform_on(V, support))
    s = torch.softmax(h @ theta, -1)
    assert (s[support] - 1 / M).abs().max() < 1e-15 and s.sum() - s[support].sum() == 0
    gw, gl = grad_logp(theta, h, w), grad_logp(theta, h, l)
    hh = h @ h
    assert abs((gw * gl).sum() - (-hh / M)) < 1e-12 * hh               # ⟨g_w,g_l⟩ = −‖h‖²/M
    assert abs((gw * gw).sum() - (M - 1) / M * hh) < 1e-12 * hh        # ‖g‖² = (M−1)/M ‖h‖²
    assert abs((gl * gl).sum() - (M - 1) / M * hh) < 1e-12 * hh


def test_theorem1_general_identity_and_support_assumption():
    """Without the uniform assumption ⟨g_w,g_l⟩ = ‖h‖²(‖s‖² − s_w − s_l); with w or l outside
    the M-token support the inner product is 0, not −‖h‖²/M (the theorem needs both inside)."""
    g = torch.Generator().manual_seed(1)
    h = torch.randn(5, generator=g, dtype=DT)
    theta = torch.randn(5, 30, generator=g, dtype=DT)
    s = torch.softmax(h @ theta, -1)
    gw, gl = grad_logp(theta, h, 3), grad_logp(theta, h, 11)
    assert abs((gw * gl).sum() - (h @ h) * (s @ s - s[3] - s[11])) < 1e-13
    theta = last_layer_theta(h, uniform_on(30, torch.arange(4)))
    assert abs((grad_logp(theta, h, 0) * grad_logp(theta, h, 20)).sum()) < 1e-13


@pytest.mark.parametrize("eta", [1e-3, 1e-1, 1.0, 30.0])
def test_theorem1_dpo_step_signs(eta):
    V, M = 50, 6
    g = torch.Generator().manual_seed(0)
    h = torch.randn(8, generator=g, dtype=DT)
    support = torch.arange(M)
    theta = last_layer_theta(h, uniform_on(V, support))
    yw, yl = torch.tensor([2]), torch.tensor([4])
    th1, (lw0, ll0), (lw1, ll1) = dpo_step_last_layer(theta, h[None], yw, yl, eta)
    dw, dl = lw1 - lw0, ll1 - ll0
    assert dw > 0 and dl < 0
    # the step is exactly Δz = η d ‖h‖² (e_w − e_l): log π_w ↑, log π_l ↓ at every η, not only to first order
    dz = h @ th1 - h @ theta
    e = torch.zeros(V, dtype=DT)
    e[2], e[4] = 1, -1
    assert (dz - eta * D * (h @ h) * e).abs().max() < 1e-12 * max(1.0, eta)
    # first order: Δlog π_w ≈ η d (‖g_w‖² − ⟨g_w,g_l⟩) = η d ‖h‖², Δlog π_l ≈ −η d ‖h‖²
    if eta <= 1e-3:
        pred = eta * D * (h @ h)
        assert abs(dw - pred) < 1e-3 * pred and abs(dl + pred) < 1e-3 * pred


# ----------------------------------------------------------------------------- Corollary 2
def corollary_setting(L, M, V=30, d=6, *, hidden="generic", prefix="random", seed=0):
    """Frozen hidden states H (L×d) shared by both responses, θ with the L-th prediction uniform on
    M tokens, responses equal on 1..L−1 and differing at L (w=0, l=1, both in the support)."""
    g = torch.Generator().manual_seed(seed)
    hL = torch.randn(d, generator=g, dtype=DT)
    hL_unit = hL / hL.norm()
    H = torch.empty(L, d, dtype=DT)
    H[-1] = hL
    for i in range(L - 1):
        noise = torch.randn(d, generator=g, dtype=DT)
        noise = noise - (noise @ hL_unit) * hL_unit                 # ⊥ h_L
        if hidden == "orthogonal":
            H[i] = noise
        elif hidden == "same":
            H[i] = hL
        else:                                                       # positive overlap with h_L
            H[i] = (0.5 + torch.rand(1, generator=g, dtype=DT)) * hL + noise
    theta = last_layer_theta(hL, uniform_on(V, torch.arange(M)), seed=seed)
    if prefix == "rejected":                                        # shared tokens = y_l[L]
        pre = torch.ones(L - 1, dtype=torch.long)
    else:
        pre = torch.randint(2, M, (L - 1,), generator=g)
    yw = torch.cat([pre, torch.tensor([0])])
    yl = torch.cat([pre, torch.tensor([1])])
    return H, theta, yw, yl


def sentence_grads(theta, H, yw, yl):
    def g(y):
        th = theta.detach().requires_grad_(True)
        (gr,) = torch.autograd.grad(torch.log_softmax(H @ th, -1).gather(1, y[:, None]).sum(), th)
        return gr
    return g(yw), g(yl)


def c_term(theta, H, yw, yl):
    """c = Σ_{i<L} (h_i·h_L)(e_{y^i} − s_i)·(e_w − e_l)."""
    S = torch.softmax(H @ theta, -1)
    w, l = int(yw[-1]), int(yl[-1])
    c = 0.0
    for i in range(len(yw) - 1):
        e = -S[i].clone()
        e[yw[i]] += 1
        c = c + (H[i] @ H[-1]) * (e[w] - e[l])
    return c


@pytest.mark.parametrize("L,M", [(2, 3), (5, 4), (9, 10)])
def test_corollary2_holds_when_prefix_states_orthogonal(L, M):
    H, theta, yw, yl = corollary_setting(L, M, hidden="orthogonal", seed=L)
    gw, gl = sentence_grads(theta, H, yw, yl)
    ww, ll, wl = (gw * gw).sum(), (gl * gl).sum(), (gw * gl).sum()
    assert abs(ww - ll) < 1e-12 * ww                                  # ‖g_w‖² = ‖g_l‖²
    assert wl <= ww
    hh = H[-1] @ H[-1]
    assert abs((ww - wl) - hh) < 1e-12 * ww                           # ⟨g_w, g_w − g_l⟩ = ‖h_L‖²
    _, (lw0, ll0), (lw1, ll1) = dpo_step_last_layer(theta, H, yw, yl, 1e-2)
    assert lw1 > lw0 and ll1 < ll0


@pytest.mark.parametrize("seed", range(4))
def test_corollary2_general_identities(seed):
    """The corrected statement: ‖g_w‖² − ‖g_l‖² = 2c, ⟨g_w,g_w−g_l⟩ = ‖h_L‖² + c,
    ⟨g_l,g_l−g_w⟩ = ‖h_L‖² − c (uniform s_L); c ≠ 0 generically, so the norms differ."""
    H, theta, yw, yl = corollary_setting(6, 5, hidden="generic", seed=seed)
    gw, gl = sentence_grads(theta, H, yw, yl)
    ww, ll, wl = (gw * gw).sum(), (gl * gl).sum(), (gw * gl).sum()
    c, hh = c_term(theta, H, yw, yl), H[-1] @ H[-1]
    tol = 1e-12 * ww
    assert abs((ww - ll) - 2 * c) < tol
    assert abs((ww - wl) - (hh + c)) < tol and abs((ll - wl) - (hh - c)) < tol
    assert abs(ww - ll) > 1e-3 * ww                                  # the equality of the corollary fails
    # the corrected criterion gives the signs of a real DPO step; log π_w falls for seeds 0-3 here
    # (‖h_L‖² + c < 0 in 35 of 200 random instances of this setting)
    eta = 1e-3
    _, (lw0, ll0), (lw1, ll1) = dpo_step_last_layer(theta, H, yw, yl, eta)
    assert float(lw1 - lw0) == pytest.approx(float(eta * D * (hh + c)), rel=1e-2)
    assert float(ll1 - ll0) == pytest.approx(float(eta * D * (c - hh)), rel=1e-2)


def test_corollary2_counterexample_both_decrease():
    """h_i = h_L and the shared prefix repeats y_l[L]: c = −(L−1)‖h‖², so ⟨g_w,g_l⟩ > ‖g_w‖² and a real
    DPO step lowers both log π_w (by ≈ η d (L−2)‖h‖²) and log π_l (by ≈ η d L‖h‖²)."""
    L, M = 4, 5
    H, theta, yw, yl = corollary_setting(L, M, hidden="same", prefix="rejected")
    gw, gl = sentence_grads(theta, H, yw, yl)
    ww, ll, wl = (gw * gw).sum(), (gl * gl).sum(), (gw * gl).sum()
    hh = H[-1] @ H[-1]
    assert abs(c_term(theta, H, yw, yl) + (L - 1) * hh) < 1e-12 * hh
    assert wl > ww and abs(ww - ll) > 0.1 * ww
    eta = 1e-3
    _, (lw0, ll0), (lw1, ll1) = dpo_step_last_layer(theta, H, yw, yl, eta)
    assert lw1 < lw0 and ll1 < ll0
    assert float(lw1 - lw0) == pytest.approx(float(-eta * D * (L - 2) * hh), rel=1e-3)
    assert float(ll1 - ll0) == pytest.approx(float(-eta * D * L * hh), rel=1e-3)


# ----------------------------------------------------------------------------- Theorem 3
def edit1_setting(L, k, V=12, *, assumption=True, seed=0, gap=None):
    """Per-position logits φ (L×V, learnable, shared), frozen offsets C_w, C_l (L×V) equal on
    positions ≤ k (0-based index of the differing token, the paper's m = k+1). With ``assumption``
    C_w = C_l + δ e_{j*} after k (δ ≥ 0): s_w[j*] ≥ s_l[j*], s_w[j] ≤ s_l[j] (Pal et al. 2024)."""
    g = torch.Generator().manual_seed(seed)
    phi = torch.randn(L, V, generator=g, dtype=DT)
    Cl = torch.randn(L, V, generator=g, dtype=DT)
    yw = torch.randint(0, V, (L,), generator=g)
    yl = yw.clone()
    yw[k], yl[k] = 0, 1
    if gap is not None:                                  # make s[j*] − s[k*] large at position k
        phi[k], Cl[k] = 0.0, 0.0
        phi[k, 0], phi[k, 1] = gap, -gap
    Cw = Cl.clone()
    if assumption:
        delta = 1.0 + 3.0 * torch.rand(L - k - 1, 1, generator=g, dtype=DT)
        Cw[k + 1:] += delta * F.one_hot(yw[k + 1:], V)
    else:
        Cw[k + 1:] = torch.randn(L - k - 1, V, generator=g, dtype=DT)
    return phi, Cw, Cl, yw, yl


def token_logps(phi, C, y):
    return torch.log_softmax(phi + C, -1).gather(1, y[:, None])[:, 0]        # (L,)


def dpo_step_logits(phi, Cw, Cl, yw, yl, eta):
    """One real SGD step of DPO on φ; per-token log-probs of both responses before and after."""
    p = phi.detach().requires_grad_(True)
    tw, tl = token_logps(p, Cw, yw), token_logps(p, Cl, yl)
    lw, ll = tw.sum(), tl.sum()
    (g,) = torch.autograd.grad(dpo_loss(lw, ll, lw.detach(), ll.detach()), p)
    p1 = phi - eta * g
    with torch.no_grad():
        return (tw.detach(), tl.detach()), (token_logps(p1, Cw, yw), token_logps(p1, Cl, yl))


def theorem3_prediction(phi, Cw, Cl, yw, yl, k, *, eq12_as_printed=False):
    """Per-token Δlog π(y_w^i) / (η d) of Theorem 3: 0 before k, eq. (21) at k, eq. (13) after k.
    Also the rejected side (same derivation): −(1 + s[j*] − s[k*]) at k and
    (1 − s_l[j])(s_l[j] − s_w[j]) − Σ_{j'≠j} s_l[j'](s_l[j'] − s_w[j']) after k."""
    Sw, Sl = torch.softmax(phi + Cw, -1), torch.softmax(phi + Cl, -1)
    L = len(yw)
    pw, pl = torch.zeros(L, dtype=DT), torch.zeros(L, dtype=DT)
    j, kk = int(yw[k]), int(yl[k])
    s = Sw[k]
    pw[k] = 1 + (s[j] - s[kk]) if eq12_as_printed else 1 + (s[kk] - s[j])
    pl[k] = -(1 + s[j] - s[kk])
    for i in range(k + 1, L):
        ji, sw, sl = int(yw[i]), Sw[i], Sl[i]
        diff = sl - sw
        mask = torch.ones_like(sw, dtype=torch.bool)
        mask[ji] = False
        pw[i] = (1 - sw[ji]) * diff[ji] - (sw[mask] * diff[mask]).sum()         # eq. (13)
        pl[i] = (1 - sl[ji]) * diff[ji] - (sl[mask] * diff[mask]).sum()
    return pw, pl


@pytest.mark.parametrize("assumption", [True, False])
@pytest.mark.parametrize("L,k", [(6, 0), (7, 3), (9, 7)])
def test_theorem3_per_token_changes_second_order(L, k, assumption):
    phi, Cw, Cl, yw, yl = edit1_setting(L, k, assumption=assumption, seed=L + k)
    pw, pl = theorem3_prediction(phi, Cw, Cl, yw, yl, k)
    errs = []
    for eta in (1.0, 0.1, 0.01):
        (tw0, tl0), (tw1, tl1) = dpo_step_logits(phi, Cw, Cl, yw, yl, eta)
        dw, dl = tw1 - tw0, tl1 - tl0
        assert (dw[:k] == 0).all() and (dl[:k] == 0).all()       # eq. (11), exactly
        errs.append(max((dw - eta * D * pw).abs().max(), (dl - eta * D * pl).abs().max()))
    # O(η²): a tenfold smaller step gives a hundredfold smaller error
    assert 0.005 < errs[1] / errs[0] < 0.02 and 0.005 < errs[2] / errs[1] < 0.02
    assert errs[2] < 1e-6 * D
    assert pw[k] >= 0 and pl[k] <= 0
    if assumption:                                    # the signs of eq. (13) under Pal et al.'s assumption
        assert (pw[k + 1:] <= 0).all() and (pl[k + 1:] <= 0).all()


def test_theorem3_eq12_as_printed_has_the_sign_swapped():
    k = 2
    phi, Cw, Cl, yw, yl = edit1_setting(6, k, gap=4.0)
    s = torch.softmax(phi[k] + Cw[k], -1)
    assert s[0] - s[1] > 0.5                          # chosen token already much likelier
    eta = 1e-4
    (tw0, _), (tw1, _) = dpo_step_logits(phi, Cw, Cl, yw, yl, eta)
    actual = (tw1 - tw0)[k] / (eta * D)
    fixed = theorem3_prediction(phi, Cw, Cl, yw, yl, k)[0][k]
    printed = theorem3_prediction(phi, Cw, Cl, yw, yl, k, eq12_as_printed=True)[0][k]
    assert abs(actual - fixed) < 1e-3
    assert float(abs(actual - printed)) == pytest.approx(float(2 * (s[0] - s[1])), abs=1e-3)


def test_theorem3_needs_shared_parameters_after_m():
    """With independent variables for the chosen and rejected rows after m, the chosen suffix tokens
    rise by η d ‖e_j − s_w‖² > 0 instead of following eq. (13)."""
    L, k = 6, 1
    phi, Cw, Cl, yw, yl = edit1_setting(L, k)
    pw, _ = theorem3_prediction(phi, Cw, Cl, yw, yl, k)
    shared = phi[: k + 1].clone().requires_grad_(True)
    own_w = phi[k + 1:].clone().requires_grad_(True)
    own_l = phi[k + 1:].clone().requires_grad_(True)

    def logps(sh, ow, ol):
        tw = token_logps(torch.cat([sh, ow]), Cw, yw)
        tl = token_logps(torch.cat([sh, ol]), Cl, yl)
        return tw, tl

    tw, tl = logps(shared, own_w, own_l)
    loss = dpo_loss(tw.sum(), tl.sum(), tw.sum().detach(), tl.sum().detach())
    gs = torch.autograd.grad(loss, (shared, own_w, own_l))
    eta = 1e-4
    with torch.no_grad():
        tw1, _ = logps(*(p - eta * g for p, g in zip((shared, own_w, own_l), gs)))
    d = (tw1 - tw.detach())[k + 1:] / (eta * D)
    Sw = torch.softmax(phi + Cw, -1)[k + 1:]
    expected = ((F.one_hot(yw[k + 1:], Sw.shape[1]) - Sw) ** 2).sum(-1)
    assert (d > 0).all() and (pw[k + 1:] < 0).all()
    torch.testing.assert_close(d, expected, rtol=1e-3, atol=0)


@pytest.mark.parametrize("seed", range(3))
def test_theorem3_longer_shared_suffix_lowers_chosen_more(seed):
    """Fixed prefix and differing token; the shared suffix grows one token at a time. The one-step
    Δlog π_w falls monotonically (and turns negative), ⟨g_w,g_l⟩ grows."""
    k, Lmax, eta = 2, 16, 1e-2
    phi, Cw, Cl, yw, yl = edit1_setting(Lmax, k, seed=seed)
    dws, ips = [], []
    for L in range(k + 1, Lmax + 1):
        args = (phi[:L], Cw[:L], Cl[:L], yw[:L], yl[:L])
        (tw0, _), (tw1, _) = dpo_step_logits(*args, eta)
        dws.append(float((tw1 - tw0).sum()))
        p = phi[:L].clone().requires_grad_(True)
        gw, = torch.autograd.grad(token_logps(p, Cw[:L], yw[:L]).sum(), p)
        gl, = torch.autograd.grad(token_logps(p, Cl[:L], yl[:L]).sum(), p)
        ips.append(float((gw * gl).sum()))
        pw, _ = theorem3_prediction(*args, k)
        assert abs(dws[-1] - eta * D * float(pw.sum())) < 2 * (eta * D) ** 2 * L      # O(η²)
    assert all(b < a for a, b in zip(dws, dws[1:]))
    assert dws[0] > 0 > dws[-1]
    assert all(b >= a for a, b in zip(ips, ips[1:]))
