"""Run directories never silently mix, lose or misuse results (issue 10, sections 3, 4 and 6).

Every refusal is an `InputError` naming the problem and leaves an existing run byte-identical;
``overwrite`` moves the old run aside; reference caches are keyed on the weights; ``resume``
checks the configuration; checkpoints load with ``weights_only=True`` (a pickle payload is
refused and never runs); a full disk leaves no temporary file; Ctrl-C says how to resume.
"""
import errno
import dataclasses
import hashlib
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

import dynamics.runs.rundir as record_mod
import dynamics.runs.checkpoints as checkpoints_mod
import dynamics.runs.train as train_mod
from analyses.cli import main
from dynamics.errors import InputError
from dynamics.core.logprobs import tokenize_pairs
from dynamics.runs.rundir import cached_reference_logprobs
from dynamics.inputs.models import tiny_model
from dynamics.runs.rundir import DiskFullError, RunDir, read_table
from dynamics.runs.recorder import RecorderConfig
from dynamics.runs.train import RunInterrupted, TrainConfig, train

BASE = dict(model="tiny-gpt2", n_pairs=12, n_probe=2, steps=2, batch_size=2, eval_every=1, lr=1e-2,
            whatif=False, token_pairs=0, save_every=1, progress=False)
CLI = ["--model", "tiny-gpt2", "--n-pairs", "12", "--n-probe", "2", "--batch-size", "2", "--eval-every", "1",
       "--lr", "0.01", "--no-whatif", "--token-pairs", "0", "--save-every", "1", "--no-progress"]


def cfg(out, **kw):
    return TrainConfig.from_flat(**{**BASE, "out": str(out), **kw})


def snapshot(root: Path) -> dict:
    """{relative path: sha256} of every file under ``root`` (empty dict if it does not exist)."""
    root = Path(root)
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def base_runs(tmp_path_factory):
    """One finished DPO run (checkpointed) and one with SFT, built once and copied by each test."""
    root = tmp_path_factory.mktemp("base")
    train(cfg(root / "dpo"))
    train(cfg(root / "sft", sft_steps=3))
    return root


