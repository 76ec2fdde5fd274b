"""A plain PyTorch preference trainer for every loss in `dynamics.core.losses.LOSSES`.

One run: load a model, optionally SFT it on ``prompt + chosen``, take the SFT model as the
reference (its log-probs of every pair are computed once and cached, so no second model is
kept), then train with the chosen preference loss (full fine-tuning or LoRA, AdamW or SGD,
gradient accumulation). Every ``eval_every`` steps a `dynamics.runs.recorder.Recorder` measures a
fixed set of probe pairs around the optimizer update (log-probs, gradient inner products,
predicted and actual changes, what-if table, token Grams) into the run directory.

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

import dataclasses
import json
import pickle
import math
import random
import re
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dynamics.inputs import data as data_mod
from dynamics.core.logprobs import (TokenizedPairs, pair_logprobs,
                               sequence_logprobs, tokenize_pairs)
from dynamics.core.losses import compute_loss, get_loss, resolve_hyper
from dynamics.inputs.models import check_device, check_model_name, load_model
from dynamics.errors import InputError
from dynamics.core.grads import IMPLS
from dynamics.core.logprobs import model_fingerprint
from dynamics.runs.rundir import (DiskFullError, RunDir, atomic_write_bytes, cached_reference_logprobs, is_no_space,
                                  move_aside, out_dir_state, run_files, to_jsonable)

DATA_KINDS = data_mod.DATA_KINDS
OPTIMIZERS = ("adamw", "sgd")
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
    eval_every: int = field(default=5, metadata={"help": "record the probe pairs every this many steps"})
    impl: str = field(default="ghost", metadata={"help": "gradient engine for the diagnostics: ghost, func, autograd"})
    whatif: bool = field(default=True, metadata={"help": "record the what-if table over the loss zoo"})
    token_pairs: int = field(default=1, metadata={"help": "probe pairs whose token Grams are saved"})
    probes: bool = field(default=False, metadata={"help": "record learning-dynamics probes (y+, y-, y*, greedy, shuffled, ...)"})
    lora_r: int = field(default=0, metadata={"help": "LoRA rank (0: full fine-tuning)"})
    save_every: int = field(default=0, metadata={"help": "checkpoint every this many steps (0: never)"})
    resume: bool = field(default=False, metadata={"help": "continue from OUT/checkpoint (same configuration; only --steps may change)"})
    overwrite: bool = field(default=False, metadata={"help": "OUT holds a run: move it aside to OUT.old-<time> and start afresh"})
    max_length: int | None = field(default=None, metadata={"help": "max prompt+response tokens (prompt cut from the left)"})
    seed: int = field(default=0, metadata={"help": "seed for data order, splits and tiny-model init"})
    dtype: str = field(default="float32", metadata={"help": "float32, float64 or bfloat16"})
    device: str = field(default="cpu", metadata={"help": "torch device"})
    progress: bool = field(default=True, metadata={"help": "show progress bars"})

    def __post_init__(self):
        get_loss(self.loss)  # raises with the list of known losses
        self.loss_params = resolve_hyper(self.loss, self.loss_params)
        for name, ok, valid in [("data_kind", self.data_kind in DATA_KINDS, DATA_KINDS),
                                ("optimizer", self.optimizer in OPTIMIZERS, OPTIMIZERS),
                                ("dtype", self.dtype in DTYPES, tuple(DTYPES))]:
            if not ok:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; known: {', '.join(valid)}")
        positive = ("batch_size", "grad_accum", "eval_every", "n_probe")
        for name in positive + ("steps", "token_pairs", "lora_r", "save_every"):
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
        if self.impl not in IMPLS:
            raise InputError(f"unknown impl {self.impl!r}; known: {', '.join(IMPLS)}")
        # inputs before anything heavy: model name/path, device, data files (issue 10 §4)
        check_model_name(self.model)
        check_device(self.device)
        for what in ("data", "eval_data"):
            source = getattr(self, what)
            if source is not None and not str(source).startswith(data_mod.HF_PREFIX):
                data_mod.check_data_file(source, what=f"{what} file")
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


def sft(model, pairs: TokenizedPairs, *, steps: int, lr: float, batch_size: int, seed: int,
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


def _out_of_space(e: BaseException) -> bool:
    return (isinstance(e, OSError) and is_no_space(e)) or (isinstance(e, RuntimeError) and "No space left" in str(e))


def _save_checkpoint(path: Path, model, opt, step: int) -> None:
    """Atomically replace ``path/`` by: trainable parameters, optimizer state, the step (plain
    tensors and numbers only, loadable with ``weights_only=True``). A failed write removes its
    temporary directory and leaves the previous checkpoint in place."""
    tmp = path.with_name(path.name + ".tmp")
    state = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        torch.save(dict(params=state, optimizer=opt.state_dict(), step=step), tmp / "state.pt")
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if _out_of_space(e):
            raise DiskFullError(f"no space left on the device writing the checkpoint {path}; the previous "
                                f"checkpoint is intact. Free some space and resume.") from e
        raise
    old = path.with_name(path.name + ".old")
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    if old.exists():
        shutil.rmtree(old)


def _checkpoint_file(path: Path) -> Path | None:
    """``path/state.pt``, or ``path.old/state.pt`` when killed between `_save_checkpoint`'s renames."""
    for d in (path, path.with_name(path.name + ".old")):
        if (d / "state.pt").is_file():
            return d / "state.pt"
    return None


