"""The trainer and run directory on a tiny model: columns, reference at step 0, errors that
keep what was recorded, config validation, and the CLI."""
import json
import math

import pandas as pd
import pytest
import torch

from analyses.cli import main
from dynamics.core.losses import LOSSES
from dynamics.runs.rundir import RunDir, read_table
from dynamics.runs.train import TrainConfig, train

RECORD_COLUMNS = {"step", "pair_id", "loss", "loss_value", "logp_w", "logp_l", "logp_w_norm", "logp_l_norm",
                  "ref_w", "ref_l", "len_w", "len_l", "margin", "reward_acc", "d_w", "d_l"}


def tiny_cfg(tmp_path, **kw):
    base = dict(out=str(tmp_path / "run"), model="tiny-llama", n_pairs=24, n_probe=4, steps=4, batch_size=4,
                eval_every=2, lr=1e-2, progress=False)
    return TrainConfig.from_flat(**{**base, **kw})


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_every_loss_trains_and_records(tmp_path, loss):
    run = train(tiny_cfg(tmp_path, loss=loss, steps=2, eval_every=1))
    rec = read_table(run.path, "records")
    assert RECORD_COLUMNS <= set(rec.columns)
    assert sorted(rec.step.unique()) == [0, 1, 2] and len(rec) == 3 * 4
    assert (rec.loss == loss).all() and rec[["logp_w", "logp_l", "d_w", "d_l"]].notna().all().all()
    step0 = rec[rec.step == 0]
    # the model at step 0 is the reference: log-probs equal reference values, zero margin
    assert (step0.logp_w - step0.ref_w).abs().max() < 1e-5 and step0.margin.abs().max() < 1e-5
    assert (rec.logp_w_norm * rec.len_w - rec.logp_w).abs().max() < 1e-4
    assert json.loads((run.path / "config.json").read_text())["loss"] == loss


def test_dpo_increases_margin_and_sft_lowers_nll(tmp_path):
    run = train(tiny_cfg(tmp_path, steps=12, eval_every=4, sft_steps=5, loss="dpo", loss_params={"beta": 1.0}))
    rec, sft = run.table("records"), run.table("sft")
    assert sft.nll.iloc[-1] < sft.nll.iloc[0]
    first, last = rec[rec.step == 0], rec[rec.step == 12]
    assert last.margin.mean() > first.margin.mean() + 1e-3
    assert len(run.table("train")) == 12


def test_grad_accum_matches_full_batch(tmp_path):
    """Accumulating 2 micro-batches of 2 gives the same update as one batch of 4 (SGD, float64)."""
    a = train(tiny_cfg(tmp_path / "a", optimizer="sgd", dtype="float64", steps=3, eval_every=3))
    b = train(tiny_cfg(tmp_path / "b", optimizer="sgd", dtype="float64", steps=3, eval_every=3, grad_accum=2))
    ra, rb = a.table("records"), b.table("records")
    assert ra.logp_w.tolist() == pytest.approx(rb.logp_w.tolist(), rel=1e-10)


def test_nan_loss_raises_and_keeps_records(tmp_path):
    # a step this large blows the weights up; the next loss is NaN
    cfg = tiny_cfg(tmp_path, loss="dpo", optimizer="sgd", lr=1e30, eval_every=1)
    with pytest.raises(ValueError, match=r"step (\d+): .*(NaN|inf)") as err:
        train(cfg)
    failed = int(err.value.args[0].split()[1].rstrip(":"))
    rec = read_table(cfg.out, "records")  # every row written before the failure survives
    assert failed >= 1 and sorted(rec.step.unique()) == list(range(failed)) and len(rec) == 4 * failed


def test_probe_error_after_the_update_names_the_step(tmp_path, monkeypatch):
    """The probe pass runs in `Recorder.after_update` (after ``opt.step()``): its errors carry the
    same "step s: probe pairs:" prefix as those of `before_update`, and the rows of earlier steps
    stay on disk."""
    from dynamics.runs.recorder import Recorder
    orig = Recorder.after_update

    def failing(self, **kw):
        if self._pending["step"] == 2:
            raise ValueError("bad probe input")
        return orig(self, **kw)
    monkeypatch.setattr(Recorder, "after_update", failing)
    cfg = tiny_cfg(tmp_path, eval_every=1)
    with pytest.raises(ValueError, match=r"^step 2: probe pairs: bad probe input$"):
        train(cfg)
    assert sorted(read_table(cfg.out, "records").step.unique()) == [0, 1]


