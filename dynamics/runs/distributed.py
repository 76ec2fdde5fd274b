"""Multi-process training (DDP) and recording, on top of ``torch.distributed``.

Launched by ``torchrun`` (or ``accelerate launch``, which sets the same environment: ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), the plain trainer
(`dynamics.runs.train`) runs one process per rank:

- **training**: the model is wrapped in ``DistributedDataParallel`` (`training_forward`); each
  rank takes its contiguous share of every micro-batch of the optimizer batch
  (`rank_micro_batches`), and the loss is scaled by the world size, so that DDP's averaged
  gradient is exactly the single-process batch-mean gradient;
- **probe diagnostics** (`DistributedRecorder`): the probe pairs are split into contiguous blocks
  (`shard_slice`); each rank runs the ordinary `dynamics.runs.recorder.Recorder` on its block
  (log-probs, sentence and token Grams, update effects), on the *unwrapped* model, so no probe
  backward reaches DDP's gradient hooks and no ``.grad`` is touched. Its rows go to an in-memory
  `ShardBuffer` instead of files; at every sync point (``after_update``, ``final``) the rows of
  all ranks are gathered (``all_gather_object``), put in the single-process order, and rank 0
  appends them to the run directory. Summaries for loggers are computed from the gathered rows,
  so every rank returns the same ones;
- **in-run rows** (`DistributedInRunRecorder`): every rank records the pairs of its own
  micro-batches from its own training backward; the rows are gathered at the end of every step
  and rank 0 writes them every ``flush_every`` steps;
- **Δθ** of an update is the same on every rank (DDP averages the gradients before the
  identical optimizer steps), so each rank snapshots its own replica: parameters are never
  communicated by the recorders;
- **files**: only rank 0 writes (config, tables, token Grams, checkpoints; other ranks hold a
  `ReplicaRunDir`, which writes nothing); every rank loads checkpoints;
- **FSDP2** (``parallel='fsdp'``: `shard_model`; or a model ``fully_shard``-ed by accelerate,
  recorded by `dynamics.runs.callbacks.DynamicsCallback`): the recorders measure on the gathered
  full parameters (`full_parameters`, `bind_full_parameters`; the section at the end says why and
  what it costs), the probe recorder once per call, the in-run recorder for each micro-batch.

Errors. Where a rank can fail on its own input (the forward and loss of a micro-batch, the probe
diagnostics), all ranks call `agree` at the same point whether or not they failed: if any rank
failed, every rank raises — the failing rank its own error, the others a `RankFailed` naming it —
so no rank is left waiting in a collective. The gathers carry errors the same way. After such an
agreed failure the ranks meet once more (`process_group_from_env`) so that rank 0 has written the
rows of every completed step before any rank exits. An error outside these points (inside the
backward, a failed write on rank 0) ends that rank's process; the others then fail at their next
collective (gloo: the peer closed the connection) or are stopped by ``torchrun``.

Single-process use (no process group, or a world of one) goes through none of this:
`make_recorder` and `make_in_run_recorder` return the plain recorders and `agree` re-raises the
local error.
"""
from __future__ import annotations

import atexit
import contextlib
import dataclasses
import inspect
import os
import tempfile
import time
import types
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import pandas as pd
import torch
from torch import nn

from dynamics.core.logprobs import PairLogProbs, TokenizedPairs, pair_logprobs
from dynamics.errors import InputError
from dynamics.runs.recorder import InRunRecorder, Recorder, RecorderConfig, in_run_summary, probe_summary
from dynamics.runs.rundir import RunDir, atomic_write_bytes

__all__ = ["World", "world", "process_group_from_env", "rank_device", "shard_slice", "check_batch",
           "rank_micro_batches", "gather_objects", "agree", "all_mean", "on_main", "RankFailed", "RankFailedInput",
           "ReplicaRunDir", "run_dir", "PairForward", "training_forward", "gradient_sync", "ShardBuffer",
           "DistributedRecorder", "DistributedInRunRecorder", "make_recorder", "make_in_run_recorder",
           "Gathered", "fsdp_units", "full_parameters", "bind_full_parameters", "FSDP_FORWARD", "shard_model",
           "ShardedPairForward"]

DEFAULT_TIMEOUT_S = 1800
"""Timeout of the process group's collectives (seconds): a backstop only, the error protocol
above keeps the ranks from waiting on a failed one."""


# ------------------------------------------------------------------ the world

@dataclass(frozen=True)
class World:
    """This process's place: ``rank`` in ``0..size-1``, ``local_rank`` on its machine,
    ``initialized``: whether a ``torch.distributed`` process group exists."""
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    initialized: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """More than one process in an initialized group: training and recording communicate."""
        return self.initialized and self.size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError as e:
        raise InputError(f"environment variable {name}={value!r} is not an integer (set by torchrun)") from e


