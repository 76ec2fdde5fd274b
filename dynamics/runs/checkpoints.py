"""Checkpoints of a training run: the trainable parameters, the optimizer state and the step.

Written atomically as ``checkpoint/state.pt`` (a temporary directory renamed into place; the
previous checkpoint survives any failure) and read with ``torch.load(weights_only=True)``, so a
checkpoint holds plain tensors, numbers and strings only and loading one never runs code.
"""
from __future__ import annotations

import pickle
import re
import shutil
from pathlib import Path

import torch

from dynamics.errors import InputError
from dynamics.runs.rundir import DiskFullError, is_no_space

__all__ = ["save_checkpoint", "checkpoint_file", "load_plain", "read_checkpoint", "copy_params", "load_checkpoint"]


def _out_of_space(e: BaseException) -> bool:
    return (isinstance(e, OSError) and is_no_space(e)) or (isinstance(e, RuntimeError) and "No space left" in str(e))


def save_checkpoint(path: Path, model, opt, step: int) -> None:
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


def checkpoint_file(path: Path) -> Path | None:
    """``path/state.pt``, or ``path.old/state.pt`` when killed between `save_checkpoint`'s renames."""
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


def read_checkpoint(file: Path) -> dict:
    """The validated content of a checkpoint file: {params: {name: tensor}, optimizer: dict, step: int}."""
    state = load_plain(file, "checkpoint")
    ok = (isinstance(state, dict) and isinstance(state.get("params"), dict) and isinstance(state.get("optimizer"), dict)
          and isinstance(state.get("step"), int) and all(isinstance(v, torch.Tensor) for v in state["params"].values()))
    if not ok:
        raise InputError(f"{file} is not a dynamics checkpoint (expected a dict of params, optimizer and step)")
    return state


def copy_params(file: Path, state: dict, named: dict) -> None:
    """Copy ``state`` {name: tensor} into the parameters ``named``, which must match exactly."""
    missing, extra = sorted(set(named) - set(state)), sorted(set(state) - set(named))
    bad = [n for n in set(named) & set(state) if tuple(state[n].shape) != tuple(named[n].shape)]
    if missing or extra or bad:
        raise InputError(f"{file} does not match the model: missing {missing[:3]}, unexpected {extra[:3]}, "
                         f"wrong shape {sorted(bad)[:3]}; was it written by this run's configuration?")
    with torch.no_grad():
        for n, v in state.items():
            named[n].copy_(v)


def load_checkpoint(path: Path, model, opt, state: dict | None = None) -> int:
    """Load `save_checkpoint`'s state into ``model`` and ``opt``; returns the step."""
    file = checkpoint_file(path)
    if file is None:
        raise InputError(f"{path} holds no checkpoint (state.pt)")
    state = read_checkpoint(file) if state is None else state
    copy_params(file, state["params"], {n: p for n, p in model.named_parameters() if p.requires_grad})
    try:
        opt.load_state_dict(state["optimizer"])
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(f"{file}: the optimizer state does not match this run's optimizer ({e})") from e
    return int(state["step"])