@pytest.mark.parametrize("kw, msg", [
    (dict(loss="dpoo"), "unknown loss 'dpoo'; known: cpo, dpo"),
    (dict(optimizer="lion"), "unknown optimizer"),
    (dict(batch_size=4, grad_accum=3), "grad_accum"),
    (dict(loss_params={"betta": 1}), "betta"),
    (dict(steps=-1), "steps"),
])
def test_config_validation(tmp_path, kw, msg):
    with pytest.raises(ValueError, match=msg):
        tiny_cfg(tmp_path, **kw)


def test_run_dir_append_and_truncate(tmp_path):
    run = RunDir(tmp_path / "r")
    run.append("records", [dict(step=0, x=1.0), dict(step=1, x=2.0)])
    run.append("records", [dict(step=2, x=3.0)])
    again = RunDir(tmp_path / "r")  # a new process sees everything written
    assert again.table("records").x.tolist() == [1.0, 2.0, 3.0] and again.last_step("records") == 2
    again.truncate_after("records", 1)
    assert pd.read_parquet(tmp_path / "r" / "records.parquet").step.tolist() == [0, 1]
    assert not list((tmp_path / "r").glob(".*.tmp"))


def test_cli_help_losses_and_train(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for cmd in ("losses", "fetch-model", "data-summary", "logprobs", "train", "demo", "plot"):
        assert cmd in out
    assert main(["losses"]) == 0
    out = capsys.readouterr().out
    for name in LOSSES:
        assert f"\n{name} " in "\n" + out
    run = tmp_path / "cli_run"
    assert main(["train", "--model", "tiny-gpt2", "--n-pairs", "20", "--n-probe", "4", "--steps", "2",
                 "--batch-size", "4", "--eval-every", "1", "--no-progress", "--out", str(run),
                 "--loss", "simpo", "--loss-params", '{"gamma": 1.0}']) == 0
    assert (run / "logprobs.png").is_file() and (run / "logprobs.pdf").is_file()
    assert json.loads((run / "config.json").read_text())["loss_params"]["gamma"] == 1.0
    assert main(["train", "--model", "tiny-gpt2", "--out", str(tmp_path / "x"), "--loss-params", '{"nope": 1}']) == 2
    assert "nope" in capsys.readouterr().err
    lp = tmp_path / "lp.parquet"
    assert main(["logprobs", "--model", "tiny-neox", "--limit", "6", "--out", str(lp)]) == 0
    df = pd.read_parquet(lp)
    assert len(df) == 6 and (df.logp_w < 0).all()
    assert [sum(x) for x in df.token_logps_w] == pytest.approx(df.logp_w.tolist(), rel=1e-5)


def test_cli_grads_sentence_and_token(tmp_path):
    import numpy as np

    from dynamics.core.grads import pair_inner_products
    from dynamics.inputs.data import builtin_sentiment_pairs
    from dynamics.core.logprobs import tokenize_pairs
    from dynamics.inputs.models import load_model

    out = tmp_path / "ip.parquet"
    assert main(["grads", "--model", "tiny-llama", "--limit", "3", "--out", str(out), "--impl", "func"]) == 0
    df = pd.read_parquet(out)
    assert list(df.columns) == ["pair_id", "ip_wl", "sq_w", "sq_l", "cos_wl", "len_w", "len_l"] and len(df) == 3
    model, tok = load_model("tiny-llama")
    tp = tokenize_pairs(tok, builtin_sentiment_pairs("long_suffix", n=3))
    ref = pair_inner_products(model, tp, impl="autograd")
    assert df.ip_wl.tolist() == pytest.approx(ref["ip_wl"].tolist(), rel=1e-4)
    tdir = tmp_path / "tok"
    assert main(["grads", "--model", "tiny-gpt2", "--limit", "2", "--level", "token", "--out", str(tdir)]) == 0
    files = sorted(tdir.glob("*.npz"))
    assert len(files) == 2
    z = np.load(files[0])
    assert z["M"].shape == z["cos"].shape == (len(z["tokens_w"]), len(z["tokens_l"]))
    assert np.allclose(np.diag(z["cos"])[:3], np.diag(z["M"])[:3] / np.sqrt(z["sq_w"][:3] * z["sq_l"][:3]))
