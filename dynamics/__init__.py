"""dynamics: training dynamics of LLM preference optimization.

The library has four layers; each imports only the layers above it in this list:

- `dynamics.core`: the mathematics on a model (log-probs, the loss zoo, exact gradient inner
  products, first-order predictions, kernels, probes) behind one object, `Analyzer`;
- `dynamics.inputs`: where models and preference pairs come from (offline SmolLM2, hub, tiny
  test models; JSONL/CSV/Parquet, TL;DR, tweets, built-in statements);
- `dynamics.runs`: training and recording into run directories (`train`, `Recorder`,
  `DynamicsCallback`, `RunDir`);
- `dynamics.tools`: what reads run directories and engines (figures, benchmark).

The experiments of the papers and the ``dynamics`` command live in the separate package
`analyses`, which the library never imports. The names below are the public API; they are
imported on first use, so ``import dynamics`` stays cheap.
"""
from __future__ import annotations

import importlib

_PUBLIC = {
    # core
    "Analyzer": "dynamics.core.analyzer",
    "TokenizedPairs": "dynamics.core.logprobs", "TokenizedSequence": "dynamics.core.logprobs",
    "tokenize_pairs": "dynamics.core.logprobs", "pair_logprobs": "dynamics.core.logprobs",
    "reference_logprobs": "dynamics.core.logprobs",
    "LOSSES": "dynamics.core.losses", "compute_loss": "dynamics.core.losses", "resolve_hyper": "dynamics.core.losses",
    "IMPLS": "dynamics.core.grads", "TokenGram": "dynamics.core.grads", "select_params": "dynamics.core.grads",
    "CASES": "dynamics.core.conditions", "predict": "dynamics.core.conditions", "what_if": "dynamics.core.conditions",
    "screen_pairs": "dynamics.core.screen", "token_attributions": "dynamics.core.attribution",
    # inputs
    "load_model": "dynamics.inputs.models", "PreferencePair": "dynamics.inputs.data",
    "load_pairs": "dynamics.inputs.data", "load_kind": "dynamics.inputs.data",
    # runs
    "TrainConfig": "dynamics.runs.train", "train": "dynamics.runs.train",
    "Recorder": "dynamics.runs.recorder", "RecorderConfig": "dynamics.runs.recorder",
    "DynamicsCallback": "dynamics.runs.callbacks", "RunDir": "dynamics.runs.rundir",
    # tools
    "plot_run": "dynamics.tools.plots", "diagnose": "dynamics.tools.diagnose",
    # errors
    "InputError": "dynamics.errors",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    """Import a public name from its module on first access (PEP 562)."""
    if name not in _PUBLIC:
        raise AttributeError(f"module 'dynamics' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