@pytest.fixture
def dpo_run(base_runs, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(base_runs / "dpo", out)
    return out


@pytest.fixture
def sft_run(base_runs, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(base_runs / "sft", out)
    return out


# ---------------------------------------------------------------- existing runs, --overwrite


def test_existing_run_is_refused_and_left_intact(dpo_run):
    before = snapshot(dpo_run)
    with pytest.raises(InputError, match=r"already holds a run .*config\.json.*--resume.*--overwrite") as err:
        train(cfg(dpo_run, loss="simpo"))
    assert str(dpo_run) in str(err.value)
    assert snapshot(dpo_run) == before
    # the command says so and exits 2 without a traceback
    assert main(["train", "--out", str(dpo_run), "--loss", "simpo"] + CLI) == 2
    assert snapshot(dpo_run) == before


def test_empty_directory_is_fine(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    run = train(cfg(out, steps=1, save_every=0))
    assert read_table(run.path, "train").step.tolist() == [1]


def test_overwrite_moves_the_old_run_aside(dpo_run, capsys):
    before = snapshot(dpo_run)
    run = train(cfg(dpo_run, loss="simpo", overwrite=True))
    aside = [p for p in dpo_run.parent.iterdir() if p.name.startswith("run.old-")]
    assert len(aside) == 1 and snapshot(aside[0]) == before  # moved, every file intact
    assert f"moved the existing run {dpo_run} aside to {aside[0]}" in capsys.readouterr().err
    assert run.read_config()["loss"] == "simpo"
    assert read_table(dpo_run, "train").step.tolist() == [1, 2]  # a fresh run: no duplicated steps
    assert set(read_table(dpo_run, "records").loss) == {"simpo"}


def test_resume_and_overwrite_exclude_each_other(tmp_path):
    with pytest.raises(InputError, match="resume and overwrite exclude each other"):
        cfg(tmp_path / "x", resume=True, overwrite=True)


# ---------------------------------------------------------------- --out a file / not writable


def test_out_is_a_file(tmp_path):
    f = tmp_path / "out.txt"
    f.write_text("keep me")
    with pytest.raises(InputError, match=rf"--out {f} is a file, not a directory"):
        train(cfg(f))
    with pytest.raises(InputError, match=rf"{f} is a file, not a directory"):
        train(cfg(f / "run"))
    assert f.read_text() == "keep me"
    assert main(["train", "--out", str(f)] + CLI) == 2


def test_out_not_writable(tmp_path, monkeypatch):
    parent = tmp_path / "ro"
    parent.mkdir()
    real = os.access
    # root may write anywhere: simulate a read-only parent through os.access
    monkeypatch.setattr(record_mod.os, "access", lambda p, mode: False if Path(p) == parent else real(p, mode))
    with pytest.raises(InputError, match=rf"--out {parent / 'run'}: the parent directory {parent} is not writable"):
        train(cfg(parent / "run"))
    assert list(parent.iterdir()) == []
    with pytest.raises(InputError, match=rf"--out {parent}: the run directory is not writable"):
        train(cfg(parent))


def test_bad_data_writes_nothing(dpo_run, tmp_path):
    before = snapshot(dpo_run)
    missing = tmp_path / "missing.jsonl"
    with pytest.raises((ValueError, FileNotFoundError), match="missing.jsonl"):
        train(cfg(dpo_run, data=str(missing), data_kind="pairs", overwrite=True))
    assert snapshot(dpo_run) == before  # not moved aside, config.json not replaced
    assert not [p for p in dpo_run.parent.iterdir() if p.name.startswith("run.old-")]
    with pytest.raises((ValueError, FileNotFoundError), match="missing.jsonl"):
        train(cfg(tmp_path / "new", data=str(missing), data_kind="pairs"))
    assert not (tmp_path / "new").exists()


# ---------------------------------------------------------------- reference caches


def test_reference_cache_keyed_on_weights_and_context(tmp_path):
    from dynamics.inputs.data import sentiment_pairs
    from dynamics.inputs.models import load_model

    _, tok = load_model("tiny-gpt2")
    tp = tokenize_pairs(tok, sentiment_pairs(None, "long_suffix", limit=4, seed=0))
    path = tmp_path / "ref.parquet"
    a, b = tiny_model("gpt2", seed=1), tiny_model("gpt2", seed=2)
    ra = cached_reference_logprobs(a, tp, path, context="x")
    assert cached_reference_logprobs(a, tp, path, context="x").equals(ra)          # same key: reused
    rb = cached_reference_logprobs(b, tp, path, context="x")                         # other weights
    assert not rb.ref_w.equals(ra.ref_w)
    mtime = path.stat().st_mtime_ns
    time.sleep(0.01)
    cached_reference_logprobs(b, tp, path, context="y")                              # other context
    assert path.stat().st_mtime_ns != mtime  # recomputed and rewritten


def test_changed_sft_never_reuses_reference_cache(base_runs, tmp_path, monkeypatch):
    """The bug: a second run with --sft-steps into the same directory reused the first run's
    reference log-probs. Even with the first run's caches in place (directory check bypassed),
    the post-SFT reference is recomputed: at step 0 the policy is the reference."""
    out = tmp_path / "run"
    out.mkdir()
    for name in ("ref_train.parquet", "ref_probe.parquet"):
        shutil.copy(base_runs / "dpo" / name, out / name)
    monkeypatch.setattr(train_mod, "out_dir_state", lambda p: "empty")
    run = train(cfg(out, sft_steps=5, lr=1e-2, steps=1, save_every=0))
    step0 = read_table(run.path, "records").query("step == 0")
    assert step0.margin.abs().max() < 1e-5
    assert step0.loss_value.tolist() == pytest.approx([math.log(2)] * len(step0), rel=1e-5)
    old = pd.read_parquet(base_runs / "dpo" / "ref_train.parquet")
    new = pd.read_parquet(out / "ref_train.parquet")
    assert not new.set_index("pair_id").ref_w.equals(old.set_index("pair_id").ref_w)


# ---------------------------------------------------------------- --resume


def test_resume_with_changed_config_is_refused(dpo_run):
    before = snapshot(dpo_run)
    with pytest.raises(InputError, match=r"configuration differs") as err:
        train(cfg(dpo_run, resume=True, loss="ipo", lr=1e-3))
    msg = str(err.value)
    assert 'loss: "dpo" -> "ipo"' in msg and "lr: 0.01 -> 0.001" in msg and "only --steps may change" in msg
    assert snapshot(dpo_run) == before


def test_resume_with_pairs_tokenized_otherwise_is_refused(dpo_run):
    """Rows recorded on other token ids (an older truncation rule, another tokenizer: the saved
    references carry the ids' fingerprints) are never continued by a resumed run."""
    import pandas as pd
    ref = dpo_run / "ref_probe.parquet"
    frame = pd.read_parquet(ref)
    frame.loc[1, "fingerprint"] = "0" * len(frame.loc[1, "fingerprint"])
    frame.to_parquet(ref, index=False)
    before = snapshot(dpo_run)
    with pytest.raises(InputError, match=r"tokenize to other ids .*--overwrite") as err:
        train(cfg(dpo_run, resume=True, steps=3))
    assert repr(str(frame.loc[1, "pair_id"])) in str(err.value)
    assert snapshot(dpo_run) == before
    assert main(["train", "--out", str(dpo_run), "--resume", "--steps", "3"] + CLI) == 2
    assert snapshot(dpo_run) == before


def test_resume_with_more_steps(dpo_run):
    run = train(cfg(dpo_run, resume=True, steps=4))
    assert read_table(run.path, "train").step.tolist() == [1, 2, 3, 4]
    counts = read_table(run.path, "records").groupby("step").pair_id.count()
    assert counts.index.tolist() == [0, 1, 2, 3, 4] and (counts == 2).all()
    assert run.read_config()["steps"] == 4 and run.read_config()["loss"] == "dpo"


def test_resume_without_checkpoint_or_run(tmp_path):
    with pytest.raises(InputError, match="holds no run to resume"):
        train(cfg(tmp_path / "nothing", resume=True))
    out = tmp_path / "nockpt"
    train(cfg(out, steps=1, save_every=0))
    before = snapshot(out)
    with pytest.raises(InputError, match=r"holds no checkpoint .*--save-every"):
        train(cfg(out, steps=1, save_every=0, resume=True))
    assert snapshot(out) == before


def test_resume_fewer_steps_than_checkpoint(dpo_run):
    with pytest.raises(InputError, match=r"checkpoint .* is at step 2, beyond --steps 1"):
        train(cfg(dpo_run, resume=True, steps=1))


# ---------------------------------------------------------------- loading what a user did not write


class _Payload:
    def __init__(self, flag):
        self.flag = str(flag)

    def __reduce__(self):
        return exec, (f"open({self.flag!r}, 'w').write('pwned')",)


@pytest.mark.parametrize("which", ["checkpoint", "sft"])
def test_pickle_payload_is_refused_and_not_run(sft_run, tmp_path, which):
    flag = tmp_path / "pwned"
    target = sft_run / "checkpoint" / "state.pt" if which == "checkpoint" else sft_run / "sft_model.pt"
    state = torch.load(target, weights_only=True)
    if which == "checkpoint":
        state["step"] = _Payload(flag)
    else:
        state["evil"] = _Payload(flag)
    torch.save(state, target)
    before = snapshot(sft_run)
    with pytest.raises(InputError, match=rf"{target} is not a plain-tensor .*refusing to load it"):
        train(cfg(sft_run, sft_steps=3, resume=True))
    assert not flag.exists()  # the payload never ran
    assert snapshot(sft_run) == before
    torch.load(target, weights_only=False)  # the payload is real: a full unpickler runs it
    assert flag.read_text() == "pwned"


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupted_checkpoint_is_refused(dpo_run, damage):
    f = dpo_run / "checkpoint" / "state.pt"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"not a checkpoint")
    before = snapshot(dpo_run)
    with pytest.raises(InputError, match=rf"{f} is corrupted or truncated: cannot load the checkpoint"):
        train(cfg(dpo_run, resume=True))
    assert snapshot(dpo_run) == before
    assert main(["train", "--resume", "--out", str(dpo_run), "--steps", "2"] + CLI) == 2


# ---------------------------------------------------------------- disk full


def test_disk_full_keeps_previous_table_and_no_tmp(tmp_path, monkeypatch):
    run = RunDir(tmp_path / "run")
    run.append("train", [dict(step=1, loss=0.5)])
    f = run.path / "train.parquet"
    before = f.read_bytes()

    def full(self, path, **kw):
        Path(path).write_bytes(b"PAR1 half a file")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_parquet", full)
    with pytest.raises(DiskFullError, match=rf"no space left on the device writing {f}; the previous "
                                            r"train\.parquet is intact") as err:
        run.append("train", [dict(step=2, loss=0.4)])
    assert isinstance(err.value, InputError)
    assert f.read_bytes() == before and not list(run.path.glob("*.tmp")) and not list(run.path.glob(".*.tmp"))
    assert run.table("train").step.tolist() == [1]  # the in-memory table was not advanced either
    monkeypatch.undo()
    run.append("train", [dict(step=2, loss=0.4)])
    assert read_table(run.path, "train").step.tolist() == [1, 2]


def test_disk_full_during_checkpoint(dpo_run, monkeypatch):
    ckpt = dpo_run / "checkpoint"
    before = snapshot(ckpt)

    def full(obj, f, *a, **kw):
        Path(f).write_bytes(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed: No space left on device")

    model = tiny_model("gpt2")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monkeypatch.setattr(checkpoints_mod.torch, "save", full)
    with pytest.raises(DiskFullError, match=rf"writing the checkpoint {ckpt}; the previous checkpoint is intact"):
        checkpoints_mod.save_checkpoint(ckpt, model, opt, 3)
    assert snapshot(ckpt) == before and not (dpo_run / "checkpoint.tmp").exists()


# ---------------------------------------------------------------- Ctrl-C


def test_interrupt_without_checkpoint_says_it_cannot_resume(tmp_path, monkeypatch):
    append = RunDir.append

    def interrupting(self, name, rows):
        rows = list(rows)
        append(self, name, rows)
        if name == "train" and rows[-1]["step"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(RunDir, "append", interrupting)
    out = tmp_path / "run"
    with pytest.raises(RunInterrupted) as err:
        train(cfg(out, steps=3, save_every=0))
    e = err.value
    assert e.step == 1 and not e.has_checkpoint and e.out == out
    msg = str(e)
    assert f"the run in {out} stopped after step 1 of 3" in msg and "train up to step 1" in msg
    assert "cannot be resumed" in msg and "--save-every N > 0" in msg
    assert f"dynamics train --overwrite --out {out}" in msg


# The child blocks right after the "train" row of step STOP_AT is on disk (flag file), so the
# SIGINT lands mid-run, deterministically.
_BLOCKING_CHILD = """
import signal, sys, time
from pathlib import Path
from dynamics.runs.rundir import RunDir
# Ctrl-C as in a terminal, even when this test runs under a shell that started it in the background
# (an asynchronous list without job control inherits SIGINT ignored, and Python then keeps it ignored)
signal.signal(signal.SIGINT, signal.default_int_handler)
from analyses.cli import main
flag, stop_at = Path(sys.argv[1]), int(sys.argv[2])
append = RunDir.append
def blocking_append(self, name, rows):
    rows = list(rows)
    append(self, name, rows)
    if name == "train" and any(r["step"] == stop_at for r in rows):
        flag.write_text("blocked")
        while True:
            time.sleep(3600)
RunDir.append = blocking_append
sys.exit(main(sys.argv[3:]))
"""


def test_sigint_says_where_and_how_to_resume(tmp_path):
    out = tmp_path / "run"
    args = ["train", "--out", str(out), "--steps", "6"] + CLI
    flag, log = tmp_path / "blocked", tmp_path / "child.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-c", _BLOCKING_CHILD, str(flag), "2"] + args,
                                stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.time() + 300
    while not flag.exists():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"the child exited ({proc.returncode}) before step 2: {log.read_text()[-2000:]}")
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=300) == 130                     # a hang guard, not a timing check
    stderr = log.read_text()
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    assert f"the run in {out} stopped after step 2 of 6" in stderr
    # blocked after the train row of step 2, before its checkpoint: step 2 is redone on resume
    assert "train up to step 2" in stderr and "The last checkpoint is at step 1" in stderr
    assert "resuming redoes steps 2-2" in stderr
    command = next(line.strip() for line in stderr.splitlines() if line.strip().startswith("dynamics train --resume"))
    assert f"--out {out}" in command
    # the printed command resumes the run
    argv = shlex.split(command)[1:]
    assert subprocess.run([sys.executable, "-m", "analyses.cli"] + argv, capture_output=True).returncode == 0
    assert read_table(out, "train").step.tolist() == list(range(1, 7))
    counts = read_table(out, "records").groupby("step").pair_id.count()
    assert counts.index.tolist() == list(range(7)) and (counts == 2).all()


# ------------------------------------------------------------------ config.json: one shape, versioned

REPO = Path(__file__).resolve().parents[1]


def test_config_is_versioned_and_one_shape(base_runs):
    from dynamics.runs.rundir import CONFIG_VERSION

    saved = json.loads((base_runs / "dpo" / "config.json").read_text())
    assert saved["version"] == CONFIG_VERSION and saved["writer"] == "dynamics train"
    assert {"model", "loss", "loss_params", "lr", "recorder"} <= set(saved)
    assert set(saved["recorder"]) == {f.name for f in dataclasses.fields(RecorderConfig)}


def test_version1_configs_are_upgraded():
    """The two version-1 shapes (trainer: recorder fields flat; callback: loss inside "recorder",
    "every" outside) read as version 2; a committed version-1 run directory still plots."""
    from dynamics.runs.rundir import upgrade_config

    trainer_v1 = dict(loss="simpo", lr=1e-5, eval_every=3, impl="func", whatif=False, token_pairs=2, probes=True,
                      steps=9, model="tiny-gpt2")
    up = upgrade_config(trainer_v1)
    assert up["recorder"] == dict(eval_every=3, impl="func", whatif=False, token_pairs=2, probes=True)
    assert up["loss"] == "simpo" and up["version"] == 2 and up["upgraded_from"] == 1 and "eval_every" not in up
    assert TrainConfig(**{k: v for k, v in up.items() if k not in ("version", "writer", "upgraded_from")}).recorder.eval_every == 3
    callback_v1 = dict(every=10, recorder=dict(loss="dpo", loss_params={"beta": 0.1}, lr=5e-6, impl="ghost",
                                               params="trainable", whatif=True, token_pairs=1, probes=False))
    up = upgrade_config(callback_v1)
    assert (up["loss"], up["loss_params"], up["lr"], up["writer"]) == ("dpo", {"beta": 0.1}, 5e-6, "DynamicsCallback")
    assert up["recorder"]["eval_every"] == 10 and "loss" not in up["recorder"] and "every" not in up
    RecorderConfig(**up["recorder"])
    with pytest.raises(InputError, match="newer than this library"):
        upgrade_config(dict(version=99))


def test_committed_version1_run_still_plots(tmp_path):
    src = REPO / "figures" / "sentiment" / "run" / "long_suffix"
    if not (src / "config.json").is_file():
        pytest.skip("no committed sentiment run")
    import shutil

    from dynamics.tools.plots import plot_run

    run = tmp_path / "run"
    shutil.copytree(src, run, ignore=shutil.ignore_patterns("token_grams", "ref_*"))
    assert "version" not in json.loads((run / "config.json").read_text())
    names = sorted(p.name for p in plot_run(run))
    assert "dynamics.png" in names and "logprobs.png" in names


def test_flat_round_trip_and_resume_against_version1(tmp_path):
    from dynamics.runs.train import config_differences

    cfg = TrainConfig.from_flat(model="tiny-gpt2", loss="dpo", eval_every=3, token_pairs=0, impl="func", steps=5)
    assert cfg.recorder == RecorderConfig(eval_every=3, token_pairs=0, impl="func")
    assert TrainConfig.from_flat(**cfg.flat()) == cfg
    v1 = dict(cfg.flat())                                    # a version-1 trainer config: all fields flat
    v1.pop("params"), v1.pop("token_chunk")                 # (which had no params / token_chunk)
    assert config_differences(json.loads(json.dumps(v1)), cfg) == []
    assert config_differences({**v1, "eval_every": 4}, cfg) == ["eval_every: 4 -> 3"]


def test_callback_names_moved_settings(tmp_path):
    from dynamics.runs.callbacks import DynamicsCallback

    with pytest.raises(TypeError, match=r"recorder=RecorderConfig\(eval_every=..., impl=...\)"):
        DynamicsCallback([], tmp_path / "x", every=5, impl="func")
    with pytest.raises(InputError, match="eval_every must be an integer >= 1"):
        RecorderConfig(eval_every=0)
