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
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from dynamics.core.conditions import first_difference, pair_token_decomposition, predict
from dynamics.core.grads import IMPLS, pair_inner_products
from dynamics.core.logprobs import TokenizedPairs, TokenizedSequence, pair_logprobs
from dynamics.core.losses import compute_loss

DT = torch.float64
BETA = 0.1
D = BETA / 2            # d_w = d_l = β σ(0) at the first step (reference = current model)
EPS = 2.0 ** -53        # unit round-off of float64


pytestmark = pytest.mark.usefixtures("one_thread")


def roundoff(n, scale):
    """Round-off bound of a float64 result reached through at most ``n`` roundings in sequence on
    terms whose magnitudes sum to ``scale``: Higham (Accuracy and Stability, Lemma 3.1 / Thm 3.1),
    |error| ≤ γ_n Σ|x_i| with γ_n = nu/(1−nu) ≤ 1.01 n u (nu < 0.01). Valid for any summation order."""
    assert n * EPS < 0.01
    return 1.01 * n * EPS * float(scale)


# ----------------------------------------------------------------------------- the project's side
# Each theorem's setting as a causal LM the project's code consumes: prompt = one token (id 0),
# response token j is scored by the logits at position j. `pair_inner_products`, `compute_loss`,
# `predict` and the Theorem 3 decomposition then have to reproduce the algebra below.
def seq(y):
    y = [int(t) for t in y]
    return TokenizedSequence((0,), tuple(y), tuple(str(t) for t in y))


def one_pair(yw, yl):
    return TokenizedPairs(["p"], [seq(yw)], [seq(yl)], pad_id=0)


class _FrozenBody(torch.nn.Module):
    """Hidden state at position p = the frozen row H[p] (one spare row for the last position)."""

    def __init__(self, H):
        super().__init__()
        self.register_buffer("H", torch.cat([H, torch.zeros(1, H.shape[1], dtype=DT)]))

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False):
        return SimpleNamespace(last_hidden_state=self.H[position_ids])


class FrozenStatesLM(torch.nn.Module):
    """Theorem 1 / Corollary 2: frozen hidden states H (L×d), learnable last layer θ (d×V);
    a body/head split, so every engine (ghost included) runs on it."""

    def __init__(self, H, theta):
        super().__init__()
        self.base_model = _FrozenBody(H)
        self.lm_head = torch.nn.Linear(*theta.shape, bias=False, dtype=DT)
        with torch.no_grad():
            self.lm_head.weight.copy_(theta.T)

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        return SimpleNamespace(logits=self.lm_head(self.base_model(input_ids, attention_mask, position_ids)
                                                   .last_hidden_state))


class PositionLogitsLM(torch.nn.Module):
    """Theorem 3: logits at position p = φ_p + C_p, with C = C_w when response token k (input
    position k+1) is y_w[k] = ``jstar``, else C_l (C_w = C_l up to p = k, so it is causal).
    ``separate=True``: the rows after k are two parameters, one per response (no sharing)."""

    def __init__(self, phi, Cw, Cl, k, jstar, separate=False):
        super().__init__()
        pad = lambda x: torch.cat([x, torch.zeros(1, x.shape[1], dtype=DT)])
        self.k, self.jstar, self.separate = k, jstar, separate
        self.register_buffer("Cw", pad(Cw))
        self.register_buffer("Cl", pad(Cl))
        if separate:
            self.shared = torch.nn.Parameter(phi[: k + 1].clone())
            self.own_w = torch.nn.Parameter(pad(phi[k + 1:]))
            self.own_l = torch.nn.Parameter(pad(phi[k + 1:]))
        else:
            self.phi = torch.nn.Parameter(pad(phi))

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        chosen = (input_ids[:, self.k + 1] == self.jstar)[:, None, None]          # (N, 1, 1)
        if self.separate:
            pw = torch.cat([self.shared, self.own_w])[position_ids]
            pl = torch.cat([self.shared, self.own_l])[position_ids]
            return SimpleNamespace(logits=torch.where(chosen, pw + self.Cw[position_ids], pl + self.Cl[position_ids]))
        C = torch.where(chosen, self.Cw[position_ids], self.Cl[position_ids])
        return SimpleNamespace(logits=self.phi[position_ids] + C)