def world() -> World:
    """The current `World`: from the process group when one is initialized, else from torchrun's
    environment variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``; rank 0 of 1 without them)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return World(torch.distributed.get_rank(), torch.distributed.get_world_size(), _env_int("LOCAL_RANK", 0), True)
    return World(_env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0), False)


_current_world = world  # for the classes below, whose ``world`` argument hides the function


def _uses_cuda(device: str) -> bool:
    return str(device).startswith("cuda")


def rank_device(device: str, w: World | None = None) -> str:
    """The device of this rank: ``"cuda"`` becomes ``"cuda:<local_rank>"`` in a multi-process run
    (one GPU per process); anything else is returned unchanged."""
    w = world() if w is None else w
    if w.size > 1 and str(device) == "cuda":
        return f"cuda:{w.local_rank}"
    return str(device)


def _agreed(error: BaseException | None) -> bool:
    """Whether ``error`` (or an exception it was raised from) came out of an agreement of all ranks."""
    seen = set()
    while error is not None and id(error) not in seen:
        if getattr(error, "dynamics_ranks_agreed", False):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


@contextlib.contextmanager
def process_group_from_env(device: str = "cpu", *, timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[World]:
    """Initialize the process group from torchrun's environment when it says ``WORLD_SIZE > 1`` and
    no group exists yet (backend ``nccl`` for a CUDA ``device``, ``gloo`` otherwise); a group made
    by the caller (``accelerate``, a test) is used as it is. Without torchrun's variables nothing
    is done. Yields the `World`.

    A group made here stays for the life of the process (destroyed at exit), so that one script
    may train several runs: ending and making a group again in one torchrun worker can wait
    forever in the rendezvous.

    When the block fails with an error all ranks agreed on (`agree`, the recorders' gathers), the
    ranks meet at a barrier before leaving, so that no rank exits (and makes ``torchrun`` stop the
    others) before rank 0 has written what the completed steps recorded.
    """
    env = world()
    if env.size > 1 and not env.initialized:
        if not torch.distributed.is_available():
            raise InputError(f"WORLD_SIZE={env.size}, but this torch build has no torch.distributed")
        for name in ("MASTER_ADDR", "MASTER_PORT", "RANK"):
            if name not in os.environ:
                raise InputError(f"WORLD_SIZE={env.size} but {name} is not set: launch with torchrun "
                                 f"(e.g. torchrun --nproc_per_node {env.size} -m analyses.cli train ...)")
        backend = "nccl" if _uses_cuda(device) else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(env.local_rank)
        torch.distributed.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
        atexit.register(_destroy_process_group)
    try:
        yield world()
    except BaseException as e:
        if _agreed(e) and world().distributed:
            torch.distributed.barrier()
        raise


def _destroy_process_group() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# ------------------------------------------------------------------ splitting the work

def shard_slice(n: int, rank: int, size: int) -> slice:
    """Rank ``rank``'s contiguous block of ``n`` items split over ``size`` ranks: sizes differ by at
    most one (the first ``n % size`` ranks get one more), a block may be empty (``n < size``), and
    the blocks of ranks 0, 1, ... concatenated are ``0..n-1`` in order."""
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"rank {rank} is not in a world of {size}")
    base, extra = divmod(n, size)
    lo = rank * base + min(rank, extra)
    return slice(lo, lo + base + (1 if rank < extra else 0))


def check_batch(batch_size: int, grad_accum: int, w: World | None = None) -> None:
    """`InputError` unless ``batch_size`` is divisible by ``grad_accum × world size``: every process
    takes an equal share of every micro-batch (`rank_micro_batches`)."""
    w = world() if w is None else w
    if batch_size % (grad_accum * w.size):
        raise InputError(f"batch_size={batch_size} must be divisible by grad_accum × processes = {grad_accum} × "
                         f"{w.size}: every process takes an equal share of every micro-batch")


def rank_micro_batches(idx: Sequence[int], grad_accum: int, w: World | None = None) -> list[list[int]]:
    """This rank's micro-batches of the optimizer batch ``idx`` (B indices).

    The single-process trainer splits ``idx`` into ``grad_accum`` micro-batches of m = B/grad_accum
    consecutive indices; here each of them is split again into ``size`` contiguous shares and this
    rank takes its own, so micro-batch k of every rank holds pairs of the single-process
    micro-batch k and the ranks' shares concatenated in rank order give it back. B must be
    divisible by ``grad_accum × size`` (`InputError` otherwise).
    """
    w = world() if w is None else w
    B = len(idx)
    check_batch(B, grad_accum, w)
    m, share = B // grad_accum, B // (grad_accum * w.size)
    return [list(idx[k * m + w.rank * share: k * m + (w.rank + 1) * share]) for k in range(grad_accum)]


# ------------------------------------------------------------------ communication

def gather_objects(obj: Any) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``all_gather_object``: pickled, so
    any picklable value); ``[obj]`` without a process group."""
    w = world()
    if not w.distributed:
        return [obj]
    out: list = [None] * w.size
    torch.distributed.all_gather_object(out, obj)
    return out


def _comm_device() -> torch.device:
    backend = torch.distributed.get_backend()
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


class RankFailed(RuntimeError):
    """Another rank failed at a point where all ranks agree (`agree`, the recorders' gathers):
    ``rank`` is the first failing rank, ``error_type`` and ``message`` its exception's."""

    def __init__(self, rank: int, error_type: str, message: str):
        super().__init__(f"rank {rank} failed: {error_type}: {message}")
        self.rank, self.error_type, self.message = rank, error_type, message


class RankFailedInput(RankFailed, InputError):
    """`RankFailed` where the failing rank's error was a ValueError (an `InputError` among them):
    the ``dynamics`` command then reports it as one line and exit code 2 on every rank, as it does
    the failing rank's own error."""


def _report(error: BaseException | None) -> dict | None:
    if error is None:
        return None
    return dict(rank=world().rank, type=type(error).__name__, message=str(error), value=isinstance(error, ValueError))


def _raise_agreed(error: BaseException | None, reports: Sequence[dict | None]) -> None:
    """Raise on every rank once all know that some rank failed (``reports``: one per rank)."""
    if error is None:
        first = next(r for r in reports if r is not None)
        cls = RankFailedInput if first["value"] else RankFailed
        error = cls(first["rank"], first["type"], first["message"])
        error.dynamics_ranks_agreed = True
        raise error
    error.dynamics_ranks_agreed = True
    raise error


def agree(error: BaseException | None) -> None:
    """Collective check that no rank failed; every rank calls it at the same point, ``error``
    being this rank's exception or None.

    If any rank failed, every rank raises: the failing rank ``error`` itself, the others a
    `RankFailed` (`RankFailedInput` for a ValueError) naming the first failing rank and its
    message. Costs one all-reduce of one number (and one gather of the messages on failure).
    Without a process group: raises ``error`` when given, else returns.
    """
    if not world().distributed:
        if error is not None:
            raise error
        return
    flag = torch.tensor([0.0 if error is None else 1.0], device=_comm_device())
    torch.distributed.all_reduce(flag)
    if flag.item() == 0:
        return
    _raise_agreed(error, gather_objects(_report(error)))


def all_mean(value: float) -> float:
    """The mean of ``value`` over the ranks (float64 all-reduce); ``value`` without a process group."""
    w = world()
    if not w.distributed:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=_comm_device())
    torch.distributed.all_reduce(t)
    return float(t.item()) / w.size


