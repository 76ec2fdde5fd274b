"""A DPO run with TRL's ``DPOTrainer`` instrumented by `dynamics.runs.callbacks.DynamicsCallback`.

The offline SmolLM2-135M (or any model `dynamics.inputs.models.load_model` knows) on sentiment pairs
(built-in statements, or the tweets CSV), reference = a frozen copy of the initial policy,
AdamW at the paper's learning rate. Writes the callback's run directory to ``out``.

Multi-process (DDP, gloo on CPU): launched by ``torchrun --nproc_per_node N`` or ``accelerate launch
--multi_gpu --num_processes N`` (accelerate's ``--cpu`` starts one process only), every process runs
this function, TRL's Trainer wraps the model in ``DistributedDataParallel`` and the callback records
as one process does (`dynamics.runs.callbacks`). ``batch_size`` is the micro-batch of all processes
together (each takes ``batch_size / N``), so the same arguments train on the same batches and
record the same rows with any number of processes.
"""
from __future__ import annotations

import copy
from pathlib import Path


def run_trl_dpo(out: str | Path, *, model_name: str = "smollm2-135m", data: str | None = None,
                style: str = "long_suffix", steps: int = 60, every: int = 10, batch_size: int = 4,
                grad_accum: int = 1, lr: float = 5e-6, beta: float = 0.1, n_probe: int = 8, seed: int = 0,
                report_to: list[str] | None = None):
    """Train ``steps`` DPO steps with TRL and record every ``every`` steps; returns the trainer.
    ``batch_size``: pairs per micro-batch over all processes (an optimizer step: ``batch_size ×
    grad_accum``); `InputError` unless divisible by the number of processes."""
    from datasets import Dataset
    try:
        from trl import DPOConfig, DPOTrainer
    except ImportError as e:
        raise ImportError("TRL is not installed: pip install -e '.[trl]'") from e

    from dynamics.errors import InputError
    from dynamics.inputs import data as data_mod
    from dynamics.runs.distributed import world
    from dynamics.runs.callbacks import DynamicsCallback
    from dynamics.runs.recorder import RecorderConfig
    from dynamics.inputs.models import load_model, native_bf16, precision_name

    out = Path(out)
    w = world()  # torchrun / accelerate launch: WORLD_SIZE processes (the process group is accelerate's)
    if batch_size % w.size:
        raise InputError(f"batch_size={batch_size} must be divisible by the {w.size} processes: each takes an equal "
                         "share of every micro-batch")
    # bf16 autocast only where the CPU computes bfloat16 natively (AVX512-BF16 / AMX): elsewhere it is
    # emulated and a step is ~10x slower (issue 10 §5). TRL's DPOConfig defaults to bf16=True.
    bf16 = native_bf16("cpu")
    capability = __import__("torch").backends.cpu.get_cpu_capability()
    if w.is_main:
        print(f"precision: {precision_name(bf16)} (CPU {capability}, native bfloat16: {'yes' if bf16 else 'no'})"
              + (f"; {w.size} processes (DDP)" if w.size > 1 else ""))
    model, tok = load_model(model_name)
    pairs = data_mod.sentiment_pairs(data, style, seed=seed)
    train, probe = data_mod.split_pairs(pairs, n_eval=n_probe, seed=seed)
    ds = Dataset.from_dict({"prompt": [p.prompt for p in train], "chosen": [p.chosen for p in train],
                            "rejected": [p.rejected for p in train]})
    args = DPOConfig(output_dir=str(out / "trainer"), per_device_train_batch_size=batch_size // w.size,
                     gradient_accumulation_steps=grad_accum, max_steps=steps, learning_rate=lr, beta=beta,
                     logging_steps=every, report_to=report_to or [], save_strategy="no", use_cpu=True,
                     gradient_checkpointing=False, seed=seed, lr_scheduler_type="constant", bf16=bf16, fp16=False)
    trainer = DPOTrainer(model=model, ref_model=copy.deepcopy(model).eval(), args=args, train_dataset=ds,
                         processing_class=tok)
    DynamicsCallback(probe, out, RecorderConfig(eval_every=every), loss="dpo", loss_params={"beta": beta}).attach(trainer)
    trainer.train()
    return trainer