def project_dpo_step(model, pairs, eta):
    """One SGD step of DPO through the project: `pair_logprobs`, `compute_loss` (reference = the
    model now), autograd. Returns the coefficients and the token log-probs before and after."""
    lp = pair_logprobs(model, pairs)
    lw, ll = lp.chosen.logp, lp.rejected.logp
    out = compute_loss("dpo", lw, ll, lw.detach(), ll.detach())
    ps = list(model.parameters())
    grads = torch.autograd.grad(out.loss.sum(), ps)
    with torch.no_grad():
        for p, g in zip(ps, grads):
            p -= eta * g
        after = pair_logprobs(model, pairs)
    before = (lp.chosen.token_logps[0].detach(), lp.rejected.token_logps[0].detach())
    return out, before, (after.chosen.token_logps[0], after.rejected.token_logps[0])


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


def uniform_bound(h, theta, support, seed=0):
    """σ with |s_j − 1/M| ≤ σ on the support. The logits there are 0 in exact arithmetic; computed,
    they are ±δ with δ ≤ roundoff(2d+8, 2|h|ᵀ(I + |h||h|ᵀ/‖h‖²)|R|) (θ = P R on the support, P
    and the d-term dot each a ≤ (d+4)-rounding chain), so e^{z_j}/Σe^{z_i} is within (e^{2δ}−1)/M
    of 1/M, plus the softmax's own (M+2)-rounding chain on terms ≤ 1."""
    d, V = theta.shape
    R = torch.randn(d, V, generator=torch.Generator().manual_seed(seed), dtype=DT)   # as in last_layer_theta
    hh = h @ h
    delta_max = roundoff(2 * d + 8, 2 * (h.abs() @ (torch.eye(d, dtype=DT) + torch.outer(h.abs(), h.abs()) / hh)
                                         @ R.abs())[support].max())
    delta = float((h @ theta)[support].abs().max())
    assert delta <= delta_max
    M = len(support)
    return (math.expm1(2 * delta) + roundoff(M + 2, 1)) / M


def ip_tol(hh, d, V, sig, scale):
    """|computed ⟨g_a,g_b⟩ − its closed form| for last-layer gradients g = h ⊗ (e − s):
    s within σ of the closed form's s moves ‖s‖² − s_a − s_b by ≤ 5σ; each gradient entry carries
    the logits / log-softmax / backward chain (≤ d+V+8 roundings, terms ≤ 1) plus σ, relative to
    |h_i|, moving the dot by ≤ 4‖h‖²ε_g; the dot itself sums d·V products of magnitudes ``scale``."""
    eg = roundoff(d + V + 8, 1) + sig
    return float(hh) * (5 * sig + 4 * eg) + roundoff(d * V, scale)


@pytest.mark.parametrize("V,M", [(50, 2), (50, 3), (50, 17), (50, 50), (1000, 40)])
def test_theorem1_inner_product_and_norms(V, M):
    g = torch.Generator().manual_seed(M)
    h = torch.randn(8, generator=g, dtype=DT) * 3
    d = h.numel()
    support = torch.randperm(V, generator=g)[:M]
    w, l = int(support[0]), int(support[1])
    theta = last_layer_theta(h, uniform_on(V, support))
    s = torch.softmax(h @ theta, -1)
    off = torch.ones(V, dtype=torch.bool)
    off[support] = False
    assert (s[off] == 0).all()                         # exp(−10⁴) underflows: exactly 0 off the support
    sig = uniform_bound(h, theta, support)
    assert (s[support] - 1 / M).abs().max() <= sig
    gw, gl = grad_logp(theta, h, w), grad_logp(theta, h, l)
    hh = h @ h
    tol = ip_tol(hh, d, V, sig, (gw.abs() * gw.abs()).sum())        # |g_w g_w| ≥ |g_w g_l| termwise here
    ww, wl, ll = (gw * gw).sum(), (gw * gl).sum(), (gl * gl).sum()
    assert abs(wl - (-hh / M)) <= tol                                   # ⟨g_w,g_l⟩ = −‖h‖²/M
    assert abs(ww - (M - 1) / M * hh) <= tol                            # ‖g‖² = (M−1)/M ‖h‖²
    assert abs(ll - (M - 1) / M * hh) <= tol
    # the project's engines on the same model: the closed forms and the autograd values above
    model = FrozenStatesLM(h[None], theta)
    for impl in IMPLS:
        ips = pair_inner_products(model, one_pair([w], [l]), impl=impl)
        assert abs(ips["ip_wl"][0] - (-hh / M)) <= tol, impl
        assert abs(ips["sq_w"][0] - (M - 1) / M * hh) <= tol and abs(ips["sq_l"][0] - (M - 1) / M * hh) <= tol, impl
        assert abs(ips["ip_wl"][0] - wl) <= 2 * tol and abs(ips["sq_w"][0] - ww) <= 2 * tol, impl
        assert abs(ips["cos_wl"][0] - (-1 / (M - 1))) <= 4 * tol / float(ww)   # cos = −1/(M−1), first order in tol/‖g‖²