def on_main(fn: Callable[[], Any]) -> Any:
    """``fn()`` run on rank 0 only (e.g. computing and caching something in the run directory),
    its result sent to every rank (``broadcast_object_list``); an exception of ``fn`` is raised on
    every rank (`RankFailed` on the others). Without a process group: ``fn()``."""
    w = world()
    if not w.distributed:
        return fn()
    box: list = [None]
    error = None
    if w.is_main:
        try:
            box[0] = ("ok", fn())
        except Exception as e:
            error, box[0] = e, ("error", _report(e))
    torch.distributed.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        _raise_agreed(error, [value])
    return value


# ------------------------------------------------------------------ files

class ReplicaRunDir(RunDir):
    """The run directory as a rank other than 0 sees it: reads like `RunDir`, writes nothing
    (``write_config``, ``append``, ``truncate_after`` do nothing; the directory is not created),
    so the trainer's code is the same on every rank and only rank 0 touches the files."""

    def __init__(self, path: str | Path):  # no mkdir: rank 0 creates the directory
        self.path = Path(path)
        self._tables: dict[str, pd.DataFrame] = {}

    def write_config(self, config: Any, *, writer: str) -> Path:
        return self.path / "config.json"

    def append(self, name: str, rows: Iterable[Mapping[str, Any]]) -> None:
        return None

    def truncate_after(self, name: str, step: int) -> None:
        return None


def run_dir(path: str | Path, w: World | None = None) -> RunDir:
    """`RunDir` (creating the directory) on rank 0, `ReplicaRunDir` on the other ranks."""
    w = world() if w is None else w
    return RunDir(path) if w.is_main else ReplicaRunDir(path)


# ------------------------------------------------------------------ the training forward

