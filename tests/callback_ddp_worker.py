"""TRL's DPOTrainer with `DynamicsCallback`, for `tests/test_callback_ddp.py`: one rank of a
multi-process run (started by torchrun, or with its environment: ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), or, imported, the single-process run it is
compared with (`train_case`).

    python tests/callback_ddp_worker.py SPEC.json    # every case of SPEC (a JSON list) in turn; an
                                                     # entry {"cli": ARGS} runs `dynamics ARGS`

A case is the keyword arguments of `train_case`. Every rank writes the callback's summaries it
logged (``dyn/*``, ``inrun/*`` of ``state.log_history``) to ``LOGS/<name>.rank<r>.json``, and the
files and directories it created, wrote, moved or removed inside the case's run directory (seen
by an audit hook, `WriteWatch`) to ``LOGS/<name>.rank<r>.writes.json`` (both outside the run
directory). Float64 is kept exact (the ``float64_exact`` patches of ``conftest.py``), one
thread. ``DYNAMICS_TEST_FAIL_RANK=r``: rank r fails at step 1: with ``DYNAMICS_TEST_FAIL_AT=probe``
(the default) the reference log-probs of its probe pairs are NaN from its second recorded step on
(bad probe input on one rank: the probe loss is not finite there); with ``inrun`` the in-run rows
of its second micro-batch raise a ValueError.
"""
import copy
import json
import os
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from distributed_worker import float64_exact  # noqa: E402

PAIRS = [  # unequal prompt and response lengths: right padding inside every batch
    ("The movie was", " wonderful and I loved every minute.", " bad"),
    ("I hate", " waiting", " waiting in long lines at the bank on mondays"),
    ("TL;DR: my friend ignores me", " and I feel bad about it", " so what"),
    ("Happy mothers day", " mum, what a lovely morning", " whatever"),
    ("The service", " was quick and friendly", " was slow"),
    ("My phone", " works great", " broke after a day and support never answered"),
    ("This book", " is a delight", " bored me"),
    ("Our trip to the coast", " was sunny and calm", " got rained out"),
]
PROBES = [("The food was", " good", " cold"), ("I think the show", " is great fun", " is a waste of time"),
          ("Weather today:", " sunny", " awful and grey"), ("The new update", " fixed my problems", " broke it")]
LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0)
BETA = 0.1


def pairs(rows, prefix):
    from types import SimpleNamespace

    return [SimpleNamespace(id=f"{prefix}{i}", prompt=p, chosen=c, rejected=r) for i, (p, c, r) in enumerate(rows)]


class WriteWatch:
    """Paths under ``root`` that this process opened for writing, created, renamed, replaced or
    removed (Python's audit events: ``open`` with a writing mode, ``os.mkdir``, ``os.rename``,
    ``os.remove``, ``tempfile.mkstemp``, ...) while ``on``; writes made by C or C++ code without
    these events (pyarrow writing a path) show through the ``os.rename`` of `atomic_write_bytes`."""

    EVENTS = {"os.mkdir", "os.rename", "os.remove", "os.rmdir", "os.truncate", "os.chmod", "tempfile.mkstemp",
              "tempfile.mkdtemp", "shutil.rmtree", "shutil.move", "shutil.copyfile"}
    _hooked: list = []

    def __init__(self, root):
        self.root, self.paths, self.on = os.path.realpath(root), [], False
        if not WriteWatch._hooked:           # an audit hook cannot be removed: one for the process
            sys.addaudithook(WriteWatch._dispatch)
        WriteWatch._hooked.append(self)

    @staticmethod
    def _dispatch(event, args):
        for w in WriteWatch._hooked:
            if w.on:
                w._event(event, args)

    def _event(self, event, args):
        if event == "open":
            path, mode, flags = args
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC))
            paths = [path] if writing else []
        elif event in self.EVENTS:
            paths = [a for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))]
        else:
            return
        for path in paths:
            if isinstance(path, (str, os.PathLike)):
                full = os.path.realpath(path)
                if full == self.root or full.startswith(self.root + os.sep):
                    self.paths.append(f"{event} {path}")


