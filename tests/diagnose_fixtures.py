"""Synthetic run directories whose diagnosis is known by construction, and a headless-Chromium
renderer, for `tests/test_diagnose.py`.

`write_scenario` writes the run described by `SCENARIO`: three probe pairs A, B, C recorded at
steps 0..10 (eval_every = 1; step 10 is the final state-only row), the rows computed as the
recorder computes them (`compute_loss` for d_w, d_l; `predict` for pred_*, thr_*, case_pred;
`case` for case_obs; `what_if` for whatif.parquet), from chosen one-step changes chosen so that

- the mean chosen log-prob falls only over steps 4→8 (A: −1 per step, B: −0.1, C: +0.2 there);
- A dominates the drop (A −3.4, B −0.1, C +2.0 from step 0 to 10; mean −0.5);
- ⟨g_w,g_l⟩ = 1.5 > thr_w = ‖g_w‖² = 1 (DPO) exactly at A@4, A@5, A@6 (3 of 30 pair-steps),
  elsewhere ⟨g_w,g_l⟩ = 0.5; ‖g_l‖² = 4, so cos_wl = 0.75 there and 0.25 elsewhere;
- the real update's ⟨g_w,Δθ⟩ (upd_dw) equals act_dw except at B@6, B@7 (+0.02): so of the 8
  falls, 3 are the pair's own gradient (A@4..6), 3 the rest of the update (A@7, B@4, B@5: pred_dw > 0,
  upd_dw < 0) and 2 curvature (B@6, B@7).

With ``in_run`` (`write_train_records`, `TRAIN`): four training pairs ``t{s}_{i}`` per step (micro-batch
i // 2), margin 0 so d_w = d_l = 0.05 (DPO, β = 0.1); at steps 4..7 pairs i = 0, 1 have ⟨g_w,g_l⟩ =
1.2, 1.3, …, 1.9 (in step order) > thr_w = ‖g_w‖² = 1 (case 2: both fall, 8 pair-steps), elsewhere
0.5 (case 1); at step 9, t9_2 has no gradient to the rejected response (d_l = 0) and t9_3 is all NaN.

With ``cross`` (`contribution_rows`, `CROSS`): the same training pairs split each probe's upd (SGD,
lr 1, B = 4: contribution = 0.0125 (k_w − k_l)); at the fall steps 4..7 t{s}_0 pushes A's chosen
down by −0.8 of −1.0 (residual −0.05), t{s}_1 pushes B's by −0.08 of −0.1 at steps 4, 5; elsewhere
each training pair and the residual get 0.2·upd. The probes are held out (no probe is a training pair).
"""
from __future__ import annotations

import fcntl
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from dynamics.core.conditions import case, predict, what_if
from dynamics.core.inrun import MISSING_REASONS, NONCONSTANT_REASON, predict_with_missing
from dynamics.core.losses import compute_loss
from dynamics.runs.rundir import RunDir, save_token_gram

PAIRS = ("A", "B", "C")
STEPS = 10                                                     # gradient steps 0..9, final state at 10
FALL = range(4, 8)                                             # steps whose update lowers the mean


def _act_dw(pair: str, step: int) -> float:
    if step in FALL:
        return {"A": -1.0, "B": -0.1, "C": 0.2}[pair]
    return {"A": 0.1, "B": 0.05, "C": 0.2}[pair]


SCENARIO = dict(
    logp_w0={"A": -50.0, "B": -60.0, "C": -40.0}, logp_l0={"A": -55.0, "B": -62.0, "C": -45.0},
    len_w={"A": 10, "B": 12, "C": 8}, len_l={"A": 11, "B": 12, "C": 9},
    act_dl=-0.2, sq_w=1.0, sq_l=4.0,
    entangled={("A", 4), ("A", 5), ("A", 6)},                  # ip_wl = 1.5 > thr_w = 1
    curvature={("B", 6), ("B", 7)},                            # upd_dw = +0.02 although act_dw < 0
    expected=dict(mean_change=-0.5, falling_ranges=[(4, 8)], falling_act_steps=[4, 5, 6, 7], n_grad=30,
                  n_entangled=3, n_fell=8, causes={"own": 3, "others": 3, "curvature": 2, "unknown": 0},
                  cause_share={"own": 3.0 / 4.4, "others": 1.2 / 4.4, "curvature": 0.2 / 4.4, "unknown": 0.0},
                  cause_steps={"own": [("A", 4), ("A", 5), ("A", 6)], "others": [("B", 4), ("B", 5), ("A", 7)],
                               "curvature": [("B", 6), ("B", 7)], "unknown": []},
                  pair_change={"A": -3.4, "B": -0.1, "C": 2.0}, margin_change=1.5, pairs_fell=2),
)