def load_plain(file: Path, what: str = "checkpoint"):
    """``torch.load(file, weights_only=True)``: tensors, numbers, strings and containers only.

    A file with pickled objects (which a full unpickler would execute) and a corrupted or
    truncated file raise `InputError` naming ``file``; nothing in the file is run.
    """
    file = Path(file)
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        if "GLOBAL" in msg or "global" in msg:
            found = re.search(r"GLOBAL (\S+)", msg)
            detail = f" (it references {found.group(1)})" if found else ""
            raise InputError(f"{file} is not a plain-tensor {what}: it holds pickled Python objects{detail}; "
                             f"refusing to load it (unpickling could run arbitrary code). Only load {what}s "
                             f"written by `dynamics train`.") from e
        raise InputError(f"{file} is corrupted or truncated: cannot load the {what} "
                         f"({msg.splitlines()[-1] if msg else type(e).__name__}).") from e
    except FileNotFoundError as e:
        raise InputError(f"{file} does not exist: no {what} to load") from e
    except Exception as e:  # zip reader errors, EOF, bad opcodes: all mean the file is damaged
        first = str(e).splitlines()[0].split(". ")[0] if str(e) else type(e).__name__
        raise InputError(f"{file} is corrupted or truncated: cannot load the {what} ({first}).") from e


def _read_checkpoint(file: Path) -> dict:
    """The validated content of a checkpoint file: {params: {name: tensor}, optimizer: dict, step: int}."""
    state = load_plain(file, "checkpoint")
    ok = (isinstance(state, dict) and isinstance(state.get("params"), dict) and isinstance(state.get("optimizer"), dict)
          and isinstance(state.get("step"), int) and all(isinstance(v, torch.Tensor) for v in state["params"].values()))
    if not ok:
        raise InputError(f"{file} is not a dynamics checkpoint (expected a dict of params, optimizer and step)")
    return state


def _copy_params(file: Path, state: dict, named: dict) -> None:
    """Copy ``state`` {name: tensor} into the parameters ``named``, which must match exactly."""
    missing, extra = sorted(set(named) - set(state)), sorted(set(state) - set(named))
    bad = [n for n in set(named) & set(state) if tuple(state[n].shape) != tuple(named[n].shape)]
    if missing or extra or bad:
        raise InputError(f"{file} does not match the model: missing {missing[:3]}, unexpected {extra[:3]}, "
                         f"wrong shape {sorted(bad)[:3]}; was it written by this run's configuration?")
    with torch.no_grad():
        for n, v in state.items():
            named[n].copy_(v)


def _load_checkpoint(path: Path, model, opt, state: dict | None = None) -> int:
    """Load `_save_checkpoint`'s state into ``model`` and ``opt``; returns the step."""
    file = _checkpoint_file(path)
    if file is None:
        raise InputError(f"{path} holds no checkpoint (state.pt)")
    state = _read_checkpoint(file) if state is None else state
    _copy_params(file, state["params"], {n: p for n, p in model.named_parameters() if p.requires_grad})
    try:
        opt.load_state_dict(state["optimizer"])
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(f"{file}: the optimizer state does not match this run's optimizer ({e})") from e
    return int(state["step"])


# ---------------------------------------------------------------- run directory checks

RUN_CONTROL = ("out", "steps", "resume", "overwrite", "progress", "save_every")  # may change on resume


