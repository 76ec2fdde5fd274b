"""Multi-process training and recording (`dynamics.runs.distributed`): 2 processes, gloo on CPU, the
tiny float64 Llama. The run directory of a 2-process run (torchrun) equals the single-process run
on the same data: every table (probe records, what-if, token decomposition, probes, the in-run
rows of every training pair, the per-training-pair split of ``cross``, the training losses) and
every token Gram, row for row, to 1e-10 relative in float64 — plain, with gradient accumulation and
with LoRA. A rank that fails on its own input stops both processes with the error (no hang), and
the rows of the completed steps are on disk. The workers are `tests/distributed_worker.py`."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import launch  # tests/launch.py (pytest puts tests/ on sys.path)

from dynamics.errors import InputError
from dynamics.runs import distributed
from dynamics.runs.recorder import InRunRecorder
from dynamics.runs.train import TrainConfig, train

pytestmark = [
    pytest.mark.skipif(not (torch.distributed.is_available()
                            and getattr(torch.distributed, "is_gloo_available", lambda: False)()),
                       reason="torch.distributed with gloo is not available"),
    pytest.mark.usefixtures("float64_exact", "one_thread"),
]

TESTS = Path(__file__).resolve().parent
WORKER = TESTS / "distributed_worker.py"
TOL = 1e-10
LAUNCH_TIMEOUT_S = 420          # a hang fails the test instead of blocking the suite
BASE = dict(model="tiny-llama", n_pairs=24, n_probe=4, steps=2, batch_size=4, eval_every=1, lr=1e-2, progress=False,
            dtype="float64", in_run=True)
CASES = {
    # 4 probes split 2 + 2, token Grams of the first 3 (2 on rank 0, 1 on rank 1), in-run update
    # effects, and the per-training-pair split of `cross` (its training pairs gathered from both ranks)
    "plain": dict(optimizer="sgd", token_pairs=3, in_run_update=True, cross=True),
    # 2 micro-batches of 2 pairs: each rank 1 pair of each; 3 probes split 2 + 1; learning-dynamics probes;
    # in-run rows by book-keeping (per-sequence gradients summed into the .grad DDP all-reduces)
    "grad_accum": dict(optimizer="adamw", grad_accum=2, n_probe=3, probes=True, in_run_bookkeeping=True),
    # LoRA; in-run update effects from each rank's kept factors
    "lora": dict(optimizer="adamw", lora_r=2, in_run_update=True, in_run_update_from="factors"),
}
TIMING = {"elapsed_s", "step_s", "record_s"}
CLI_ARGS = ["train", "--model", "tiny-llama", "--n-pairs", "24", "--n-probe", "4", "--steps", "2", "--batch-size", "4",
            "--eval-every", "1", "--lr", "0.01", "--dtype", "float64", "--in-run", "--no-progress"]


_env, _free_port, _torchrun = launch.env, launch.free_port, launch.torchrun


def _finish(procs) -> list[tuple[int, str, str]]:
    return launch.finish(procs, LAUNCH_TIMEOUT_S)


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """Every case of `CASES` and one ``dynamics train`` command, trained by 2 processes started by
    torchrun (one launch): {case: run directory}, plus ``"cli"`` and the launch's output."""
    root = tmp_path_factory.mktemp("ddp")
    spec = [{**BASE, **kw, "out": str(root / name)} for name, kw in CASES.items()]
    spec.append({"cli": CLI_ARGS + ["--out", str(root / "cli")]})
    (root / "spec.json").write_text(json.dumps(spec))
    cmd = _torchrun() + ["--standalone", "--nproc_per_node", "2", str(WORKER), "runs", str(root / "spec.json")]
    proc = subprocess.Popen(cmd, env=_env(), cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ((rc, out, err),) = _finish([proc])
    assert rc == 0, err[-6000:]
    return {**{name: root / name for name in CASES}, "cli": root / "cli", "stdout": out}


def _scale(name: str, column: str, df: pd.DataFrame) -> float:
    """The size a column's differences are measured against: its own largest value, and for the
    rounding-level residual ``contrib_resid_*`` (``upd − Σ contributions``) that of ``upd_*``."""
    ref = column.replace("contrib_resid_", "upd_d") if column.startswith("contrib_resid_") else column
    values = df[ref].to_numpy(dtype=float)
    values = values[np.isfinite(values)]
    return float(np.abs(values).max()) if values.size else 0.0


def assert_same_table(name: str, got: pd.DataFrame, want: pd.DataFrame) -> None:
    """Same columns, rows in the same order, exact non-float values, floats to `TOL` relative
    (NaN and ±inf, e.g. a what-if threshold of a zero coefficient, in the same places)."""
    assert list(got.columns) == list(want.columns), name
    assert len(got) == len(want), f"{name}: {len(got)} rows, single process {len(want)}"
    for col in want.columns:
        if col in TIMING:
            continue
        a, b = got[col], want[col]
        if b.dtype.kind == "f":
            x, y = a.to_numpy(dtype=float), b.to_numpy(dtype=float)
            ok = np.isfinite(y)
            assert (np.isfinite(x) == ok).all() and (x[~ok].astype(str) == y[~ok].astype(str)).all(), \
                f"{name}.{col}: NaN or inf in other places"
            err = float(np.abs(x[ok] - y[ok]).max()) if ok.any() else 0.0
            assert err <= TOL * max(_scale(name, col, want), 1e-300), f"{name}.{col}: max error {err:.3e}"
        else:
            assert a.astype(str).tolist() == b.astype(str).tolist(), f"{name}.{col}"


def assert_same_run(got: Path, want: Path) -> None:
    tables = sorted(p.name for p in want.glob("*.parquet"))
    assert sorted(p.name for p in got.glob("*.parquet")) == tables
    for t in tables:
        assert_same_table(t, pd.read_parquet(got / t), pd.read_parquet(want / t))
    grams = sorted(p.name for p in (want / "token_grams").iterdir())
    assert sorted(p.name for p in (got / "token_grams").iterdir()) == grams
    for g in grams:
        a, b = np.load(got / "token_grams" / g), np.load(want / "token_grams" / g)
        assert sorted(a.files) == sorted(b.files)
        for k in b.files:
            if b[k].dtype.kind == "f":
                assert np.abs(a[k] - b[k]).max() <= TOL * max(np.abs(b[k]).max(), 1e-300), f"{g}: {k}"
            else:
                assert (a[k] == b[k]).all(), f"{g}: {k}"
    config = lambda p: {k: v for k, v in json.loads((p / "config.json").read_text()).items() if k != "out"}
    assert config(got) == config(want)


@pytest.mark.parametrize("case", sorted(CASES))
def test_two_processes_record_what_one_process_records(ddp_runs, tmp_path, case):
    single = train(TrainConfig.from_flat(**{**BASE, **CASES[case], "out": str(tmp_path / "single")}))
    run = ddp_runs[case]
    assert_same_run(run, single.path)
    rec = pd.read_parquet(run / "train_records.parquet")
    assert rec.groupby("step").size().tolist() == [4, 4]           # both ranks' pairs of every step
    if case == "grad_accum":
        assert rec.micro.tolist() == [0, 0, 1, 1] * 2


def test_torchrun_cli_writes_once(ddp_runs):
    """``dynamics train`` under torchrun: one run directory, figures drawn by rank 0 only."""
    run = ddp_runs["cli"]
    assert ddp_runs["stdout"].count(f"wrote {run / 'dynamics.png'}") == 1
    rec = pd.read_parquet(run / "records.parquet")
    assert rec.groupby("step").size().to_dict() == {0: 4, 1: 4, 2: 4}
    assert pd.read_parquet(run / f"{InRunRecorder.TABLE}.parquet").groupby("step").size().to_dict() == {0: 4, 1: 4}
    assert not list(run.glob(".*.tmp"))


def test_a_failing_rank_stops_every_rank(tmp_path):
    """Rank 1's reference log-probs of step 2 are NaN (bad input on one rank): both processes exit
    with status 2 and the error (rank 0: naming rank 1), without waiting on each other, and every
    table holds the rows of steps 0 and 1, complete."""
    out, port = tmp_path / "run", str(_free_port())
    argv = CLI_ARGS + ["--out", str(out), "--steps", "4"]
    procs = [subprocess.Popen([sys.executable, str(WORKER), "cli", *argv], cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env=_env(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                                       MASTER_PORT=port, DYNAMICS_TEST_FAIL_RANK="1", DYNAMICS_TEST_FAIL_STEP="2"))
             for r in range(2)]
    (rc0, _, err0), (rc1, _, err1) = _finish(procs)
    assert rc1 == 2 and "error: step 2: loss 'dpo' produced NaN" in err1, err1[-3000:]
    assert rc0 == 2 and "error: rank 1 failed: ValueError: step 2: loss 'dpo' produced NaN" in err0, err0[-3000:]
    assert "Traceback" not in err0 + err1
    steps = lambda t: pd.read_parquet(out / f"{t}.parquet").groupby("step").size().to_dict()
    assert steps("train") == {1: 1, 2: 1}
    assert steps("records") == {0: 4, 1: 4} and steps(InRunRecorder.TABLE) == {0: 4, 1: 4}
    assert sorted(steps("whatif")) == sorted(steps("token_decomp")) == [0, 1]
    assert pd.read_parquet(out / "records.parquet")[["logp_w", "ip_wl", "act_dw"]].notna().all().all()
    assert not list(out.glob(".*.tmp"))


# ------------------------------------------------------------------ the pieces, in one process

def test_shard_slice_blocks_restore_the_order():
    for n in range(0, 9):
        for size in range(1, 5):
            blocks = [shard_slice_list(n, r, size) for r in range(size)]
            assert sum(blocks, []) == list(range(n))
            assert max(map(len, blocks)) - min(map(len, blocks)) <= 1


def shard_slice_list(n, rank, size):
    return list(range(n))[distributed.shard_slice(n, rank, size)]


def test_rank_micro_batches_split_every_micro_batch():
    idx = [7, 3, 5, 1, 0, 2, 6, 4]
    per_rank = [distributed.rank_micro_batches(idx, 2, distributed.World(rank=r, size=2)) for r in range(2)]
    assert per_rank == [[[7, 3], [0, 2]], [[5, 1], [6, 4]]]
    # rank shares of micro-batch k, in rank order, are the single-process micro-batch k
    assert [per_rank[0][k] + per_rank[1][k] for k in range(2)] == distributed.rank_micro_batches(idx, 2)
    with pytest.raises(InputError, match=r"divisible by grad_accum × processes = 2 × 3"):
        distributed.check_batch(8, 2, distributed.World(rank=0, size=3))


def test_single_process_is_unchanged():
    """Without a process group nothing communicates: no DDP wrapper, `agree` re-raises this
    process's error, `all_mean` and `on_main` are the identity and the call."""
    w = distributed.world()
    assert not w.distributed and w.is_main
    assert type(distributed.training_forward(torch.nn.Linear(1, 1), w)) is distributed.PairForward
    with pytest.raises(KeyError, match="mine"):
        distributed.agree(KeyError("mine"))
    distributed.agree(None)
    assert distributed.all_mean(2.5) == 2.5 and distributed.on_main(lambda: 3) == 3
    assert issubclass(distributed.RankFailedInput, InputError) and issubclass(distributed.RankFailed, RuntimeError)


def test_replica_run_dir_writes_nothing(tmp_path):
    replica = distributed.run_dir(tmp_path / "r", distributed.World(rank=1, size=2))
    replica.write_config({"a": 1}, writer="test")
    replica.append("records", [dict(step=0, x=1.0)])
    replica.truncate_after("records", 0)
    assert not (tmp_path / "r").exists() and replica.table("records").empty
