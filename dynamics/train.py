"""A plain PyTorch preference trainer for every loss in `dynamics.losses.LOSSES`.

One run: load a model, optionally SFT it on ``prompt + chosen``, take the SFT model as the
reference (its log-probs of every pair are computed once and cached, so no second model is
kept), then train with the chosen preference loss. Every ``eval_every`` steps a fixed set of
probe pairs is scored and one flat row per step × probe pair goes to ``records.parquet``:

    step, pair_id, loss, loss_value, logp_w, logp_l, logp_w_norm, logp_l_norm, ref_w, ref_l,
    len_w, len_l, margin, reward_acc, d_w, d_l

``step`` counts preference optimizer steps; the row at step s describes the model after s
updates (step 0 = the reference). ``margin = (logp_w - ref_w) - (logp_l - ref_l)`` and
``reward_acc = margin > 0`` are the DPO implicit-reward margin and accuracy, whatever the loss.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dynamics import data as data_mod
from dynamics.logprobs import (TokenizedPairs, cached_reference_logprobs, pair_logprobs,
                               sequence_logprobs, tokenize_pairs)
from dynamics.losses import compute_loss, get_loss, resolve_hyper
from dynamics.models import load_model
from dynamics.record import RunDir

DATA_KINDS = ("sentiment", "tldr", "pairs")
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
    loss: str = field(default="dpo", metadata={"help": "a name in dynamics.losses.LOSSES"})
    loss_params: dict = field(default_factory=dict, metadata={"help": "hyper-parameter overrides for the loss"})
    steps: int = field(default=40, metadata={"help": "preference optimizer steps"})
    batch_size: int = field(default=4, metadata={"help": "pairs per optimizer step"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step (batch_size must divide)"})
    lr: float = field(default=5e-6, metadata={"help": "preference learning rate (seed 004: 5e-6)"})
    optimizer: str = field(default="adamw", metadata={"help": "adamw or sgd"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    sft_steps: int = field(default=0, metadata={"help": "SFT steps on prompt+chosen before preference training"})
    sft_lr: float = field(default=5e-5, metadata={"help": "SFT learning rate (AdamW)"})
    eval_every: int = field(default=5, metadata={"help": "score the probe pairs every this many steps"})
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
        for name in ("steps", "batch_size", "grad_accum", "eval_every", "n_probe"):
            if getattr(self, name) < (0 if name == "steps" else 1):
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"grad_accum={self.grad_accum} must divide batch_size={self.batch_size}")
        if self.sft_steps < 0 or self.lr <= 0 or self.sft_lr <= 0:
            raise ValueError("sft_steps must be >= 0 and learning rates > 0")


def load_config_pairs(cfg: TrainConfig) -> list:
    """The pairs a config names (validated `PreferencePair`s)."""
    if cfg.data_kind == "sentiment":
        return data_mod.sentiment_pairs(cfg.data, cfg.style, limit=cfg.n_pairs, seed=cfg.seed)
    if cfg.data is None:
        raise ValueError(f"data_kind={cfg.data_kind!r} needs a data file")
    if cfg.data_kind == "tldr":
        return data_mod.load_tldr(cfg.data, limit=cfg.n_pairs)
    return data_mod.load_pairs(cfg.data, limit=cfg.n_pairs)


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


@torch.no_grad()
def probe_records(model, probe: TokenizedPairs, ref, cfg: TrainConfig, step: int) -> list[dict]:
    """One row per probe pair describing the model now (see the module docstring)."""
    was = model.training
    model.eval()
    out = pair_logprobs(model, probe)
    model.train(was)
    dtype = out.chosen.logp.dtype
    ref_w, ref_l = _ref_tensors(ref, list(range(len(probe))), dtype, out.chosen.logp.device)
    lw, ll = out.chosen.logp, out.rejected.logp
    nw, nl = out.chosen.lengths.to(dtype), out.rejected.lengths.to(dtype)
    try:
        lo = compute_loss(cfg.loss, lw, ll, ref_w, ref_l, nw, nl, **cfg.loss_params)
    except ValueError as e:
        raise ValueError(f"step {step}: probe pairs: {e}") from e
    margin = (lw - ref_w) - (ll - ref_l)
    rows = []
    for k, pid in enumerate(probe.pair_ids):
        rows.append(dict(
            step=step, pair_id=pid, loss=cfg.loss, loss_value=float(lo.loss[k]),
            logp_w=float(lw[k]), logp_l=float(ll[k]),
            logp_w_norm=float(out.chosen.logp_norm[k]), logp_l_norm=float(out.rejected.logp_norm[k]),
            ref_w=float(ref_w[k]), ref_l=float(ref_l[k]), len_w=int(nw[k]), len_l=int(nl[k]),
            margin=float(margin[k]), reward_acc=bool(margin[k] > 0),
            d_w=float(lo.d_w[k]), d_l=float(lo.d_l[k])))
    return rows


def train(cfg: TrainConfig, *, model=None, tokenizer=None) -> RunDir:
    """Run ``cfg`` end to end and return its run directory.

    ``model``/``tokenizer`` may be passed to reuse a loaded model (``cfg.model`` is then only
    recorded). A NaN or infinite loss stops the run with a ValueError; every row recorded before
    it stays on disk.
    """
    from tqdm.auto import tqdm

    run = RunDir(cfg.out)
    run.write_config(cfg)
    torch.manual_seed(cfg.seed)
    if model is None:
        model, tokenizer = load_model(cfg.model, dtype=DTYPES[cfg.dtype], device=cfg.device, seed=cfg.seed)
    pairs = load_config_pairs(cfg)
    if len(pairs) <= cfg.n_probe:
        raise ValueError(f"{len(pairs)} pairs cannot leave training pairs beside n_probe={cfg.n_probe} probes")
    train_pairs, probe_pairs = data_mod.split_pairs(pairs, n_eval=cfg.n_probe, seed=cfg.seed)
    kw = dict(max_length=cfg.max_length, truncation="prompt_left" if cfg.max_length else "error")
    train_tp, probe_tp = tokenize_pairs(tokenizer, train_pairs, **kw), tokenize_pairs(tokenizer, probe_pairs, **kw)
    if len(train_tp) < cfg.batch_size:
        raise ValueError(f"{len(train_tp)} training pairs are fewer than batch_size={cfg.batch_size}")

    t0 = time.time()
    if cfg.sft_steps:
        sft_losses = sft(model, train_tp, steps=cfg.sft_steps, lr=cfg.sft_lr, batch_size=cfg.batch_size,
                         seed=cfg.seed, progress=cfg.progress)
        run.append("sft", [dict(step=i + 1, nll=v) for i, v in enumerate(sft_losses)])

    # The model after SFT is the reference: its log-probs are computed once.
    ref_train = cached_reference_logprobs(model, train_tp, run.path / "ref_train.parquet")
    ref_probe = cached_reference_logprobs(model, probe_tp, run.path / "ref_probe.parquet")
    run.append("records", probe_records(model, probe_tp, ref_probe, cfg, step=0))

    params = [p for p in model.parameters() if p.requires_grad]
    opt = _make_optimizer(params, cfg.optimizer, cfg.lr, cfg.weight_decay)
    batches = _batches(len(train_tp), cfg.batch_size, cfg.seed)
    micro = cfg.batch_size // cfg.grad_accum
    model.train()
    for step in tqdm(range(1, cfg.steps + 1), desc=cfg.loss, disable=not cfg.progress):
        idx = next(batches)
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
        opt.step()
        run.append("train", [dict(step=step, loss=total, lr=cfg.lr, elapsed_s=time.time() - t0)])
        if step % cfg.eval_every == 0 or step == cfg.steps:
            run.append("records", probe_records(model, probe_tp, ref_probe, cfg, step=step))
    model.eval()
    return run
