"""The loss zoo: a registry of pure per-pair preference losses and their coefficients.

Notation (all tensors 1-D, shape ``(B,)``, one entry per preference pair):
``lw, ll`` = log π_θ(y_w|x), log π_θ(y_l|x) summed over response tokens; ``rw, rl`` = the same
under the frozen reference model; ``|y_w|, |y_l|`` = number of response tokens (float);
``avg = log π / |y|``. Every loss function returns the per-pair quantity that is *minimized*.

Seed 004 writes the general margin loss (eq. 8) as ``ℓ = -(m(h_w(lw) - h_l(ll)) + Λ(lw))``
and defines the coefficients (docs/math.md §2, whose table §2.1 lists every loss)::

    d_w = ∂(-ℓ)/∂lw,   d_l = ∂ℓ/∂ll,   so that   ∇_θ ℓ = -(d_w ∇lw - d_l ∇ll).

`compute_loss` gets ``d_w, d_l`` exactly by autograd for every loss; `closed_form_coefficients`
gives the paper formulas where there is one, as a cross-check.

Where Table 2 of seed 004 and the loss's own paper disagree, the paper wins and the docstring
of the loss says so. Recurring looseness in Table 2: the reference log-ratio ``c_ref`` is not
multiplied by β (DPO, R-DPO, DPOP, KTO), and ``m`` is written as a quantity to maximize even
for squared losses (IPO, SPPO), where maximizing it would be wrong.

Coefficient sign flips (IPO, SPPO) and hinge dead zones (RRHF, SLiC-HF) are documented per loss.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from dynamics.errors import InputError

__all__ = [
    "LOSSES", "LossSpec", "LossOutput", "register", "get_loss", "resolve_hyper", "check_hyper", "HYPER_RULES",
    "compute_loss", "closed_form_coefficients", "general_form_table", "format_loss_table",
]

LossFn = Callable[..., Tensor]  # fn(lw, ll, rw, rl, len_w, len_l, **hyper) -> (B,)


@dataclass(frozen=True)
class LossSpec:
    """One registered loss: the pure function and what the CLI, plots and tests need to know."""

    name: str
    fn: LossFn
    defaults: Mapping[str, Any]  # read-only (MappingProxyType); copy with dict(spec.defaults)
    formula: str  # one line, unicode, the quantity minimized
    description: str
    needs_ref: bool  # reference log-probs required with the default hyper-parameters
    uses_length_normalized: bool  # uses log π/|y| (plot length-normalized log-probs)
    reference: str  # paper


@dataclass(frozen=True)
class LossOutput:
    """Per-pair ``loss`` (B,), with the caller's autograd graph, and detached ``d_w, d_l`` (B,)."""

    loss: Tensor
    d_w: Tensor
    d_l: Tensor


LOSSES: dict[str, LossSpec] = {}
_CLOSED_FORMS: dict[str, Callable[..., tuple[Tensor, Tensor]]] = {}


def register(name: str, *, defaults: Mapping[str, Any], formula: str, needs_ref: bool,
             reference: str, uses_length_normalized: bool = False,
             description: str | None = None) -> Callable[[LossFn], LossFn]:
    """Decorator adding ``fn`` to `LOSSES` under ``name``; the description defaults to the
    first paragraph of the docstring."""

    def deco(fn: LossFn) -> LossFn:
        if name in LOSSES:
            raise ValueError(f"loss '{name}' is already registered")
        doc = (fn.__doc__ or "").strip().split("\n\n")[0]
        LOSSES[name] = LossSpec(
            name=name, fn=fn, defaults=MappingProxyType(dict(defaults)), formula=formula,
            description=description or " ".join(doc.split()), needs_ref=needs_ref,
            uses_length_normalized=uses_length_normalized, reference=reference)
        return fn

    return deco


def _closed_form(name: str):
    return lambda fn: _CLOSED_FORMS.setdefault(name, fn)


def get_loss(name: str) -> LossSpec:
    """The `LossSpec` registered as ``name``; ValueError listing the known names otherwise."""
    try:
        return LOSSES[name]
    except KeyError:
        raise InputError(f"unknown loss {name!r}; known: {', '.join(sorted(LOSSES))}") from None


