"""One rank of the multi-process tests (`tests/test_distributed.py`), started by them with torchrun's
environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``).

    python tests/distributed_worker.py runs SPEC.json     # train() every config of SPEC (a JSON list;
                                                          # an entry {"cli": ARGS} runs `dynamics ARGS`)
    python tests/distributed_worker.py cli ARGS...        # `dynamics ARGS...`, exit with its status

Both keep float64 exact (the ``float64_exact`` patches of ``conftest.py``, as the single-process
runs they are compared with) and use one thread. ``DYNAMICS_TEST_FAIL_RANK=r`` and
``DYNAMICS_TEST_FAIL_STEP=s`` make rank r's reference log-probs of step s NaN (bad input on one
rank: its loss is not finite), with ``grad_accum=1``.
"""
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def float64_exact() -> None:
    """The patches of the ``float64_exact`` fixture, for the life of this process."""
    import conftest

    for mod in (conftest.llama_mod, conftest.neox_mod):
        mod.eager_attention_forward = conftest._eager_attention64
    conftest.llama_mod.LlamaRotaryEmbedding.forward = conftest._rotary64
    conftest.neox_mod.GPTNeoXRotaryEmbedding.forward = conftest._rotary64
    conftest.llama_mod.LlamaRMSNorm.forward = conftest._rmsnorm64


def inject_failure() -> None:
    """Bad input on one rank (see the module docstring)."""
    rank, step = os.environ.get("DYNAMICS_TEST_FAIL_RANK"), os.environ.get("DYNAMICS_TEST_FAIL_STEP")
    if rank is None or int(rank) != int(os.environ.get("RANK", "0")):
        return
    import dynamics.runs.train as train_mod

    original, calls = train_mod._ref_tensors, [0]

    def ref_tensors(ref, idx, dtype, device):
        ref_w, ref_l = original(ref, idx, dtype, device)
        calls[0] += 1
        if calls[0] == int(step) + 1:           # one call per step (grad_accum=1)
            ref_w = torch.full_like(ref_w, float("nan"))
        return ref_w, ref_l

    train_mod._ref_tensors = ref_tensors


def main(argv: list[str]) -> int:
    torch.set_num_threads(1)
    float64_exact()
    inject_failure()
    if argv[0] == "cli":
        from analyses.cli import main as cli_main
        return cli_main(argv[1:])
    from dynamics.runs.train import TrainConfig, train

    from analyses.cli import main as cli_main

    for flat in json.loads(Path(argv[1]).read_text()):   # one process group (made by the first run) for all
        if "cli" in flat:                                # a `dynamics` command line
            status = cli_main(flat["cli"])
            if status:
                return status
        else:
            train(TrainConfig.from_flat(**flat))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
