"""The squeezing effect and the digits warm-up of the learning-dynamics paper (seed 000).

Two experiments, each split into a data function (returns a tidy long-format DataFrame) and a
plotting function (reads that DataFrame only):

* `run_toy` / `plot_toy`: a linear softmax model ``z = W x`` and one exact gradient step on
  ``log π(y|x)``. A *positive* step ascends ``log π(y)`` (SFT, DPO's ``y_w``); a *negative* step
  descends it (DPO's ``y_l``). Seed 000 (Fig. 2, "squeezing effect"): a negative gradient on a
  low-probability ("valley") label of a peaky distribution moves mass to the argmax, because the
  logit change ``Δz = -η‖x‖²(e_y − π)`` raises every other logit in proportion to its
  probability. The step is taken with autograd on ``W``; `closed_form_logit_change` is the
  cross-check.
* `run_digits` / `plot_digits`: the MNIST warm-up with sklearn's 8×8 digits. A small float64 MLP
  is trained; then for update examples ``u`` (class ``c``) one SGD step on ``-log π(c|x_u)`` and
  the change of ``log π(y_o|x_o)`` and ``log π(c|x_o)`` on held-out ``o``, next to the first-order
  (eNTK) prediction ``η⟨∇log π(·|x_o), ∇log π(c|x_u)⟩`` from exact per-example gradients
  (``torch.func``) and its residual.

`reproduce_toy_and_digits` runs both and writes data (Parquet/CSV) and figures (PNG+PDF).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from torch.func import functional_call, grad, vmap

from dynamics.tools.plots import CHOSEN, REJECTED, STYLE, save_figure

DTYPE = torch.float64
SIGNS = {"positive": 1.0, "negative": -1.0}
# case -> (direction of the step, shape of the distribution, which label is the target)
TOY_CASES = {
    "positive_valley": ("positive", "peaky", "valley"),
    "negative_flat": ("negative", "flat", "valley"),
    "negative_peak": ("negative", "peaky", "peak"),
    "negative_valley": ("negative", "peaky", "valley"),
}


# ----------------------------------------------------------------------------- toy model
def entropy(p: np.ndarray) -> float:
    """Shannon entropy in nats (0·log 0 = 0)."""
    p = np.asarray(p, dtype=float)
    nz = p[p > 0]
    return float(-(nz * np.log(nz)).sum())


def toy_logits(V: int, shape: str, *, seed: int = 0) -> torch.Tensor:
    """Target logits (V,): ``flat`` near-uniform, ``peaky`` one dominant label (p ≈ 0.8)."""
    if shape not in ("flat", "peaky"):
        raise ValueError(f"unknown shape {shape!r}; known: flat, peaky")
    g = torch.Generator().manual_seed(seed)
    if shape == "flat":
        return 0.01 * torch.randn(V, generator=g, dtype=DTYPE)
    z = torch.randn(V, generator=g, dtype=DTYPE)
    z[int(torch.randint(V, (1,), generator=g))] = math.log(V) + 2.0  # e²/(e²+V·E e^z/V) ≈ 0.82
    return z


def toy_model(V: int, d: int, shape: str, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A generic ``W`` (V×d) and unit-norm input ``x`` (d,) with ``W x`` = `toy_logits`.

    ``W = z xᵀ/‖x‖² + R (I − x xᵀ/‖x‖²)``: the random ``R`` part does not touch this input.
    """
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(d, generator=g, dtype=DTYPE)
    x = x / x.norm()
    R = torch.randn(V, d, generator=g, dtype=DTYPE)
    P = torch.eye(d, dtype=DTYPE) - torch.outer(x, x)
    W = torch.outer(toy_logits(V, shape, seed=seed), x) + R @ P
    return W, x