def train_case(out, *, batch_size: int, lora: bool, in_run: bool, steps: int = 2, ga: int = 1, token_pairs: int = 0,
               optim: str = "adamw_torch", logs=None, name: str = "run", trainer_cls=None, use_cpu: bool = True):
    """Train the tiny float64 Llama with TRL's DPOTrainer and the callback (probe records every
    step); ``batch_size`` per process. ``trainer_cls``: a subclass of TRL's DPOTrainer to use
    instead (`tests/callback_fsdp_worker.py`); ``use_cpu=False``: train on the accelerator.
    Returns the trainer."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    trainer_cls = DPOTrainer if trainer_cls is None else trainer_cls

    from dynamics.inputs.models import tiny_model, tiny_tokenizer
    from dynamics.runs.callbacks import DynamicsCallback
    from dynamics.runs.recorder import RecorderConfig

    tok, model = tiny_tokenizer(), tiny_model("llama", seed=0, dtype=torch.float64)
    train = pairs(PAIRS, "t")
    ds = Dataset.from_dict({k: [getattr(p, k) for p in train] for k in ("prompt", "chosen", "rejected")})
    args = DPOConfig(output_dir=str(Path(out).parent / f"{Path(out).name}-trainer"),
                     per_device_train_batch_size=batch_size, gradient_accumulation_steps=ga, max_steps=steps, learning_rate=1e-2, beta=BETA, logging_steps=1,
                     report_to=[], use_cpu=use_cpu, save_strategy="no", bf16=False, fp16=False, seed=0,
                     disable_tqdm=True, activation_checkpointing=False, lr_scheduler_type="constant", optim=optim)
    peft = None
    if lora:
        from peft import LoraConfig
        peft = LoraConfig(**LORA)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr = trainer_cls(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=peft,
                        ref_model=None if lora else copy.deepcopy(model))
    watch = WriteWatch(out) if logs is not None else None   # (a process's audit hook stays: workers only)
    if watch is not None:
        watch.on = True                  # from the callback's construction on (it makes the directory)
    try:
        cfg = RecorderConfig(eval_every=1, in_run=in_run, in_run_update=in_run, token_pairs=token_pairs)
        DynamicsCallback(pairs(PROBES, "p"), out, cfg, loss="dpo", loss_params={"beta": BETA}).attach(tr)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tr.train()
    finally:
        if watch is not None:
            watch.on = False
    if logs is not None:
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        logged = [{k: v for k, v in h.items() if k.startswith(("dyn/", "inrun/"))} for h in tr.state.log_history]
        Path(logs).mkdir(parents=True, exist_ok=True)
        (Path(logs) / f"{name}.rank{rank}.json").write_text(json.dumps([h for h in logged if h]))
        (Path(logs) / f"{name}.rank{rank}.writes.json").write_text(json.dumps(watch.paths))
    return tr


def inject_failure() -> None:
    """Bad probe input on one rank (module docstring)."""
    rank = os.environ.get("DYNAMICS_TEST_FAIL_RANK")
    if rank is None or int(rank) != int(os.environ.get("RANK", "0")):
        return
    if os.environ.get("DYNAMICS_TEST_FAIL_AT", "probe") == "inrun":
        from dynamics.runs.callbacks import DynamicsCallback

        add_rows, seen = DynamicsCallback._add_rows, [0]

        def failing_add_rows(self, *args, **kwargs):
            seen[0] += 1
            if seen[0] == 2:
                raise ValueError("test: a bad in-run row")
            return add_rows(self, *args, **kwargs)

        DynamicsCallback._add_rows = failing_add_rows
        return
    from dynamics.runs.recorder import Recorder

    original, calls = Recorder.before_update, [0]

    def before_update(self, step, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 2:
            self.ref_w = torch.full_like(self.ref_w, float("nan"))
        return original(self, step, *args, **kwargs)

    Recorder.before_update = before_update


def main(argv: list[str]) -> int:
    torch.set_num_threads(1)
    float64_exact()
    inject_failure()
    from analyses.cli import main as cli_main

    for case in json.loads(Path(argv[0]).read_text()):  # one process group (accelerate's) for all
        if "cli" in case:
            status = cli_main(case["cli"])
            if status:
                return status
        else:
            train_case(**case)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