def config_differences(saved: dict, cfg: TrainConfig) -> list[str]:
    """Fields (other than `RUN_CONTROL`) in which ``cfg`` differs from a saved ``config.json``,
    as ``"name: old -> new"``."""
    new = json.loads(json.dumps(to_jsonable(cfg)))
    defaults = json.loads(json.dumps(to_jsonable(TrainConfig(loss=cfg.loss))))
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
    from dynamics.core.losses import resolve_hyper

    args = ["dynamics", "train"] + (["--resume"] if resume else []) + (["--overwrite"] if overwrite else [])
    args += ["--out", str(cfg.out)]
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("out", "resume", "overwrite", "progress"):
            continue
        value, flag = override.get(f.name, getattr(cfg, f.name)), "--" + f.name.replace("_", "-")
        if f.name == "loss_params":
            if value != resolve_hyper(cfg.loss, {}):
                args += [flag, json.dumps(value, sort_keys=True)]
        elif value == f.default or value is None:
            continue
        elif isinstance(value, bool):
            args.append(flag if value else "--no-" + f.name.replace("_", "-"))
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
        ckpt_file = _checkpoint_file(out / "checkpoint")
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
        content = _read_checkpoint(ckpt_file)
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
    file = _checkpoint_file(run.path / "checkpoint")
    if file is not None:
        try:
            saved = _read_checkpoint(file)["step"]
        except InputError:
            saved = None
    lines = [f"interrupted: the run in {out} stopped "
             + (f"after step {done} of {cfg.steps}." if done else "before its first preference step completed.")]
    on_disk = [f"{name} up to step {run.last_step(name)}" for name in ("train", "records", "sft")
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


def build_probe_sets(model, tokenizer, probe_pairs, train_pairs, seed: int) -> dict:
    """{pair_id: probes} for every probe pair (seed 000's set): y⁺, y⁻, another prompt's y⁺, a
    held-out prompt's y⁺ (the next probe pair), shuffled y⁺, shuffled other response, and the
    model-made y* (argmax under teacher forcing on y⁺) and greedy decode, made from the model
    as it is now (the reference) and kept fixed."""
    from dynamics.core.probes import model_probes, probe_set

    sets = {}
    for k, pair in enumerate(probe_pairs):
        held = probe_pairs[(k + 1) % len(probe_pairs)] if len(probe_pairs) > 1 else None
        sets[str(pair.id)] = list(probe_set(pair, others=train_pairs, held_out=held, seed=seed)) + \
            list(model_probes(model, tokenizer, pair, max_new_tokens=16))
    return sets


def train(cfg: TrainConfig, *, model=None, tokenizer=None) -> RunDir:
    """Run ``cfg`` end to end and return its run directory.

    ``model``/``tokenizer`` may be passed to reuse a loaded model (``cfg.model`` is then only
    recorded). Everything is validated before anything is written to ``cfg.out`` (see
    `_check_out_dir`); bad input raises `InputError`. A NaN or infinite loss stops the run with
    a ValueError naming the step; every row recorded before it stays on disk. Ctrl-C raises
    `RunInterrupted` (where the run stopped, how to resume).
    """
    where: dict = {}  # "run": the RunDir once created
    try:
        return _train(cfg, model, tokenizer, where)
    except KeyboardInterrupt:
        raise _interrupted(cfg, where.get("run")) from None


def _train(cfg: TrainConfig, model, tokenizer, where: dict) -> RunDir:
    from tqdm.auto import tqdm

    from dynamics.runs.recorder import Recorder, RecorderConfig

    # ---- validate everything before writing anything
    out = Path(cfg.out)
    out_state, ckpt_file, ckpt_state = _check_out_dir(cfg)
    train_pairs, probe_pairs = split_config_pairs(cfg)
    torch.manual_seed(cfg.seed)
    if model is None:
        model, tokenizer = load_model(cfg.model, dtype=DTYPES[cfg.dtype], device=cfg.device, seed=cfg.seed)
    kw = dict(max_length=cfg.max_length)
    train_tp, probe_tp = tokenize_pairs(tokenizer, train_pairs, **kw), tokenize_pairs(tokenizer, probe_pairs, **kw)
    if len(train_tp) < cfg.batch_size:
        raise ValueError(f"{len(train_tp)} training pairs are fewer than batch_size={cfg.batch_size}")
    sft_file = out / "sft_model.pt"
    sft_state = None
    if cfg.sft_steps and cfg.resume:  # the reference is the post-SFT model: it must be restorable
        if not sft_file.is_file():
            raise InputError(f"--resume: {sft_file} is missing, so the post-SFT reference model cannot be restored; "
                             f"start the run again with --overwrite")
        sft_state = load_plain(sft_file, "SFT model state")
        if not (isinstance(sft_state, dict) and all(isinstance(v, torch.Tensor) for v in sft_state.values())):
            raise InputError(f"{sft_file} is not an SFT model state (a dict of parameter tensors)")

    # ---- write
    if out_state == "run" and cfg.overwrite:
        aside = move_aside(out)
        print(f"--overwrite: moved the existing run {out} aside to {aside}", file=sys.stderr)
    run = RunDir(out)
    where["run"] = run
    if not cfg.resume:
        run.write_config(cfg)
    ckpt = run.path / "checkpoint"

    t0 = time.time()
    if sft_state is not None:
        _copy_params(sft_file, sft_state, dict(model.named_parameters()))
    elif cfg.sft_steps:
        sft_losses = sft(model, train_tp, steps=cfg.sft_steps, lr=cfg.sft_lr, batch_size=cfg.batch_size,
                         seed=cfg.seed, progress=cfg.progress)
        run.append("sft", [dict(step=i + 1, nll=v) for i, v in enumerate(sft_losses)])
        if cfg.save_every:
            sft_params = {n: p.detach().cpu() for n, p in model.named_parameters()}
            atomic_write_bytes(sft_file, lambda f: torch.save(sft_params, f))
    if cfg.lora_r:
        model = apply_lora(model, cfg.lora_r, cfg.seed)

    # The model after SFT is the reference: its log-probs are computed once and cached on disk,
    # keyed on the model's weights (after SFT / LoRA) and on everything else they depend on.
    context = dict(model=cfg.model, tokenizer=_tokenizer_fingerprint(tokenizer), truncation=kw,
                   dtype=cfg.dtype, device=cfg.device)
    ref_train = cached_reference_logprobs(model, train_tp, run.path / "ref_train.parquet", context=context)
    ref_probe = cached_reference_logprobs(model, probe_tp, run.path / "ref_probe.parquet", context=context)
    opt = _make_optimizer([p for p in model.parameters() if p.requires_grad], cfg.optimizer, cfg.lr,
                          cfg.weight_decay)
    start = 0
    if cfg.resume:
        start = _load_checkpoint(ckpt_file.parent, model, opt, ckpt_state)
        run.write_config(cfg)  # the same configuration, with the new step count
        for table in ("records", "whatif", "token_decomp", "probes"):  # rows of steps >= start are redone
            run.truncate_after(table, start - 1)
        run.truncate_after("train", start)
    rec = Recorder(model, probe_tp, ref_probe, run, RecorderConfig(
        loss=cfg.loss, loss_params=cfg.loss_params, lr=cfg.lr, impl=cfg.impl, whatif=cfg.whatif,
        token_pairs=cfg.token_pairs, probes=cfg.probes), tokenizer=tokenizer,
        probe_sets=build_probe_sets(model, tokenizer, probe_pairs, train_pairs, cfg.seed) if cfg.probes else None)
    batches = _batches(len(train_tp), cfg.batch_size, cfg.seed)
    for _ in range(start):  # the same batch sequence as an uninterrupted run
        next(batches)
    micro = cfg.batch_size // cfg.grad_accum
    model.train()
    for step in tqdm(range(start, cfg.steps), desc=cfg.loss, disable=not cfg.progress, initial=start,
                     total=cfg.steps):
        idx = next(batches)
        t_step = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for lo_i in range(0, len(idx), micro):
            sub = idx[lo_i:lo_i + micro]
            out = pair_logprobs(model, train_tp.subset(sub))
            lw, ll = out.chosen.logp, out.rejected.logp
            ref_w, ref_l = _ref_tensors(ref_train, sub, lw.dtype, lw.device)
            try:
                lo = compute_loss(cfg.loss, lw, ll, ref_w, ref_l, out.chosen.lengths.to(lw.dtype),
                                  out.rejected.lengths.to(lw.dtype), **cfg.loss_params)
            except ValueError as e:  # NaN/inf: stop, naming the step; earlier rows are on disk
                raise ValueError(f"step {step}: {e}") from e
            loss = lo.loss.sum() / len(idx)  # mean over the whole optimizer batch
            loss.backward()
            total += loss.item()
        record, t_rec = step % cfg.eval_every == 0, 0.0
        if record:
            t = time.perf_counter()
            try:
                rec.before_update(step)
            except ValueError as e:
                raise ValueError(f"step {step}: probe pairs: {e}") from e
            t_rec += time.perf_counter() - t
        opt.step()
        if record:
            t = time.perf_counter()
            rec.after_update()
            t_rec += time.perf_counter() - t
        # step_s: forward, backward and optimizer step; record_s: the diagnostics around it
        run.append("train", [dict(step=step + 1, loss=total, lr=cfg.lr, elapsed_s=time.time() - t0,
                                  step_s=time.perf_counter() - t_step - t_rec, record_s=t_rec)])
        if cfg.save_every and (step + 1) % cfg.save_every == 0:
            _save_checkpoint(ckpt, model, opt, step + 1)
    rec.final(cfg.steps)
    model.eval()
    return run


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