def resolve_hyper(name: str, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Defaults of loss ``name`` updated with ``overrides``, validated by `check_hyper`.

    Unknown keys, wrong types (a string β), non-finite numbers and values outside the loss's
    valid range (`HYPER_RULES`) raise `dynamics.errors.InputError` (a ValueError) naming the
    loss and the parameter. The trainer, the recorder and the callback all resolve through here.
    """
    if not isinstance(name, str):
        raise InputError(f"loss must be a name (str), got {type(name).__name__} {name!r}")
    spec = get_loss(name)
    if overrides is not None and not isinstance(overrides, Mapping):
        raise InputError(f"loss {name!r}: hyper-parameters must be a mapping (JSON object) like "
                         f'{{"beta": 0.1}}, got {type(overrides).__name__} {overrides!r}')
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(spec.defaults), key=str)
    if unknown:
        raise InputError(f"unknown hyper-parameter(s) {unknown} for loss {name!r}; "
                         f"valid: {sorted(spec.defaults)}")
    hp = {**spec.defaults, **overrides}
    check_hyper(name, hp)
    return hp


@dataclass(frozen=True)
class HyperRule:
    """What values a hyper-parameter takes: a real number ``> low`` (``strict``) or ``>= low``,
    or one of ``choices`` (strings)."""

    low: float | None = None
    strict: bool = True
    choices: tuple[str, ...] = ()
    why: str = ""

    def problem(self, value: Any) -> str | None:
        if self.choices:
            return None if isinstance(value, str) and value in self.choices else f"valid: {list(self.choices)}"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"must be a number, got {type(value).__name__} {value!r}"
        if not math.isfinite(value):
            return f"must be finite, got {value}"
        if self.low is not None and (value <= self.low if self.strict else value < self.low):
            return f"must be {'>' if self.strict else '>='} {self.low:g}, got {value}"
        return None


# Valid ranges. Seed 004, Table 2: "the constants in these objectives satisfy β, γ, δ, λ_w, λ_l > 0".
# β > 0 everywhere (a temperature / KL strength: β ≤ 0 flips or removes the preference; IPO and SPPO
# divide by it). Where a zero value is a documented special case we allow it: γ = 0 is SimPO without
# target margin (Meng et al.'s ablation); λ = 0 switches a regularizer off (CPO → reference-free DPO,
# DPOP → DPO, RRHF/SLiC → ranking only, ORPO → SFT); α = 0 is R-DPO → DPO. z_ref is β times a KL
# estimate, which KTO clamps at 0, so z_ref >= 0. δ (the SLiC hinge margin) and λ_w, λ_l (KTO
# weights) follow Table 2 strictly.
_POSITIVE = HyperRule(0.0, strict=True)
_NONNEG = HyperRule(0.0, strict=False)
_NLL = HyperRule(choices=("sum", "mean"))
HYPER_RULES: dict[str, dict[str, HyperRule]] = {
    "dpo": {"beta": _POSITIVE},
    "rdpo": {"beta": _POSITIVE, "alpha": _NONNEG, "variant": HyperRule(choices=("paper", "table2"))},
    "simpo": {"beta": _POSITIVE, "gamma": _NONNEG},
    "ipo": {"beta": _POSITIVE},
    "ipo_avg": {"beta": _POSITIVE},
    "rrhf": {"lam": _NONNEG, "nll": _NLL},
    "slic": {"delta": _POSITIVE, "lam": _NONNEG, "nll": _NLL},
    "cpo": {"beta": _POSITIVE, "lam": _NONNEG, "nll": _NLL},
    "dpop": {"beta": _POSITIVE, "lam": _NONNEG, "variant": HyperRule(choices=("inside", "outside"))},
    "kto": {"beta": _POSITIVE, "lam_w": _POSITIVE, "lam_l": _POSITIVE, "z_ref": _NONNEG},
    "sppo": {"beta": _POSITIVE, "variant": HyperRule(choices=("hard", "table2"))},
    "orpo": {"lam": _NONNEG},
    "sft": {"nll": _NLL},
}


def check_hyper(name: str, hyper: Mapping[str, Any]) -> None:
    """Raise `InputError` for a hyper-parameter of loss ``name`` outside its rule (`HYPER_RULES`).

    A loss registered without rules gets a type check against its defaults: a number where the
    default is a number (finite), a string where it is a string.
    """
    rules = HYPER_RULES.get(name, {})
    defaults = LOSSES[name].defaults if name in LOSSES else {}
    for key, value in hyper.items():
        rule = rules.get(key)
        if rule is None:
            default = defaults.get(key)
            if isinstance(default, str):
                rule = HyperRule(choices=(value,) if isinstance(value, str) else (default,))
            elif isinstance(default, (int, float)) and not isinstance(default, bool):
                rule = HyperRule()
            else:
                continue
        problem = rule.problem(value)
        if problem and rule.choices:
            raise InputError(f"loss {name!r}: {key}={value!r}; {problem}")
        if problem:
            raise InputError(f"loss {name!r}: hyper-parameter {key} {problem}")


# ----------------------------------------------------------------------------- helpers
def _need_ref(name: str, rw: Tensor | None, rl: Tensor | None) -> tuple[Tensor, Tensor]:
    if rw is None or rl is None:
        raise ValueError(f"loss {name!r} needs reference log-probs ref_w and ref_l")
    return rw, rl


def _need_len(name: str, nw: Tensor | None, nl: Tensor | None) -> tuple[Tensor, Tensor]:
    if nw is None or nl is None:
        raise ValueError(f"loss {name!r} needs response lengths len_w and len_l")
    return nw, nl


def _choice(name: str, key: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"loss {name!r}: {key}={value!r}; valid: {list(choices)}")
    return value


def _nll(name: str, nll: str, lw: Tensor, nw: Tensor | None) -> Tensor:
    """Chosen NLL term: ``-lw`` ("sum") or the token mean ``-lw/|y_w|`` ("mean"). (B,)"""
    if _choice(name, "nll", nll, ("sum", "mean")) == "sum":
        return -lw
    return -lw / _need_len(name, nw, nw)[0]


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, stable at both ends (Mächler 2012 branch at -log 2)."""
    return torch.where(x < -math.log(2.0), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


# ----------------------------------------------------------------------------- the losses
@register("dpo", defaults={"beta": 0.1}, needs_ref=True, reference="Rafailov et al. 2023",
          formula="−log σ(β[(lw−rw) − (ll−rl)])")
def dpo(lw, ll, rw=None, rl=None, len_w=None, len_l=None, *, beta):
    """Direct Preference Optimization.

    Deviation from Table 2: Table 2 writes m(a)=log σ(a − c_ref) with a = β(lw−ll), i.e. c_ref
    not multiplied by β; the DPO paper (and this code) uses β·c_ref.
    """
    rw, rl = _need_ref("dpo", rw, rl)
    margin = (lw - rw) - (ll - rl)  # (B,)
    # seed 004, Table 2: DPO, m(a)=log σ(a − c_ref), h_w=h_l=βa (with β·c_ref, as in eq. 3)
    return -F.logsigmoid(beta * margin)


@register("rdpo", defaults={"beta": 0.1, "alpha": 0.2, "variant": "paper"}, needs_ref=True,
          reference="Park et al. 2024", formula="−log σ(β[(lw−rw) − (ll−rl)] + α(|y_w|−|y_l|))")
def rdpo(lw, ll, rw=None, rl=None, len_w=None, len_l=None, *, beta, alpha, variant):
    """Length-regularized DPO (R-DPO).

    ``variant="paper"`` (default): −log σ(β·margin + α(|y_w|−|y_l|)), Park et al. eq. 9 and the
    SimPO paper's baseline table (seed 001). It follows from penalizing α|y| in the reward: a
    longer chosen response meets the margin sooner, so DPO stops pushing length up.
    ``variant="table2"``: seed 004 Table 2 literally, −log σ(β(lw−ll) − c_ref − α(|y_w|−|y_l|)):
    opposite length sign and c_ref without β. Deviations of the default from Table 2: both.
    """
    return -F.logsigmoid(_rdpo_logits(lw, ll, rw, rl, len_w, len_l, beta, alpha, variant))


def _rdpo_logits(lw, ll, rw, rl, len_w, len_l, beta, alpha, variant):
    rw, rl = _need_ref("rdpo", rw, rl)
    nw, nl = _need_len("rdpo", len_w, len_l)
    if _choice("rdpo", "variant", variant, ("paper", "table2")) == "table2":
        # seed 004, Table 2: R-DPO, m(a)=log σ(a − (c_ref + α(|y_w|−|y_l|))), h=βa
        return beta * (lw - ll) - (rw - rl) - alpha * (nw - nl)
    return beta * ((lw - rw) - (ll - rl)) + alpha * (nw - nl)  # Park et al. eq. 9


@register("simpo", defaults={"beta": 2.0, "gamma": 0.5}, needs_ref=False,
          uses_length_normalized=True, reference="Meng et al. 2024",
          formula="−log σ(β(lw/|y_w| − ll/|y_l|) − γ)")
def simpo(lw, ll, rw=None, rl=None, len_w=None, len_l=None, *, beta, gamma):
    """Simple Preference Optimization: reference-free, length-normalized, target margin γ.

    γ=0.5 from seed 004 C.3; β=2.0 is the SimPO paper's recommended range [2.0, 2.5] (seed 004
    gives no β for SimPO). Matches Table 2 literally.
    """
    nw, nl = _need_len("simpo", len_w, len_l)
    # seed 004, Table 2: SimPO, m(a)=log σ(a−γ), h=β/|y|·a
    return -F.logsigmoid(beta * (lw / nw - ll / nl) - gamma)


def _ipo(name, lw, ll, rw, rl, len_w, len_l, beta, average):
    rw, rl = _need_ref(name, rw, rl)
    hw, hl = lw - rw, ll - rl  # (B,)
    if average:
        nw, nl = _need_len(name, len_w, len_l)
        hw, hl = hw / nw, hl / nl
    # seed 004, Table 2: IPO, m(a)=(a − (c_ref + 1/(2β)))², h=a — minimized, not maximized
    return (hw - hl - 1.0 / (2.0 * beta)) ** 2


@register("ipo", defaults={"beta": 0.1}, needs_ref=True, reference="Azar et al. 2024",
          formula="((lw−rw) − (ll−rl) − 1/(2β))²")
def ipo(lw, ll, rw=None, rl=None, len_w=None, len_l=None, *, beta):
    """Identity Preference Optimization on summed log-probs (β is the paper's τ).

    Deviation from Table 2: Table 2 puts the square in m, a quantity to maximize; IPO (eq. 17)
    minimizes it. d_w = d_l = 2(1/(2β) − margin): both change sign once the margin passes
    1/(2β) (IPO then pulls the margin back).
    """
    return _ipo("ipo", lw, ll, rw, rl, len_w, len_l, beta, average=False)


@register("ipo_avg", defaults={"beta": 0.1}, needs_ref=True, uses_length_normalized=True,
          reference="Azar et al. 2024; TRL DPOTrainer loss_type='ipo'",
          formula="((lw−rw)/|y_w| − (ll−rl)/|y_l| − 1/(2β))²")
def ipo_avg(lw, ll, rw=None, rl=None, len_w=None, len_l=None, *, beta):
    """IPO on per-token-averaged log-ratios, as TRL's ``ipo`` loss computes it.

    Same deviation and sign flip as `ipo` (with d_w, d_l divided by |y_w|, |y_l|).
    """
    return _ipo("ipo_avg", lw, ll, rw, rl, len_w, len_l, beta, average=True)


@register("rrhf", defaults={"lam": 1.0, "nll": "sum"}, needs_ref=False,
          uses_length_normalized=True, reference="Yuan et al. 2023",
          formula="max(0, ll/|y_l| − lw/|y_w|) − λ·lw")
def rrhf(lw, ll, rw=None, rl=None, len_w=None, len_l=None, *, lam, nll):
    """Rank Responses with Human Feedback, one pair: ranking hinge on avg log-probs + NLL.

    ``nll="sum"`` (default): −λ·lw, Table 2's Λ(a)=λa and RRHF's L_ft = −Σ_t log P. ``"mean"``:
    −λ·lw/|y_w|, the token-mean cross-entropy of RRHF's released code. Matches Table 2.
    Preference coefficients vanish once lw/|y_w| > ll/|y_l| (then d_w = λ or λ/|y_w|, d_l = 0).
    """
    nw, nl = _need_len("rrhf", len_w, len_l)
    # seed 004, Table 2: RRHF, m(a)=min(0,a), h=a/|y|, Λ(a)=λa
    return torch.relu(ll / nl - lw / nw) + lam * _nll("rrhf", nll, lw, nw)


@register("slic", defaults={"delta": 1.0, "lam": 1.0, "nll": "sum"}, needs_ref=False,
          reference="Zhao et al. 2023", formula="max(0, δ − (lw − ll)) − λ·lw")
def slic(lw, ll, rw=None, rl=None, len_w=None, len_l=None, *, delta, lam, nll):
    """SLiC-HF: rank-calibration hinge with margin δ + NLL on the chosen response.

    SLiC-HF's regularizer is the NLL of the SFT target; on preference data that is y_w, as in
    Table 2 (matches it literally). ``nll`` as in `rrhf`. Preference coefficients vanish once
    lw − ll > δ.
    """
    # seed 004, Table 2: SLiC-HF, m(a)=min(0, a−δ), h=a, Λ(a)=λa
    return torch.relu(delta - (lw - ll)) + lam * _nll("slic", nll, lw, len_w)


@register("cpo", defaults={"beta": 0.1, "lam": 1.0, "nll": "sum"}, needs_ref=False,
          reference="Xu et al. 2024", formula="−log σ(β(lw − ll)) − λ·lw")
def cpo(lw, ll, rw=None, rl=None, len_w=None, len_l=None, *, beta, lam, nll):
    """Contrastive Preference Optimization: reference-free DPO + NLL on the chosen response.

    Matches Table 2. ``nll="mean"`` gives TRL CPOTrainer's token-mean NLL (``cpo_alpha`` = λ;
    TRL averages over all chosen tokens of the batch, equal per pair when B=1).
    """
    # seed 004, Table 2: CPO, m(a)=log σ(a), h=βa, Λ(a)=λa
    return -F.logsigmoid(beta * (lw - ll)) + lam * _nll("cpo", nll, lw, len_w)


@register("dpop", defaults={"beta": 0.1, "lam": 50.0, "variant": "inside"}, needs_ref=True,
          reference="Pal et al. 2024 (Smaug)",
          formula="−log σ(β[(lw−rw) − (ll−rl) − λ·max(0, rw − lw)])")
def dpop(lw, ll, rw=None, rl=None, len_w=None, len_l=None, *, beta, lam, variant):
    """DPO-Positive: penalizes the chosen log-prob falling below the reference.

    ``variant="inside"`` (default): Pal et al.'s DPOP, penalty inside the sigmoid and scaled by
    β. Table 2 also puts the penalty inside σ (in h_w) but literally without β on it or on
    c_ref: m(a)=log σ(a − c_ref), h_w=βa − λ max(0, c_ref^w − a) (its "log c_ref^w" is a typo,
    c_ref^w already is a log-prob); with λ=50, β=0.1 that is a 10× stronger penalty. We follow
    the paper. ``variant="outside"``: −log σ(β·margin) + λ·max(0, rw − lw), a separate hinge.
    """
    rw, rl = _need_ref("dpop", rw, rl)
    margin = (lw - rw) - (ll - rl)  # (B,)
    penalty = torch.relu(rw - lw)  # (B,)
    if _choice("dpop", "variant", variant, ("inside", "outside")) == "outside":
        return -F.logsigmoid(beta * margin) + lam * penalty
    # seed 004, Table 2: DPOP, m(a)=log σ(a − c_ref), h_w=βa − λ max(0, c_ref^w − a) (β on all)
    return -F.logsigmoid(beta * (margin - lam * penalty))


@register("kto", defaults={"beta": 0.1, "lam_w": 1.0, "lam_l": 1.0, "z_ref": 0.0},
          needs_ref=True, reference="Ethayarajh et al. 2024",
          formula="λ_w(1 − σ(β(lw−rw) − z)) + λ_l(1 − σ(z − β(ll−rl)))")
def kto(lw, ll, rw=None, rl=None, len_w=None, len_l=None, *, beta, lam_w, lam_l, z_ref):
    """Kahneman-Tversky Optimization, paired form (one desirable + one undesirable response).

    ``z_ref`` is the KL baseline *already multiplied by β* (Table 2's / SimPO's z_ref; TRL's
    ``kl`` corresponds to z_ref = β·kl), a constant (KTO detaches it). Deviations from Table 2:
    (i) Table 2's m(h_w − h_l) with h_l = λ_l σ(z − a) would *raise* the rejected log-prob when
    minimized; KTO's loss is λ_l(1 − v_l), i.e. m(h_w + h_l) up to a constant; (ii) Table 2's
    h_l omits β and both h's omit β on c_ref. We follow the KTO paper (eq. 7), as TRL does.
    """
    rw, rl = _need_ref("kto", rw, rl)
    # seed 004, Table 2: KTO, m(a)=a, h_w=λ_w σ(βa − (c_ref^w + z)), h_l=λ_l σ((c_ref^l + z) − a)
    return lam_w * (1 - torch.sigmoid(beta * (lw - rw) - z_ref)) + \
        lam_l * (1 - torch.sigmoid(z_ref - beta * (ll - rl)))


@register("sppo", defaults={"beta": 0.1, "variant": "hard"}, needs_ref=True,
          reference="Wu et al. 2024; TRL DPOTrainer loss_type='sppo_hard'",
          formula="(lw−rw − 1/(2β))² + (ll−rl + 1/(2β))²")
def sppo(lw, ll, rw=None, rl=None, len_w=None, len_l=None, *, beta, variant):
    """Self-Play Preference Optimization, hard-label form (P=1 for y_w, 0 for y_l).

    ``variant="hard"`` (default): SPPO eq. 4.7 with hard probabilities, as TRL's ``sppo_hard``:
    log-ratios regressed to ±1/(2β). ``variant="table2"``: seed 004's form,
    (lw − 1/β)² + (ll + 1/β)², no reference, targets ±1/β, refs ignored. Table 2 literally writes
    m(h_w − h_l) with m(a)=a, which would *maximize* the winner's squared error; appendix A.1
    minimizes the sum of squares, which is what ``"table2"`` implements. Coefficients:
    d_w = 2(τ − (lw−rw)) and d_l = 2((ll−rl) + τ), τ = 1/(2β); d_w < 0 once the chosen
    log-ratio passes τ, d_l < 0 once the rejected one falls below −τ (SPPO is not a margin loss).
    """
    if _choice("sppo", "variant", variant, ("hard", "table2")) == "table2":
        # seed 004, Table 2 / A.1: SPPO, h_w(a)=(a − β⁻¹)², h_l(a)=(a + β⁻¹)², a = log π
        return (lw - 1.0 / beta) ** 2 + (ll + 1.0 / beta) ** 2
    rw, rl = _need_ref("sppo", rw, rl)
    tau = 0.5 / beta
    return (lw - rw - tau) ** 2 + (ll - rl + tau) ** 2


@register("orpo", defaults={"lam": 0.1}, needs_ref=False, uses_length_normalized=True,
          reference="Hong et al. 2024",
          formula="−lw/|y_w| − λ·log σ(log odds_w − log odds_l), odds = p/(1−p), p = e^{lw/|y_w|}")
def orpo(lw, ll, rw=None, rl=None, len_w=None, len_l=None, *, lam):
    """Odds Ratio Preference Optimization: token-mean SFT loss + λ·odds-ratio loss.

    Not in Table 2. λ=0.1 is the ORPO paper's (TRL's ``beta``). ORPO's SFT term is over the
    response tokens; TRL's ORPOTrainer takes it over prompt+response, batch-averaged.
    """
    nw, nl = _need_len("orpo", len_w, len_l)
    aw, al = lw / nw, ll / nl  # (B,) mean token log-probs, < 0
    log_odds = (aw - al) - (_log1mexp(aw) - _log1mexp(al))  # (B,)
    return -aw - lam * F.logsigmoid(log_odds)


@register("sft", defaults={"nll": "sum"}, needs_ref=False, reference="supervised fine-tuning",
          formula="−lw   (nll='mean': −lw/|y_w|)")
def sft(lw, ll, rw=None, rl=None, len_w=None, len_l=None, *, nll):
    """Negative log-likelihood of the chosen response only; d_w = 1 (or 1/|y_w|), d_l = 0."""
    return _nll("sft", nll, lw, len_w)


# ----------------------------------------------------------------------------- closed forms
@_closed_form("dpo")
def _cf_dpo(lw, ll, rw, rl, nw, nl, *, beta):
    c = beta * torch.sigmoid(-beta * ((lw - rw) - (ll - rl)))  # seed 004 eq. 4: β c(θ)
    return c, c


@_closed_form("rdpo")
def _cf_rdpo(lw, ll, rw, rl, nw, nl, *, beta, alpha, variant):
    c = beta * torch.sigmoid(-_rdpo_logits(lw, ll, rw, rl, nw, nl, beta, alpha, variant))
    return c, c


@_closed_form("simpo")
def _cf_simpo(lw, ll, rw, rl, nw, nl, *, beta, gamma):
    s = torch.sigmoid(-(beta * (lw / nw - ll / nl) - gamma))
    return beta / nw * s, beta / nl * s  # d_w/d_l = |y_l|/|y_w|


@_closed_form("ipo")
def _cf_ipo(lw, ll, rw, rl, nw, nl, *, beta):
    c = 2 * (1 / (2 * beta) - ((lw - rw) - (ll - rl)))
    return c, c


@_closed_form("cpo")
def _cf_cpo(lw, ll, rw, rl, nw, nl, *, beta, lam, nll):
    c = beta * torch.sigmoid(-beta * (lw - ll))
    return c + (lam if nll == "sum" else lam / nw), c


@_closed_form("dpop")
def _cf_dpop(lw, ll, rw, rl, nw, nl, *, beta, lam, variant):
    margin = (lw - rw) - (ll - rl)
    below = (rw > lw).to(lw.dtype)  # the penalty is active
    if variant == "outside":
        c = beta * torch.sigmoid(-beta * margin)
        return c + lam * below, c
    c = beta * torch.sigmoid(-beta * (margin - lam * torch.relu(rw - lw)))
    return c * (1 + lam * below), c


@_closed_form("kto")
def _cf_kto(lw, ll, rw, rl, nw, nl, *, beta, lam_w, lam_l, z_ref):
    sw = torch.sigmoid(beta * (lw - rw) - z_ref)
    sl = torch.sigmoid(z_ref - beta * (ll - rl))
    return lam_w * beta * sw * (1 - sw), lam_l * beta * sl * (1 - sl)


@_closed_form("sppo")
def _cf_sppo(lw, ll, rw, rl, nw, nl, *, beta, variant):
    if variant == "table2":  # seed 004 appendix A.1: dθ/dt = −(lw − β⁻¹)∇lw − (ll + β⁻¹)∇ll
        return 2 * (1 / beta - lw), 2 * (ll + 1 / beta)
    tau = 0.5 / beta
    return 2 * (tau - (lw - rw)), 2 * ((ll - rl) + tau)


# ----------------------------------------------------------------------------- entry points
def _prepare(logp_w, logp_l, ref_w, ref_l, len_w, len_l):
    if logp_w.dim() != 1 or logp_w.shape != logp_l.shape:
        raise ValueError(f"logp_w and logp_l must be 1-D of equal shape (B,); "
                         f"got {tuple(logp_w.shape)} and {tuple(logp_l.shape)}")
    out = []
    for key, t in (("ref_w", ref_w), ("ref_l", ref_l), ("len_w", len_w), ("len_l", len_l)):
        if t is not None:
            t = torch.as_tensor(t, dtype=logp_w.dtype, device=logp_w.device)
            if t.shape != logp_w.shape:
                raise ValueError(f"{key} must have shape {tuple(logp_w.shape)}, got {tuple(t.shape)}")
            t = t.detach()  # reference log-probs and lengths are constants
        out.append(t)
    return out


def _check_finite(name: str, what: str, x: Tensor) -> None:
    bad = ~torch.isfinite(x)
    if bad.any():
        kind = "NaN" if torch.isnan(x).any() else "inf"
        raise ValueError(f"loss {name!r} produced {kind} in {what} for pairs "
                         f"{bad.nonzero().flatten().tolist()}")


def compute_loss(name: str, logp_w: Tensor, logp_l: Tensor, ref_w: Tensor | None = None,
                 ref_l: Tensor | None = None, len_w: Tensor | None = None,
                 len_l: Tensor | None = None, *, check_finite: bool = True,
                 **hyper: Any) -> LossOutput:
    """Per-pair loss ``name`` and its exact coefficients.

    Args: ``logp_w, logp_l`` (B,) sequence log-probs of chosen/rejected responses under π_θ
    (may require grad; the returned ``loss`` stays differentiable w.r.t. them); ``ref_w,
    ref_l`` (B,) reference log-probs, or None for reference-free losses; ``len_w, len_l`` (B,)
    response token counts; ``hyper`` overrides the loss's defaults (see `resolve_hyper`).

    Returns `LossOutput` with ``loss`` (B,), ``d_w = ∂(-ℓ)/∂logp_w`` (B,) and
    ``d_l = ∂ℓ/∂logp_l`` (B,), from autograd on detached copies of the log-probs.
    Raises ValueError for unknown names/hyper-parameters, missing inputs, and (with
    ``check_finite``) NaN/inf in the loss or coefficients.
    """
    spec = get_loss(name)
    hp = resolve_hyper(name, hyper)
    ref_w, ref_l, len_w, len_l = _prepare(logp_w, logp_l, ref_w, ref_l, len_w, len_l)
    with torch.enable_grad():
        w = logp_w.detach().clone().requires_grad_(True)
        l = logp_l.detach().clone().requires_grad_(True)
        loss_c = spec.fn(w, l, ref_w, ref_l, len_w, len_l, **hp)  # (B,)
        if check_finite:
            _check_finite(name, "the loss", loss_c.detach())
        # per-pair losses: the gradient of the sum is the per-pair derivative
        g_w, g_l = torch.autograd.grad(loss_c.sum(), (w, l), allow_unused=True)
    if torch.is_grad_enabled() and (logp_w.requires_grad or logp_l.requires_grad):
        loss = spec.fn(logp_w, logp_l, ref_w, ref_l, len_w, len_l, **hp)  # on the caller's graph
    else:
        loss = loss_c.detach()
    d_w = -g_w if g_w is not None else torch.zeros_like(w)
    d_l = g_l if g_l is not None else torch.zeros_like(l)
    if check_finite:
        _check_finite(name, "d_w", d_w)
        _check_finite(name, "d_l", d_l)
    return LossOutput(loss=loss, d_w=d_w.detach(), d_l=d_l.detach())


def closed_form_coefficients(name: str, logp_w: Tensor, logp_l: Tensor,
                             ref_w: Tensor | None = None, ref_l: Tensor | None = None,
                             len_w: Tensor | None = None, len_l: Tensor | None = None,
                             **hyper: Any) -> tuple[Tensor, Tensor]:
    """``(d_w, d_l)``, each (B,), from the paper's closed form, for a cross-check of
    `compute_loss`. Same arguments; ValueError for losses without a closed form here."""
    get_loss(name)
    if name not in _CLOSED_FORMS:
        raise ValueError(f"loss {name!r} has no closed form here; available: "
                         f"{', '.join(sorted(_CLOSED_FORMS))} (use compute_loss)")
    hp = resolve_hyper(name, hyper)
    ref_w, ref_l, len_w, len_l = _prepare(logp_w, logp_l, ref_w, ref_l, len_w, len_l)
    LOSSES[name].fn(logp_w, logp_l, ref_w, ref_l, len_w, len_l, **hp)  # validates inputs
    d_w, d_l = _CLOSED_FORMS[name](logp_w.detach(), logp_l.detach(), ref_w, ref_l,
                                   len_w, len_l, **hp)
    return d_w, d_l


def general_form_table() -> list[dict[str, Any]]:
    """One row per registered loss (sorted by name): name, formula, defaults, needs_ref,
    length_normalized, closed_form, reference — for ``dynamics losses``."""
    return [dict(name=s.name, formula=s.formula, defaults=dict(s.defaults),
                 needs_ref=s.needs_ref, length_normalized=s.uses_length_normalized,
                 closed_form=s.name in _CLOSED_FORMS, reference=s.reference)
            for s in (LOSSES[k] for k in sorted(LOSSES))]


def format_loss_table() -> str:
    """`general_form_table` as plain text, one line per loss, after a legend line."""
    lines = ["lw, ll: log π(y_w|x), log π(y_l|x) (summed); rw, rl: reference; |y|: response tokens"]
    for r in general_form_table():
        hp = ", ".join(f"{k}={v}" for k, v in r["defaults"].items())
        lines.append(f"{r['name']:<8} {r['formula']}   [{hp}] ({'ref' if r['needs_ref'] else 'no-ref'})")
    return "\n".join(lines)
