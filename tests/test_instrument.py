"""Training instrumentation: the Recorder's rows, predicted vs actual changes, the TRL callback,
and crash-safe run directories (SIGKILL, then --resume without duplicate or missing rows)."""
import copy
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch

from dynamics.core.losses import LOSSES
from dynamics.runs.rundir import read_table
from dynamics.runs.train import TrainConfig, train

DIAG_COLUMNS = {"ip_wl", "sq_w", "sq_l", "cos_wl", "pred_dw", "pred_dl", "thr_w", "thr_l", "case_pred",
                "upd_dw", "upd_dl", "act_dw", "act_dl", "case_obs"}


def tiny_cfg(tmp_path, **kw):
    base = dict(out=str(tmp_path / "run"), model="tiny-llama", n_pairs=24, n_probe=4, steps=4, batch_size=4,
                eval_every=2, lr=1e-3, progress=False, dtype="float64", optimizer="sgd")
    return TrainConfig.from_flat(**{**base, **kw})


def test_records_have_diagnostics_and_first_order_predictions(tmp_path):
    run = train(tiny_cfg(tmp_path, lr=1e-3, steps=3, eval_every=1, token_pairs=1))
    rec = read_table(run.path, "records")
    assert DIAG_COLUMNS <= set(rec.columns)
    assert sorted(rec.step.unique()) == [0, 1, 2, 3]
    body = rec[rec.step < 3]
    assert body[list(DIAG_COLUMNS)].notna().all().all()
    assert rec[rec.step == 3][["act_dw", "upd_dw"]].isna().all().all()  # final state: no update follows
    # the next row's log-prob is this row's plus the actual change
    for s in (0, 1, 2):
        a, b = rec[rec.step == s].set_index("pair_id"), rec[rec.step == s + 1].set_index("pair_id")
        assert np.allclose(a.logp_w + a.act_dw, b.logp_w.loc[a.index], atol=1e-10)
    # ⟨g, Δθ⟩ predicts the actual change of a small SGD step to first order
    err = (body.upd_dw - body.act_dw).abs() / body.act_dw.abs()
    assert err.median() < 0.05
    assert (body.cos_wl.abs() <= 1).all() and (body.sq_w > 0).all()
    wi = read_table(run.path, "whatif")
    assert set(wi["loss"]) == set(LOSSES) and sorted(wi.step.unique()) == [0, 1, 2]
    dpo = wi[wi["loss"] == "dpo"].set_index(["step", "pair_id"]).sort_index()
    own = body.set_index(["step", "pair_id"]).sort_index()
    assert np.allclose(dpo.dlogp_w.loc[own.index], own.pred_dw, rtol=1e-9, atol=1e-14)
    grams = sorted((run.path / "token_grams").glob("*.npz"))
    assert len(grams) == 3
    z = np.load(grams[0])
    assert z["M"].shape == (len(z["tokens_w"]), len(z["tokens_l"]))
    dec = read_table(run.path, "token_decomp")
    assert len(dec) > 0 and set(dec.step) == {0, 1, 2}


def test_sgd_self_step_prediction_matches_reality(tmp_path):
    """A step on the probe pairs themselves: predicted (seed 004 eq. 5) vs actual, error O(η)."""
    from dynamics.core import conditions
    from dynamics.core.grads import pair_inner_products
    from dynamics.core.logprobs import pair_logprobs, tokenize_pairs
    from dynamics.inputs.data import builtin_sentiment_pairs
    from dynamics.core.losses import compute_loss
    from dynamics.inputs.models import load_model

    model, tok = load_model("tiny-neox", dtype=torch.float64)
    tp = tokenize_pairs(tok, builtin_sentiment_pairs("short_suffix", n=1))
    with torch.no_grad():
        out = pair_logprobs(model, tp)
    ref_w, ref_l = out.chosen.logp - 0.3, out.rejected.logp + 0.2
    errors = []
    for lr in (1e-2, 1e-3):
        m = copy.deepcopy(model)
        o = pair_logprobs(m, tp)
        lo = compute_loss("dpo", o.chosen.logp, o.rejected.logp, ref_w, ref_l)
        ip = pair_inner_products(m, tp, impl="ghost")
        pred = conditions.predict(lo.d_w, lo.d_l, ip["ip_wl"], ip["sq_w"], ip["sq_l"], lr=lr)
        lo.loss.sum().backward()
        with torch.no_grad():
            for p in m.parameters():
                p -= lr * p.grad
            new = pair_logprobs(m, tp)
        act = new.chosen.logp - o.chosen.logp.detach()
        errors.append(float((pred["dlogp_w"] - act).abs() / act.abs()))
    assert errors[1] < 0.05 and errors[1] < errors[0] / 5  # first order: the error shrinks with η