class PairForward(nn.Module):
    """``forward(pairs) = pair_logprobs(model, pairs)``: the trainer's forward of B pairs (chosen and
    rejected stacked, 2B sequences) as one module call, so that ``DistributedDataParallel`` can
    wrap it (DDP must see the forward to reduce the gradients of the backward) while the model
    itself keeps the single-process computation (the lm_head at the response positions only)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pairs: TokenizedPairs) -> PairLogProbs:
        return pair_logprobs(self.model, pairs)


def training_forward(model: nn.Module, w: World | None = None) -> nn.Module:
    """The module the training loop calls on a micro-batch (``out = fw(pairs)``, a `PairLogProbs`):
    `PairForward` of ``model``, wrapped in ``DistributedDataParallel`` in a multi-process run.

    DDP is built without synchronizing buffers at every forward (the buffers, e.g. rotary tables,
    are never trained and equal on every rank; broadcasting them would add a collective to every
    forward, also to one that then fails on one rank) and with ``find_unused_parameters=False``;
    its construction broadcasts rank 0's parameters, so replicas start identical. The diagnostics
    use ``model`` itself, never this wrapper. A model sharded by `shard_model` (FSDP2) gets its
    `ShardedPairForward` instead (FSDP2 averages the gradients as DDP does).
    """
    w = world() if w is None else w
    if fsdp_units(model):                  # sharded by `shard_model`: FSDP2 reduces the gradients, no DDP
        return ShardedPairForward(model)
    fw = PairForward(model)
    if not w.distributed:
        return fw
    from torch.nn.parallel import DistributedDataParallel

    device = next(model.parameters()).device
    ids = [device.index] if device.type == "cuda" else None
    # torch >= 2.13 names it forward_sync_buffers (broadcast_buffers is deprecated there)
    no_buffer_sync = ({"forward_sync_buffers": False}
                      if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
                      else {"broadcast_buffers": False})
    return DistributedDataParallel(fw, device_ids=ids, find_unused_parameters=False, **no_buffer_sync)


def gradient_sync(fw: nn.Module, sync: bool):
    """Context for one micro-batch's backward: DDP's ``no_sync()`` unless ``sync`` (the last
    micro-batch of the optimizer step, whose backward all-reduces the accumulated gradients);
    nothing for a module that is not DDP."""
    if sync or not hasattr(fw, "no_sync"):
        return contextlib.nullcontext()
    return fw.no_sync()


# ------------------------------------------------------------------ gathering recorders

class ShardBuffer:
    """A stand-in for `RunDir` given to a rank's own recorder: ``append(name, rows)`` keeps the rows
    in memory instead of writing a table; ``path`` is a private temporary directory for the files
    a recorder writes itself (token Grams), removed when the buffer is garbage-collected.
    `take` hands everything over (and forgets it)."""

    def __init__(self, rank: int = 0):
        self._tmp = tempfile.TemporaryDirectory(prefix=f"dynamics-rank{rank}-")
        self.path = Path(self._tmp.name)
        self._rows: dict[str, list[dict]] = {}

    def append(self, name: str, rows: Iterable[Mapping[str, Any]]) -> None:
        self._rows.setdefault(name, []).extend(dict(r) for r in rows)

    def take(self) -> tuple[dict[str, list[dict]], dict[str, bytes]]:
        """``({table: rows}, {relative file path: bytes})`` since the last `take`; the files are
        deleted from the temporary directory."""
        rows, self._rows = self._rows, {}
        files = {}
        for f in sorted(p for p in self.path.rglob("*") if p.is_file()):
            files[f.relative_to(self.path).as_posix()] = f.read_bytes()
            f.unlink()
        return rows, files


def _single_process_order(name: str, rows: list[dict]) -> list[dict]:
    """Rows of all ranks, concatenated in rank order, put in the order one process writes them:
    ``whatif`` is loss-major (every pair of a loss, then the next loss), ``train_records`` is
    ordered by step and micro-batch (the ranks' shares of a micro-batch in rank order),
    ``contributions`` (``cross``) by response (all chosen probe responses, then all rejected); other
    tables are pair-major per step, which rank order already gives. Stable sorts only."""
    if not rows:
        return rows
    if name == "whatif" and "loss" in rows[0]:
        first = {}
        for r in rows:
            first.setdefault(r["loss"], len(first))
        return sorted(rows, key=lambda r: (r["step"], first[r["loss"]]))
    if name == InRunRecorder.TABLE:
        return sorted(rows, key=lambda r: (r["step"], r["micro"]))
    if name == "contributions" and "response" in rows[0]:  # every chosen probe response, then every rejected
        return sorted(rows, key=lambda r: (r["step"], r["response"] != "chosen"))
    return rows


def _gather_shards(buffer: ShardBuffer, error: BaseException | None) -> tuple[dict[str, list[dict]], dict[str, bytes]]:
    """Collective: every rank's buffered rows and files, merged in single-process order, on every
    rank; raises on every rank if any rank passed an ``error`` (see `agree`)."""
    rows, files = buffer.take()
    payloads = gather_objects((_report(error), rows, files))
    reports = [p[0] for p in payloads]
    if any(r is not None for r in reports):
        _raise_agreed(error, reports)
    merged: dict[str, list[dict]] = {}
    all_files: dict[str, bytes] = {}
    for _, r, f in payloads:  # rank order
        for name, table_rows in r.items():
            merged.setdefault(name, []).extend(table_rows)
        all_files.update(f)
    return {name: _single_process_order(name, r) for name, r in merged.items()}, all_files


def _write_gathered(run: RunDir, rows: Mapping[str, list[dict]], files: Mapping[str, bytes], w: World) -> None:
    if not w.is_main:
        return
    for name, table_rows in rows.items():
        run.append(name, table_rows)
    for rel, data in files.items():
        target = run.path / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(target, lambda p, data=data: p.write_bytes(data))


def _gather_micro_batches(batches) -> list:
    """Collective: this rank's micro-batches of a step (a list, one per micro-batch, or one item)
    gathered from all ranks in the single-process order: micro-batch k is the ranks' shares of
    micro-batch k in rank order (`rank_micro_batches`), so the result is ``[k=0: rank 0, rank 1,
    ..., k=1: rank 0, ...]``."""
    mine = list(batches) if isinstance(batches, (list, tuple)) else [batches]
    every = gather_objects(mine)
    if len({len(b) for b in every}) != 1:
        raise RuntimeError(f"the ranks have different numbers of micro-batches: {[len(b) for b in every]}")
    return [every[r][k] for k in range(len(mine)) for r in range(len(every))]


class DistributedRecorder:
    """`Recorder` over ``probe`` split across the ranks; the same calls (``before_update``,
    ``after_update``, ``final``, ``pending``) and the same rows in the same order as one process.

    Every rank must make every call (they are collective). This rank's `Recorder` measures its
    contiguous block of the probe pairs (`shard_slice`; with fewer pairs than ranks some blocks
    are empty and those ranks only take part in the gathers); ``cfg.token_pairs`` counts the
    first probe pairs overall, so a rank saves the token Grams of those in its block.
    ``probe_sets`` (``{pair_id: probes}``, all probe pairs) is cut to the block. ``run``: the real
    run directory (`ReplicaRunDir` on ranks other than 0); other keyword arguments go to `Recorder`.

    An FSDP2 model (`shard_model`, or any ``fully_shard``-ed one) is measured inside
    `bind_full_parameters`: each call gathers the full parameters once (its cost: see
    `full_parameters`), so θ_s, Δθ and every Gram are those of the whole model, identical on
    every rank, and the training's sharded state is left as it was. ``cross`` is not supported
    there (the optimizer state it reads is sharded).
    """

    def __init__(self, model, probe: TokenizedPairs, ref: pd.DataFrame, run: RunDir, cfg: RecorderConfig, *,
                 world: World | None = None, probe_sets: dict | None = None, **kwargs):
        self.world = _current_world() if world is None else world
        self.model, self.run, self.cfg = model, run, cfg
        if cfg.cross and fsdp_units(model):
            raise InputError("cross is not supported with FSDP yet: the per-training-pair split reads the optimizer "
                             "state, which FSDP shards")
        block = shard_slice(len(probe), self.world.rank, self.world.size)
        self.buffer = ShardBuffer(self.world.rank)
        self.local: Recorder | None = None
        self._pending = False
        if block.stop > block.start:
            idx = list(range(block.start, block.stop))
            shard = probe.subset(idx)
            local_cfg = dataclasses.replace(cfg, token_pairs=max(0, min(cfg.token_pairs, block.stop) - block.start))
            sets = None if probe_sets is None else {pid: probe_sets[pid] for pid in shard.pair_ids if pid in probe_sets}
            self.local = Recorder(model, shard, ref.iloc[block].reset_index(drop=True), self.buffer, local_cfg,
                                  probe_sets=sets, **kwargs)
        if self.world.is_main:
            (run.path / "token_grams").mkdir(exist_ok=True)

    @property
    def pending(self) -> bool:
        """True between `before_update` and `after_update`."""
        return self._pending

    def before_update(self, step: int, lr: float | None = None, *, train_batch=None, **kwargs) -> None:
        """`Recorder.before_update` on this rank's block; then `agree` (a probe pair that fails on
        one rank, e.g. a non-finite loss, raises on every rank).

        ``train_batch`` (``cross``): this rank's micro-batches of the step (`TrainingBatch`es whose
        ``c_w, c_l`` are those of the whole batch's loss); they are gathered (collective) into the
        step's whole batch in the single-process order, which every rank's block is split over."""
        error = None
        try:
            if train_batch is not None:
                train_batch = _gather_micro_batches(train_batch)
            with self._full_parameters():
                if self.local is not None:
                    self.local.before_update(step, lr, train_batch=train_batch, **kwargs)
        except Exception as e:
            error = e
        agree(error)
        self._pending = True

    def after_update(self, **kwargs) -> dict[str, float]:
        """`Recorder.after_update` on this rank's block; the rows of all ranks gathered, written by
        rank 0. Returns the summaries of the gathered ``records`` rows (the same on every rank)."""
        if not self._pending:
            raise RuntimeError("after_update() without before_update()")
        self._pending = False
        rows = self._collect(lambda: self.local.after_update(**kwargs))
        return probe_summary(rows.get("records", []))

    def final(self, step: int, **kwargs) -> None:
        """`Recorder.final` on this rank's block; the rows of all ranks gathered, written by rank 0."""
        self._pending = False
        self._collect(lambda: self.local.final(step, **kwargs))

    def _collect(self, call: Callable[[], Any]) -> dict[str, list[dict]]:
        error = None
        try:
            with self._full_parameters():
                if self.local is not None:
                    call()
        except Exception as e:
            error = e
        rows, files = _gather_shards(self.buffer, error)
        _write_gathered(self.run, rows, files, self.world)
        return rows

    def _full_parameters(self):
        """An FSDP2 model's full parameters for this rank's measurements (`bind_full_parameters`,
        collective: every rank enters it, also one with an empty block); nothing otherwise."""
        return bind_full_parameters(self.model, [None if self.local is None else self.local.analyzer])


