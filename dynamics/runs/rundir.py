"""Run directories: the resolved configuration and tidy long-format tables, written crash-safely.

A run directory holds ``config.json`` and one Parquet file per table (``records.parquet``: one
flat row per step × pair; ``train.parquet``: one row per optimizer step; more tables later).
Every write replaces the file atomically (write to a temporary file, then ``os.replace``), so a
run killed at any moment leaves each table as it was after its last completed write, never a
half-written file. A failed write (disk full, interrupt) removes its temporary file and leaves
the previous version in place.

`out_dir_state` classifies an output path *without writing anything* (new, empty directory,
existing run; a file or an unwritable place raises `InputError`); `move_aside` renames an
existing run to ``OUT.old-YYYYmmdd-HHMMSS`` (never deletes it).
"""
from __future__ import annotations

import dataclasses
import errno
import json
import os
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

import hashlib

import pandas as pd

from dynamics.core.logprobs import REF_COLUMNS, TokenizedPairs, model_fingerprint, pair_fingerprints, reference_logprobs
from dynamics.errors import InputError


class DiskFullError(InputError):
    """No space left while writing a run file; the previous version of the file is intact."""


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def is_no_space(e: OSError) -> bool:
    # pyarrow's write errors are OSErrors that may carry only the message, not the errno
    return e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)) or "No space left" in str(e)


def atomic_write_bytes(path: Path, write) -> None:
    """``write(tmp)`` then replace ``path`` by ``tmp``. On any failure (disk full, interrupt) the
    temporary file is removed and ``path`` keeps its previous content; no space left raises
    `DiskFullError` naming the file."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        _remove_quietly(tmp)
        if isinstance(e, OSError) and is_no_space(e):
            kept = f"the previous {path.name} is intact" if path.exists() else f"{path.name} was not created"
            raise DiskFullError(f"no space left on the device writing {path}; {kept}. "
                                f"Free some space and resume (or rerun) the run.") from e
        raise


RUN_MARKERS = ("config.json", "checkpoint", "checkpoint.old", "sft_model.pt")


def run_files(path: str | Path) -> list[str]:
    """The names in directory ``path`` that make it a run (config.json, *.parquet, checkpoint/, ...)."""
    path = Path(path)
    if not path.is_dir():
        return []
    return sorted(p.name for p in path.iterdir() if p.name in RUN_MARKERS or p.suffix == ".parquet")


def out_dir_state(path: str | Path) -> str:
    """What an output path is, checked without writing: ``"new"`` (does not exist; its nearest
    existing ancestor is a writable directory), ``"empty"`` (a directory without run files,
    writable) or ``"run"`` (a directory holding a run: config.json, *.parquet or checkpoint/).

    Raises `InputError` when ``path`` (or an ancestor) is a file, or the place is not writable.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"--out {path} is a file, not a directory; choose a directory path for the run")
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise InputError(f"--out {path}: {probe} is a file, not a directory; choose another output path")
    if not os.access(probe, os.W_OK | os.X_OK):
        what = "run directory" if probe == path else f"parent directory {probe}"
        raise InputError(f"--out {path}: the {what} is not writable; choose a writable location "
                         f"(or fix its permissions)")
    if not path.exists():
        return "new"
    return "run" if run_files(path) else "empty"


def move_aside(path: str | Path) -> Path:
    """Rename directory ``path`` to ``path.old-YYYYmmdd-HHMMSS`` (``-2``, ``-3``, ... if taken);
    returns the new path. Nothing is deleted."""
    path = Path(path)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = path.with_name(f"{path.name}.old-{stamp}")
    k = 2
    while target.exists():
        target = path.with_name(f"{path.name}.old-{stamp}-{k}")
        k += 1
    try:
        path.rename(target)
    except OSError as e:
        raise InputError(f"--overwrite: cannot move the existing run {path} aside to {target}: {e}") from e
    return target