def sgd_step_logits(W: torch.Tensor, x: torch.Tensor, y: int, eta: float, sign: float
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """One exact SGD step (autograd) on ``loss = -sign·log π(y|x)``; returns logits before, after.

    ``sign=+1`` ascends ``log π(y)`` (positive gradient), ``sign=-1`` descends it (negative).
    """
    W = W.detach().clone().requires_grad_(True)
    z = W @ x                                    # (V,)
    loss = -sign * torch.log_softmax(z, -1)[y]
    (gW,) = torch.autograd.grad(loss, W)
    with torch.no_grad():
        z_after = (W - eta * gW) @ x
    return z.detach(), z_after


def closed_form_logit_change(pi: torch.Tensor, y: int, x: torch.Tensor, eta: float, sign: float
                             ) -> torch.Tensor:
    """Δz for a linear softmax with learnable ``W``, one example: ``η·sign·‖x‖²·(e_y − π)``.

    (∇_W log π(y) = (e_y − π) xᵀ, so ΔW = η·sign·(e_y − π) xᵀ and Δz = ΔW x.)
    """
    e = torch.zeros_like(pi)
    e[y] = 1.0
    return eta * sign * (x @ x) * (e - pi)


def run_toy(V_list=(50, 1000), *, d: int = 4, eta: float = 2.0, seed: int = 0) -> pd.DataFrame:
    """One step per case of `TOY_CASES` for each vocabulary size; one row per (V, case, label).

    Columns: V, case, direction, shape, eta, label, p_before, p_after, is_target, is_argmax
    (``is_argmax``: argmax of the distribution *before* the step).
    """
    rows = []
    for V in V_list:
        for case, (direction, shape, which) in TOY_CASES.items():
            W, x = toy_model(V, d, shape, seed=seed)
            pi = torch.softmax(W @ x, -1)
            y = int(pi.argmax()) if which == "peak" else int(pi.argmin())
            z0, z1 = sgd_step_logits(W, x, y, eta, SIGNS[direction])
            p0, p1 = torch.softmax(z0, -1).numpy(), torch.softmax(z1, -1).numpy()
            am = int(p0.argmax())
            for j in range(V):
                rows.append(dict(V=V, case=case, direction=direction, shape=shape, eta=eta, label=j,
                                 p_before=p0[j], p_after=p1[j], is_target=j == y, is_argmax=j == am))
    return pd.DataFrame(rows)


def toy_summary(df: pd.DataFrame) -> pd.DataFrame:
    """Per (V, case): argmax mass, entropy and target probability before and after the step."""
    out = []
    for (V, case), g in df.groupby(["V", "case"], sort=False):
        t, a = g[g.is_target].iloc[0], g[g.is_argmax].iloc[0]
        out.append(dict(V=V, case=case, direction=g.direction.iloc[0], shape=g["shape"].iloc[0],
                        p_argmax_before=a.p_before, p_argmax_after=a.p_after,
                        entropy_before=entropy(g.p_before), entropy_after=entropy(g.p_after),
                        p_target_before=t.p_before, p_target_after=t.p_after,
                        argmax_after_is_same=bool(g.p_after.values.argmax() == g.p_before.values.argmax())))
    return pd.DataFrame(out)


def plot_toy(df: pd.DataFrame, axes=None, *, V: int | None = None):
    """One row per case: the distribution before (grey) and after (colour) the step, labels sorted
    by their probability before; linear axis left, log axis right; the target label marked."""
    V = int(df.V.min()) if V is None else V
    d = df[df.V == V]
    cases = list(dict.fromkeys(d.case))
    with plt.rc_context(STYLE):
        if axes is None:
            fig, axes = plt.subplots(len(cases), 2, figsize=(6.8, 1.5 * len(cases)), squeeze=False)
        else:
            axes = np.asarray(axes).reshape(len(cases), 2)
            fig = axes[0, 0].figure
        for r, case in enumerate(cases):
            g = d[d.case == case].sort_values("p_before", ascending=False).reset_index(drop=True)
            color = CHOSEN if g.direction.iloc[0] == "positive" else REJECTED
            rank = np.arange(len(g))
            t = int(np.flatnonzero(g.is_target.values)[0])
            for c, ax in enumerate(axes[r]):
                ax.plot(rank, g.p_before, color="0.6", lw=1.0, label="before")
                ax.plot(rank, g.p_after, color=color, lw=1.0, label="after")
                ax.scatter([t, t], [g.p_before[t], g.p_after[t]], color=["0.4", color], s=14, zorder=3,
                           marker="v", label="target $y$" if c == 0 else None)
                if c == 1:
                    ax.set_yscale("log")
                ax.set_title(f"{case.replace('_', ' ')} (V={V})" + (", log" if c else ""))
            axes[r, 0].set_ylabel(r"$\pi(j|x)$")
        for ax in axes[-1]:
            ax.set_xlabel("label rank (by $\\pi$ before)")
        axes[0, 0].legend(frameon=False)
        fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- digits warm-up
class MLP(torch.nn.Module):
    def __init__(self, d_in: int = 64, hidden: int = 32, n_classes: int = 10):
        super().__init__()
        self.fc1 = torch.nn.Linear(d_in, hidden)
        self.fc2 = torch.nn.Linear(hidden, n_classes)

    def forward(self, x):  # (B, 64) -> (B, 10) logits
        return self.fc2(torch.tanh(self.fc1(x)))


def load_digits_split(*, test_frac: float = 0.3, seed: int = 0):
    """sklearn's 8×8 digits scaled to [0, 1], float64, a deterministic random split."""
    from sklearn.datasets import load_digits
    X, y = load_digits(return_X_y=True)
    perm = np.random.default_rng(seed).permutation(len(y))
    n_test = int(round(test_frac * len(y)))
    te, tr = perm[:n_test], perm[n_test:]
    X = torch.tensor(X / 16.0, dtype=DTYPE)
    y = torch.tensor(y, dtype=torch.long)
    return X[tr], y[tr], X[te], y[te]


def train_digits(X, y, *, hidden: int = 32, steps: int = 300, lr: float = 1e-2, seed: int = 0) -> MLP:
    """Full-batch Adam on the NLL, float64, deterministic."""
    torch.manual_seed(seed)
    model = MLP(X.shape[1], hidden, 10).to(DTYPE)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
    return model.eval()


def _flat_grads(model, params, X, Y, chunk_size=None) -> torch.Tensor:
    """Per-example ∇_θ log π(Y_i|X_i), flattened: (N, P)."""
    def logp(p, x, t):
        return torch.log_softmax(functional_call(model, p, (x[None],))[0], -1).gather(0, t[None])[0]
    g = vmap(grad(logp), in_dims=(None, 0, 0), chunk_size=chunk_size)(params, X, Y)
    return torch.cat([g[k].reshape(len(X), -1) for k in params], 1)


def _unflatten(vec, params):
    out, i = {}, 0
    for k, p in params.items():
        out[k] = vec[i:i + p.numel()].view_as(p)
        i += p.numel()
    return out


@contextmanager
def _threads(n: int | None):
    """Temporarily set torch's intra-op threads (tiny matrices: extra threads only contend)."""
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def run_digits(*, etas=(0.1, 0.01), n_update_per_class: int = 5, n_observe: int | None = None,
               steps: int = 300, hidden: int = 32, seed: int = 0, num_threads: int | None = 1
               ) -> pd.DataFrame:
    """One SGD step on ``-log π(c|x_u)`` per update example; effects on held-out examples.

    Update examples: the first ``n_update_per_class`` of each class in the training split;
    observed: the held-out split (``n_observe`` per class, all by default). One row per
    (eta, u, o): ``u_idx, u_class, u_sq`` (‖∇log π(c|x_u)‖²; the step length is η·√u_sq),
    ``o_idx, o_class, acc`` (held-out accuracy), ``d_true, pred_true, resid_true`` (actual,
    first-order and residual Δlog π(y_o|x_o)) and ``d_c, pred_c, resid_c`` (the same for
    log π(c|x_o)). First order: Δθ = η ∇log π(c|x_u), so ``pred = η ⟨∇log π(·|x_o), ∇log π(c|x_u)⟩``,
    which is ``-η A K G`` of seed 000 with exact per-example gradients (``torch.func``).
    ``num_threads``: torch threads while it runs (restored after); ``None`` leaves them alone.
    """
    with _threads(num_threads):
        return _run_digits(etas, n_update_per_class, n_observe, steps, hidden, seed)


def _run_digits(etas, n_update_per_class, n_observe, steps, hidden, seed) -> pd.DataFrame:
    Xtr, ytr, Xte, yte = load_digits_split(seed=seed)
    model = train_digits(Xtr, ytr, hidden=hidden, steps=steps, seed=seed)
    params = {k: v.detach() for k, v in model.named_parameters()}
    with torch.no_grad():
        logp0 = torch.log_softmax(model(Xte), -1)                               # (O, 10)
    acc = float((logp0.argmax(-1) == yte).float().mean())
    if n_observe is not None:
        keep = torch.cat([torch.nonzero(yte == c)[:n_observe, 0] for c in range(10)])
        Xte, yte, logp0 = Xte[keep], yte[keep], logp0[keep]
    else:
        keep = torch.arange(len(yte))
    # update examples: the first n per class of the training split (deterministic)
    u_idx = torch.cat([torch.nonzero(ytr == c)[:n_update_per_class, 0] for c in range(10)])
    Gu = _flat_grads(model, params, Xtr[u_idx], ytr[u_idx])                     # (U, P)
    Go = _flat_grads(model, params, Xte, yte)                                   # (O, P)
    K_true = Go @ Gu.T                                                          # (O, U)
    K_c = torch.empty_like(K_true)
    for c in range(10):                                 # ∇log π(c|x_o) for the u of class c
        cols = torch.nonzero(ytr[u_idx] == c)[:, 0]
        Gc = _flat_grads(model, params, Xte, torch.full_like(yte, c))
        K_c[:, cols] = Gc @ Gu[cols].T
    rows = []
    for eta in etas:
        for j, ui in enumerate(u_idx.tolist()):
            c = int(ytr[ui])
            new = _unflatten(torch.cat([p.flatten() for p in params.values()]) + eta * Gu[j], params)
            with torch.no_grad():
                logp1 = torch.log_softmax(functional_call(model, new, (Xte,)), -1)
            d = logp1 - logp0
            rows.append(pd.DataFrame(dict(
                eta=eta, u_idx=ui, u_class=c, u_sq=float(Gu[j] @ Gu[j]), o_idx=keep.numpy(),
                o_class=yte.numpy(), acc=acc,
                d_true=d.gather(1, yte[:, None])[:, 0].numpy(), pred_true=(eta * K_true[:, j]).numpy(),
                d_c=d[:, c].numpy(), pred_c=(eta * K_c[:, j]).numpy())))
    df = pd.concat(rows, ignore_index=True)
    return df.assign(resid_true=df.d_true - df.pred_true, resid_c=df.d_c - df.pred_c)


def digits_residuals(df: pd.DataFrame) -> pd.DataFrame:
    """Per eta: relative residual ‖d − pred‖/‖d‖ over all (u, o), for both targets."""
    def rel(g, a, b):
        return float(np.linalg.norm(g[a] - g[b]) / np.linalg.norm(g[a]))
    return pd.DataFrame([dict(eta=eta, rel_resid_true=rel(g, "d_true", "pred_true"),
                              rel_resid_c=rel(g, "d_c", "pred_c"),
                              mean_abs_d_true=float(g.d_true.abs().mean()))
                         for eta, g in df.groupby("eta")])


def digits_heatmap(df: pd.DataFrame, value: str = "d_true", eta: float | None = None, *,
                   normalize: bool = False) -> pd.DataFrame:
    """10×10 mean of ``value`` (rows: class of u, columns: class of o) at one eta (largest by default).

    ``normalize``: divide each update's changes by the length of its parameter step η‖∇log π(c|x_u)‖
    (first order: ⟨∇log π(·|x_o), unit step⟩), so that every update example weighs the same however
    confident the model already is on it (a fitted example has a tiny gradient).
    """
    eta = df.eta.max() if eta is None else eta
    d = df[df.eta == eta]
    if normalize:
        d = d.assign(**{value: d[value] / (eta * np.sqrt(d.u_sq))})
    return d.pivot_table(index="u_class", columns="o_class", values=value, aggfunc="mean")


def plot_digits(df: pd.DataFrame, ax=None, *, value: str = "d_true", eta: float | None = None,
                normalize: bool = True):
    """Heatmap of the mean one-step change (class of the update example × class of the observed
    example), by default normalized per update (`digits_heatmap`); diverging colours centred at 0."""
    H = digits_heatmap(df, value, eta, normalize=normalize)
    eta = df.eta.max() if eta is None else eta
    with plt.rc_context(STYLE):
        if ax is None:
            fig, ax = plt.subplots(figsize=(3.6, 3.0))
        fig = ax.figure
        lim = float(np.abs(H.values).max())
        im = ax.imshow(H.values, cmap="RdBu", vmin=-lim, vmax=lim)
        ax.set_xticks(range(10), H.columns)
        ax.set_yticks(range(10), H.index)
        ax.set_xlabel("class of observed $x_o$")
        ax.set_ylabel("class of update $x_u$")
        what = r"\log\pi(y_o|x_o)" if value.endswith("true") else r"\log\pi(c_u|x_o)"
        norm = r" / $\|\Delta\theta\|$" if normalize else ""
        ax.set_title(rf"mean $\Delta {what}${norm}, $\eta$={eta:g}")
        fig.colorbar(im, ax=ax, shrink=0.85)
    return fig


def plot_digits_fit(df: pd.DataFrame, ax=None):
    """Actual Δlog π(y_o|x_o) against the first-order prediction, one colour per eta."""
    with plt.rc_context(STYLE):
        if ax is None:
            fig, ax = plt.subplots(figsize=(3.4, 2.6))
        fig = ax.figure
        for i, (eta, g) in enumerate(df.groupby("eta")):
            s = g.pred_true.abs().max()
            ax.scatter(g.pred_true / s, g.d_true / s, s=3, lw=0, alpha=0.5, color=plt.get_cmap("tab10")(i),
                       label=f"η={eta:g}")
        ax.plot([-1, 1], [-1, 1], color="0.5", lw=0.8, ls="--")
        ax.set_xlabel("first-order prediction (scaled)")
        ax.set_ylabel(r"actual $\Delta\log\pi(y_o|x_o)$ (scaled)")
        ax.legend(frameon=False, markerscale=3)
    return fig


# ----------------------------------------------------------------------------- reproduce
def reproduce_toy_and_digits(out_dir, quick: bool = True) -> list[Path]:
    """Run both experiments; write data (Parquet, CSV summaries) and figures (PNG+PDF).

    ``quick``: 2 update examples per class, 300 training steps, η ∈ {0.1, 0.01} (seconds);
    otherwise 20 per class and η ∈ {0.3, 0.1, 0.03, 0.01}.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    toy = run_toy()
    toy.to_parquet(out / "toy_squeezing.parquet")
    toy_summary(toy).to_csv(out / "toy_squeezing_summary.csv", index=False)
    paths += [out / "toy_squeezing.parquet", out / "toy_squeezing_summary.csv"]
    for V in sorted(toy.V.unique()):
        paths += save_figure(plot_toy(toy, V=int(V)), out / f"toy_squeezing_V{V}")
    etas = (0.1, 0.01) if quick else (0.3, 0.1, 0.03, 0.01)
    dig = run_digits(etas=etas, n_update_per_class=2 if quick else 20)
    dig.to_parquet(out / "digits_dynamics.parquet")
    digits_residuals(dig).to_csv(out / "digits_residuals.csv", index=False)
    paths += [out / "digits_dynamics.parquet", out / "digits_residuals.csv"]
    paths += save_figure(plot_digits(dig), out / "digits_heatmap")
    paths += save_figure(plot_digits(dig, value="d_c"), out / "digits_heatmap_class_u")
    paths += save_figure(plot_digits_fit(dig), out / "digits_first_order")
    return paths