class DistributedInRunRecorder:
    """`InRunRecorder` of a multi-process run: each rank records the pairs of its own micro-batches
    from its own training backward (``micro_batch``, ``begin_step``, ``add`` as `InRunRecorder`);
    `end_step` (collective) gathers the rows of the step from all ranks in the single-process
    order, and rank 0 appends them to ``train_records`` every ``flush_every`` steps and at `flush`
    (local: no communication, so it may run in a ``finally``).

    ``c_scale``: the factor between the loss whose backward a rank runs and the true batch loss
    L: the trainer's rank loss is ``world size × Σ_own ℓ / B`` (DDP then averages over ranks),
    so ``c_scale = 1 / world size`` makes the recorded ``c_w = ∂L/∂lw``, ``c_l`` the single-process
    values. The Gram entries do not depend on it (they are divided by the captured scales).

    FSDP2 (a model with ``fully_shard`` units). The in-run contractions need no weight of a linear
    layer or an embedding: their factors (the layer's input a and output gradient b of the rank's
    own rows) are whole activations on every rank, sharded weights or not. What does need whole
    parameters: the capture finds the selected parameters by identity at hook time, and inside
    FSDP's forward a module holds FSDP's unsharded parameter, another tensor than the sharded
    DTensor that ``model.parameters()`` gives between steps; a norm weight's per-example
    gradient is a vjp through the module with the weight's values; and ``in_run_update`` puts θ_s
    back into the model for a jvp. So every unit is gathered (`full_parameters`) for the capture's
    construction (it resolves FSDP's unsharded parameters, which FSDP keeps, same objects, from one
    all-gather to the next), for each recorded micro-batch's forward and backward (``micro_batch``),
    and around ``begin_step``/``end_step`` with ``in_run_update``. Communication: one all-gather of
    every unit per micro-batch, where FSDP's own forward and backward gather each unit once or
    twice (it reshards after forward except at the root), so no more than training without the
    recorder; memory: the whole model on every rank during the micro-batch (as DDP holds it).
    Gradients are reduce-scattered by FSDP's backward as usual, and the sharded parameters,
    gradients and optimizer state are untouched.
    """

    TABLE = InRunRecorder.TABLE

    def __init__(self, model, run: RunDir, cfg: RecorderConfig, *, world: World | None = None, loss: str = "dpo",
                 loss_params: dict | None = None, flush_every: int = 20, c_scale: float = 1.0):
        if isinstance(flush_every, bool) or not isinstance(flush_every, int) or flush_every < 1:
            raise ValueError(f"flush_every must be an integer >= 1, got {flush_every!r}")
        self.world = _current_world() if world is None else world
        self.run, self.flush_every, self.c_scale = run, flush_every, float(c_scale)
        self.model, self.cfg = model, cfg
        self.buffer = ShardBuffer(self.world.rank)
        with full_parameters(model):        # FSDP2: the capture resolves FSDP's unsharded parameters (above)
            self.local = InRunRecorder(model, self.buffer, cfg, loss=loss, loss_params=loss_params, flush_every=1)
        self.capture = self.local.capture
        self._rows: list[dict] = []   # gathered rows of finished steps not yet on disk (all ranks keep them)
        self._steps = 0

    @contextlib.contextmanager
    def micro_batch(self):
        """`InRunRecorder.micro_batch` (this rank's capture); an FSDP2 model's units gathered for its
        duration (collective: every rank opens it for every micro-batch; see the class docstring)."""
        with full_parameters(self.model), self.local.micro_batch() as cap:
            yield cap

    def _update_window(self):
        """`full_parameters` where ``in_run_update`` reads or writes θ (collective), else nothing."""
        return full_parameters(self.model) if self.cfg.in_run_update else contextlib.nullcontext()

    def begin_step(self) -> None:
        """`InRunRecorder.begin_step` (this rank's snapshot of θ_s, ``in_run_update`` only)."""
        with self._update_window():
            self.local.begin_step()

    def add(self, *args, b_opt: float | None = None, **kwargs) -> None:
        """`InRunRecorder.add`: the rows of this rank's micro-batch just captured. ``b_opt`` (the
        coefficients ``d = ∓c·b_opt`` from the captured scales) is taken times ``c_scale``, as the
        captured scales are ``1 / c_scale`` times those of the batch loss."""
        if b_opt is not None:
            kwargs["b_opt"] = b_opt * self.c_scale
        self.local.add(*args, **kwargs)

    def end_step(self) -> dict[str, float]:
        """Close the step on every rank (collective): gather its rows, keep them for rank 0's next
        write, and return the summaries of all the step's pairs (the same on every rank)."""
        error = None
        try:
            with self._update_window():
                self.local.end_step()
        except Exception as e:
            error = e
        rows, _ = _gather_shards(self.buffer, error)
        step_rows = rows.get(self.TABLE, [])
        for r in step_rows:
            r["c_w"], r["c_l"] = r["c_w"] * self.c_scale, r["c_l"] * self.c_scale
        if not step_rows:
            return {}
        self._rows += step_rows
        self._steps += 1
        if self._steps >= self.flush_every:
            self.flush()
        return in_run_summary(step_rows)

    def flush(self) -> None:
        """Rank 0 appends the gathered rows of the finished steps to ``train_records.parquet``."""
        if self._rows and self.world.is_main:
            self.run.append(self.TABLE, self._rows)
        self._rows, self._steps = [], 0


