"""A plain PyTorch preference trainer for every loss in `dynamics.core.losses.LOSSES`.

One run: load a model, optionally SFT it on ``prompt + chosen``, take the SFT model as the
reference (its log-probs of every pair are computed once and cached, so no second model is
kept), then train with the chosen preference loss (full fine-tuning or LoRA, AdamW or SGD,
gradient accumulation). Every ``eval_every`` steps a `dynamics.runs.recorder.Recorder` measures a
fixed set of probe pairs around the optimizer update (log-probs, gradient inner products,
predicted and actual changes, what-if table, token Grams) into the run directory. With
``recorder.in_run`` a `dynamics.runs.recorder.InRunRecorder` also records, at every step, the
pairs being trained on (``train_records.parquet``), from hooks on the training backward itself.

Launched by ``torchrun`` with several processes, the same run is trained with DDP (or, with
``parallel='fsdp'``, FSDP2: the model sharded, the probe diagnostics and in-run rows computed on
the gathered full parameters) and recorded by all ranks, and rank 0 writes the same run directory
as one process (`dynamics.runs.distributed`).

Checkpoints (``checkpoint/``: trainable parameters, optimizer state, step) are written
atomically every ``save_every`` steps; ``resume=True`` continues from the last one and drops
the rows recorded after it, so a run killed at any moment (even by SIGKILL) resumes without
duplicate or missing rows. Checkpoints hold plain tensors and numbers only and are loaded with
``torch.load(weights_only=True)``: a file with pickled objects is refused, never executed.

The output directory is never silently mixed or lost: everything (configuration, data, model,
output path, the checkpoint to resume) is validated before anything is written; an existing
run is refused unless ``resume`` (whose configuration must equal the saved one in everything
but ``steps``) or ``overwrite`` (which moves the old run aside to ``OUT.old-<time>``). Ctrl-C
raises `RunInterrupted`, whose message says where the run stopped and how to resume it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dynamics.core.contrib import TrainingBatch
from dynamics.core.logprobs import TokenizedPairs, sequence_logprobs, tokenize_pairs
from dynamics.core.losses import compute_loss, get_loss, resolve_hyper
from dynamics.core.probes import build_probe_sets
from dynamics.errors import InputError
from dynamics.inputs import data as data_mod
from dynamics.inputs.models import check_device, check_model_name, load_model
from dynamics.runs import distributed
from dynamics.runs.checkpoints import (checkpoint_file, copy_params, load_checkpoint, load_plain, read_checkpoint,
                                       save_checkpoint)
from dynamics.runs.recorder import InRunRecorder, RecorderConfig
from dynamics.runs.rundir import (RunDir, atomic_write_bytes, cached_reference_logprobs, changed_fingerprints,
                                  move_aside, out_dir_state, run_files, to_jsonable, upgrade_config)

DATA_KINDS = data_mod.DATA_KINDS
OPTIMIZERS = ("adamw", "sgd")
PARALLEL = ("ddp", "fsdp")
"""How a multi-process run (torchrun) trains: DDP (every rank holds the model) or FSDP2 (sharded,
`dynamics.runs.distributed.shard_model`)."""
FSDP_UNSUPPORTED = {
    "cross": "the per-training-pair split of an update reads the optimizer's state (Adam's moments), which FSDP "
             "shards over the ranks",
    "save_every": "checkpoints hold whole parameter and optimizer tensors, FSDP's are sharded over the ranks "
                  "(they would need torch.distributed.checkpoint)",
    "resume": "checkpoints hold whole parameter and optimizer tensors, FSDP's are sharded over the ranks",
}
"""Options not supported with ``parallel='fsdp'`` (`InputError`), and why."""
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


@dataclass
class TrainConfig:
    """Everything a run needs; saved as ``config.json`` in the run directory."""
    out: str = field(default="runs/train", metadata={"help": "run directory"})
    model: str = field(default="smollm2-135m", metadata={"help": "smollm2-135m, tiny-{gpt2,llama,neox}, a .gguf, or a hub id/path"})
    data: str | None = field(default=None, metadata={"help": "data file; None: built-in sentiment statements"})
    data_kind: str = field(default="sentiment", metadata={"help": "sentiment (tweet CSV or built-in), tldr (comparisons JSON), pairs (JSONL/CSV/Parquet)"})
    style: str = field(default="long_suffix", metadata={"help": "sentiment response style"})
    n_pairs: int | None = field(default=None, metadata={"help": "use at most this many pairs (train + probe)"})
    n_probe: int = field(default=16, metadata={"help": "held-out probe pairs scored every eval_every steps"})
    eval_data: str | None = field(default=None, metadata={"help": "draw the probe pairs from this file (same kind as data) instead of splitting them off the training data"})
    loss: str = field(default="dpo", metadata={"help": "a name in dynamics.core.losses.LOSSES"})
    loss_params: dict = field(default_factory=dict, metadata={"help": "hyper-parameter overrides for the loss"})
    steps: int = field(default=40, metadata={"help": "preference optimizer steps"})
    batch_size: int = field(default=4, metadata={"help": "pairs per optimizer step"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step (batch_size must divide)"})
    lr: float = field(default=5e-6, metadata={"help": "preference learning rate (seed 004: 5e-6)"})
    optimizer: str = field(default="adamw", metadata={"help": "adamw or sgd"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    sft_steps: int = field(default=0, metadata={"help": "SFT steps on prompt+chosen before preference training"})
    sft_lr: float = field(default=5e-5, metadata={"help": "SFT learning rate (AdamW)"})
    lora_r: int = field(default=0, metadata={"help": "LoRA rank (0: full fine-tuning)"})
    save_every: int = field(default=0, metadata={"help": "checkpoint every this many steps (0: never)"})
    resume: bool = field(default=False, metadata={"help": "continue from OUT/checkpoint (same configuration; only --steps may change)"})
    overwrite: bool = field(default=False, metadata={"help": "OUT holds a run: move it aside to OUT.old-<time> and start afresh"})
    max_length: int | None = field(default=None, metadata={"help": "max prompt+response tokens (a pair's prompt cut once from the left, by its longer response)"})
    seed: int = field(default=0, metadata={"help": "seed for data order, splits and tiny-model init"})
    dtype: str = field(default="float32", metadata={"help": "float32, float64 or bfloat16"})
    device: str = field(default="cpu", metadata={"help": "torch device"})
    parallel: str = field(default="ddp", metadata={"help": "multi-process training under torchrun: ddp (every rank holds the model) or fsdp (FSDP2: decoder layers and the root sharded; the probe diagnostics gather the full parameters once per recorded call, in-run rows for each micro-batch; not with cross, save_every, resume); one process: ignored"})
    progress: bool = field(default=True, metadata={"help": "show progress bars"})
    recorder: RecorderConfig = field(default_factory=RecorderConfig, metadata={"help": "what is recorded (RecorderConfig)"})

    @classmethod
    def from_flat(cls, **values) -> "TrainConfig":
        """A config from one flat mapping, as the CLI flags and the experiments' presets give it:
        the names of `RecorderConfig` fields go to ``recorder`` (over ``values["recorder"]`` if
        given), the others to `TrainConfig`."""
        rec_names = {f.name for f in dataclasses.fields(RecorderConfig)}
        base = values.pop("recorder", None) or RecorderConfig()
        if isinstance(base, dict):
            base = RecorderConfig(**base)
        rec = {k: values.pop(k) for k in list(values) if k in rec_names}
        return cls(**values, recorder=dataclasses.replace(base, **rec))

    def flat(self) -> dict:
        """The inverse of `from_flat`: every field by name, `RecorderConfig`'s among them."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "recorder"}
        return {**out, **{f.name: getattr(self.recorder, f.name) for f in dataclasses.fields(RecorderConfig)}}

    def __post_init__(self):
        if isinstance(self.recorder, dict):  # from config.json
            self.recorder = RecorderConfig(**self.recorder)
        if not isinstance(self.recorder, RecorderConfig):
            raise InputError(f"recorder must be a RecorderConfig, got {type(self.recorder).__name__}")
        get_loss(self.loss)  # raises with the list of known losses
        self.loss_params = resolve_hyper(self.loss, self.loss_params)
        for name, ok, valid in [("data_kind", self.data_kind in DATA_KINDS, DATA_KINDS),
                                ("optimizer", self.optimizer in OPTIMIZERS, OPTIMIZERS),
                                ("parallel", self.parallel in PARALLEL, PARALLEL),
                                ("dtype", self.dtype in DTYPES, tuple(DTYPES))]:
            if not ok:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; known: {', '.join(valid)}")
        positive = ("batch_size", "grad_accum", "n_probe")
        for name in positive + ("steps", "lora_r", "save_every"):
            if getattr(self, name) < (1 if name in positive else 0):
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"grad_accum={self.grad_accum} must divide batch_size={self.batch_size}")
        if self.sft_steps < 0:
            raise InputError(f"sft_steps must be >= 0, got {self.sft_steps}")
        for name, low in (("lr", None), ("sft_lr", None), ("weight_decay", 0.0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise InputError(f"{name} must be a finite number, got {v!r}")
            if (v < low) if low is not None else (v <= 0):
                raise InputError(f"{name} must be {'>= 0' if low is not None else '> 0'}, got {v:g}")
        # inputs before anything heavy: model name/path, device, data files (issue 10 §4)
        check_model_name(self.model)
        check_device(self.device)
        for what in ("data", "eval_data"):
            source = getattr(self, what)
            if source is not None and not str(source).startswith(data_mod.HF_PREFIX):
                data_mod.check_data_file(source, what=f"{what} file")
        if self.recorder.in_run and self.lora_r and self.recorder.params not in ("trainable", "lora"):
            raise InputError(f"in_run with LoRA measures the gradients the training backward computes, those of the "
                             f"adapters: use params 'trainable' or 'lora', not {self.recorder.params!r}")
        if self.parallel == "fsdp":
            flat = self.flat()
            used = [name for name in FSDP_UNSUPPORTED if flat[name]]
            if used:
                raise InputError(f"parallel='fsdp' does not support {', '.join(used)}: "
                                 + "; ".join(f"{name}: {FSDP_UNSUPPORTED[name]}" for name in used)
                                 + "; use parallel='ddp'")
        if self.resume and self.overwrite:
            raise InputError("resume and overwrite exclude each other: --resume continues the run in --out, "
                             "--overwrite moves it aside and starts a new one")


def load_config_pairs(cfg: TrainConfig) -> list:
    """The pairs a config names (validated `PreferencePair`s): at most ``n_pairs`` of ``data``."""
    return _read_pairs(cfg, cfg.data, cfg.n_pairs)


def _read_pairs(cfg: TrainConfig, source: str | None, limit: int | None) -> list:
    return data_mod.load_kind(cfg.data_kind, source, style=cfg.style, limit=limit, seed=cfg.seed)


def split_config_pairs(cfg: TrainConfig) -> tuple[list, list]:
    """(training pairs, probe pairs): ``n_probe`` probes drawn from ``cfg.eval_data`` when given
    (all of ``cfg.data`` then trains), else split off ``cfg.data`` (`dynamics.inputs.data.split_pairs`)."""
    pairs = load_config_pairs(cfg)
    if cfg.eval_data is not None:
        held = _read_pairs(cfg, cfg.eval_data, None)
        if len(held) < cfg.n_probe:
            raise ValueError(f"eval_data {cfg.eval_data} has {len(held)} pairs, fewer than n_probe={cfg.n_probe}")
        _, probe = data_mod.split_pairs(held, n_eval=cfg.n_probe, seed=cfg.seed)
        train_ids = {str(p.id) for p in pairs}
        clash = [p.id for p in probe if str(p.id) in train_ids]
        if clash:
            raise ValueError(f"probe pairs {clash[:5]} from eval_data are also in the training data")
        return list(pairs), probe
    if len(pairs) <= cfg.n_probe:
        raise ValueError(f"{len(pairs)} pairs cannot leave training pairs beside n_probe={cfg.n_probe} probes")
    return data_mod.split_pairs(pairs, n_eval=cfg.n_probe, seed=cfg.seed)


def _batches(n: int, size: int, seed: int):
    """Endless shuffled epochs of index batches, deterministic from ``seed``."""
    rng = random.Random(seed)
    while True:
        order = list(range(n))
        rng.shuffle(order)
        for lo in range(0, n - size + 1, size):
            yield order[lo:lo + size]


def _make_optimizer(params, name: str, lr: float, weight_decay: float = 0.0):
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def supervised_finetune(model, pairs: TokenizedPairs, *, steps: int, lr: float, batch_size: int, seed: int,
        progress: bool = True) -> list[float]:
    """SFT on ``prompt + chosen``: minimize the token-mean NLL of the chosen responses.

    Returns the loss of every step.
    """
    from tqdm.auto import tqdm

    model.train()
    opt = _make_optimizer([p for p in model.parameters() if p.requires_grad], "adamw", lr)
    batches, losses = _batches(len(pairs), min(batch_size, len(pairs)), seed + 1), []
    for _ in tqdm(range(steps), desc="sft", disable=not progress):
        idx = next(batches)
        out = sequence_logprobs(model, [pairs.chosen[i] for i in idx], pairs.pad_id)
        loss = -out.logp.sum() / out.lengths.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


def _ref_tensors(ref, idx, dtype, device):
    rows = ref.iloc[idx]
    as_t = lambda col: torch.tensor(rows[col].to_numpy(), dtype=dtype, device=device)
    return as_t("ref_w"), as_t("ref_l")


def apply_lora(model, r: int, seed: int):
    """Wrap ``model`` with PEFT LoRA adapters of rank ``r`` on every linear layer of the body."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


# ---------------------------------------------------------------- run directory checks

RUN_CONTROL = ("out", "steps", "resume", "overwrite", "progress", "save_every")  # may change on resume


WRITER = "dynamics train"


def config_differences(saved: dict, cfg: TrainConfig) -> list[str]:
    """Fields (other than `RUN_CONTROL`) in which ``cfg`` differs from a saved ``config.json``
    (any version, see `dynamics.runs.rundir.upgrade_config`), as ``"name: old -> new"``."""
    saved = upgrade_config(saved)
    saved = {**saved, **(saved.get("recorder") or {})}                       # flat, as `TrainConfig.flat`
    new = json.loads(json.dumps(to_jsonable(cfg.flat())))
    defaults = json.loads(json.dumps(to_jsonable(TrainConfig(loss=cfg.loss).flat())))
    diffs = []
    for name, value in new.items():
        if name in RUN_CONTROL:
            continue
        old = saved.get(name, defaults.get(name))
        if old != value:
            diffs.append(f"{name}: {json.dumps(old)} -> {json.dumps(value)}")
    return diffs


def train_command(cfg: TrainConfig, *, resume: bool = True, overwrite: bool = False, **override) -> str:
    """The ``dynamics train`` command line that reproduces ``cfg`` (every non-default field;
    ``override``: field values to use instead of ``cfg``'s)."""
    args = ["dynamics", "train"] + (["--resume"] if resume else []) + (["--overwrite"] if overwrite else [])
    args += ["--out", str(cfg.out)]
    defaults = {**{f.name: f.default for f in dataclasses.fields(TrainConfig)},
                **{f.name: f.default for f in dataclasses.fields(RecorderConfig)}}
    for name, value in cfg.flat().items():
        if name in ("out", "resume", "overwrite", "progress"):
            continue
        value, flag = override.get(name, value), "--" + name.replace("_", "-")
        if name == "loss_params":
            if value != resolve_hyper(cfg.loss, {}):
                args += [flag, json.dumps(value, sort_keys=True)]
        elif value == defaults[name] or value is None:
            continue
        elif isinstance(value, bool):
            args.append(flag if value else "--no-" + name.replace("_", "-"))
        else:
            args += [flag, str(value)]
    return shlex.join(args)


def _check_out_dir(cfg: TrainConfig) -> tuple[str, Path | None, dict | None]:
    """Validate ``cfg.out`` for ``cfg`` without writing: returns (state, checkpoint file to resume
    from, its validated content). Raises `InputError` for a file, an unwritable place, an
    existing run without resume/overwrite, or a resume that cannot or must not continue."""
    out = Path(cfg.out)
    state = out_dir_state(out)
    if cfg.resume:
        if state != "run":
            raise InputError(f"--resume: {out} holds no run to resume ({'it does not exist' if state == 'new' else 'it is empty'}); "
                             f"drop --resume to start a new run")
        ckpt_file = checkpoint_file(out / "checkpoint")
        if ckpt_file is None:
            raise InputError(f"--resume: {out} holds no checkpoint ({out / 'checkpoint' / 'state.pt'} is missing; "
                             f"resuming needs a run started with --save-every N > 0). Start it again with "
                             f"--overwrite (the old run is moved aside) or choose another --out")
        if not (out / "config.json").is_file():
            raise InputError(f"--resume: {out / 'config.json'} is missing, so the configuration cannot be checked; "
                             f"start a new run with --overwrite")
        try:
            saved = json.loads((out / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise InputError(f"--resume: {out / 'config.json'} is unreadable ({e}); start a new run with --overwrite") from e
        diffs = config_differences(saved, cfg)
        if diffs:
            raise InputError(f"--resume: the configuration differs from the run in {out} (only --steps may change "
                             f"on resume): " + "; ".join(diffs) + ". Resume with the run's own options, or start a "
                             f"new run with --overwrite or another --out")
        content = read_checkpoint(ckpt_file)
        if content["step"] > cfg.steps:
            raise InputError(f"--resume: the checkpoint {ckpt_file} is at step {content['step']}, beyond --steps "
                             f"{cfg.steps}; pass --steps {content['step']} or more")
        return state, ckpt_file, content
    if state == "run" and not cfg.overwrite:
        raise InputError(f"--out {out} already holds a run ({', '.join(run_files(out))}); refusing to mix or replace "
                         f"it. Pass --resume to continue it (same options), --overwrite to move it aside to "
                         f"{out.name}.old-<time> and start afresh, or choose another --out")
    return state, None, None


class RunInterrupted(Exception):
    """The run was interrupted (Ctrl-C / SIGINT). The message says where it stopped, which rows are
    on disk and how to resume; ``out``, ``step`` (last completed step or None), ``checkpoint_step``
    (or None) and ``command`` carry the same."""

    def __init__(self, message: str, *, out: Path, step: int | None, checkpoint_step: int | None,
                 command: str | None):
        super().__init__(message)
        self.out, self.step, self.checkpoint_step, self.command = out, step, checkpoint_step, command

    @property
    def has_checkpoint(self) -> bool:
        return self.checkpoint_step is not None


def _interrupted(cfg: TrainConfig, run: RunDir | None) -> RunInterrupted:
    """The `RunInterrupted` for a run stopped by Ctrl-C, from what is on disk."""
    out = Path(cfg.out)
    if run is None:
        return RunInterrupted(f"interrupted before anything was written to {out}; start the run again",
                              out=out, step=None, checkpoint_step=None, command=None)
    run = RunDir(run.path)  # what is on disk (an interrupted write may not have reached memory)
    done = run.last_step("train")
    saved = None
    file = checkpoint_file(run.path / "checkpoint")
    if file is not None:
        try:
            saved = read_checkpoint(file)["step"]
        except InputError:
            saved = None
    lines = [f"interrupted: the run in {out} stopped "
             + (f"after step {done} of {cfg.steps}." if done else "before its first preference step completed.")]
    on_disk = [f"{name} up to step {run.last_step(name)}" for name in ("train", "records", InRunRecorder.TABLE, "sft")
               if run.last_step(name) is not None]
    lines.append("On disk: config.json" + (", " + ", ".join(on_disk) if on_disk else "") + ".")
    if saved is not None:
        command = train_command(cfg)
        lines.append(f"The last checkpoint is at step {saved}; resume with:\n  {command}")
        if done is not None and done > saved:
            lines.append(f"(resuming redoes steps {saved + 1}-{done} and replaces their rows; "
                         f"only --steps may change)")
    else:
        every = cfg.save_every or 10
        command = train_command(cfg, resume=False, overwrite=True, save_every=every)
        why = (f"no checkpoint was written yet (the first is at step {cfg.save_every})" if cfg.save_every
               else "no checkpoint was written (resume needs --save-every N > 0)")
        lines.append(f"It cannot be resumed: {why}. Start it again (the partial run is moved aside) with:\n  {command}")
    return RunInterrupted("\n".join(lines), out=out, step=done, checkpoint_step=saved, command=command)


def train(cfg: TrainConfig, *, model=None, tokenizer=None) -> RunDir:
    """Run ``cfg`` end to end and return its run directory.

    ``model``/``tokenizer`` may be passed to reuse a loaded model (``cfg.model`` is then only
    recorded). Everything is validated before anything is written to ``cfg.out`` (see
    `_check_out_dir`); bad input raises `InputError`. A NaN or infinite loss stops the run with
    a ValueError naming the step; every row recorded before it stays on disk. Ctrl-C raises
    `RunInterrupted` (where the run stopped, how to resume).
    """
    where: dict = {}  # "run": the RunDir once created
    # under torchrun (WORLD_SIZE > 1): one process per rank, DDP or FSDP2 (`dynamics.runs.distributed`)
    with distributed.process_group_from_env(cfg.device):
        try:
            return _train(cfg, model, tokenizer, where)
        except KeyboardInterrupt:
            raise _interrupted(cfg, where.get("run")) from None


def _train(cfg: TrainConfig, model, tokenizer, where: dict) -> RunDir:
    from tqdm.auto import tqdm


    # ---- validate everything before writing anything; in a multi-process run every rank
    # validates, and if one fails all do (distributed.agree) before rank 0 writes anything
    world = distributed.world()
    failed = None
    try:
        out = Path(cfg.out)
        out_state, ckpt_file, ckpt_state = _check_out_dir(cfg)
        distributed.check_batch(cfg.batch_size, cfg.grad_accum, world)
        train_pairs, probe_pairs = split_config_pairs(cfg)
        torch.manual_seed(cfg.seed)
        if model is None:
            model, tokenizer = load_model(cfg.model, dtype=DTYPES[cfg.dtype], seed=cfg.seed,
                                          device=distributed.rank_device(cfg.device, world))  # cuda: one GPU per rank
        kw = dict(max_length=cfg.max_length)
        train_tp, probe_tp = tokenize_pairs(tokenizer, train_pairs, **kw), tokenize_pairs(tokenizer, probe_pairs, **kw)
        if len(train_tp) < cfg.batch_size:
            raise ValueError(f"{len(train_tp)} training pairs are fewer than batch_size={cfg.batch_size}")
        if cfg.resume:  # the saved rows were recorded on these token ids; other ids would mix two runs
            for name, tp in (("ref_train", train_tp), ("ref_probe", probe_tp)):
                changed = changed_fingerprints(tp, out / f"{name}.parquet")
                if changed:
                    raise InputError(f"--resume: {len(changed)} pair(s) of {out} (e.g. {changed[0]!r}) tokenize to other "
                                     f"ids than when the run was recorded (another tokenizer, max_length or "
                                     f"truncation rule); start a new run or pass --overwrite")
        sft_file = out / "sft_model.pt"
        sft_state = None
        if cfg.sft_steps and cfg.resume:  # the reference is the post-SFT model: it must be restorable
            if not sft_file.is_file():
                raise InputError(f"--resume: {sft_file} is missing, so the post-SFT reference model cannot be restored; "
                                 f"start the run again with --overwrite")
            sft_state = load_plain(sft_file, "SFT model state")
            if not (isinstance(sft_state, dict) and all(isinstance(v, torch.Tensor) for v in sft_state.values())):
                raise InputError(f"{sft_file} is not an SFT model state (a dict of parameter tensors)")
    except Exception as e:
        failed = e
    distributed.agree(failed)

    # ---- write (rank 0 only: the other ranks' run directory is a `distributed.ReplicaRunDir`)
    if out_state == "run" and cfg.overwrite and world.is_main:
        aside = move_aside(out)
        print(f"--overwrite: moved the existing run {out} aside to {aside}", file=sys.stderr)
    run = distributed.run_dir(out, world)
    where["run"] = run
    if not cfg.resume:
        run.write_config(cfg, writer=WRITER)
    ckpt = run.path / "checkpoint"

    t0 = time.time()
    if sft_state is not None:
        copy_params(sft_file, sft_state, dict(model.named_parameters()))
    elif cfg.sft_steps:  # multi-process: every rank runs the same SFT (no communication, identical replicas)
        sft_losses = supervised_finetune(model, train_tp, steps=cfg.sft_steps, lr=cfg.sft_lr, batch_size=cfg.batch_size,
                         seed=cfg.seed, progress=cfg.progress and world.is_main)
        run.append("sft", [dict(step=i + 1, nll=v) for i, v in enumerate(sft_losses)])
        if cfg.save_every and world.is_main:
            sft_params = {n: p.detach().cpu() for n, p in model.named_parameters()}
            atomic_write_bytes(sft_file, lambda f: torch.save(sft_params, f))
    if cfg.lora_r:
        model = apply_lora(model, cfg.lora_r, cfg.seed)

    # The model after SFT is the reference: its log-probs are computed once and cached on disk,
    # keyed on the model's weights (after SFT / LoRA) and on everything else they depend on.
    context = dict(model=cfg.model, tokenizer=_tokenizer_fingerprint(tokenizer), truncation=kw,
                   dtype=cfg.dtype, device=cfg.device)
    # (multi-process: rank 0 computes and caches them, every rank receives them)
    ref_train = distributed.on_main(
        lambda: cached_reference_logprobs(model, train_tp, run.path / "ref_train.parquet", context=context))
    ref_probe = distributed.on_main(
        lambda: cached_reference_logprobs(model, probe_tp, run.path / "ref_probe.parquet", context=context))
    probe_sets = (build_probe_sets(model, tokenizer, probe_pairs, train_pairs, seed=cfg.seed)
                  if cfg.recorder.probes else None)
    if cfg.parallel == "fsdp":  # multi-process: shard now (the references and probe sets above used the whole model)
        model = distributed.shard_model(model, world)
    opt = _make_optimizer([p for p in model.parameters() if p.requires_grad], cfg.optimizer, cfg.lr,
                          cfg.weight_decay)
    start = 0
    if cfg.resume:
        start = load_checkpoint(ckpt_file.parent, model, opt, ckpt_state)
        run.write_config(cfg, writer=WRITER)  # the same configuration, with the new step count
        for table in ("records", "whatif", "token_decomp", "probes", "contributions",
                      InRunRecorder.TABLE):  # rows of steps >= start are redone
            run.truncate_after(table, start - 1)
        run.truncate_after("train", start)
    # multi-process: each rank records its block of the probe pairs, rank 0 writes them all
    rec = distributed.make_recorder(world, model, probe_tp, ref_probe, run, cfg.recorder, loss=cfg.loss,
                   loss_params=cfg.loss_params, lr=cfg.lr, tokenizer=tokenizer, probe_sets=probe_sets)
    batches = _batches(len(train_tp), cfg.batch_size, cfg.seed)
    for _ in range(start):  # the same batch sequence as an uninterrupted run
        next(batches)
    # in_run: every step's training pairs, measured on the training backward (train_records.parquet)
    inrun = (distributed.make_in_run_recorder(world, model, run, cfg.recorder, loss=cfg.loss,
                                              loss_params=cfg.loss_params) if cfg.recorder.in_run else None)
    # fw(pairs) = pair_logprobs(model, pairs), DDP-wrapped if needed (FSDP: the sharded root's forward)
    fw = distributed.training_forward(model, world)
    fw.train()  # and the model
    try:
        for step in tqdm(range(start, cfg.steps), desc=cfg.loss, disable=not cfg.progress or not world.is_main,
                         initial=start, total=cfg.steps):
            idx = next(batches)
            t_step = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            total = 0.0
            if inrun is not None:
                inrun.begin_step()
            # cross: the step's training pairs and dL/dlw, dL/dll for the per-pair split (§4.1)
            cross = [] if cfg.recorder.cross and cfg.recorder.due(step) else None
            # micro-batches of grad_accum; multi-process: this rank's share of each
            for k_micro, sub in enumerate(distributed.rank_micro_batches(idx, cfg.grad_accum, world)):
                sub_tp = train_tp.subset(sub)
                with inrun.micro_batch() if inrun else contextlib.nullcontext() as cap, \
                        distributed.gradient_sync(fw, k_micro == cfg.grad_accum - 1):
                    failed = None
                    try:  # this rank's forward and loss; if one rank fails, all stop before the backward
                        out = fw(sub_tp)
                        lw, ll = out.chosen.logp, out.rejected.logp
                        if cap is not None:
                            cap.watch(lw, ll)
                        ref_w, ref_l = _ref_tensors(ref_train, sub, lw.dtype, lw.device)
                        try:
                            lo = compute_loss(cfg.loss, lw, ll, ref_w, ref_l, out.chosen.lengths.to(lw.dtype),
                                              out.rejected.lengths.to(lw.dtype), **cfg.loss_params)
                        except ValueError as e:  # NaN/inf: stop, naming the step; earlier rows are on disk
                            raise ValueError(f"step {step}: {e}") from e
                        # mean over the whole optimizer batch; × processes, as DDP averages their gradients
                        loss = lo.loss.sum() / len(idx) * world.size
                    except Exception as e:
                        failed = e
                    distributed.agree(failed)
                    loss.backward()
                total += loss.item()
                if cross is not None:
                    cross.append(TrainingBatch(sub_tp, -lo.d_w.detach() / len(idx), lo.d_l.detach() / len(idx)))
                if inrun is not None:
                    inrun.add(step, sub_tp.pair_ids, lw=lw, ll=ll, len_w=out.chosen.lengths, len_l=out.rejected.lengths,
                              ref_w=ref_w, ref_l=ref_l, lw_norm=out.chosen.logp_norm, ll_norm=out.rejected.logp_norm,
                              lr=cfg.lr, micro=k_micro, pairs=sub_tp)
            total = distributed.all_mean(total)  # the batch loss (multi-process: of all ranks' shares)
            record, t_rec = cfg.recorder.due(step), 0.0
            if record:
                t = time.perf_counter()
                with _probe_errors(step):
                    rec.before_update(step, train_batch=cross)
                t_rec += time.perf_counter() - t
            opt.step()
            if record:
                t = time.perf_counter()
                with _probe_errors(step):  # the probe pass runs here (θ_s put back)
                    rec.after_update(optimizer=opt)
                t_rec += time.perf_counter() - t
            if inrun is not None:
                inrun.end_step()
            # step_s: forward, backward and optimizer step; record_s: the diagnostics around it
            run.append("train", [dict(step=step + 1, loss=total, lr=cfg.lr, elapsed_s=time.time() - t0,
                                      step_s=time.perf_counter() - t_step - t_rec, record_s=t_rec)])
            if cfg.save_every and (step + 1) % cfg.save_every == 0:
                if inrun is not None:
                    inrun.flush()  # rows up to the checkpoint on disk before it exists
                if world.is_main:
                    save_checkpoint(ckpt, model, opt, step + 1)
    finally:  # every finished step's rows on disk, also when a step fails or is interrupted
        if inrun is not None:
            inrun.flush()
    rec.final(cfg.steps)
    model.eval()
    return run


@contextlib.contextmanager
def _probe_errors(step: int):
    """Bad probe input (a ValueError of the recorder) names the step and the probe pairs."""
    try:
        yield
    except ValueError as e:
        raise ValueError(f"step {step}: probe pairs: {e}") from e


def _tokenizer_fingerprint(tokenizer) -> str:
    """Identity of a tokenizer: class, name, size, special tokens and a hash of its vocabulary."""
    import hashlib

    if tokenizer is None:
        return "none"
    try:
        vocab = sorted(tokenizer.get_vocab().items())
    except Exception:  # a tokenizer without get_vocab: its name and size only
        vocab = []
    h = hashlib.blake2b(repr(vocab).encode(), digest_size=12).hexdigest()
    return (f"{type(tokenizer).__name__}|{getattr(tokenizer, 'name_or_path', '')}|{len(tokenizer)}|"
            f"{getattr(tokenizer, 'all_special_ids', '')}|{h}")


def run_summary(run: RunDir) -> str:
    """A few lines on a finished run: probe pairs, recorded steps, and the mean chosen and
    rejected log-probs, margin and reward accuracy at the first and last recorded step."""
    rec = run.table("records")
    if rec.empty:
        return f"{run.path}: no recorded step"
    lines = [f"probe pairs: {rec.pair_id.nunique()}, steps recorded: {sorted(rec.step.unique().tolist())}"]
    for name, step in (("first", rec.step.min()), ("last", rec.step.max())):
        df = rec[rec.step == step]
        lines.append(f"{name:5s} step {int(step):3d}: chosen log-prob {df.logp_w.mean():8.3f}  rejected "
                     f"{df.logp_l.mean():8.3f}  margin {df.margin.mean():7.3f}  reward acc {df.reward_acc.mean():.2f}")
    return "\n".join(lines)