# Runs `dynamics train` in a child that blocks, deterministically, right after the "train" row of
# step KILL_AT is on disk (and signals it with a flag file); the test then SIGKILLs it there. No race:
# the kill always lands mid-run, after checkpoint 6 and with rows of steps 6-8 written past it.
_BLOCKING_CHILD = """
import sys, time
from pathlib import Path
from dynamics.runs.rundir import RunDir
from analyses.cli import main
flag, kill_at = Path(sys.argv[1]), int(sys.argv[2])
append = RunDir.append
def blocking_append(self, name, rows):
    rows = list(rows)
    append(self, name, rows)
    if name == "train" and any(r["step"] == kill_at for r in rows):
        flag.write_text("blocked")
        while True:
            time.sleep(3600)
RunDir.append = blocking_append
sys.exit(main(sys.argv[3:]))
"""
KILL_AT = 8


def test_resume_after_sigkill(tmp_path):
    out = tmp_path / "run"
    cli = ["train", "--model", "tiny-gpt2", "--n-pairs", "24",
           "--n-probe", "4", "--steps", "40", "--batch-size", "4", "--eval-every", "1", "--save-every", "3",
           "--lr", "1e-3", "--optimizer", "sgd", "--dtype", "float64", "--token-pairs", "0", "--no-whatif",
           "--no-progress", "--out", str(out)]
    args = [sys.executable, "-m", "analyses.cli"] + cli
    flag = tmp_path / "blocked"
    log = tmp_path / "child.log"
    with open(log, "wb") as err:      # a file, not a pipe: a full pipe would block the child
        proc = subprocess.Popen([sys.executable, "-c", _BLOCKING_CHILD, str(flag), str(KILL_AT)] + cli,
                                stdout=subprocess.DEVNULL, stderr=err)
    while not flag.exists():          # wait for the child to block (or to fail: then report why)
        if proc.poll() is not None:
            pytest.fail(f"the child exited ({proc.returncode}) before step {KILL_AT}: {log.read_text()[-2000:]}")
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert torch.load(out / "checkpoint" / "state.pt", weights_only=False)["step"] == 6
    assert read_table(out, "train").step.max() == KILL_AT                       # rows past the checkpoint
    killed = read_table(out, "records")  # readable after SIGKILL
    assert killed.step.max() == KILL_AT - 1                                     # records of steps 6, 7 get redone
    assert subprocess.run(args + ["--resume"], capture_output=True).returncode == 0
    rec = read_table(out, "records")
    counts = rec.groupby("step").pair_id.count()
    assert counts.index.tolist() == list(range(41)) and (counts == 4).all()  # no duplicates, none missing
    train_rows = read_table(out, "train")
    assert train_rows.step.tolist() == list(range(1, 41))
    # identical to an uninterrupted run (deterministic float64)
    ref = train(TrainConfig.from_flat(out=str(tmp_path / "ref"), model="tiny-gpt2", n_pairs=24, n_probe=4, steps=40,
                            batch_size=4, eval_every=1, lr=1e-3, optimizer="sgd", dtype="float64", token_pairs=0,
                            whatif=False, progress=False))
    a = rec.sort_values(["step", "pair_id"]).logp_w.to_numpy()
    b = ref.table("records").sort_values(["step", "pair_id"]).logp_w.to_numpy()
    assert np.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_trl_dpo_trainer_with_callback(tmp_path):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from dynamics.inputs.models import native_bf16

    from dynamics.runs.callbacks import DynamicsCallback
    from dynamics.runs.recorder import RecorderConfig
    from dynamics.inputs.data import builtin_sentiment_pairs
    from dynamics.inputs.models import tiny_model, tiny_tokenizer

    tok, model = tiny_tokenizer(), tiny_model("llama", seed=0)
    pairs = builtin_sentiment_pairs("short_suffix", n=20)
    train_pairs, probe = pairs[:16], pairs[16:]
    def dataset(ps):
        return Dataset.from_dict({"prompt": [p.prompt for p in ps], "chosen": [p.chosen for p in ps],
                                  "rejected": [p.rejected for p in ps]})
    ds = dataset(train_pairs)
    args = DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                     max_steps=4, logging_steps=1, report_to=[], learning_rate=1e-3, use_cpu=True,
                     save_strategy="no", beta=0.1, bf16=native_bf16("cpu"), fp16=False)
    trainer = DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=ds,
                         eval_dataset=dataset(probe), processing_class=tok)
    cb = DynamicsCallback(probe, tmp_path / "dyn", RecorderConfig(eval_every=2), loss="dpo",
                          loss_params={"beta": 0.1}).attach(trainer)
    trainer.train()
    # the callback's probe sequences are token for token those TRL trains on (EOS appended)
    for i, row in enumerate(trainer.eval_dataset):
        w, l = cb.rec.probe.chosen[i], cb.rec.probe.rejected[i]
        assert list(w.prompt_ids) == row["prompt_ids"] == list(l.prompt_ids)
        assert list(w.response_ids) == row["chosen_ids"] and list(l.response_ids) == row["rejected_ids"]
        assert w.response_ids[-1] == tok.eos_token_id
    rec = read_table(tmp_path / "dyn", "records")
    assert sorted(rec.step.unique()) == [0, 2, 4] and (rec.groupby("step").size() == 4).all()
    body = rec[rec.step < 4]
    assert body[list(DIAG_COLUMNS)].notna().all().all()
    assert (body.act_dw != 0).all()  # the trainer's real AdamW update moved the probes
    logged = [h for h in trainer.state.log_history if "dyn/cos_wl" in h]
    assert len(logged) == 2
    assert cb.rec.lr == pytest.approx(1e-3)