def make_recorder(w: World, model, probe: TokenizedPairs, ref: pd.DataFrame, run: RunDir, cfg: RecorderConfig,
                  **kwargs) -> Recorder | DistributedRecorder:
    """`DistributedRecorder` in a multi-process run or for a model with FSDP2 units (also in a world
    of one, e.g. ``fully_shard`` over one GPU: its parameters are DTensors all the same, measured
    inside `bind_full_parameters`), else the plain `Recorder` (same arguments)."""
    if w.distributed or fsdp_units(model):
        return DistributedRecorder(model, probe, ref, run, cfg, world=w, **kwargs)
    return Recorder(model, probe, ref, run, cfg, **kwargs)


def make_in_run_recorder(w: World, model, run: RunDir, cfg: RecorderConfig,
                         **kwargs) -> InRunRecorder | DistributedInRunRecorder:
    """`DistributedInRunRecorder` (``c_scale = 1 / world size``, see there) in a multi-process run or
    for a model with FSDP2 units, else the plain `InRunRecorder` (same arguments)."""
    if w.distributed or fsdp_units(model):
        return DistributedInRunRecorder(model, run, cfg, world=w, c_scale=1.0 / w.size, **kwargs)
    return InRunRecorder(model, run, cfg, **kwargs)


# ------------------------------------------------------------------ FSDP2: the full parameters for the probe pass
#
# With FSDP2 (``torch.distributed.fsdp.fully_shard``; also what the transformers/accelerate FSDP2
# plugin builds) every rank holds 1/size of each parameter, as a DTensor. The gradient inner
# products of the diagnostics contract per-example gradients over θ. Two ways to get them:
#
# (1) run the ghost hooks on the unsharded modules inside FSDP's own forward/backward and sum the
#     per-rank partial contractions with one all-reduce: cheap in memory, but the ghost engine's
#     lm_head path and its norm-layer fallback read whole weights (``head.weight``, a norm's
#     ``weight``) outside FSDP's hooks, where they are sharded, and the token Grams, jvps (Δθ
#     effects) and Δθ = θ_{s+1} − θ_s itself would each need their own partial-sum protocol;
# (2) gather the analysed parameters for the probe pass and run the unchanged single-process code.
#
# We do (2), with FSDP's own machinery (`full_parameters`): every FSDP unit is unsharded (its
# parameters all-gathered into the module) with resharding after forward/backward switched off, so
# every probe forward, backward, jvp and direct weight read sees whole tensors; then every unit is
# resharded and its settings restored. Cost: one all-gather of the analysed units' parameters per
# window (each rank receives the (size−1)/size of them it does not hold: `Gathered.bytes` counts
# their full size) and the full model in memory for its duration (as DDP holds it all the time);
# nothing else is communicated, and the values are those of one process, bit for bit on the same
# inputs. The training's ``.grad`` (the sharded gradients) is never touched: inside the window the
# modules hold FSDP's unsharded parameters, which the probe pass does not accumulate into.