def test_theorem1_general_identity_and_support_assumption():
    """Without the uniform assumption ⟨g_w,g_l⟩ = ‖h‖²(‖s‖² − s_w − s_l); with w or l outside
    the M-token support the inner product is 0, not −‖h‖²/M (the theorem needs both inside)."""
    g = torch.Generator().manual_seed(1)
    h = torch.randn(5, generator=g, dtype=DT)
    theta = torch.randn(5, 30, generator=g, dtype=DT)
    d, V = theta.shape
    s = torch.softmax(h @ theta, -1)
    hh = h @ h
    gw, gl = grad_logp(theta, h, 3), grad_logp(theta, h, 11)
    closed = hh * (s @ s - s[3] - s[11])
    # both sides: chains of ≤ d·V + d + V + 8 roundings on terms of total size ≤ 4‖h‖² (Σ|e_w−s||e_l−s| ≤ 2, ‖s‖² + s_w + s_l ≤ 3)
    tol = roundoff(d * V + d + V + 8, 8 * hh)
    assert abs((gw * gl).sum() - closed) <= tol
    model = FrozenStatesLM(h[None], theta)
    for impl in IMPLS:
        assert abs(pair_inner_products(model, one_pair([3], [11]), impl=impl)["ip_wl"][0] - closed) <= 2 * tol, impl
    theta = last_layer_theta(h, uniform_on(30, torch.arange(4)))
    gw0, gl20 = grad_logp(theta, h, 0), grad_logp(theta, h, 20)
    # exactly 0 in exact arithmetic; s_20 = 0 exactly (underflow) and s_j within σ of 1/4 on the support
    tol = ip_tol(hh, d, V, uniform_bound(h, theta, torch.arange(4)), (gw0.abs() * gw0.abs()).sum())
    assert abs((gw0 * gl20).sum()) <= tol
    model = FrozenStatesLM(h[None], theta)
    for impl in IMPLS:
        assert abs(pair_inner_products(model, one_pair([0], [20]), impl=impl)["ip_wl"][0]) <= tol, impl


@pytest.mark.parametrize("eta", [1e-3, 1e-1, 1.0, 30.0])
def test_theorem1_dpo_step_signs(eta):
    V, M = 50, 6
    g = torch.Generator().manual_seed(0)
    h = torch.randn(8, generator=g, dtype=DT)
    d = h.numel()
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
    sig = uniform_bound(h, theta, support)
    hh = float(h @ h)
    # Δz: the gradient's entries are exact up to σ and a (d+V+8)-chain; the two d-term logits round on |h||θ|, |h||θ'|
    zscale = float((h.abs() @ (theta.abs() + th1.abs())).max())
    tol_z = eta * D * hh * 2 * (sig + roundoff(d + V + 8, 1)) + roundoff(d + 2, zscale)
    assert (dz - eta * D * hh * e).abs().max() <= tol_z
    # the project: compute_loss's coefficients, the real step through pair_logprobs, predict's case
    model = FrozenStatesLM(h[None], theta)
    pairs = one_pair(yw, yl)
    ips = pair_inner_products(model, pairs, impl="ghost")
    out, (tw0, tl0), (tw1, tl1) = project_dpo_step(model, pairs, eta)
    assert abs(out.d_w[0] - D) <= roundoff(4, D) and abs(out.d_l[0] - D) <= roundoff(4, D)       # β σ(0)
    # the same step as above (both: log π' = z_y − logsumexp z, ≤ 2(d + V + 8) roundings on the logits' scale)
    tol_lp = 2 * tol_z + roundoff(2 * (d + V + 8), zscale + math.log(V))
    assert abs((tw1 - tw0)[0] - dw) <= 2 * tol_lp and abs((tl1 - tl0)[0] - dl) <= 2 * tol_lp
    p = predict(out.d_w, out.d_l, ips["ip_wl"], ips["sq_w"], ips["sq_l"], lr=eta)
    assert p["case"].tolist() == [1]
    # eq. 5 with Theorem 1: Δlog π_w ≈ η d (‖g_w‖² − ⟨g_w,g_l⟩) = η d ‖h‖², Δlog π_l ≈ −η d ‖h‖²
    tol_p = eta * D * 2 * ip_tol(hh, d, V, sig, hh)
    assert abs(p["dlogp_w"][0] - eta * D * hh) <= tol_p and abs(p["dlogp_l"][0] + eta * D * hh) <= tol_p
    # exactly (uniform s): Δlog π_{w,l} = ±a − log(1 + 2(cosh a − 1)/M), a = η d ‖h‖² (the shifted
    # logsumexp); s off uniform by σ moves the logsumexp by ≤ Mσe^{2a}
    a = eta * D * hh
    rem = math.log1p(2 * (math.cosh(a) - 1) / M)
    tol_x = 2 * tol_lp + M * sig * math.exp(2 * a)
    for dw_, dl_ in ((dw, dl), ((tw1 - tw0)[0], (tl1 - tl0)[0])):
        assert abs(dw_ - (a - rem)) <= tol_x and abs(dl_ - (-a - rem)) <= tol_x
    if eta <= 1e-3:                                   # first order: remainder ≤ 2(cosh a − 1)/M ≤ (a²/M) cosh a
        assert rem <= a * a / M * math.cosh(a) < 1e-3 * a


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


