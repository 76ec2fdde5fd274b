"""Launching test processes with torchrun or by hand (RANK/WORLD_SIZE env), shared by the
multi-process tests (test_distributed, test_callback_ddp)."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent


def env(**extra) -> dict:
    """This process's environment without any torchrun variables, one thread per process, the
    repository importable, plus ``extra``."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    return {**base, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS.parent), **extra}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun() -> list[str]:
    """The torchrun command of this interpreter's environment."""
    exe = Path(sys.executable).with_name("torchrun")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "torch.distributed.run"]


def finish(procs, timeout_s: float) -> list[tuple[int, str, str]]:
    """(return code, stdout, stderr) of each process; all killed and the test failed on a timeout."""
    try:
        outs = [p.communicate(timeout=timeout_s) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"the processes did not finish within {timeout_s} s (a hang)")
    return [(p.returncode, o, e) for p, (o, e) in zip(procs, outs)]