@dataclass(frozen=True)
class Gathered:
    """What one `full_parameters` window gathered: ``units`` FSDP units (parameter groups: a
    ``fully_shard([a, b])`` of several modules is one), ``bytes`` the full size of their parameters
    (the all-gathered data), ``seconds`` the wall time of the all-gathers."""
    units: int = 0
    bytes: int = 0
    seconds: float = 0.0


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The FSDP2 units (`torch.distributed.fsdp.FSDPModule`) in ``model`` (itself included), in
    ``modules()`` order; ``[]`` for a plain or DDP model, or without FSDP2 in this torch."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def _fsdp_state(unit):
    """FSDP2's per-unit state (torch 2.13 internals: ``_get_fsdp_state``); `InputError` if this
    torch's FSDP2 has another shape (the reshard settings could not be restored)."""
    get = getattr(unit, "_get_fsdp_state", None)
    state = get() if callable(get) else None
    if state is None or not hasattr(state, "_fsdp_param_groups"):
        raise InputError("full_parameters: this torch's FSDP2 internals differ from torch 2.13's "
                         "(no _get_fsdp_state()._fsdp_param_groups); the probe pass cannot gather the parameters")
    return state


def _distinct_units(units: Sequence[nn.Module]) -> list[nn.Module]:
    """One module per FSDP state: ``fully_shard([final_norm, lm_head])`` (as accelerate's FSDP2
    plugin shards the model's tail) makes each module an FSDPModule sharing one state and one
    parameter group, which is gathered once."""
    seen, out = set(), []
    for unit in units:
        key = id(_fsdp_state(unit))
        if key not in seen:
            seen.add(key)
            out.append(unit)
    return out


def _save_reshard_settings(units: Sequence[nn.Module]) -> list:
    """Each unit's reshard-after-forward/backward settings, exactly (FSDP2 has setters but no
    getters: its state is read), for `_restore_reshard_settings`."""
    saved = []
    for unit in units:
        state = _fsdp_state(unit)
        groups = [(g, g.post_forward_mesh_info, g.reshard_after_backward) for g in state._fsdp_param_groups]
        saved.append((state, state._auto_reshard_after_forward, groups))
    return saved


def _restore_reshard_settings(saved: list) -> None:
    for state, auto, groups in saved:
        state._auto_reshard_after_forward = auto
        for g, post_forward, after_backward in groups:
            g.post_forward_mesh_info, g.reshard_after_backward = post_forward, after_backward


_GATHERED: set[int] = set()
"""``id`` of the FSDP units inside an open `full_parameters` window (a nested call skips them)."""


def _top_units(units: Sequence[nn.Module]) -> list[nn.Module]:
    """The units not inside another unit: the roots FSDP finds at the first forward."""
    inner = {id(m) for u in units for m in u.modules() if m is not u}
    return [u for u in units if id(u) not in inner]


def _full_size(units: Sequence[nn.Module]) -> int:
    """Bytes of the full parameters of the parameter groups of ``units`` (each once, in their
    stored dtype): what their all-gathers bring together."""
    params = {id(fp.sharded_param): fp.sharded_param for u in units for g in _fsdp_state(u)._fsdp_param_groups
              for fp in g.fsdp_params}
    return sum(p.numel() * p.element_size() for p in params.values())


@contextlib.contextmanager
def full_parameters(model: nn.Module) -> Iterator[Gathered]:
    """Collective context: the FSDP2 units of ``model`` hold their full (unsharded) parameters for
    the duration, so that the diagnostics (`dynamics.core`, the `Recorder`) run on ``model`` as in
    one process; a no-op (yields an empty `Gathered`) for a plain or DDP model. Every rank must
    enter it at the same point (the entry all-gathers). Yields a `Gathered` (units, bytes, seconds).

    On entry, for every unit: resharding after forward and after backward is switched off
    (``set_reshard_after_forward(False)``, ``set_reshard_after_backward(False)``, not recursive)
    and the unit is unsharded (``unshard()``, one all-gather of its parameters); units never run
    yet are first initialized as their first forward would (the roots). Inside, the modules'
    parameters are FSDP's unsharded parameters (plain tensors, the same on every rank), so the
    diagnostics' parameter dicts must be taken inside (`bind_full_parameters`). Writes to them
    are not sharded back (the Recorder puts θ_s in and restores θ_{s+1} bit for bit). On exit,
    also after an error: every unit is resharded (no communication) and its reshard settings are
    restored exactly. The training's sharded parameters, their ``.grad`` and the optimizer state
    are not touched. Why gather rather than sum partial contractions, and the cost: see the
    comment above this section. Inside a window of the same units, a nested call gathers nothing
    and leaves them unsharded (yields an empty `Gathered`). With an FSDP ``MixedPrecisionPolicy``
    the gathered parameters are in its ``param_dtype``, as in FSDP's own forward.
    """
    units = [u for u in fsdp_units(model) if id(u) not in _GATHERED]
    if not units:
        yield Gathered()
        return
    for root in _top_units(units):
        state = _fsdp_state(root)
        if state._is_root is None:     # never run: FSDP's lazy initialization of the first forward
            state._lazy_init()
    ids = [id(u) for u in units]
    units = _distinct_units(units)
    saved = _save_reshard_settings(units)
    size = _full_size(units)
    _GATHERED.update(ids)
    try:
        for unit in units:
            unit.set_reshard_after_forward(False, recurse=False)
            unit.set_reshard_after_backward(False, recurse=False)
        t0 = time.perf_counter()
        for unit in units:
            unit.unshard()
        if any(_uses_cuda(str(p.device)) for p in model.parameters()):
            torch.cuda.synchronize()
        yield Gathered(len(units), size, time.perf_counter() - t0)
    finally:
        try:
            for unit in units:
                unit.reshard()
            _restore_reshard_settings(saved)
        finally:
            _GATHERED.difference_update(ids)


