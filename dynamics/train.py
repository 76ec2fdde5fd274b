"""A plain PyTorch preference trainer for every loss in `dynamics.losses.LOSSES`.

One run: load a model, optionally SFT it on ``prompt + chosen``, take the SFT model as the
reference (its log-probs of every pair are computed once and cached, so no second model is
kept), then train with the chosen preference loss (full fine-tuning or LoRA, AdamW or SGD,
gradient accumulation). Every ``eval_every`` steps a `dynamics.recorder.Recorder` measures a
fixed set of probe pairs around the optimizer update (log-probs, gradient inner products,
predicted and actual changes, what-if table, token Grams) into the run directory.

Checkpoints (``checkpoint/``: trainable parameters, optimizer state, step) are written
atomically every ``save_every`` steps; ``resume=True`` continues from the last one and drops
the rows recorded after it, so a run killed at any moment (even by SIGKILL) resumes without
duplicate or missing rows.
"""
from __future__ import annotations

import random
import shutil
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
    eval_data: str | None = field(default=None, metadata={"help": "draw the probe pairs from this file (same kind as data) instead of splitting them off the training data"})
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
    eval_every: int = field(default=5, metadata={"help": "record the probe pairs every this many steps"})
    impl: str = field(default="ghost", metadata={"help": "gradient engine for the diagnostics: ghost, func, autograd"})
    whatif: bool = field(default=True, metadata={"help": "record the what-if table over the loss zoo"})
    token_pairs: int = field(default=1, metadata={"help": "probe pairs whose token Grams are saved"})
    probes: bool = field(default=False, metadata={"help": "record learning-dynamics probes (y+, y-, y*, greedy, shuffled, ...)"})
    lora_r: int = field(default=0, metadata={"help": "LoRA rank (0: full fine-tuning)"})
    save_every: int = field(default=0, metadata={"help": "checkpoint every this many steps (0: never)"})
    resume: bool = field(default=False, metadata={"help": "continue from OUT/checkpoint"})
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
        if self.sft_steps < 0 or self.lr <= 0 or self.sft_lr <= 0:
            raise ValueError("sft_steps must be >= 0 and learning rates > 0")


def load_config_pairs(cfg: TrainConfig) -> list:
    """The pairs a config names (validated `PreferencePair`s): at most ``n_pairs`` of ``data``."""
    return _read_pairs(cfg, cfg.data, cfg.n_pairs)


def _read_pairs(cfg: TrainConfig, source: str | None, limit: int | None) -> list:
    if cfg.data_kind == "sentiment":
        return data_mod.sentiment_pairs(source, cfg.style, limit=limit, seed=cfg.seed)
    if source is None:
        raise ValueError(f"data_kind={cfg.data_kind!r} needs a data file")
    if cfg.data_kind == "tldr":
        return data_mod.load_tldr(source, limit=limit)
    return data_mod.load_pairs(source, limit=limit)


def split_config_pairs(cfg: TrainConfig) -> tuple[list, list]:
    """(training pairs, probe pairs): ``n_probe`` probes drawn from ``cfg.eval_data`` when given
    (all of ``cfg.data`` then trains), else split off ``cfg.data`` (`dynamics.data.split_pairs`)."""
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


def _save_checkpoint(path: Path, model, opt, step: int) -> None:
    """Atomically replace ``path/`` by: trainable parameters, optimizer state, the step."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    state = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
    torch.save(dict(params=state, optimizer=opt.state_dict(), step=step), tmp / "state.pt")
    old = path.with_name(path.name + ".old")
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    if old.exists():
        shutil.rmtree(old)


def _load_checkpoint(path: Path, model, opt) -> int:
    """Load `_save_checkpoint`'s state into ``model`` and ``opt``; returns the step."""
    if not (path / "state.pt").is_file() and (path.with_name(path.name + ".old") / "state.pt").is_file():
        path = path.with_name(path.name + ".old")  # killed between the two renames
    state = torch.load(path / "state.pt", weights_only=False)
    named = dict(model.named_parameters())
    with torch.no_grad():
        for n, v in state["params"].items():
            named[n].copy_(v)
    opt.load_state_dict(state["optimizer"])
    return int(state["step"])


