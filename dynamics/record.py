"""Run directories: the resolved configuration and tidy long-format tables, written crash-safely.

A run directory holds ``config.json`` and one Parquet file per table (``records.parquet``: one
flat row per step × pair; ``train.parquet``: one row per optimizer step; more tables later).
Every write replaces the file atomically (write to a temporary file, then ``os.replace``), so a
run killed at any moment leaves each table as it was after its last completed write, never a
half-written file.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import pandas as pd


def _atomic_write_bytes(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
        self.path.mkdir(parents=True, exist_ok=True)
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
            self._tables[name] = pd.read_parquet(f) if f.is_file() else pd.DataFrame()
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