TRAIN = dict(
    per_step=4, entangled_ip={(s, i): 1.2 + 0.1 * (2 * (s - 4) + i) for s in FALL for i in (0, 1)},
    no_rejected=(9, 2), all_nan=(9, 3),
    expected=dict(n_rows=40, n_pred=39, n_own_fall=8, n_case=38, n_case2=8, n_cos=38, n_missing=2,
                  top=["t7_1", "t7_0", "t6_1", "t6_0", "t5_1"], regime="some"),
)

CROSS = dict(
    special={("A", s): {0: -0.8, 1: -0.15, 2: 0.05, 3: -0.05} for s in FALL}
    | {("B", s): {0: 0.01, 1: -0.08, 2: -0.01, 3: -0.01} for s in (4, 5)}
    | {("B", s): {0: -0.01, 1: 0.02, 2: 0.01, 3: 0.0} for s in (6, 7)},
    c=0.05 / 4,
    # over the 8 falls (Σ act_dw = −4.4): other training pairs −3.94, residual −0.22, beyond first order −0.24
    expected=dict(act_sum=-4.4, others=-3.94, residual=-0.22, higher_order=-0.24, own=0.0,
                  pushes=["t6_0", "t7_0", "t4_0", "t5_0", "t4_1"]),
)


def train_pair_ids(step):
    return [f"t{step}_{i}" for i in range(TRAIN["per_step"])]


def probe_contributions(pair, step, upd):
    """{training pair index: contribution} to ``pair``'s chosen response at ``step`` (upd = its upd_dw)."""
    return CROSS["special"].get((pair, step), {i: 0.2 * upd for i in range(TRAIN["per_step"])})


def write_train_records(run: RunDir, loss="dpo", loss_params=None, lr=1.0) -> None:
    """`TRAIN`'s train_records.parquet: the rows `InRunRecorder` writes (`predict_with_missing`)."""
    t = lambda x: torch.tensor(x, dtype=torch.float64)                          # noqa: E731
    loss_params = dict(loss_params or {"beta": 0.1})
    rows, B = [], TRAIN["per_step"]
    for step in range(STEPS):
        ids = train_pair_ids(step)
        lw = [-30.0 - i for i in range(B)]
        ll = [-32.0 - i for i in range(B)]
        st = state_rows(step, ids, lw, ll, lw, ll, [6] * B, [7] * B, loss, loss_params, lr)
        d_w, d_l = [r["d_w"] for r in st], [r["d_l"] for r in st]
        ip = [TRAIN["entangled_ip"].get((step, i), 0.5) for i in range(B)]
        sq_w, sq_l = [1.0] * B, [4.0] * B
        reasons = [None] * B
        if step == TRAIN["no_rejected"][0]:
            i = TRAIN["no_rejected"][1]
            d_l[i], ip[i], sq_l[i], reasons[i] = 0.0, float("nan"), float("nan"), MISSING_REASONS[(False, True)]
        if step == TRAIN["all_nan"][0]:
            i = TRAIN["all_nan"][1]
            ip[i] = sq_w[i] = sq_l[i] = float("nan")
            reasons[i] = NONCONSTANT_REASON
        pred = predict_with_missing(t(d_w), t(d_l), t(ip), t(sq_w), t(sq_l), lr=lr)
        for i, r in enumerate(st):
            nan_all = reasons[i] == NONCONSTANT_REASON
            r.update(micro=i // 2, d_l=d_l[i], c_w=-d_w[i] / B, c_l=d_l[i] / B, ip_wl=ip[i], sq_w=sq_w[i],
                     sq_l=sq_l[i], cos_wl=ip[i] / np.sqrt(sq_w[i] * sq_l[i]),
                     pred_dw=float("nan") if nan_all else float(pred["dlogp_w"][i]),
                     pred_dl=float("nan") if nan_all else float(pred["dlogp_l"][i]),
                     thr_w=float("nan") if nan_all else float(pred["thr_w"][i]),
                     thr_l=float("nan") if nan_all else float(pred["thr_l"][i]),
                     case_pred=-1 if nan_all else int(pred["case"][i]), missing_reason=reasons[i])
        rows += st
    run.append("train_records", rows)


