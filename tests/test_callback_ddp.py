"""`DynamicsCallback` under TRL's DPOTrainer with 2 processes (DDP, gloo on CPU; the tiny float64
Llama): the run directory equals that of one process training on the same global batches, every
rank logs the same summaries, only rank 0 writes, and a rank that fails in the callback stops both
processes with the error. The ranks are `tests/callback_ddp_worker.py`, started by torchrun.

Same batches. The Trainer's data loader is sharded by accelerate (``BatchSamplerShard``): from the
same seeded permutation as one process, rank r takes the r-th per-device batch of every group of
W consecutive ones, so with ``per_device_train_batch_size`` = 2 on 2 ranks the ranks' shares of
step s, in rank order, are exactly the single-process batch of 4 of step s (asserted: the rows'
pair ids in order). Rows are therefore compared in order, row for row.

Tolerances. Quantities at θ_0 (the probe records of step 0 but their update effects, step 0's
what-if rows, token decomposition and token Grams) are float64 on both sides: 1e-10 relative to
the column's largest value. Everything else went through TRL's
fused LM head, whose log-softmax and its backward run in float32 (`tests/test_callback_inrun.py`)
on batches of 2 instead of 4 (another tiling, so another float32 rounding): the in-run rows, and
θ_1, θ_2 through the gradient. For SGD (case ``full``) the update is −η·g, so its effect on the
probes carries the gradient's relative error, ≲ 8·eps32·log V (TOL32 of test_callback_inrun); the
LoRA case's AdamW normalizes the gradient elementwise (its first LoRA update is ≈ η·sign(g), and
elements with |g| ≈ Adam's eps carry the error as it is); measured: 5e-8 (full), 1e-7 (in-run rows
of LoRA), 5e-13 (LoRA probe records), all below TOL32 = 5.7e-6. A difference of rounded numbers
carries their rounding, not its own: the in-run ``margin`` = (logp_w − ref_w) − (logp_l − ref_l)
of TRL's float32 sums (|logp| ~ 100, margin ~ 0.1 after a step) is compared relative to its
operands' largest value (`OPERANDS`); one float32 ulp of 125 is 3e-5 of a margin of 0.24.
"""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import launch  # tests/launch.py (pytest puts tests/ on sys.path)

pytest.importorskip("trl")
pytest.importorskip("peft")

from dynamics.inputs.models import tiny_tokenizer  # noqa: E402

pytestmark = [
    pytest.mark.skipif(not (torch.distributed.is_available()
                            and getattr(torch.distributed, "is_gloo_available", lambda: False)()),
                       reason="torch.distributed with gloo is not available"),
    pytest.mark.usefixtures("float64_exact", "one_thread"),
]

TESTS = Path(__file__).resolve().parent
WORKER = TESTS / "callback_ddp_worker.py"
TOL64 = 1e-10
TOL32 = 8 * torch.finfo(torch.float32).eps * math.log(len(tiny_tokenizer()))
LAUNCH_TIMEOUT_S = 300          # a hang fails the test instead of blocking the suite
PROCESSES, BATCH = 2, 4         # global batch: 2 per process
CASES = {
    # full fine-tuning (a frozen reference model), SGD; token Grams of 3 probes (2 on rank 0, 1 on rank 1);
    # in-run rows, the tied embedding / lm_head's fused-head use included
    "full": dict(lora=False, in_run=True, token_pairs=3, optim="sgd"),
    # LoRA, AdamW; in-run rows of the training pairs with their update effects
    "lora": dict(lora=True, in_run=True),
}
AT_THETA_S = {"step", "pair_id", "logp_w", "logp_l", "logp_w_norm", "logp_l_norm", "ref_w", "ref_l", "len_w", "len_l",
              "margin", "d_w", "d_l", "loss_value", "ip_wl", "sq_w", "sq_l", "cos_wl", "pred_dw", "pred_dl", "thr_w",
              "thr_l", "case_pred"}      # records columns measured at θ_s (not through the update)
