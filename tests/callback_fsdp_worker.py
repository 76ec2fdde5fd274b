"""TRL's DPOTrainer with `DynamicsCallback` under accelerate's FSDP2 (``fully_shard``), for
`tests/test_callback_fsdp.py`: one rank, started by torchrun (``--cpu``) or by ``accelerate launch
--use_fsdp --fsdp_version 2`` (``--cuda``, one GPU per process).

    python tests/callback_fsdp_worker.py --cpu|--cuda SPEC.json

SPEC: a JSON list of `callback_ddp_worker.train_case` keyword arguments, trained in turn in one
process group. Besides the files `train_case` writes (``LOGS/<name>.rank<r>.json`` and
``.writes.json``), every rank writes ``LOGS/<name>.rank<r>.fsdp.json``: how the trained model was
sharded (the names of the FSDP modules, the number of distinct units, the parameter types, the
trainer's ``is_fsdp_enabled``) and what the callback's `dynamics.runs.distributed.full_parameters`
windows gathered (count, bytes, seconds; collected by wrapping the function).

``--cpu``: accelerate does not shard on CPU: ``AcceleratorState`` sets ``DistributedType.FSDP``
only for GPU-like devices (``MULTI_GPU``, ``MULTI_NPU``, ...), so under ``MULTI_CPU`` it drops the
plugin and trains with DDP. `CPUFSDPTrainer` lifts that one gate after the accelerator is made
(``distributed_type = FSDP`` and an FSDP2 plugin on its state, as ``accelerate launch --use_fsdp
--fsdp_version 2 --fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP`` would make them), so that the
rest is accelerate's, transformers' and TRL's own FSDP2 code on CPU with gloo: accelerate's
``fsdp2_prepare_model`` shards the policy (decoder layers, the tail [norm, embedding, lm_head],
the root), TRL's ``prepare_fsdp`` the reference model. (Accelerate copies `PartialState`'s shared
state into every `AcceleratorState` made later, so the state's ``distributed_type`` reads
``MULTI_CPU`` again after the preparation, as on GPU it reads ``MULTI_GPU``; the trainer's
``is_fsdp_enabled`` and the sharded model stay.) ``--cuda``: nothing is patched.
"""
import contextlib
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from distributed_worker import float64_exact  # noqa: E402


def cpu_fsdp_trainer():
    """TRL's DPOTrainer with accelerate's FSDP2 switched on under ``MULTI_CPU`` (module docstring)."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    from trl import DPOTrainer

    class CPUFSDPTrainer(DPOTrainer):
        def create_accelerator_and_postprocess(self):
            super().create_accelerator_and_postprocess()
            state = self.accelerator.state
            if state.distributed_type != DistributedType.MULTI_CPU:
                raise RuntimeError(f"expected accelerate's MULTI_CPU, got {state.distributed_type}")
            state.distributed_type = DistributedType.FSDP
            state.fsdp_plugin = FullyShardedDataParallelPlugin(fsdp_version=2,
                                                               auto_wrap_policy="transformer_based_wrap")
            self.is_fsdp_enabled = True

    return CPUFSDPTrainer


def count_windows(log: list):
    """Wrap `dynamics.runs.distributed.full_parameters` so that every window that gathered
    something is appended to ``log`` (units, bytes, seconds)."""
    from dynamics.runs import distributed

    original = distributed.full_parameters

    @contextlib.contextmanager
    def counted(model):
        with original(model) as g:
            if g.units:
                log.append(dict(units=g.units, bytes=g.bytes, seconds=g.seconds))
            yield g

    distributed.full_parameters = counted


def main(argv: list[str]) -> int:
    mode, spec = argv[0], json.loads(Path(argv[1]).read_text())
    if mode not in ("--cpu", "--cuda"):
        raise SystemExit(f"usage: callback_fsdp_worker.py --cpu|--cuda SPEC.json, not {mode}")
    torch.set_num_threads(1)
    float64_exact()
    from callback_ddp_worker import train_case
    from torch.distributed.tensor import DTensor

    from dynamics.runs import distributed

    windows: list = []
    count_windows(windows)
    trainer_cls = cpu_fsdp_trainer() if mode == "--cpu" else None
    for case in spec:
        windows.clear()
        t0 = time.perf_counter()
        tr = train_case(**case, trainer_cls=trainer_cls, use_cpu=mode == "--cpu")
        units = distributed.fsdp_units(tr.model)
        names = {id(m): n for n, m in tr.model.named_modules()}
        info = dict(fsdp_modules=[names[id(u)] for u in units], units=len({id(u._get_fsdp_state()) for u in units}),
                    param_types=sorted({type(p).__name__ for p in tr.model.parameters()}),
                    dtensor=all(isinstance(p, DTensor) for p in tr.model.parameters()),
                    fsdp_enabled=bool(tr.is_fsdp_enabled), windows=list(windows),
                    train_s=time.perf_counter() - t0)
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        (Path(case["logs"]) / f"{case['name']}.rank{rank}.fsdp.json").write_text(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