def contribution_rows(records):
    """`CROSS`'s contributions.parquet rows for the gradient rows of ``records`` (a list of dicts,
    completed in place with contrib_sum_* and contrib_resid_*)."""
    out, c = [], CROSS["c"]
    for r in records:
        if "upd_dw" not in r:
            continue
        for response, upd in (("chosen", r["upd_dw"]), ("rejected", r["upd_dl"])):
            parts = (probe_contributions(r["pair_id"], r["step"], upd) if response == "chosen"
                     else {i: 0.2 * upd for i in range(TRAIN["per_step"])})
            for i, tid in enumerate(train_pair_ids(r["step"])):
                out.append(dict(step=r["step"], pair_id=r["pair_id"], response=response, train_pair=tid,
                                k_w=1.0 + parts[i] / c, k_l=1.0, c_w=-c, c_l=c, contribution=parts[i]))
            total = sum(parts.values())
            side = "w" if response == "chosen" else "l"
            r[f"contrib_sum_{side}"], r[f"contrib_resid_{side}"] = total, upd - total
    return out


ATTRIBUTIONS = dict(chosen=(0.001, 0.5, (("The", 0.1), ("good", -0.7), ("movie", 0.3))),
                    margin=(0.2, -0.5, (("The", 0.05), ("good", 0.9), ("movie", -0.2), ("bad", -0.4))))
"""(delta, gap, tokens) per target of pair A: chosen converged (|δ|/|gap| = 0.002), margin not (0.4)."""


def state_rows(step, pairs, logp_w, logp_l, ref_w, ref_l, len_w, len_l, loss, loss_params, lr):
    """The recorder's state columns (and d_w, d_l of ``loss``) for the given per-pair values."""
    t = lambda x: torch.tensor(x, dtype=torch.float64)                          # noqa: E731
    lo = compute_loss(loss, t(logp_w), t(logp_l), t(ref_w), t(ref_l), t(len_w), t(len_l), **loss_params)
    margin = (t(logp_w) - t(ref_w)) - (t(logp_l) - t(ref_l))
    return [dict(step=step, pair_id=p, loss=loss, loss_value=float(lo.loss[k]), logp_w=logp_w[k], logp_l=logp_l[k],
                 logp_w_norm=logp_w[k] / len_w[k], logp_l_norm=logp_l[k] / len_l[k], ref_w=ref_w[k], ref_l=ref_l[k],
                 len_w=int(len_w[k]), len_l=int(len_l[k]), margin=float(margin[k]), reward_acc=bool(margin[k] > 0),
                 d_w=float(lo.d_w[k]), d_l=float(lo.d_l[k]), lr=lr) for k, p in enumerate(pairs)]


def gradient_columns(rows, ip, sq_w, sq_l):
    """Add the gradient columns (ip_wl, sq_w, sq_l, cos_wl, pred_*, thr_*, case_pred) to ``rows``
    as the recorder does (`predict` with the rows' d_w, d_l and lr)."""
    t = lambda x: torch.tensor(x, dtype=torch.float64)                          # noqa: E731
    p = predict(t([r["d_w"] for r in rows]), t([r["d_l"] for r in rows]), t(ip), t(sq_w), t(sq_l),
                lr=rows[0]["lr"])
    for k, r in enumerate(rows):
        r.update(ip_wl=ip[k], sq_w=sq_w[k], sq_l=sq_l[k], cos_wl=ip[k] / np.sqrt(sq_w[k] * sq_l[k]),
                 pred_dw=float(p["dlogp_w"][k]), pred_dl=float(p["dlogp_l"][k]), thr_w=float(p["thr_w"][k]),
                 thr_l=float(p["thr_l"][k]), case_pred=int(p["case"][k]))
    return rows