def sent_tol(theta, H, yw, yl, sig=0.0):
    """Round-off bound for Gram entries of sentence gradients g = Σ_t h_t ⊗ (e_{y_t} − s_t) and their
    closed forms: per entry an L-term sum after each token's (d+V+8)-rounding chain, then a d·V-term
    dot, on the scale of |g|-products bounded by A = Σ_t |h_t| ⊗ |e − s_t|; plus 8‖h_L‖²σ for s_L
    within σ of uniform (closed forms in ‖h_L‖² and c assume it exactly)."""
    d, V = theta.shape
    S = torch.softmax(H @ theta, -1)
    A = lambda y: H.abs().T @ (F.one_hot(y, V) - S).abs()                    # (d, V)
    Aw, Al = A(yw), A(yl)
    scale = ((Aw + Al) ** 2).sum()
    return roundoff(d * V + len(yw) + d + V + 8, scale) + 8 * float(H[-1] @ H[-1]) * sig


def project_grams(theta, H, yw, yl, ww, ll, wl, tol):
    """`pair_inner_products` (every engine) on the frozen-states model = the autograd Gram above."""
    model = FrozenStatesLM(H, theta)
    for impl in IMPLS:
        ips = pair_inner_products(model, one_pair(yw, yl), impl=impl)
        assert abs(ips["sq_w"][0] - ww) <= 2 * tol and abs(ips["sq_l"][0] - ll) <= 2 * tol, impl
        assert abs(ips["ip_wl"][0] - wl) <= 2 * tol, impl
    return model, ips


@pytest.mark.parametrize("L,M", [(2, 3), (5, 4), (9, 10)])
def test_corollary2_holds_when_prefix_states_orthogonal(L, M):
    H, theta, yw, yl = corollary_setting(L, M, hidden="orthogonal", seed=L)
    gw, gl = sentence_grads(theta, H, yw, yl)
    ww, ll, wl = (gw * gw).sum(), (gl * gl).sum(), (gw * gl).sum()
    # h_i ⊥ h_L holds up to the round-off of the projection (≤ d+4 roundings on |noise|·|h_L|): c ≈ 0
    tol = sent_tol(theta, H, yw, yl, uniform_bound(H[-1], theta, torch.arange(M), seed=L))
    tol += 4 * roundoff(H.shape[1] + 4, (H[:-1].abs() @ H[-1].abs()).max() * 2 * (L - 1))
    assert abs(ww - ll) <= tol                                        # ‖g_w‖² = ‖g_l‖²
    assert wl <= ww
    hh = H[-1] @ H[-1]
    assert abs((ww - wl) - hh) <= tol                                 # ⟨g_w, g_w − g_l⟩ = ‖h_L‖²
    _, (lw0, ll0), (lw1, ll1) = dpo_step_last_layer(theta, H, yw, yl, 1e-2)
    assert lw1 > lw0 and ll1 < ll0
    model, ips = project_grams(theta, H, yw, yl, ww, ll, wl, tol)
    out, (tw0, tl0), (tw1, tl1) = project_dpo_step(model, one_pair(yw, yl), 1e-2)
    p = predict(out.d_w, out.d_l, ips["ip_wl"], ips["sq_w"], ips["sq_l"], lr=1e-2)
    assert p["case"].tolist() == [1] and tw1.sum() > tw0.sum() and tl1.sum() < tl0.sum()
    assert abs(p["dlogp_w"][0] - 1e-2 * D * hh) <= 1e-2 * D * 3 * tol    # eq. 5 = η d ‖h_L‖²