def build_probe_sets(model, tokenizer, probe_pairs, train_pairs, seed: int) -> dict:
    """{pair_id: probes} for every probe pair (seed 000's set): y⁺, y⁻, another prompt's y⁺, a
    held-out prompt's y⁺ (the next probe pair), shuffled y⁺, shuffled other response, and the
    model-made y* (argmax under teacher forcing on y⁺) and greedy decode, made from the model
    as it is now (the reference) and kept fixed."""
    from dynamics.probes import model_probes, probe_set

    sets = {}
    for k, pair in enumerate(probe_pairs):
        held = probe_pairs[(k + 1) % len(probe_pairs)] if len(probe_pairs) > 1 else None
        sets[str(pair.id)] = list(probe_set(pair, others=train_pairs, held_out=held, seed=seed)) + \
            list(model_probes(model, tokenizer, pair, max_new_tokens=16))
    return sets


def train(cfg: TrainConfig, *, model=None, tokenizer=None) -> RunDir:
    """Run ``cfg`` end to end and return its run directory.

    ``model``/``tokenizer`` may be passed to reuse a loaded model (``cfg.model`` is then only
    recorded). A NaN or infinite loss stops the run with a ValueError naming the step; every
    row recorded before it stays on disk.
    """
    from tqdm.auto import tqdm

    from dynamics.recorder import Recorder, RecorderConfig

    run = RunDir(cfg.out)
    ckpt = run.path / "checkpoint"
    has_ckpt = any((p / "state.pt").is_file() for p in (ckpt, ckpt.with_name("checkpoint.old")))
    if cfg.resume and not has_ckpt:
        raise FileNotFoundError(f"resume=True but {ckpt} holds no checkpoint")
    run.write_config(cfg)
    torch.manual_seed(cfg.seed)
    if model is None:
        model, tokenizer = load_model(cfg.model, dtype=DTYPES[cfg.dtype], device=cfg.device, seed=cfg.seed)
    train_pairs, probe_pairs = split_config_pairs(cfg)
    kw = dict(max_length=cfg.max_length, truncation="prompt_left" if cfg.max_length else "error")
    train_tp, probe_tp = tokenize_pairs(tokenizer, train_pairs, **kw), tokenize_pairs(tokenizer, probe_pairs, **kw)
    if len(train_tp) < cfg.batch_size:
        raise ValueError(f"{len(train_tp)} training pairs are fewer than batch_size={cfg.batch_size}")

    t0 = time.time()
    sft_file = run.path / "sft_model.pt"
    if cfg.sft_steps and cfg.resume:  # the reference is the post-SFT model: restore it
        state = torch.load(sft_file)
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(state[n])
    elif cfg.sft_steps:
        sft_losses = sft(model, train_tp, steps=cfg.sft_steps, lr=cfg.sft_lr, batch_size=cfg.batch_size,
                         seed=cfg.seed, progress=cfg.progress)
        run.append("sft", [dict(step=i + 1, nll=v) for i, v in enumerate(sft_losses)])
        if cfg.save_every:
            torch.save({n: p.detach().cpu() for n, p in model.named_parameters()}, sft_file)
    if cfg.lora_r:
        model = apply_lora(model, cfg.lora_r, cfg.seed)

    # The model after SFT is the reference: its log-probs are computed once (and cached on disk).
    ref_train = cached_reference_logprobs(model, train_tp, run.path / "ref_train.parquet")
    ref_probe = cached_reference_logprobs(model, probe_tp, run.path / "ref_probe.parquet")
    opt = _make_optimizer([p for p in model.parameters() if p.requires_grad], cfg.optimizer, cfg.lr,
                          cfg.weight_decay)
    start = 0
    if cfg.resume:
        start = _load_checkpoint(ckpt, model, opt)
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