TIMING = {"step_s", "record_s"}
OPERANDS = {"margin": ("logp_w", "logp_l", "ref_w", "ref_l")}
"""Columns that are differences of others: their error is relative to the largest operand."""
CLI = ["trl-dpo", "--model", "tiny-llama", "--steps", "2", "--every", "1", "--batch-size", "4", "--n-probe", "3",
       "--style", "short_suffix"]


_env, _free_port, _torchrun = launch.env, launch.free_port, launch.torchrun


def _finish(procs) -> list[tuple[int, str, str]]:
    return launch.finish(procs, LAUNCH_TIMEOUT_S)


def _spec(root: Path, cases: dict) -> list[dict]:
    spec = [{**kw, "out": str(root / name), "batch_size": BATCH // PROCESSES, "logs": str(root / "logs"), "name": name}
            for name, kw in cases.items()]
    return spec


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """Every case of `CASES` and the ``dynamics trl-dpo`` example, trained by 2 processes started by
    torchrun (one launch, one process group): the root directory and the launch's stdout."""
    root = tmp_path_factory.mktemp("cb_ddp")
    spec = _spec(root, CASES) + [{"cli": CLI + ["--out", str(root / "cli")]}]
    (root / "spec.json").write_text(json.dumps(spec))
    cmd = _torchrun() + ["--standalone", "--nproc_per_node", str(PROCESSES), str(WORKER), str(root / "spec.json")]
    proc = subprocess.Popen(cmd, env=_env(), cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ((rc, out, err),) = _finish([proc])
    assert rc == 0, err[-6000:]
    return root, out


def assert_same_table(name: str, got: pd.DataFrame, want: pd.DataFrame, tol_of) -> None:
    """Same columns, rows in the same order, exact non-float values, floats to ``tol_of(column,
    step)`` relative to the column's largest value, or its operands' for a difference of other
    columns (`OPERANDS`; NaN and ±inf in the same places)."""
    assert list(got.columns) == list(want.columns), name
    assert len(got) == len(want), f"{name}: {len(got)} rows, single process {len(want)}"
    steps = want["step"].to_numpy() if "step" in want else np.zeros(len(want), dtype=int)
    for col in want.columns:
        if col in TIMING:
            continue
        a, b = got[col], want[col]
        if b.dtype.kind != "f":
            assert a.astype(str).tolist() == b.astype(str).tolist(), f"{name}.{col}"
            continue
        x, y = a.to_numpy(dtype=float), b.to_numpy(dtype=float)
        ok = np.isfinite(y)
        assert (np.isfinite(x) == ok).all() and (x[~ok].astype(str) == y[~ok].astype(str)).all(), \
            f"{name}.{col}: NaN or inf in other places"
        scale = max(float(np.abs(y[ok]).max()) if ok.any() else 0.0, 1e-300)
        for op in OPERANDS.get(col, ()):
            if op in want:
                scale = max(scale, float(np.nanmax(np.abs(want[op].to_numpy(dtype=float)))))
        for s in np.unique(steps[ok]):
            m = ok & (steps == s)
            err = float(np.abs(x[m] - y[m]).max()) / scale
            assert err <= tol_of(col, s), f"{name}.{col} step {s}: error {err:.2e} relative"


def tolerance(table: str):
    """TOL64 for what step 0 measures at θ_0 (records but the update effects, what-if, token
    decomposition), TOL32 for the rest (module docstring)."""
    def tol_of(col: str, step: int) -> float:
        at_theta0 = step == 0 and (table in ("whatif", "token_decomp") or (table == "records" and col in AT_THETA_S))
        return TOL64 if at_theta0 else TOL32
    return tol_of


@pytest.mark.parametrize("case", sorted(CASES))
def test_two_processes_record_what_one_process_records(ddp_runs, tmp_path, case):
    root, _ = ddp_runs
    assert_records_of_one_process(root, case, CASES[case], tmp_path)
    config = json.loads((root / case / "config.json").read_text())
    assert config["parallel"] == "ddp"


def assert_records_of_one_process(root: Path, case: str, kw: dict, tmp_path: Path, processes: int = PROCESSES) -> None:
    """The run directory ``root/case`` written by ``processes`` ranks (`callback_ddp_worker.train_case`
    of the case ``kw``, ``BATCH // processes`` pairs per rank) equals that of one process training on
    the same global batches (rows in order, tolerances of the module docstring); every rank logged
    the single process's summaries; only rank 0 wrote. Shared with `tests/test_callback_fsdp.py`."""
    from callback_ddp_worker import train_case

    run = root / case
    tr = train_case(tmp_path / "single", batch_size=BATCH, **kw)
    single = tmp_path / "single"
    tables = sorted(p.name for p in single.glob("*.parquet"))
    assert sorted(p.name for p in run.glob("*.parquet")) == tables
    assert ("train_records.parquet" in tables) == kw["in_run"]
    for t in tables:
        if t == "steps.parquet":       # timings of rank 0's steps
            assert pd.read_parquet(run / t).step.tolist() == pd.read_parquet(single / t).step.tolist()
            continue
        name = t.removesuffix(".parquet")
        assert_same_table(name, pd.read_parquet(run / t), pd.read_parquet(single / t), tolerance(name))
    grams = sorted(p.name for p in (single / "token_grams").iterdir())
    assert len(grams) == 2 * kw.get("token_pairs", 0)
    assert sorted(p.name for p in (run / "token_grams").iterdir()) == grams
    for g in grams:
        a, b = np.load(run / "token_grams" / g), np.load(single / "token_grams" / g)
        for k in b.files:
            if b[k].dtype.kind == "f":
                tol = TOL64 if g.startswith("step000000") else TOL32
                assert np.abs(a[k] - b[k]).max() <= tol * max(np.abs(b[k]).max(), 1e-300), f"{g}: {k}"
            else:
                assert (a[k] == b[k]).all(), f"{g}: {k}"
    rec = pd.read_parquet(run / "records.parquet")
    assert rec.groupby("step").size().to_dict() == {0: 4, 1: 4, 2: 4}        # both ranks' probe blocks
    config = json.loads((run / "config.json").read_text())
    assert config["writer"] == "DynamicsCallback" and config["processes"] == processes
    assert config["training_args"]["per_device_train_batch_size"] == BATCH // processes

    # every rank logged the same summaries, those of the single process
    logs = [json.loads((root / "logs" / f"{case}.rank{r}.json").read_text()) for r in range(processes)]
    assert all(log == logs[0] for log in logs) and len(logs[0]) == 2
    want = [{k: v for k, v in h.items() if k.startswith(("dyn/", "inrun/"))} for h in tr.state.log_history]
    want = [h for h in want if h]
    assert [sorted(h) for h in logs[0]] == [sorted(h) for h in want]
    for got, exp in zip(logs[0], want):
        for k in exp:
            assert got[k] == pytest.approx(exp[k], rel=TOL32, abs=TOL32), k
    if kw["in_run"]:
        assert "inrun/cos_wl" in logs[0][0]

    # only rank 0 wrote (an audit hook on every rank: files opened for writing, made, moved, removed)
    writes = [json.loads((root / "logs" / f"{case}.rank{r}.writes.json").read_text()) for r in range(processes)]
    assert all(w == [] for w in writes[1:]), [w[:5] for w in writes[1:]]
    assert any("records.parquet" in w for w in writes[0]) and any("config.json" in w for w in writes[0])


def test_trl_dpo_example_under_torchrun(ddp_runs):
    """``dynamics trl-dpo`` with 2 processes: one run directory with every probe pair at every
    step, the global micro-batch of 4 split 2 + 2, figures drawn by rank 0 only."""
    root, out = ddp_runs
    run = root / "cli"
    assert out.count(f"wrote {run / 'dynamics.png'}") == 1
    rec = pd.read_parquet(run / "records.parquet")
    assert rec.groupby("step").size().to_dict() == {0: 3, 1: 3, 2: 3}
    assert rec[rec.step < 2][["logp_w", "ip_wl", "act_dw"]].notna().all().all()
    config = json.loads((run / "config.json").read_text())
    assert config["processes"] == 2 and config["training_args"]["per_device_train_batch_size"] == 2
    assert not list(run.glob(".*.tmp"))


@pytest.mark.parametrize("where", ["probe", "inrun"])
def test_a_failing_rank_stops_every_rank(tmp_path, where):
    """Rank 1 fails at step 1 (``probe``: its probe pairs' reference log-probs are NaN, bad input on
    one rank; ``inrun``: its in-run rows raise): both processes stop with the error (rank 0: naming
    rank 1), without waiting on each other; rank 0 wrote the rows of step 0 (the in-run rows, kept
    for a later write, are flushed on the way out)."""
    root, port = tmp_path, str(_free_port())
    case = dict(lora=False, in_run=False, optim="sgd") if where == "probe" else dict(lora=True, in_run=True)
    (root / "spec.json").write_text(json.dumps(_spec(root, {"run": case})))
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(root / "spec.json")], cwd=root,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_env(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), LOCAL_WORLD_SIZE="2",
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=port, DYNAMICS_TEST_FAIL_RANK="1",
                                       DYNAMICS_TEST_FAIL_AT=where))
             for r in range(2)]
    (rc0, _, err0), (rc1, _, err1) = _finish(procs)
    message = "loss 'dpo' produced NaN" if where == "probe" else "test: a bad in-run row"
    assert rc1 != 0 and f"ValueError: {message}" in err1, err1[-3000:]
    assert rc0 != 0 and f"RankFailedInput: rank 1 failed: ValueError: {message}" in err0, err0[-3000:]
    steps = lambda t: pd.read_parquet(root / "run" / f"{t}.parquet").groupby("step").size().to_dict()  # noqa: E731
    assert steps("records") == {0: 4}          # step 1 failed before its records (or in them)
    if where == "inrun":
        assert steps("train_records") == {0: 4}
    assert not list((root / "run").glob(".*.tmp"))


