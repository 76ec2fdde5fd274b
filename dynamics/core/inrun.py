"""In-run gradient inner products: ⟨g_w, g_l⟩, ‖g_w‖², ‖g_l‖² of the pairs being trained on,
from hooks on the training backward itself (no extra forward or backward).

The batch loss of a preference step over B pairs (of a micro-batch; the trainer divides by the
optimizer batch size B_opt) depends on θ only through the sequence log-probs::

    L = (1/B_opt) Σ_k ℓ_k(lw_k, ll_k),      ∂L/∂lw_k = c_w,k = −d_w,k / B_opt,
                                            ∂L/∂ll_k = c_l,k = +d_l,k / B_opt

(d_w, d_l of docs/math.md §2). Rows of a causal LM do not interact, so at every module the
training backward delivers, for the row of sequence i, the output gradient of log π_i scaled by
its scalar: b_iτ = c_i b̃_iτ with b̃_iτ = ∂ log π_i / ∂y_iτ. The ghost identity (§6.1) then gives,
per parameter and summed over its uses (a tied embedding / lm_head: all pairs of uses)::

    c_i c_j ⟨g_i, g_j⟩ = Σ_{τσ} (a_iτ · a_jσ)(b_iτ · b_jσ)          (a: the use's input factor)

and only three entries per pair are formed: (w_k, l_k), (w_k, w_k), (l_k, l_k) — linear in B —
each divided by the captured c_w,k c_l,k, c_w,k², c_l,k². The scalars c are read from the
backward (hooks on the log-prob tensors the loss was computed from), so they are exactly the
factors that multiplied b. `InRunCapture.watch_tokens` reads them from the per-token log-prob
tensor the loss sums instead (TRL's ``fused_lm_head`` output, whose per-sequence sums are formed
inside the trainer's loss): there ∂L/∂log π(y_it) = c_i at every response token of a loss that
depends on sequence i only through its sum, and a row where it is not one scalar (TRL's
``ld_alpha`` tail weighting) is reported missing, not guessed. Where c_i = 0 exactly (an inactive
hinge: SLiC-HF or RRHF past its margin has d_l = 0) the backward carries no information on g_i:
the entries that need it are NaN and `PairProducts.missing` says why.

Per parameter the cheaper exact contraction is used (`dynamics.core.ghost.pair_entries_from_uses`):
the ghost form, cost 3 B T² (d_in + d_out), or per-example gradients, cost 2B·T·d_in·d_out
(docs/math.md §6.2). At the lm_head, positions whose output gradient is exactly zero (a
full-sequence head, as in TRL: every prompt position) are dropped before contracting. Right
padding needs no masking: a padded position's output gradient is exactly zero, and its input is
finite whenever the training's own weight gradient is.

Book-keeping (``bookkeeping=True``, opt-in). At long sequences the per-example form dominates the
extra cost: it forms each sequence's weight gradient G_i = Σ_τ b_iτ ⊗ a_iτ *beside* the batch
gradient Σ_i G_i that autograd forms anyway, +1/3 of the linear layers' work (docs/math.md §6.4).
With book-keeping every selected plain ``nn.Linear`` (not the output layer, not a weight shared
with another module) whose entries the contraction materializes (by the cost model: the
sequences are long; `InRunCapture._materialized`) runs as `_PerSequenceLinear`: the same
forward; in the backward its weight gradient is formed per sequence *instead of* the batch
gradient, the three entries per pair are read off those, and their sum Σ_i G_i is returned as
the weight gradient; short sequences keep the ghost form (cheaper than writing N·d_in·d_out
numbers). The extra work is then the dot products and the sum, O(N·d_in·d_out) against the
O(N·T·d_in·d_out) of the layer. The price: Σ_i G_i adds the same products in another order than
autograd's single matmul, so the training gradient equals the one without in_run to float
rounding, not bit for bit (tested in float64 to 64 ulps). Under ``torch.autocast`` the layer
casts its input and weight as autocast would, and sums the per-sequence gradients in float32.

What the numbers are. θ = the selected parameters, which must all be trainable (the backward
reaches nothing else). The forward runs as the trainer runs it: in train mode, so with dropout
the inner products are those of the gradients with the dropout masks actually drawn (the tiny
test models have dropout 0, SmolLM2 too). LoRA: θ = the adapter matrices (``lora_A``/``lora_B``
are linear layers). Tied weights: one parameter, its embedding and head uses together.
Mixed precision (``torch.autocast``) is accepted: the factors are those of the mixed-precision
backward (half-precision output gradients, the layer inputs as the module received them) and the
contraction runs in float32, so the values carry the half-precision rounding of the training
gradients (measured ~2e-3 relative, tested to 2e-2 against the float64 oracle). Refused with `InputError`:
gradient checkpointing (the recomputed forward would record every call twice), a selected
parameter that does not require grad, a selected lm_head weight used outside the lm_head module
(a fused LM head such as TRL's ``fused_lm_head``: its gradient flows past every hook), a parameter
used by a module that takes several tensor inputs, and more than one forward with grad under one
capture.

Usage (one micro-batch; `dynamics.runs.recorder.InRunRecorder` does this for the trainer)::

    cap = InRunCapture(model, "trainable")
    with cap.capture():
        out = pair_logprobs(model, pairs)                  # rows: chosen 0..B-1, rejected B..2B-1
        lw, ll = out.chosen.logp, out.rejected.logp
        cap.watch(lw, ll)
        loss = compute_loss("dpo", lw, ll, rw, rl).loss.sum() / B
        loss.backward()
    prod = cap.result()                                    # PairProducts, (B,) each
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynamics.core import conditions
from dynamics.core.ghost import Factor, Use, call_uses, compact_positions, entry_costs, pair_entries_from_uses
from dynamics.core.grads import resolve_params
from dynamics.core.logprobs import unwrap
from dynamics.core.probe_pass import update_dot
from dynamics.errors import InputError

__all__ = ["InRunCapture", "PairProducts", "KeptUses", "MISSING_REASONS", "NONCONSTANT_REASON", "CONTRACTIONS",
           "predict_with_missing", "row_scales"]

CONTRACTIONS = ("auto", "ghost", "materialize")
"""How each parameter's entries are contracted (`dynamics.core.ghost.pair_entries_from_uses`): the
cheaper by flop count, or always one form (an embedding use is always ghost); equal values."""

MISSING_REASONS = {
    (True, False): "no gradient to chosen (d_w=0)",
    (False, True): "no gradient to rejected (d_l=0)",
    (True, True): "no gradient to chosen or rejected (d_w=d_l=0)",
}
"""``missing`` text by (c_w = 0, c_l = 0): which response this backward carried no gradient to."""

NONCONSTANT_REASON = ("per-token loss weights within a response (the loss is not a function of the summed "
                      "log-prob, e.g. TRL's ld_alpha): not supported")
"""``missing`` text of a pair watched by `InRunCapture.watch_tokens` whose ∂L/∂log π(y_t) is not the
same at every response token of the chosen or the rejected sequence."""

ROW_SCALE_ULPS = 16
"""`row_scales` tolerance in units of the gradient dtype's machine epsilon (see there)."""