@pytest.mark.parametrize("seed", range(4))
def test_corollary2_general_identities(seed):
    """The corrected statement: ‖g_w‖² − ‖g_l‖² = 2c, ⟨g_w,g_w−g_l⟩ = ‖h_L‖² + c,
    ⟨g_l,g_l−g_w⟩ = ‖h_L‖² − c (uniform s_L); c ≠ 0 generically, so the norms differ."""
    H, theta, yw, yl = corollary_setting(6, 5, hidden="generic", seed=seed)
    gw, gl = sentence_grads(theta, H, yw, yl)
    ww, ll, wl = (gw * gw).sum(), (gl * gl).sum(), (gw * gl).sum()
    c, hh = c_term(theta, H, yw, yl), H[-1] @ H[-1]
    tol = sent_tol(theta, H, yw, yl, uniform_bound(H[-1], theta, torch.arange(5), seed=seed))
    assert abs((ww - ll) - 2 * c) <= tol
    assert abs((ww - wl) - (hh + c)) <= tol and abs((ll - wl) - (hh - c)) <= tol
    assert abs(ww - ll) > 1e-3 * ww                                  # the equality of the corollary fails
    # the corrected criterion gives the signs of a real DPO step; log π_w falls for seeds 0-3 here
    # (‖h_L‖² + c < 0 in 35 of 200 random instances of this setting)
    eta = 1e-3
    _, (lw0, ll0), (lw1, ll1) = dpo_step_last_layer(theta, H, yw, yl, eta)
    # (rel=1e-2: the O(η²) remainder of a first-order prediction, not round-off)
    assert float(lw1 - lw0) == pytest.approx(float(eta * D * (hh + c)), rel=1e-2)
    assert float(ll1 - ll0) == pytest.approx(float(eta * D * (c - hh)), rel=1e-2)
    # the project: its Gram, coefficients and eq. 5 give the corrected first-order values; its own
    # real step agrees with the one above (the same float64 step, two code paths)
    model, ips = project_grams(theta, H, yw, yl, ww, ll, wl, tol)
    out, (tw0, tl0), (tw1, tl1) = project_dpo_step(model, one_pair(yw, yl), eta)
    p = predict(out.d_w, out.d_l, ips["ip_wl"], ips["sq_w"], ips["sq_l"], lr=eta)
    assert abs(p["dlogp_w"][0] - eta * D * (hh + c)) <= eta * D * 4 * tol
    assert abs(p["dlogp_l"][0] - eta * D * (c - hh)) <= eta * D * 4 * tol
    assert float((tw1 - tw0).sum()) == pytest.approx(float(lw1 - lw0), rel=1e-9)  # Δ of ~1e-4 from logps of ~10: 1e-9 ≫ 1e4·n·u
    assert float((tl1 - tl0).sum()) == pytest.approx(float(ll1 - ll0), rel=1e-9)


def test_corollary2_counterexample_both_decrease():
    """h_i = h_L and the shared prefix repeats y_l[L]: c = −(L−1)‖h‖², so ⟨g_w,g_l⟩ > ‖g_w‖² and a real
    DPO step lowers both log π_w (by ≈ η d (L−2)‖h‖²) and log π_l (by ≈ η d L‖h‖²)."""
    L, M = 4, 5
    H, theta, yw, yl = corollary_setting(L, M, hidden="same", prefix="rejected")
    gw, gl = sentence_grads(theta, H, yw, yl)
    ww, ll, wl = (gw * gw).sum(), (gl * gl).sum(), (gw * gl).sum()
    hh = H[-1] @ H[-1]
    assert abs(c_term(theta, H, yw, yl) + (L - 1) * hh) <= sent_tol(theta, H, yw, yl, uniform_bound(H[-1], theta, torch.arange(M)))
    assert wl > ww and abs(ww - ll) > 0.1 * ww
    model, ips = project_grams(theta, H, yw, yl, ww, ll, wl, sent_tol(theta, H, yw, yl))
    out, (tw0, tl0), (tw1, tl1) = project_dpo_step(model, one_pair(yw, yl), 1e-3)
    p = predict(out.d_w, out.d_l, ips["ip_wl"], ips["sq_w"], ips["sq_l"], lr=1e-3)
    assert p["case"].tolist() == [2]                                  # the project predicts: both fall
    assert tw1.sum() < tw0.sum() and tl1.sum() < tl0.sum()            # and its real step does
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