def test_cli_predict_check(tmp_path, capsys):
    from analyses.cli import main

    out = tmp_path / "pc"
    assert main(["predict-check", "--model", "tiny-llama", "--pairs", "2", "--limit", "10", "--adam-steps", "1",
                 "--lrs", "1e-4", "1e-3", "--dtype", "float64", "--out", str(out)]) == 0
    sgd = pd.read_parquet(out / "sgd_self_step.parquet")
    assert len(sgd) == 4 and set(sgd.lr) == {1e-4, 1e-3}
    err = ((sgd.pred_dw - sgd.act_dw).abs() / sgd.act_dw.abs()).groupby(sgd.lr).median()
    assert err[1e-4] < 1e-3 and err[1e-4] < err[1e-3]
    assert "real update" in capsys.readouterr().out


def test_probes_recorded_and_plotted(tmp_path):
    from analyses.learning_dynamics import plot_probe_curves, run_llm_squeezing, squeezing_summary

    run = run_llm_squeezing(tmp_path / "sq", quick=True, model="tiny-llama")
    probes = read_table(run.path, "probes")
    names = set(probes.probe)
    assert {"chosen", "rejected", "argmax_teacher", "other_chosen", "held_out_chosen", "chosen_shuffled",
            "other_shuffled"} <= names
    assert sorted(probes.step.unique()) == [0, 4, 8, 12, 16, 20, 24]
    assert probes[["logp", "argmax_mass", "entropy"]].notna().all().all()
    # y* is the per-token argmax under teacher forcing on y+: Σ log π(y*_t) ≥ Σ log π(y+_t)
    ch = probes[probes.probe == "chosen"]
    assert (ch.argmax_logp >= ch.logp - 1e-9).all() and (ch.argmax_logp > ch.logp + 1e-6).any()
    s = squeezing_summary(probes)
    assert set(s.probe) == names and s.notna().all().all()
    fig = plot_probe_curves(probes)
    assert len(fig.axes) == 3
    # the right panel's two curves (one per y axis) are named by one legend
    legends = [ax.get_legend() for ax in fig.axes[1:] if ax.get_legend() is not None]
    assert len(legends) == 1
    assert [t.get_text() for t in legends[0].get_texts()] == ["argmax mass", r"$\sum_t\log\pi(y^*_t)$"]


def test_step_axes_tick_whole_steps():
    """Curves over optimizer steps put ticks at whole steps only (12 steps: matplotlib's default
    locator would tick 0, 2.5, 5, 7.5, 10)."""
    import matplotlib.pyplot as plt

    from analyses.learning_dynamics import plot_probe_curves
    from dynamics.tools.plots import plot_cosine, plot_logprobs

    steps = np.repeat(np.arange(12), 2)
    rec = pd.DataFrame(dict(step=steps, logp_w=-np.arange(24.0), logp_l=-2 * np.arange(24.0),
                            cos_wl=np.linspace(0, 0.3, 24), pairs=["a", "b"] * 12))
    probes = pd.DataFrame(dict(step=steps, probe=["chosen", "rejected"] * 12, logp=-np.arange(24.0),
                               argmax_mass=np.linspace(0.1, 0.2, 24), argmax_logp=-np.arange(24.0)))
    figs = [plot_logprobs(rec), plot_cosine(rec, by="pairs"), plot_probe_curves(probes)]
    for fig in figs:
        fig.canvas.draw()
        for ax in fig.axes:
            if ax.get_xlabel() == "step":
                ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
                assert len(ticks) >= 3 and all(float(t).is_integer() for t in ticks), ticks
        plt.close(fig)
