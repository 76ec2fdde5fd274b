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

import pandas as pd

from dynamics.errors import InputError


class DiskFullError(InputError):
    """No space left while writing a run file; the previous version of the file is intact."""


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def _no_space(e: OSError) -> bool:
    # pyarrow's write errors are OSErrors that may carry only the message, not the errno
    return e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)) or "No space left" in str(e)


def _atomic_write_bytes(path: Path, write) -> None:
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
        if isinstance(e, OSError) and _no_space(e):
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

    def write_config(self, config: Any) -> Path:
        """Write ``config.json`` (a dataclass or mapping), atomically."""
        target = self.path / "config.json"
        text = json.dumps(to_jsonable(config), indent=2, sort_keys=True)
        _atomic_write_bytes(target, lambda p: p.write_text(text + "\n"))
        return target

    def read_config(self) -> dict:
        return json.loads((self.path / "config.json").read_text())

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
        _atomic_write_bytes(self.path / f"{name}.parquet", lambda p: df.to_parquet(p, index=False))
        self._tables[name] = df

    def truncate_after(self, name: str, step: int) -> None:
        """Drop rows of table ``name`` with ``step > step`` (used when resuming from a checkpoint)."""
        df = self.table(name)
        if df.empty or "step" not in df:
            return
        keep = df[df["step"] <= step].reset_index(drop=True)
        _atomic_write_bytes(self.path / f"{name}.parquet", lambda p: keep.to_parquet(p, index=False))
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