def write_scenario(path, *, loss="dpo", loss_params=None, lr=1.0, whatif=True, tokens=True, screen=True,
                   attributions=True, in_run=True, cross=True, config=None, writer="dynamics train") -> Path:
    """Write the `SCENARIO` run to ``path`` (see the module docstring); returns ``path``.

    ``config``: a dict written verbatim as config.json (e.g. a version-1 file) instead of the
    default version-2 config written by `RunDir.write_config`."""
    path = Path(path)
    run = RunDir(path)
    loss_params = dict(loss_params or {"beta": 0.1})
    if config is None:
        run.write_config(dict(model="synthetic", loss=loss, loss_params=loss_params, lr=lr,
                              recorder=dict(eval_every=1, impl="ghost", params="trainable", whatif=whatif,
                                            token_pairs=1 if tokens else 0, token_chunk=8, probes=False)),
                         writer=writer)
    else:
        (path / "config.json").write_text(json.dumps(config))
    S = SCENARIO
    lw = [S["logp_w0"][p] for p in PAIRS]
    ll = [S["logp_l0"][p] for p in PAIRS]
    ref_w, ref_l = list(lw), list(ll)                           # π_ref = π_θ at step 0
    nw, nl = [S["len_w"][p] for p in PAIRS], [S["len_l"][p] for p in PAIRS]
    records, wi = [], []
    for step in range(STEPS):
        rows = state_rows(step, PAIRS, lw, ll, ref_w, ref_l, nw, nl, loss, loss_params, lr)
        ip = [1.5 if (p, step) in S["entangled"] else 0.5 for p in PAIRS]
        gradient_columns(rows, ip, [S["sq_w"]] * 3, [S["sq_l"]] * 3)
        act_dw = [_act_dw(p, step) for p in PAIRS]
        act_dl = [S["act_dl"]] * 3
        obs = case(torch.tensor(act_dw), torch.tensor(act_dl))
        for k, (p, r) in enumerate(zip(PAIRS, rows)):
            r.update(upd_dw=0.02 if (p, step) in S["curvature"] else act_dw[k], upd_dl=act_dl[k], act_dw=act_dw[k],
                     act_dl=act_dl[k], case_obs=int(obs[k]))
        records += rows
        if whatif:
            t = lambda x: torch.tensor(x, dtype=torch.float64)                  # noqa: E731
            w = what_if(t(lw), t(ll), t(ref_w), t(ref_l), t(nw), t(nl), t(ip), t([S["sq_w"]] * 3),
                        t([S["sq_l"]] * 3), lr=lr, pair_ids=list(PAIRS)).rename(columns={"pair": "pair_id"})
            w.insert(0, "step", step)
            wi += w.to_dict("records")
        lw = [a + d for a, d in zip(lw, act_dw)]
        ll = [a + d for a, d in zip(ll, act_dl)]
    records += state_rows(STEPS, PAIRS, lw, ll, ref_w, ref_l, nw, nl, loss, loss_params, lr)
    if cross:
        run.append("contributions", contribution_rows(records))
    run.append("records", records)
    if in_run:
        write_train_records(run, loss, loss_params, lr)
    if whatif:
        run.append("whatif", wi)
    if tokens:
        write_tokens(run)
    if screen:
        run.append("screen", [dict(pair_id=p, len_w=S["len_w"][p], len_l=S["len_l"][p], ches=c, ches_norm=c / 10,
                                   h_ip=c * 2.0, edit_distance=e, prefix=1, suffix=2, ip_wl=0.5, sq_w=1.0, sq_l=4.0,
                                   cos_wl=0.25, logp_w=S["logp_w0"][p], logp_l=S["logp_l0"][p], d_w=0.05, d_l=0.05,
                                   pred_dw=0.025 * c, pred_dl=-0.175, case_pred=1)
                              for p, c, e in zip(PAIRS, (3.0, 2.0, 1.0), (1, 5, 9))])
    if attributions:
        run.append("attributions", [dict(pair_id="A", target=target, position=i, token=tok, segment="response",
                                         attribution=a, delta=delta, gap=gap)
                                    for target, (delta, gap, toks) in ATTRIBUTIONS.items()
                                    for i, (tok, a) in enumerate(toks)])
    return path


TOKEN_PRED = {"chosen": (0.01, 0.05, -0.02, -0.03), "rejected": (0.0, -0.06, -0.01, -0.01)}
"""Per-token predictions of pair A at every step (m = 1): chosen before 0.01, at 0.05, after −0.05."""


def write_tokens(run: RunDir) -> None:
    toks_w, toks_l = ["The", "good", "movie", "."], ["The", "bad", "movie", "."]
    rows = [dict(step=s, pair_id="A", response=side, m=1, token=i,
                 token_str=(toks_w if side == "chosen" else toks_l)[i], segment="before" if i < 1 else "at" if i == 1 else "after", pred=v)
            for s in range(STEPS) for side, preds in TOKEN_PRED.items() for i, v in enumerate(preds)]
    run.append("token_decomp", rows)
    rng = np.random.default_rng(0)
    for s in (0, STEPS - 1):
        M = torch.tensor(rng.normal(size=(4, 4)))
        sq_a, sq_b = torch.rand(4, dtype=torch.float64) + 1, torch.rand(4, dtype=torch.float64) + 1
        cos = (M / torch.sqrt(sq_a[:, None] * sq_b[None, :])).clamp(-1, 1)
        gram = SimpleNamespace(M=M, cos=cos, sq_a=sq_a, sq_b=sq_b, tokens_a=toks_w, tokens_b=toks_l)
        save_token_gram(run.path / "token_grams" / f"step{s:06d}_A.npz", gram, "A", s)