def to_jsonable(obj: Any) -> Any:
    """Dataclasses, paths, dtypes and tuples as plain JSON values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


CONFIG_VERSION = 2
"""Version of the ``config.json`` shape. Version 2: ``{"version", "writer", "model", "loss",
"loss_params", "lr", "recorder": {RecorderConfig fields}, ...}`` for every run (the trainer's
`TrainConfig` fields, or the callback's trainer arguments besides); experiment indexes add
``"version"`` and ``"writer"`` to their own settings. Version 1 (no ``"version"`` key) had the
recorder fields flat in the trainer's config and the loss inside the callback's ``"recorder"``;
`upgrade_config` reads it as version 2."""
RECORDER_V1_KEYS = ("eval_every", "impl", "params", "whatif", "token_pairs", "token_chunk", "probes")


def upgrade_config(config: dict) -> dict:
    """A ``config.json`` mapping in the current shape (`CONFIG_VERSION`); a newer one than this
    library knows raises `InputError`. Version 1 is converted (``upgraded_from: 1`` is added)."""
    version = config.get("version", 1)
    if not isinstance(version, int) or version > CONFIG_VERSION:
        raise InputError(f"config.json has version {version!r}, newer than this library's {CONFIG_VERSION}; "
                         "upgrade dynamics to read this run")
    if version == CONFIG_VERSION:
        return config
    out = dict(config)
    rec = out.get("recorder")
    if isinstance(rec, dict) and "every" in out:               # the callback: loss inside "recorder"
        rec = dict(rec)
        for k in ("loss", "loss_params", "lr"):
            if k in rec:
                out[k] = rec.pop(k)
        rec["eval_every"] = out.pop("every")
        out["recorder"], out["writer"] = rec, "DynamicsCallback"
    elif "eval_every" in out:                                   # the trainer: recorder fields flat
        out["recorder"] = {k: out.pop(k) for k in RECORDER_V1_KEYS if k in out}
        out["writer"] = "dynamics train"
    out.update(version=CONFIG_VERSION, upgraded_from=1)
    return out


class RunDir:
    """A run directory with append-only tables.

    ``append(name, rows)`` adds rows (dicts) to table ``name`` and rewrites ``name.parquet``
    atomically. Rows already on disk are loaded on construction, so a resumed run appends after
    them; `last_step` tells where a table stopped.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except FileExistsError as e:
            raise InputError(f"run directory {self.path}: {e.filename or self.path} is a file, not a directory; "
                             f"choose another output path") from e
        except PermissionError as e:
            raise InputError(f"run directory {self.path} cannot be created: permission denied "
                             f"({e.filename or self.path}); choose a writable location") from e
        except NotADirectoryError as e:
            raise InputError(f"run directory {self.path}: a parent of it is a file, not a directory; "
                             f"choose another output path") from e
        self._tables: dict[str, pd.DataFrame] = {}

    def write_config(self, config: Any, *, writer: str) -> Path:
        """Write ``config.json`` atomically: ``config`` (a dataclass or mapping) with ``version``
        (`CONFIG_VERSION`) and ``writer`` (what wrote the run: ``"dynamics train"``,
        ``"DynamicsCallback"``, ``"reproduce tldr"``, ...)."""
        target = self.path / "config.json"
        body = {**to_jsonable(config), "version": CONFIG_VERSION, "writer": writer}
        text = json.dumps(body, indent=2, sort_keys=True)
        atomic_write_bytes(target, lambda p: p.write_text(text + "\n"))
        return target

    def read_config(self) -> dict:
        """``config.json`` in the current shape (`upgrade_config`); `InputError` if it is missing
        or unreadable."""
        return read_config(self.path)

    def table(self, name: str) -> pd.DataFrame:
        """All rows of table ``name`` so far (empty DataFrame if none)."""
        if name not in self._tables:
            f = self.path / f"{name}.parquet"
            try:
                self._tables[name] = pd.read_parquet(f) if f.is_file() else pd.DataFrame()
            except (OSError, ValueError) as e:  # pyarrow raises ArrowInvalid (a ValueError) on a damaged file
                raise InputError(f"{f} is not a readable Parquet table ({e}); the run directory is damaged") from e
        return self._tables[name]

    def append(self, name: str, rows: Iterable[Mapping[str, Any]]) -> None:
        """Append ``rows`` to table ``name`` and persist it atomically."""
        new = pd.DataFrame(list(rows))
        if new.empty:
            return
        old = self.table(name)
        df = new if old.empty else pd.concat([old, new], ignore_index=True)
        atomic_write_bytes(self.path / f"{name}.parquet", lambda p: df.to_parquet(p, index=False))
        self._tables[name] = df

    def truncate_after(self, name: str, step: int) -> None:
        """Drop rows of table ``name`` with ``step > step`` (used when resuming from a checkpoint)."""
        df = self.table(name)
        if df.empty or "step" not in df:
            return
        keep = df[df["step"] <= step].reset_index(drop=True)
        atomic_write_bytes(self.path / f"{name}.parquet", lambda p: keep.to_parquet(p, index=False))
        self._tables[name] = keep

    def last_step(self, name: str) -> int | None:
        df = self.table(name)
        return None if df.empty or "step" not in df else int(df["step"].max())


def read_table(run_dir: str | Path, name: str = "records") -> pd.DataFrame:
    """Read table ``name`` of a run directory (raises FileNotFoundError naming the file)."""
    f = Path(run_dir) / f"{name}.parquet"
    if not f.is_file():
        raise FileNotFoundError(f"{f} does not exist; is {run_dir} a run directory?")
    return pd.read_parquet(f)


# ------------------------------------------------------------------ reference cache

def changed_fingerprints(pairs: TokenizedPairs, path: str | Path) -> list[str]:
    """Ids of the ``pairs`` whose rows in the reference file ``path`` carry another token
    fingerprint than ``pairs`` now has (pairs absent from the file, or no file: none)."""
    path = Path(path)
    if not path.is_file():
        return []
    have = pd.read_parquet(path, columns=["pair_id", "fingerprint"]).set_index("pair_id")["fingerprint"]
    return [pid for pid, fp in zip(pairs.pair_ids, pair_fingerprints(pairs)) if pid in have.index and have[pid] != fp]


def cached_reference_logprobs(model, pairs: TokenizedPairs, path: str | Path, *,
                              batch_size: int = 8, context: object = None) -> pd.DataFrame:
    """`reference_logprobs`, read from / written to the Parquet file ``path``.

    A cached row is reused only when both its token fingerprint (the pair's prompt and response
    ids, hence tokenizer and truncation) and the cache key match; the key hashes
    `model_fingerprint` (identity and all weights, so another model or the model after a
    different SFT never reuses a cache) and ``context`` (anything else the values depend on,
    given by the caller: model name, tokenizer, truncation, dtype, device). Missing or stale
    rows are recomputed and the file rewritten atomically (stale rows dropped). Returns rows in
    the order of ``pairs``.
    """
    path = Path(path)
    key = hashlib.blake2b(f"{model_fingerprint(model)}|{context!r}".encode(), digest_size=16).hexdigest()
    have = pd.read_parquet(path) if path.is_file() else pd.DataFrame(columns=REF_COLUMNS + ["cache_key"])
    if "cache_key" not in have:  # a cache from before keys: its model is unknown, never reuse it
        have = have.iloc[:0].assign(cache_key=pd.Series(dtype=str))
    want = dict(zip(pairs.pair_ids, pair_fingerprints(pairs)))
    good = have[(have["pair_id"].map(want) == have["fingerprint"]) & (have["cache_key"] == key)]
    todo = [i for i, pid in enumerate(pairs.pair_ids) if pid not in set(good["pair_id"])]
    if todo or len(good) != len(have):
        if todo:
            new = reference_logprobs(model, pairs.subset(todo), batch_size=batch_size).assign(cache_key=key)
            good = pd.concat([good, new], ignore_index=True) if len(good) else new
        path.parent.mkdir(parents=True, exist_ok=True)
        frame = good.reset_index(drop=True)
        atomic_write_bytes(path, lambda f: frame.to_parquet(f, index=False))
    return good.drop(columns="cache_key").set_index("pair_id").loc[pairs.pair_ids].reset_index()


# ------------------------------------------------------------------ token Grams

def safe_name(text: str) -> str:
    """``text`` with every character other than letters, digits, ``-_.`` replaced by ``_`` (file names)."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(text))


def save_token_gram(path: str | Path, gram, pair_id: str, step: int | None = None) -> Path:
    """Write a `dynamics.core.grads.TokenGram` of a pair's chosen (a) and rejected (b) response as
    ``.npz``: ``M`` (La, Lb), ``cos`` (La, Lb), ``sq_w`` (La,), ``sq_l`` (Lb,) in float64, the
    decoded ``tokens_w``/``tokens_l``, ``pair_id`` and, when given, ``step``."""
    import numpy as np

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = dict(M=gram.M.double().cpu().numpy(), cos=gram.cos.double().cpu().numpy(),
                  sq_w=gram.sq_a.double().cpu().numpy(), sq_l=gram.sq_b.double().cpu().numpy(),
                  tokens_w=np.array(gram.tokens_a), tokens_l=np.array(gram.tokens_b), pair_id=np.array(pair_id))
    if step is not None:
        arrays["step"] = step
    np.savez(path, **arrays)
    return path


def read_config(run_dir: str | Path) -> dict:
    """The ``config.json`` of ``run_dir`` in the current shape (`upgrade_config`), without creating
    anything. Raises `InputError` when it is missing, not JSON, or from a newer version."""
    f = Path(run_dir) / "config.json"
    if not f.is_file():
        raise InputError(f"{run_dir} is not a run directory (no config.json)")
    try:
        config = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{f} is unreadable ({e})") from e
    if not isinstance(config, dict):
        raise InputError(f"{f} is not a JSON object")
    return upgrade_config(config)