def test_sharded_training_and_a_missing_process_group_refused(tmp_path):
    """DeepSpeed (from the training arguments or accelerate's launch environment) and FSDP version 1
    (a FullyShardedDataParallel wrapper in the model, or the trainer's FSDP plugin of version 1) are
    refused at train begin with `InputError`; FSDP is read off the model, so an FSDP request that
    left the model unsharded (accelerate on CPU trains with DDP then) is not refused for FSDP; a
    trainer of several processes without a process group fails with `RuntimeError`; nothing is
    written."""
    from types import SimpleNamespace

    from callback_ddp_worker import PROBES, pairs

    from dynamics.errors import InputError
    from dynamics.runs.callbacks import DynamicsCallback

    class FullyShardedDataParallel(torch.nn.Module):   # what FSDP version 1 wraps a model in (by name)
        def __init__(self, module):
            super().__init__()
            self.module = module

    cb = DynamicsCallback(pairs(PROBES, "p"), tmp_path / "dyn")
    model = torch.nn.Linear(1, 1)
    v1_trainer = SimpleNamespace(is_fsdp_enabled=True, accelerator=SimpleNamespace(
        distributed_type="DistributedType.FSDP", state=SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=1))))
    for args, env, trainer, m, match in [
            (dict(deepspeed="ds_config.json"), {}, None, model, "does not support DeepSpeed"),
            ({}, {"ACCELERATE_USE_DEEPSPEED": "true"}, None, model, "does not support DeepSpeed"),
            ({}, {}, None, FullyShardedDataParallel(model), "supports FSDP version 2 .*not version 1"),
            ({}, {}, v1_trainer, model, "supports FSDP version 2 .*not version 1")]:
        with pytest.MonkeyPatch.context() as mp:
            for k, v in env.items():
                mp.setenv(k, v)
            cb._trainer = trainer
            with pytest.raises(InputError, match=match):
                cb.on_train_begin(SimpleNamespace(world_size=2, **args), None, None, model=m)
    cb._trainer = None
    for args, env in [({}, {}), (dict(fsdp=["full_shard"]), {}), ({}, {"ACCELERATE_USE_FSDP": "true"})]:
        with pytest.MonkeyPatch.context() as mp:
            for k, v in env.items():
                mp.setenv(k, v)
            with pytest.raises(RuntimeError, match="2 processes but torch.distributed has no process group"):
                cb.on_train_begin(SimpleNamespace(world_size=2, **args), None, None, model=model)
    assert not (tmp_path / "dyn" / "config.json").exists()