# ------------------------------------------------------------------ headless Chromium (DevTools over a pipe)

def chromium_binary() -> str | None:
    """The first of chromium, chromium-browser, google-chrome on PATH, or None."""
    return next((b for b in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if b), None)


class _Pipe:
    """Chrome DevTools protocol over ``--remote-debugging-pipe``: Chrome reads commands on its fd 3
    and writes replies and events on its fd 4, each a JSON message ended by a NUL byte."""

    def __init__(self, binary: str, profile: Path, timeout: float):
        to_chrome_r, self.to_chrome = os.pipe()
        self.from_chrome, from_chrome_w = os.pipe()

        def fds():                                             # in the child: the pipe ends become 3 and 4
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_chrome_r, from_chrome_w)]  # no clash with 3, 4
            for fd, want in zip(high, (3, 4)):
                os.dup2(fd, want)
                os.set_inheritable(want, True)

        self.proc = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe", "--no-first-run",
             "--no-default-browser-check", "--hide-scrollbars", f"--user-data-dir={profile}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=fds,
            close_fds=False)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self.deadline = time.monotonic() + timeout
        self.buf, self.next_id, self.events = b"", 0, []

    def _message(self) -> dict:
        while b"\0" not in self.buf:
            left = self.deadline - time.monotonic()
            if left <= 0 or not select.select([self.from_chrome], [], [], left)[0]:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self.from_chrome, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe")
            self.buf += chunk
        raw, self.buf = self.buf.split(b"\0", 1)
        return json.loads(raw)

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self.next_id += 1
        msg = dict(id=self.next_id, method=method, params=params or {})
        if session:
            msg["sessionId"] = session
        os.write(self.to_chrome, json.dumps(msg).encode() + b"\0")
        while True:
            m = self._message()
            if m.get("id") == self.next_id:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})
            self.events.append(m)

    def wait_for(self, method: str) -> None:
        while not any(e.get("method") == method for e in self.events):
            self.events.append(self._message())

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self.to_chrome, self.from_chrome):
            os.close(fd)


def render(html_path: Path, profile: Path, screenshot: Path | None = None, timeout: float = 90.0) -> dict:
    """Open ``html_path`` in headless Chromium and report what the browser saw.

    Returns ``{"ids": section ids in the rendered DOM, "images": [(complete, naturalWidth)],
    "errors": console messages, uncaught exceptions and log entries of level warning/error,
    "height": page height}``; with ``screenshot`` also writes a full-page PNG there.
    """
    pipe = _Pipe(chromium_binary(), profile, timeout)
    try:
        target = pipe.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = pipe.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Runtime", "Log", "Page"):
            pipe.send(f"{domain}.enable", session=session)
        pipe.events.clear()
        pipe.send("Page.navigate", {"url": Path(html_path).resolve().as_uri()}, session=session)
        pipe.wait_for("Page.loadEventFired")
        expr = ("JSON.stringify({ids: Array.from(document.querySelectorAll('section[id]')).map(s => s.id),"
                " images: Array.from(document.images).map(i => [i.complete, i.naturalWidth]),"
                " height: document.documentElement.scrollHeight})")
        seen = json.loads(pipe.send("Runtime.evaluate", {"expression": expr, "returnByValue": True},
                                    session=session)["result"]["value"])
        if screenshot is not None:
            pipe.send("Emulation.setDeviceMetricsOverride", {"width": 1200, "height": min(int(seen["height"]), 16000),
                                                             "deviceScaleFactor": 1, "mobile": False}, session=session)
            shot = pipe.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True},
                             session=session)
            import base64
            Path(screenshot).write_bytes(base64.b64decode(shot["data"]))
        errors = []
        for e in pipe.events:
            p = e.get("params", {})
            if e.get("method") == "Runtime.consoleAPICalled":
                errors.append(f"console.{p.get('type')}: " + " ".join(str(a.get("value", a.get("description")))
                                                                     for a in p.get("args", [])))
            elif e.get("method") == "Runtime.exceptionThrown":
                d = p.get("exceptionDetails", {})
                errors.append(f"uncaught: {d.get('exception', {}).get('description') or d.get('text')}")
            elif e.get("method") == "Log.entryAdded" and p.get("entry", {}).get("level") in ("warning", "error"):
                errors.append(f"log.{p['entry']['level']}: {p['entry'].get('text')} {p['entry'].get('url', '')}")
        return dict(ids=seen["ids"], images=[tuple(x) for x in seen["images"]], errors=errors, height=seen["height"])
    finally:
        pipe.close()
