"""One rank of the FSDP2 tests (`tests/test_fsdp.py`), started by torchrun (gloo on CPU):

    python tests/fsdp_worker.py OUT SPEC.json

1. the probe pass on a sharded model: the tiny float64 Llama of ``SPEC["gram"]`` sharded by
   `dynamics.runs.distributed.shard_model`; the pair inner products and the sentence Gram of the
   probe pairs inside `bind_full_parameters` (before any forward; with the gradients of a training
   backward pending; after two training steps), the gathered bytes and seconds, the parameter
   types inside and after, whether the pending ``.grad`` stayed bit for bit, and the full
   parameters after the two hand-written SGD steps; written to ``OUT/probe_rank<r>.pt``;
2. ``train()`` of every config in ``SPEC["runs"]`` (``parallel='fsdp'``); the number of FSDP units
   `shard_model` made for each is written to ``OUT/units_rank<r>.json``.

Float64 is kept exact (the ``float64_exact`` patches of ``conftest.py``), one thread.
"""
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from distributed_worker import float64_exact  # noqa: E402


def sgd_step(fw, opt, pairs, idx, w) -> None:
    """One step of the loss ``−Σ (logp_w − logp_l) / B`` on the batch ``idx`` (this rank's share;
    × world size, as FSDP averages the ranks' gradients)."""
    from dynamics.runs import distributed

    (share,) = distributed.rank_micro_batches(idx, 1, w)
    out = fw(pairs.subset(share))
    loss = -(out.chosen.logp - out.rejected.logp).sum() / len(idx) * w.size
    opt.zero_grad(set_to_none=True)
    loss.backward()


def settings(model) -> list[tuple[bool, bool]]:
    """(reshard after forward, reshard after backward) of every FSDP unit (torch 2.13 internals)."""
    from dynamics.runs import distributed

    return [(g.post_forward_mesh_info is not None, g.reshard_after_backward)
            for u in distributed.fsdp_units(model) for g in u._get_fsdp_state()._fsdp_param_groups]


def probe_pass(out: Path, spec: dict) -> None:
    from torch.distributed.tensor import DTensor

    from dynamics.core.analyzer import Analyzer
    from dynamics.core.logprobs import tokenize_pairs
    from dynamics.inputs.models import load_model
    from dynamics.runs import distributed
    from dynamics.runs.train import TrainConfig, split_config_pairs

    w = distributed.world()
    train_pairs, probe_pairs = split_config_pairs(TrainConfig.from_flat(**spec["config"]))
    model, tok = load_model(spec["config"]["model"], dtype=torch.float64, seed=0)
    probe, train_tp = tokenize_pairs(tok, probe_pairs), tokenize_pairs(tok, train_pairs)
    seqs = probe.chosen + probe.rejected
    distributed.shard_model(model, w)
    an = Analyzer(model, probe.pad_id, params="trainable")
    res = {"units": len(distributed.fsdp_units(model))}

    def measure(tag):
        with distributed.bind_full_parameters(model, [an]) as g:
            res[f"types_inside_{tag}"] = sorted({type(p).__name__ for p in model.parameters()})
            ip = an.pair_inner_products(probe)
            res[f"ip_{tag}"] = {k: v.detach().clone() for k, v in ip.items()}
            t0 = time.perf_counter()
            res[f"gram_{tag}"] = an.sentence_gram(seqs).detach().clone()
            res[f"gram_seconds_{tag}"] = time.perf_counter() - t0
        res[f"gathered_{tag}"] = dict(units=g.units, bytes=g.bytes, seconds=g.seconds)
        res[f"types_after_{tag}"] = sorted({type(p).__name__ for p in model.parameters()})

    measure("start")                                      # before any forward: FSDP's lazy init
    res["settings_start"] = settings(model)
    fw = distributed.training_forward(model, w)
    opt = torch.optim.SGD(model.parameters(), lr=spec["lr"])
    for k, idx in enumerate(spec["batches"]):
        sgd_step(fw, opt, train_tp, idx, w)
        if k == 0:                                        # the window with the gradients pending
            before = {n: p.grad.to_local().clone() for n, p in model.named_parameters()}
            measure("pending")
            res["grad_untouched"] = all(torch.equal(before[n], p.grad.to_local())
                                        for n, p in model.named_parameters())
            res["still_dtensor"] = all(isinstance(p, DTensor) for p in model.parameters())
        opt.step()
    measure("end")
    res["settings_kept"] = settings(model) == res["settings_start"]
    try:                                                  # an error inside: sharded again, settings back
        with distributed.full_parameters(model):
            with distributed.full_parameters(model) as inner:  # nested: nothing more gathered
                res["nested_bytes"] = inner.bytes
            res["nested_left_full"] = all(not isinstance(p, DTensor) for p in model.parameters())
            raise KeyError("inside")
    except KeyError:
        res["error_restores"] = (settings(model) == res["settings_start"]
                                 and all(isinstance(p, DTensor) for p in model.parameters()))
    res["params_end"] = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
    torch.save(res, out / f"probe_rank{w.rank}.pt")


def main(argv: list[str]) -> int:
    torch.set_num_threads(1)
    float64_exact()
    from dynamics.runs import distributed
    from dynamics.runs.train import TrainConfig, train

    out, spec = Path(argv[0]), json.loads(Path(argv[1]).read_text())
    shard_model, units = distributed.shard_model, []

    def counting_shard_model(model, w=None):              # the runs really train sharded: their FSDP units
        model = shard_model(model, w)
        units.append(len(distributed.fsdp_units(model)))
        return model

    distributed.shard_model = counting_shard_model
    with distributed.process_group_from_env("cpu"):      # one group for everything below
        probe_pass(out, spec["gram"])
        for flat in spec["runs"]:
            train(TrainConfig.from_flat(**flat))
    (out / f"units_rank{distributed.world().rank}.json").write_text(json.dumps(units[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