@contextlib.contextmanager
def bind_full_parameters(model: nn.Module, analyzers: Iterable[Any] = ()) -> Iterator[Gathered]:
    """`full_parameters` of ``model``, with the parameter dict (``params``, canonical name ->
    parameter) of every given `dynamics.core.analyzer.Analyzer` bound to the gathered parameters
    of the same names for the duration and put back afterwards. (An Analyzer resolves θ when it
    is made, on the sharded model; inside the window the modules hold other tensors.) A no-op
    for a model without FSDP2 units; None entries of ``analyzers`` are skipped."""
    analyzers = [a for a in analyzers if a is not None]
    with full_parameters(model) as gathered:
        if not fsdp_units(model):
            yield gathered
            return
        named = dict(model.named_parameters())
        saved = [(a, a.params) for a in analyzers]
        try:
            for a in analyzers:
                missing = sorted(set(a.params) - set(named))
                if missing:
                    raise InputError(f"the analysed parameters {missing[:3]} are not parameters of the FSDP model")
                a.params = {n: named[n] for n in a.params}
            yield gathered
        finally:
            for a, params in saved:
                a.params = params


FSDP_FORWARD = "dynamics_pair_logprobs"
"""The method `shard_model` adds to a sharded model: ``model.dynamics_pair_logprobs(pairs)`` is
`dynamics.core.logprobs.pair_logprobs` run as a forward of the FSDP root (its parameters gathered
before, gradients reduce-scattered after the backward)."""


def _pair_logprobs_method(self, pairs: TokenizedPairs) -> PairLogProbs:
    out = pair_logprobs(self, pairs)
    # the chosen/rejected halves are views of one stacked tensor: FSDP warns about views among a
    # root's outputs (an in-place op on one would drop its pre-backward hook); (B, L) copies
    return PairLogProbs(*(dataclasses.replace(s, token_logps=s.token_logps.clone()) for s in (out.chosen, out.rejected)))


def shard_model(model: nn.Module, w: World | None = None) -> nn.Module:
    """Shard a transformers causal LM with FSDP2 (``fully_shard``) over the process group, in place
    (returned for convenience); unchanged without a multi-process group.

    Units: every decoder layer (the classes in the model's ``_no_split_modules``, as the
    transformers/accelerate FSDP plugin wraps them) and the whole model as the root, which holds
    the embeddings, the final norm and the head — a tied head and its embedding in one unit (FSDP2
    shares a parameter only within a unit: a tied head wrapped as a unit of its own sees a sharded
    weight). The trainer and the diagnostics call the body and the head separately
    (`dynamics.core.logprobs.body_and_head`), never the model's ``forward``, so the training forward
    is registered as an FSDP forward method of the root (`FSDP_FORWARD`, used by
    `training_forward`): the root's parameters are gathered before it and its gradients
    reduce-scattered after the backward. Gradients are averaged over the ranks, as with DDP, so
    the trainer's loss scaling is the same. A PEFT (LoRA) model is sharded the same way, the
    ``PeftModel`` as the root: a decoder layer's unit holds its frozen weights and its trainable
    adapters together (FSDP2 allows both in one unit; the frozen ones get no gradient).
    """
    w = world() if w is None else w
    if not w.distributed:
        return model
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    layer_classes = set(getattr(model, "_no_split_modules", None) or ())   # a PeftModel: its base model's
    layers = [m for m in model.modules() if type(m).__name__ in layer_classes]
    if not layers:
        raise InputError(f"parallel='fsdp' wraps the decoder layers named by a transformers model's "
                         f"_no_split_modules; {type(model).__name__} has none: use parallel='ddp'")
    for layer in layers:
        fully_shard(layer)
    fully_shard(model)
    setattr(model, FSDP_FORWARD, types.MethodType(_pair_logprobs_method, model))
    register_fsdp_forward_method(model, FSDP_FORWARD)
    return model


class ShardedPairForward(nn.Module):
    """`PairForward` of a model sharded by `shard_model`: ``forward(pairs)`` calls its
    `FSDP_FORWARD` method (the FSDP root's forward), so the same ``pair_logprobs``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        if not callable(getattr(model, FSDP_FORWARD, None)):
            raise InputError("the model has FSDP2 units but was not sharded by dynamics.runs.distributed.shard_model "
                             "(no training forward registered on its root)")
        self.model = model

    def forward(self, pairs: TokenizedPairs) -> PairLogProbs:
        return getattr(self.model, FSDP_FORWARD)(pairs)