def row_scales(grad: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Per row i of a per-token gradient ``grad`` (N, T) = ∂L/∂log π(y_it), the scalar c_i it is at
    every position of ``mask`` (N, T) bool, and whether it is constant there: ``(c (N,) float64,
    constant (N,) bool)``.

    A loss that depends on sequence i only through its summed log-prob Σ_t log π(y_it) (TRL's DPO
    losses with ``ld_alpha=None``, WPO weights included) backpropagates the broadcast of one scalar,
    so the entries are bitwise equal; ``constant`` allows a deviation of `ROW_SCALE_ULPS` machine
    epsilons of ``grad``'s dtype times the row's largest |entry| (a few roundings if a loss forms
    the factor per token, e.g. through a float mask) — far below the relative difference 1 − α of
    TRL's ``ld_alpha = α`` tail weighting (any α ≤ 1 − 1e-5 in float32). ``c`` is the masked mean
    (0 for a row without masked positions: no gradient reaches it)."""
    if grad.dim() != 2 or mask.shape != grad.shape:
        raise ValueError(f"row_scales: grad and mask must be (N, T) of one shape, got {tuple(grad.shape)}, "
                         f"{tuple(mask.shape)}")
    m = mask.to(device=grad.device, dtype=torch.bool)
    g = grad.detach().double()
    n = m.sum(1)
    c = torch.where(m, g, 0.0).sum(1) / n.clamp_min(1)
    dev = torch.where(m, (g - c[:, None]).abs(), 0.0).amax(1)
    top = torch.where(m, g.abs(), 0.0).amax(1)
    eps = torch.finfo(grad.dtype).eps if grad.dtype.is_floating_point else 0.0
    return c, dev <= ROW_SCALE_ULPS * eps * top


@dataclass
class PairProducts:
    """Per training pair (B,), float64: ``ip_wl = ⟨g_w,g_l⟩``, ``sq_w = ‖g_w‖²``, ``sq_l = ‖g_l‖²``,
    ``cos_wl`` (0 when a norm is 0), NaN where the backward carried no gradient to a response;
    ``c_w, c_l``: the captured ∂L/∂lw, ∂L/∂ll; ``missing``: None or a `MISSING_REASONS` text."""
    ip_wl: Tensor
    sq_w: Tensor
    sq_l: Tensor
    cos_wl: Tensor
    c_w: Tensor
    c_l: Tensor
    missing: list = field(default_factory=list)


@dataclass
class KeptUses:
    """The uses of one captured backward (``InRunCapture(keep_uses=True)``), kept until the update
    Δθ of the step is known: ``dots`` gives ⟨g_w,k, Δθ⟩ and ⟨g_l,k, Δθ⟩ of its B pairs from them
    (docs/math.md §4.2's upd from factors: Σ_τ b_iτ · (ΔW a_iτ) per linear use, ⟨G_i, ΔW⟩ for a
    book-kept layer's per-sequence gradient), divided by the captured scales c. ``uses``: one
    {id(parameter): uses} per contraction; ``n_rows``: the batch rows N (items of every use);
    ``rows_w, rows_l``, ``c_w, c_l``, ``ok_w, ok_l`` (B,): the pairs' rows, scales and whether a
    scale is usable (c ≠ 0 and one scalar per sequence; elsewhere the backward carried no g_i)."""
    uses: list
    n_rows: int
    rows_w: Tensor
    rows_l: Tensor
    c_w: Tensor
    c_l: Tensor
    ok_w: Tensor
    ok_l: Tensor

    def dots(self, delta: dict[int, Tensor]) -> tuple[Tensor, Tensor]:
        """``(upd_w, upd_l)`` (B,) float64 on the CPU for ``delta`` {id(parameter): Δ}; NaN where
        ``ok`` is False. Every parameter with kept uses must be in ``delta``."""
        raw = torch.zeros(self.n_rows, dtype=torch.float64, device=self.rows_w.device)
        with torch.no_grad():
            for group in self.uses:
                for pid, ulist in group.items():
                    for u in ulist:                            # c_i ⟨g_i, Δ⟩ of this use, (N,)
                        raw += update_dot(u, delta[pid], self.n_rows)
        raw = raw.cpu()                                        # one transfer, not one per use
        nan = torch.tensor(float("nan"), dtype=torch.float64)
        out = []
        for rows, c, ok in ((self.rows_w, self.c_w, self.ok_w), (self.rows_l, self.c_l, self.ok_l)):
            c, ok = c.cpu(), ok.cpu()
            out.append(torch.where(ok, raw[rows.cpu()] / torch.where(ok, c, 1.0), nan))
        return out[0], out[1]


@dataclass
class _Call:
    module: nn.Module
    names: list                   # selected (role, parameter) owned by the module
    inp: Tensor                   # detached input: (N, T, d_in) or (N, T) ids
    n_rows: int


def _single_input(mod, args, kwargs) -> Tensor:
    tensors = [a for a in args if isinstance(a, Tensor)] + [v for v in kwargs.values() if isinstance(v, Tensor)]
    if len(tensors) != 1:
        raise InputError(f"in_run: module {type(mod).__name__} owns a selected parameter but takes {len(tensors)} "
                         "tensor inputs; the in-run engine handles modules with one tensor input and one output "
                         "(linear, embedding, norm layers); select other parameters or turn in_run off")
    return tensors[0]


class _PerSequenceLinear(torch.autograd.Function):
    """``y = x Wᵀ + b`` (the forward of ``nn.Linear``, bit for bit) whose backward forms the weight
    gradient per sequence (book-keeping, see the module docstring).

    ``x`` (N, T, d_in), ``weight`` (d_out, d_in), ``bias`` (d_out,) or None; ``receive(G, gb)`` gets
    the per-sequence gradients G (N, d_out, d_in) and gb (N, d_out) or None during the backward,
    which returns ``∂x = ∂y W`` and ``∂W = Σ_i G_i``, ``∂b = Σ_i gb_i``, the sums in at least
    float32 (a bf16 layer under autocast accumulates as its matmul would)."""

    @staticmethod
    def forward(ctx, x, weight, bias, receive):
        ctx.save_for_backward(x, weight)
        ctx.receive, ctx.has_bias = receive, bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        gx = g.matmul(weight) if ctx.needs_input_grad[0] else None
        N, d_out, d_in = g.shape[0], g.shape[-1], x.shape[-1]
        g3, x3 = g.reshape(N, -1, d_out), x.reshape(N, -1, d_in)
        G = torch.bmm(g3.transpose(1, 2), x3)                                   # (N, d_out, d_in): G_i = Σ_τ b_iτ ⊗ a_iτ
        gb = g3.sum(1) if ctx.has_bias else None                                # (N, d_out)
        ctx.receive(G, gb)
        acc = torch.promote_types(G.dtype, torch.float32)
        total = lambda t: t.sum(0, dtype=acc).to(t.dtype)
        return gx, total(G) if ctx.needs_input_grad[1] else None, \
            total(gb) if ctx.has_bias and ctx.needs_input_grad[2] else None, None


class InRunCapture:
    """Hooks that turn a training forward/backward of 2B sequences into per-pair Gram entries.

    ``model``: a causal LM (transformers, possibly PEFT-wrapped); ``params``: a
    `dynamics.core.grads.select_params` spec or dict, resolved now; every selected parameter must
    require grad. ``contraction``: one of `CONTRACTIONS` (equal values; "auto" is the fastest).
    ``bookkeeping``: form the selected plain linear layers' weight gradients per sequence instead
    of the batch gradient (`_PerSequenceLinear`; faster at long sequences, the training gradient
    then equal to float rounding instead of bit for bit; module docstring). ``keep_uses``: keep
    every use contracted (its factors: the layers' inputs and output gradients, or a book-kept
    layer's per-sequence gradients) for `kept`, whose ⟨g_i, Δθ⟩ is then the real update's effect
    without a jvp; memory: those factors of the micro-batch, alive until `kept`'s result is dropped.
    One `capture` block holds one forward with grad and one backward (one micro-batch); `result`
    is valid after it and until the next `capture`.
    """

    def __init__(self, model, params="trainable", *, contraction: str = "auto", bookkeeping: bool = False,
                 keep_uses: bool = False):
        if contraction not in CONTRACTIONS:
            raise ValueError(f"unknown contraction {contraction!r}; known: {', '.join(CONTRACTIONS)}")
        if bookkeeping and contraction == "ghost":
            raise ValueError("bookkeeping forms per-sequence gradients, which contraction='ghost' never uses; "
                             "use contraction='auto' or 'materialize'")
        self.model, self.contraction, self.bookkeeping = model, contraction, bool(bookkeeping)
        self.keep_uses = bool(keep_uses)
        self.params = resolve_params(model, params)
        frozen = [n for n, p in self.params.items() if not p.requires_grad]
        if frozen:
            raise InputError(f"in_run: the selected parameters {frozen[:3]}{' ...' if len(frozen) > 3 else ''} do not "
                             "require grad; the training backward computes gradients of the trainable parameters "
                             "only, so in_run measures those (params='trainable' or a subset)")
        if not self.params:
            raise InputError("in_run: no parameter selected")
        self._reset()

    def _reset(self):
        self._calls: list[_Call] = []
        self._forwards = 0
        self._rows: tuple[Tensor, Tensor] | None = None
        self._c: dict[str, Tensor] = {}
        self._constant: dict[str, Tensor] = {}   # watch_tokens: whether each row's per-token scale is one scalar
        self._head: nn.Module | None = None
        self._fused: set[int] = set()   # selected output-layer parameters used outside the module (watch_tokens)
        self.bookkept: list[str] = []   # names of the modules whose calls ran as `_PerSequenceLinear` in this capture
        self._n_calls: dict[int, int] | None = None
        self._pending: dict[int, list[Use]] = {}
        self._kept: list[dict[int, list[Use]]] = []   # keep_uses: every contracted group of uses
        self._scales: tuple | None = None             # (c_w, c_l, ok_w, ok_l) of the last `result`
        self._n_rows: int | None = None               # rows of the per-token tensor (watch_tokens)
        self._acc: tuple[Tensor, Tensor, Tensor] | None = None
        self._grads_seen = 0
        self._busy = False     # inside our own computations (the norm-weight vjp runs the module again)
        self.seconds = 0.0     # spent in the contractions of this capture (during and after the backward)

    @contextlib.contextmanager
    def capture(self):
        """Record the selected parameters' module calls of the forward run inside, and contract
        their uses as the backward inside delivers each output gradient; hooks always removed."""
        base = unwrap(self.model)
        flag = ("is_activation_checkpointing" if hasattr(type(base), "is_activation_checkpointing")
                else "is_gradient_checkpointing")  # transformers >= 5 renamed it
        if getattr(base, flag, False):
            raise InputError("in_run does not support gradient checkpointing: the checkpointed forward is run "
                             "again inside the backward and its module calls would be recorded twice; turn "
                             "gradient checkpointing off or in_run off")
        self._reset()
        wanted = self._wanted = {id(p) for p in self.params.values()}
        handles = []

        def on_forward(mod, args, kwargs, output, names):
            if self._busy or not torch.is_grad_enabled() or not isinstance(output, Tensor) or not output.requires_grad:
                return  # a no-grad forward (reference log-probs, scoring): not part of the training step
            inp = _single_input(mod, args, kwargs)
            k = len(self._calls)
            self._calls.append(_Call(mod, names, inp.detach(), output.shape[0]))
            output.register_hook(lambda g, k=k: self._on_grad(k, g))

        def count_forward(mod, args, kwargs):
            if torch.is_grad_enabled():
                self._forwards += 1

        get_head = getattr(base, "get_output_embeddings", None)
        self._head = get_head() if callable(get_head) else None
        owners: dict[int, int] = {}
        for module in base.modules():
            for p in module.parameters(recurse=False):
                owners[id(p)] = owners.get(id(p), 0) + 1
        patched = []
        try:
            for qualname, module in base.named_modules():
                names = [(r, p) for r, p in module.named_parameters(recurse=False) if id(p) in wanted]
                if not names:
                    continue
                if self.bookkeeping and self._bookkeepable(module, names, owners):
                    module.forward = self._per_sequence_forward(qualname, module, names, on_forward)
                    patched.append(module)
                else:
                    handles.append(module.register_forward_hook(
                        lambda m, a, kw, o, names=names: on_forward(m, a, kw, o, names), with_kwargs=True))
            emb = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
            if isinstance(emb, nn.Module):
                handles.append(emb.register_forward_pre_hook(count_forward, with_kwargs=True))
            yield self
        finally:
            for h in handles:
                h.remove()
            for module in patched:
                del module.forward

    def _bookkeepable(self, module: nn.Module, names, owners: dict[int, int]) -> bool:
        """Whether ``module`` may run as `_PerSequenceLinear`: a plain ``nn.Linear`` (not a subclass,
        its ``forward`` not replaced by someone else) whose weight is selected, is not the output
        layer (its response positions are few: the compact ghost form is cheaper there) and is
        owned by no other module (a tied weight's uses are contracted together)."""
        return (type(module) is nn.Linear and module is not self._head and "forward" not in module.__dict__
                and any(r == "weight" for r, _ in names) and all(owners[id(p)] == 1 for _, p in names))

    def _materialized(self, x: Tensor, weight: Tensor) -> bool:
        """Whether the per-sequence form is the one the contraction takes for a linear layer with
        input ``x`` (N, T, d_in): always with ``contraction="materialize"``, by `entry_costs` (the
        cost model of `pair_entries_from_uses`) with "auto". Only there does book-keeping pay: for
        short sequences the ghost contraction beside autograd's product is cheaper than forming
        and summing N·d_in·d_out numbers (docs/math.md §6.4)."""
        if self.contraction == "materialize":
            return True
        N, T = x.shape[:2]
        meta = lambda d: Factor(torch.empty(N, T, d, device="meta"))
        c_ghost, c_mat = entry_costs([Use(meta(weight.shape[0]), meta(weight.shape[1]))], max(N // 2, 1))
        return c_mat < c_ghost

    def _per_sequence_forward(self, qualname: str, module: nn.Linear, names, on_forward):
        """The replacement ``forward`` of a book-keeping linear layer: `_PerSequenceLinear` for a
        training forward of (N, T, d_in) inputs whose entries are materialized (`_materialized`),
        the ordinary layer with the hook path's recording otherwise."""
        def forward(input: Tensor) -> Tensor:
            x = input
            if (self._busy or not torch.is_grad_enabled() or x.dim() != 3
                    or not (x.requires_grad or module.weight.requires_grad)
                    or not self._materialized(x, module.weight)):
                out = F.linear(x, module.weight, module.bias)
                on_forward(module, (x,), {}, out, names)
                return out
            if qualname not in self.bookkept:
                self.bookkept.append(qualname)
            k = len(self._calls)
            self._calls.append(_Call(module, names, None, x.shape[0]))
            receive = lambda G, gb: self._receive(k, lambda call: self._per_sequence_uses(call, G, gb))
            w, b, dev = module.weight, module.bias, x.device.type
            if not torch.is_autocast_enabled(dev):
                return _PerSequenceLinear.apply(x, w, b, receive)
            dt = torch.get_autocast_dtype(dev)     # cast as autocast casts a linear layer's operands
            with torch.autocast(dev, enabled=False):
                return _PerSequenceLinear.apply(x.to(dt), w.to(dt), None if b is None else b.to(dt), receive)
        return forward

    @staticmethod
    def _per_sequence_uses(call: _Call, G: Tensor, gb: Tensor | None) -> list[tuple[int, Use]]:
        """The uses of a book-kept call: its selected weight's and bias's per-sequence gradients."""
        N, mats = G.shape[0], {"weight": G, "bias": gb}
        return [(id(p), Use(mat=mats[r].reshape(N, -1))) for r, p in call.names]

    def watch(self, logp_w: Tensor, logp_l: Tensor, rows_w: Tensor | None = None, rows_l: Tensor | None = None) -> None:
        """Declare the pairs: ``logp_w, logp_l`` (B,) are the chosen/rejected log-prob tensors the
        loss is computed from (hooks read ∂L/∂log π from them), ``rows_w, rows_l`` (B,) their rows
        in the model batch (default: chosen 0..B-1, rejected B..2B-1, as `pair_logprobs` and TRL's
        concatenated forward stack them). Call inside `capture`, before the backward."""
        B = logp_w.shape[0]
        if logp_l.shape != (B,) or logp_w.shape != (B,):
            raise ValueError(f"watch: logp_w and logp_l must be (B,), got {tuple(logp_w.shape)}, {tuple(logp_l.shape)}")
        dev = logp_w.device
        rows_w = torch.arange(B, device=dev) if rows_w is None else torch.as_tensor(rows_w, device=dev)
        rows_l = torch.arange(B, 2 * B, device=dev) if rows_l is None else torch.as_tensor(rows_l, device=dev)
        self._rows = (rows_w, rows_l)
        self._c, self._constant = {}, {}
        for side, t in (("w", logp_w), ("l", logp_l)):
            if not t.requires_grad:
                raise ValueError(f"watch: logp_{side} does not require grad (computed without grad?)")
            t.register_hook(lambda g, side=side: self._c.__setitem__(side, g.detach().double()))

    def watch_tokens(self, per_token: Tensor, mask: Tensor, rows_w: Tensor | None = None,
                     rows_l: Tensor | None = None, *, fused_head: tuple[Tensor, Tensor] | None = None) -> None:
        """`watch` for a loss computed from per-token log-probs: ``per_token`` (N, T) is the tensor the
        loss sums (TRL's ``outputs.log_probs`` of its ``fused_lm_head`` forward), ``mask`` (N, T) bool
        its response positions (TRL's ``label_mask``), ``rows_w, rows_l`` (B,) as in `watch` (default:
        chosen 0..B-1, rejected B..2B-1 of N = 2B rows).

        The hook reads ∂L/∂log π(y_it) and takes c_i = its value at the masked positions of row i
        (`row_scales`): exact when the loss depends on each sequence only through its summed
        log-prob. A row where it is not constant (a per-token weighting such as TRL's ``ld_alpha``)
        gets NaN entries and `NONCONSTANT_REASON` (``PairProducts.missing``): its backward did not
        scale one gradient g_i, so no ⟨g_i, ·⟩ can be read from it.

        ``fused_head = (h, y)``: the output layer is applied outside its module (TRL's fused LM head
        multiplies by ``lm_head.weight`` directly, so no hook sees it): ``h`` (N, T, d) the hidden
        state it projected at each position of ``per_token``, ``y`` (N, T) the target ids there. Its
        selected weight (and bias) then get the use of docs/math.md §6.1's lm_head row, with the
        output gradient read off the backward: ∂L/∂z_t = ∂L/∂log π(y_t) · (e_{y_t} − softmax(z_t)),
        z_t = W h_t + b recomputed at the masked positions (`_fused_head_uses`). A model whose
        logits are scaled or soft-capped is not of this form: the caller refuses it."""
        if per_token.dim() != 2 or mask.shape != per_token.shape:
            raise ValueError(f"watch_tokens: per_token and mask must be (N, T) of one shape, got "
                             f"{tuple(per_token.shape)}, {tuple(mask.shape)}")
        N, dev = per_token.shape[0], per_token.device
        if rows_w is None or rows_l is None:
            if N % 2:
                raise ValueError(f"watch_tokens: {N} rows cannot be chosen/rejected halves; pass rows_w, rows_l")
            B = N // 2
        rows_w = torch.arange(B, device=dev) if rows_w is None else torch.as_tensor(rows_w, device=dev)
        rows_l = torch.arange(B, 2 * B, device=dev) if rows_l is None else torch.as_tensor(rows_l, device=dev)
        if rows_w.shape != rows_l.shape or rows_w.dim() != 1:
            raise ValueError(f"watch_tokens: rows_w and rows_l must be (B,), got {tuple(rows_w.shape)}, "
                             f"{tuple(rows_l.shape)}")
        if not per_token.requires_grad:
            raise ValueError("watch_tokens: per_token does not require grad (computed without grad?)")
        self._rows, self._n_rows = (rows_w, rows_l), N
        self._c, self._constant = {}, {}
        mask = mask.detach().bool()
        if fused_head is not None:
            h, y = fused_head
            head = self._head
            if not isinstance(head, nn.Linear):
                raise InputError(f"in_run: a fused LM head needs a linear output layer, got {type(head).__name__}")
            if h.shape[:2] != mask.shape or y.shape != mask.shape:
                raise ValueError(f"watch_tokens: fused_head h (N, T, d) and y (N, T) must match per_token "
                                 f"{tuple(mask.shape)}, got {tuple(h.shape)}, {tuple(y.shape)}")
            self._fused = {id(p) for p in (head.weight, head.bias) if p is not None and id(p) in self._wanted}

        def on_grad(g):
            c, const = row_scales(g, mask.to(g.device))
            for side, rows in (("w", rows_w), ("l", rows_l)):
                self._c[side], self._constant[side] = c[rows.to(c.device)], const[rows.to(c.device)]
            if fused_head is not None and self._fused:
                t0 = time.perf_counter()
                for pid, use in self._fused_head_uses(g.detach(), mask.to(g.device), *fused_head):
                    self._pending.setdefault(pid, []).append(use)   # with the embedding's use if tied: result()
                self.seconds += time.perf_counter() - t0

        per_token.register_hook(on_grad)

    def _fused_head_uses(self, g: Tensor, mask: Tensor, h: Tensor, y: Tensor) -> list[tuple[int, Use]]:
        """The output layer's uses at the masked positions with a gradient, packed to the left per row
        (`dynamics.core.ghost.compact_positions`): rows ∂L/∂z_t = g_t (e_{y_t} − π_t) (N, L, V), cols
        h_t (N, L, d) (ones for the bias); computed in float64 for a float64 weight, else float32."""
        head = self._head
        W, b = head.weight, head.bias
        dt = torch.float64 if W.dtype == torch.float64 else torch.float32
        with torch.no_grad():
            gm = torch.where(mask, g, torch.zeros((), dtype=g.dtype, device=g.device))[..., None]   # (N, T, 1)
            hs, gs = compact_positions(h.detach().to(dt), gm.to(dt))       # one order for h, g and y: gm's
            ys, _ = compact_positions(y.clamp_min(0), gm)
            r = -torch.softmax(F.linear(hs, W.detach().to(dt), None if b is None else b.detach().to(dt)), -1)
            r.scatter_add_(-1, ys[..., None], torch.ones_like(r[..., :1]))
            r.mul_(gs)                                                                     # (N, L, V)
        uses = {id(W): Use(Factor(r), Factor(hs))}
        if b is not None:
            uses[id(b)] = Use(Factor(r), Factor(torch.ones_like(gs)))
        return [(pid, u) for pid, u in uses.items() if pid in self._fused]

    # ------------------------------------------------------------------ during the backward
    def _on_grad(self, k: int, g: Tensor) -> None:
        """The output gradient of recorded call ``k``: its uses from the input and ``g``."""
        head = self._calls[k].module is self._head
        self._receive(k, lambda call: call_uses(call.module, call.names, call.inp, g.detach(), compact=head))

    def _receive(self, k: int, uses_of) -> None:
        """Contract the uses ``uses_of(call)`` of recorded call ``k`` now, or keep them until every
        use of a parameter of several calls has arrived (a tied embedding / lm_head)."""
        if self._rows is None:
            raise RuntimeError("InRunCapture: the backward ran before watch(logp_w, logp_l)")
        if self._n_calls is None:  # the forward is complete once the backward starts
            self._check_forward()
            self._n_calls = {pid: 1 for pid in self._fused}          # the fused head's use (watch_tokens)
            for c in self._calls:
                for _, p in c.names:
                    self._n_calls[id(p)] = self._n_calls.get(id(p), 0) + 1
        call = self._calls[k]
        self._grads_seen += 1
        self._busy, t0 = True, time.perf_counter()
        try:
            self._contract_call(call, uses_of)
        finally:
            self._busy = False
            self.seconds += time.perf_counter() - t0

    def _contract_call(self, call: _Call, uses_of) -> None:
        with torch.no_grad():
            now: dict[int, list[Use]] = {}
            for pid, use in uses_of(call):
                if self._n_calls[pid] == 1:
                    now.setdefault(pid, []).append(use)
                else:  # a parameter of several calls (tied embedding / lm_head): wait for all its uses
                    self._pending.setdefault(pid, []).append(use)
            if now:
                self._add(now)
        call.inp = None  # its uses hold what is needed; let the input go with the graph

    def _add(self, uses: dict[int, list[Use]]) -> None:
        if self.keep_uses:
            self._kept.append(uses)
        entries = pair_entries_from_uses(uses, *self._rows, mode=self.contraction)
        self._acc = entries if self._acc is None else tuple(a + e for a, e in zip(self._acc, entries))

    def _check_forward(self) -> None:
        if self._forwards > 1:
            raise InputError(f"in_run: {self._forwards} forwards with grad ran under one capture; the in-run engine "
                             "needs chosen and rejected in one forward (rows = sequences) per backward")
        head = self._head
        if (head is not None and any(id(p) in self._wanted and id(p) not in self._fused
                                     for p in head.parameters(recurse=False))
                and not any(c.module is head for c in self._calls)):
            raise InputError("in_run: the output layer's weight is among the selected parameters but the lm_head module "
                             "was not called in the forward: the weight is used outside the module (a fused LM head, "
                             "e.g. TRL's fused_lm_head), whose gradient the in-run engine cannot see; leave the "
                             "head (and a weight tied to it) out of the trained/selected parameters, e.g. with LoRA")
        n = {c.n_rows for c in self._calls}
        if len(n) > 1:
            raise InputError(f"in_run: module calls with different batch sizes {sorted(n)} under one capture")

    # ------------------------------------------------------------------ after the backward
    def result(self) -> PairProducts:
        """The Gram entries of the watched pairs, divided by the captured scales."""
        if self._rows is None:
            raise RuntimeError("InRunCapture.result() without watch() in the capture block")
        if self._grads_seen == 0:
            raise RuntimeError("InRunCapture.result(): no backward ran inside the capture block")
        if set(self._c) != {"w", "l"}:
            raise RuntimeError("InRunCapture.result(): the watched log-prob tensors received no gradient; pass watch() "
                               "the very tensors the loss is computed from (a new slice or sum of them is another "
                               "tensor)")
        used = {id(p) for c in self._calls for _, p in c.names} | self._fused
        missing = [n for n, p in self.params.items() if id(p) not in used]
        if missing:
            raise InputError(f"in_run: selected parameter(s) {missing[:5]} are used by no module call the in-run engine "
                             "can see (used outside a module forward?); select other parameters")
        with torch.no_grad():
            if self._pending:
                self._busy, t0 = True, time.perf_counter()
                try:
                    self._add(self._pending)
                finally:
                    self._busy = False
                    self.seconds += time.perf_counter() - t0
                self._pending = {}
            B = len(self._rows[0])
            zeros = torch.zeros(B, dtype=torch.float64, device=self._rows[0].device)
            raw_ip, raw_w, raw_l = self._acc if self._acc is not None else (zeros, zeros, zeros)
            c_w = self._c.get("w", zeros).to(raw_ip.device)
            c_l = self._c.get("l", zeros).to(raw_ip.device)
            yes = torch.ones(B, dtype=torch.bool, device=raw_ip.device)
            const = (self._constant.get("w", yes).to(raw_ip.device), self._constant.get("l", yes).to(raw_ip.device))
            nan = torch.full_like(raw_ip, float("nan"))
            ok_w, ok_l = (c_w != 0) & const[0], (c_l != 0) & const[1]
            sq_w = torch.where(ok_w, raw_w / torch.where(ok_w, c_w * c_w, 1.0), nan)
            sq_l = torch.where(ok_l, raw_l / torch.where(ok_l, c_l * c_l, 1.0), nan)
            ok = ok_w & ok_l
            ip = torch.where(ok, raw_ip / torch.where(ok, c_w * c_l, 1.0), nan)
            denom = (sq_w * sq_l).sqrt()
            cos = torch.where(denom > 0, ip / denom.clamp_min(torch.finfo(denom.dtype).tiny), torch.zeros_like(ip))
            cos = torch.where(ok, cos, nan)
        self._scales = (c_w, c_l, ok_w, ok_l)
        bad = (~(const[0] & const[1])).tolist()
        reasons = [NONCONSTANT_REASON if x else MISSING_REASONS.get((not bool(a), not bool(b)))
                   for x, a, b in zip(bad, ok_w.tolist(), ok_l.tolist())]
        return PairProducts(ip.cpu(), sq_w.cpu(), sq_l.cpu(), cos.cpu(), c_w.cpu(), c_l.cpu(), reasons)

    def kept(self) -> KeptUses:
        """The uses of this capture with its pairs' rows and scales (``keep_uses=True``; after
        `result`), for ⟨g_i, Δθ⟩ once the update is known (`KeptUses.dots`)."""
        if not self.keep_uses:
            raise RuntimeError("InRunCapture.kept() needs keep_uses=True")
        if self._scales is None:
            raise RuntimeError("InRunCapture.kept() before result()")
        n = self._calls[0].n_rows if self._calls else self._n_rows
        return KeptUses(self._kept, n, *self._rows, *self._scales)


def predict_with_missing(d_w: Tensor, d_l: Tensor, ip_wl: Tensor, sq_w: Tensor, sq_l: Tensor,
                         lr: float) -> dict[str, Tensor]:
    """`dynamics.core.conditions.predict` where some inner products may be NaN (unavailable).

    A missing value is only missing where its coefficient is not zero: with d_l = 0 (the
    rejected response got no gradient, so ⟨g_w,g_l⟩ and ‖g_l‖² are NaN) the chosen side is still
    exact, ``dlogp_w = η d_w ‖g_w‖²`` and ``thr_l = (d_l/d_w)‖g_l‖² = 0``; with d_w = 0 the
    rejected side is ``dlogp_l = −η d_l ‖g_l‖²`` and ``thr_w = 0``. So each output is evaluated
    with the NaN entries its formula multiplies by a zero coefficient replaced by 0; the others
    stay NaN. ``case`` is −1 where a predicted change is NaN. All inputs (B,).
    """
    zero_if = lambda coef, x: torch.where(coef == 0, torch.zeros_like(x), x)
    side_w = conditions.predict(d_w, d_l, zero_if(d_l, ip_wl), zero_if(d_w, sq_w), zero_if(d_l, sq_l), lr=lr)
    side_l = conditions.predict(d_w, d_l, zero_if(d_w, ip_wl), zero_if(d_w, sq_w), zero_if(d_l, sq_l), lr=lr)
    dw, dl = side_w["dlogp_w"], side_l["dlogp_l"]
    case = torch.where(dw.isnan() | dl.isnan(), torch.full_like(side_w["case"], -1), conditions.case(dw, dl))
    return dict(dlogp_w=dw, dlogp_l=dl, dmargin=dw - dl, thr_w=side_w["thr_w"], thr_l=side_w["thr_l"], case=case)
