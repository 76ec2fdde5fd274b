"""`DynamicsCallback` under TRL's DPOTrainer with accelerate's FSDP2 (``fully_shard``), 2 processes:
the run directory equals that of one process training on the same global batches (the cases,
comparison and tolerances of `tests/test_callback_ddp.py`: full fine-tuning with SGD and token
Grams; LoRA with AdamW and in-run rows with their update effects, also with 2 micro-batches per
step), the model really trained sharded, and every measurement ran on gathered full parameters
(the all-gathered bytes are the whole model's, per window). The ranks are
`tests/callback_fsdp_worker.py`.

Where what runs. Accelerate does not shard on CPU: ``AcceleratorState`` sets
``DistributedType.FSDP`` only for GPU-like devices, so ``accelerate launch --use_fsdp
--fsdp_version 2`` on CPU trains with DDP (`test_accelerate_on_cpu_trains_with_ddp` shows it and
that the callback records that run as DDP). On CPU (gloo) the worker lifts that one gate
(``--cpu``: accelerate's distributed type and an FSDP2 plugin set on the accelerator's state
after it is made), and the rest is accelerate's, transformers' and TRL's own FSDP2 code: the
policy sharded by ``fsdp2_prepare_model`` (decoder layers, the tail [final norm, embedding,
lm_head] as one unit of three modules, the root), the reference model by TRL's ``prepare_fsdp``.
`test_fsdp_on_cuda_records_what_one_process_records` runs the unpatched launch on CUDA (skipped
without CUDA; one process per GPU, at most 2).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import launch  # tests/launch.py (pytest puts tests/ on sys.path)

pytest.importorskip("trl")
pytest.importorskip("peft")

from test_callback_ddp import BATCH, PROCESSES, _spec, assert_records_of_one_process  # noqa: E402
from test_callback_ddp import CASES as DDP_CASES  # noqa: E402


def _fsdp2_gloo() -> bool:
    if not (torch.distributed.is_available() and getattr(torch.distributed, "is_gloo_available", lambda: False)()):
        return False
    try:
        from torch.distributed.fsdp import FSDPModule, fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


pytestmark = [
    pytest.mark.skipif(not _fsdp2_gloo(), reason="torch.distributed with gloo and FSDP2 is not available"),
    pytest.mark.usefixtures("float64_exact", "one_thread"),
]

TESTS = Path(__file__).resolve().parent
WORKER = TESTS / "callback_fsdp_worker.py"
LAUNCH_TIMEOUT_S = 300          # a hang fails the test instead of blocking the suite
CASES = {**DDP_CASES,
         # LoRA with 2 micro-batches per step: the in-run windows across FSDP's gradient accumulation
         "lora_ga": dict(lora=True, in_run=True, ga=2)}


def _model_bytes(lora: bool) -> int:
    """Bytes of the tiny float64 Llama's parameters (with the test's LoRA adapters when ``lora``)."""
    from callback_ddp_worker import LORA

    from dynamics.inputs.models import tiny_model

    model = tiny_model("llama", seed=0, dtype=torch.float64)
    if lora:
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(**LORA))
    return sum(p.numel() * p.element_size() for p in model.parameters())


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    """Every case of `CASES`, trained by 2 processes (torchrun, gloo) under accelerate's FSDP2 path
    (`callback_fsdp_worker.py --cpu`): the root directory."""
    root = tmp_path_factory.mktemp("cb_fsdp")
    (root / "spec.json").write_text(json.dumps(_spec(root, CASES)))
    cmd = launch.torchrun() + ["--standalone", "--nproc_per_node", str(PROCESSES), str(WORKER), "--cpu",
                               str(root / "spec.json")]
    proc = subprocess.Popen(cmd, env=launch.env(), cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ((rc, _, err),) = launch.finish([proc], LAUNCH_TIMEOUT_S)
    assert rc == 0, err[-6000:]
    return root


@pytest.mark.parametrize("case", sorted(CASES))
def test_fsdp_records_what_one_process_records(fsdp_runs, tmp_path, case):
    assert_records_of_one_process(fsdp_runs, case, CASES[case], tmp_path)
    config = json.loads((fsdp_runs / case / "config.json").read_text())
    assert config["parallel"] == "fsdp2"
    for r in range(PROCESSES):
        info = json.loads((fsdp_runs / "logs" / f"{case}.rank{r}.fsdp.json").read_text())
        # trained sharded: 2 decoder layers, the tail [norm, embedding, lm_head] (one unit), the root
        assert info["fsdp_enabled"] and info["units"] == 4 and info["dtensor"], info
        # every window gathered the whole model (all 4 units), nothing less
        assert info["windows"] and all(w["units"] == 4 and w["bytes"] == _model_bytes(CASES[case]["lora"])
                                       for w in info["windows"]), info["windows"]


def test_fsdp_communication(fsdp_runs):
    """What the callback's windows all-gathered per run, printed for the record (``pytest -s``):
    one window per recorder call and per pass at train begin, and with in-run rows one per
    micro-batch."""
    for case in sorted(CASES):
        info = json.loads((fsdp_runs / "logs" / f"{case}.rank0.fsdp.json").read_text())
        w = info["windows"]
        # full: reference, the recorder's calls (before/after update of 2 steps, final) -> 1 + 2·2 + 1;
        # in-run: + construction, head check, and per step: each micro-batch, begin and end (update effects)
        ga = CASES[case].get("ga", 1)
        want = 1 + 2 * 2 + 1 + (2 + (ga + 2) * 2 if CASES[case]["in_run"] else 0)
        assert len(w) == want, (case, len(w))
        ms = sorted(x["seconds"] * 1e3 for x in w)
        print(f"\n{case}: {len(w)} windows, {w[0]['bytes']} bytes each (float64 tiny Llama), all-gathers "
              f"{sum(ms):.1f} ms in all (median {ms[len(ms) // 2]:.1f} ms) of {info['train_s']:.1f} s of training")


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA accelerate shards: this shows the CPU fallback")
def test_accelerate_on_cpu_trains_with_ddp(tmp_path):
    """``accelerate launch --use_fsdp --fsdp_version 2`` on CPU: accelerate keeps ``MULTI_CPU``, drops
    the FSDP plugin and wraps the model in DDP; the callback records that run (every probe pair at
    every step) and ``config.json`` says ``parallel: ddp``."""
    exe = Path(sys.executable).with_name("accelerate")
    if not exe.is_file():
        pytest.skip("no accelerate launcher next to this interpreter")
    out = tmp_path / "run"
    cmd = [str(exe), "launch", "--use_fsdp", "--fsdp_version", "2", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(launch.free_port()),
           "-m", "analyses.cli", "trl-dpo", "--out", str(out), "--model", "tiny-llama", "--steps", "1",
           "--every", "1", "--batch-size", "4", "--n-probe", "3", "--style", "short_suffix"]
    proc = subprocess.Popen(cmd, env=launch.env(), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    ((rc, _, err),) = launch.finish([proc], LAUNCH_TIMEOUT_S)
    assert rc == 0, err[-6000:]
    config = json.loads((out / "config.json").read_text())
    assert config["parallel"] == "ddp" and config["processes"] == 2
    import pandas as pd
    assert pd.read_parquet(out / "records.parquet").groupby("step").size().to_dict() == {0: 3, 1: 3}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="accelerate shards with FSDP on GPU-like devices only")
def test_fsdp_on_cuda_records_what_one_process_records(tmp_path):
    """The unpatched launch on CUDA (nccl): the environment ``accelerate launch --use_fsdp
    --fsdp_version 2 --fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP`` sets, one process per GPU
    (2, or 1 on a one-GPU machine, where FSDP2 shards over a mesh of one: DTensor parameters all
    the same); the rows are compared with one process on CPU (float64 on both sides)."""
    n = min(2, torch.cuda.device_count())
    root = tmp_path
    spec = [{**kw, "out": str(root / name), "batch_size": BATCH // n, "logs": str(root / "logs"), "name": name}
            for name, kw in CASES.items()]
    (root / "spec.json").write_text(json.dumps(spec))
    env = launch.env(ACCELERATE_USE_FSDP="true", FSDP_VERSION="2", FSDP_AUTO_WRAP_POLICY="TRANSFORMER_BASED_WRAP",
                     CUDA_VISIBLE_DEVICES=os.environ.get("CUDA_VISIBLE_DEVICES", ",".join(map(str, range(n)))))
    cmd = launch.torchrun() + ["--standalone", "--nproc_per_node", str(n), str(WORKER), "--cuda",
                               str(root / "spec.json")]
    proc = subprocess.Popen(cmd, env=env, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ((rc, _, err),) = launch.finish([proc], LAUNCH_TIMEOUT_S)
    assert rc == 0, err[-6000:]
    for case in sorted(CASES):
        assert_records_of_one_process(root, case, CASES[case], tmp_path / f"single_{case}", processes=n)
        info = json.loads((root / "logs" / f"{case}.rank0.fsdp.json").read_text())
        assert info["fsdp_enabled"] and info["units"] == 4 and info["dtensor"], info
        assert json.loads((root / case / "config.json").read_text())["parallel"] == "fsdp2"