def project_decomposition(phi, Cw, Cl, yw, yl, k, *, separate=False, impl="autograd"):
    """The project's Theorem 3 decomposition (`pair_token_decomposition`, token Grams of `impl`) on
    the model of this setting, with DPO's coefficients from `compute_loss` at π = π_ref, η = 1."""
    model = PositionLogitsLM(phi, Cw, Cl, k, int(yw[k]), separate)
    z = torch.zeros(1, dtype=DT)
    coef = compute_loss("dpo", z, z, z, z)
    assert first_difference(seq(yw).response_ids, seq(yl).response_ids) == k
    return pair_token_decomposition(model, seq(yw), seq(yl), 0, coef.d_w[0], coef.d_l[0], 1.0, impl=impl)


def token_tol(L, V):
    """Round-off bound, in units of η d, for a per-token prediction: an L-term sum over the token
    Gram row (2L entries, each a ((L+1)·V)-term dot of gradients with ‖g^t‖² ≤ 2, so Σ|terms| ≤ 8L)
    and eq. (13)'s V-term sums (≤ V + 16 roundings)."""
    return roundoff((L + 1) * V + 2 * L + V + 16, 8 * L)


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
    # the project's decomposition is eqs. (11), (21), (13) on both sides, for each engine
    tol = token_tol(L, phi.shape[1])
    for impl in ("autograd", "func"):
        dec = project_decomposition(phi, Cw, Cl, yw, yl, k, impl=impl)
        assert dec["m"] == k
        assert (dec["tok_w"] / D - pw).abs().max() <= 2 * tol and (dec["tok_l"] / D - pl).abs().max() <= 2 * tol, impl
        assert abs(dec["w_before"]) <= D * k * tol and abs(dec["l_before"]) <= D * k * tol       # eq. (11)
        assert abs(dec["w_at"] / D - pw[k]) <= 2 * tol and abs(dec["w_after"] / D - pw[k + 1:].sum()) <= 2 * L * tol


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
    assert abs(actual - fixed) < 1e-3                 # O(η) remainder of the first-order value at η = 1e-4
    assert float(abs(actual - printed)) == pytest.approx(float(2 * (s[0] - s[1])), abs=1e-3)
    at = project_decomposition(phi, Cw, Cl, yw, yl, k)["w_at"] / D
    assert abs(at - fixed) <= 2 * token_tol(6, phi.shape[1])
    assert float(abs(at - printed)) == pytest.approx(float(2 * (s[0] - s[1])), abs=4 * token_tol(6, phi.shape[1]))


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
    torch.testing.assert_close(d, expected, rtol=1e-3, atol=0)       # O(η) remainder at η = 1e-4
    # the project on the model with separate rows after m: its decomposition gives the same rise
    dec = project_decomposition(phi, Cw, Cl, yw, yl, k, separate=True)
    assert (dec["tok_w"][k + 1:] / D - expected).abs().max() <= 2 * token_tol(L, phi.shape[1])
    shared = project_decomposition(phi, Cw, Cl, yw, yl, k)
    assert (shared["tok_w"][k + 1:] / D - pw[k + 1:]).abs().max() <= 2 * token_tol(L, phi.shape[1])


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
        # the project: its ⟨g_w,g_l⟩ and eq. 5 on this length's model
        ips_p = pair_inner_products(PositionLogitsLM(*args[:3], k, int(yw[k])), one_pair(yw[:L], yl[:L]), impl="func")
        tol = token_tol(L, phi.shape[1]) * L                                        # the L-token sentence sums
        assert abs(ips_p["ip_wl"][0] - ips[-1]) <= 2 * tol
        p = predict(torch.tensor([D], dtype=DT), torch.tensor([D], dtype=DT), ips_p["ip_wl"], ips_p["sq_w"], ips_p["sq_l"], lr=eta)
        assert abs(p["dlogp_w"][0] / (eta * D) - pw.sum()) <= 4 * tol
    assert all(b < a for a, b in zip(dws, dws[1:]))
    assert dws[0] > 0 > dws[-1]
    assert all(b >= a for a, b in zip(ips, ips[1:]))
