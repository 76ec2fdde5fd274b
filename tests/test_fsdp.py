"""FSDP2 (``fully_shard``) on CPU: 2 processes, gloo, the tiny float64 Llama (tied head) and GPT-NeoX
(untied). The probe diagnostics of a sharded model run on its gathered full parameters
(`dynamics.runs.distributed.full_parameters`): the sentence Gram and the pair inner products equal
the unsharded single-process values to 1e-10 relative, before any forward, with a training
backward's gradients pending (which stay bit for bit) and after two training steps; the model is
sharded again afterwards and the training steps equal one process's. ``dynamics train`` with
``parallel='fsdp'`` writes the run directory of one process (every table and token Gram, 2 steps
recorded), also with in-run rows (and their update effects) and with LoRA (the in-run capture and
its update jvp run on the units gathered for each micro-batch, `DistributedInRunRecorder`). The
ranks are `tests/fsdp_worker.py`."""
import json
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import torch

from dynamics.core.analyzer import Analyzer
from dynamics.core.logprobs import pair_logprobs, tokenize_pairs
from dynamics.errors import InputError
from dynamics.inputs.models import load_model
from dynamics.runs import distributed
from dynamics.runs.train import TrainConfig, split_config_pairs, train

from test_distributed import _env, _finish, _torchrun, assert_same_run


def _fsdp2_available() -> bool:
    if not (torch.distributed.is_available() and getattr(torch.distributed, "is_gloo_available", lambda: False)()):
        return False
    try:
        from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method  # noqa: F401
    except ImportError:
        return False
    return True


pytestmark = [
    pytest.mark.skipif(not _fsdp2_available(), reason="torch.distributed with gloo and FSDP2 is not available"),
    pytest.mark.usefixtures("float64_exact", "one_thread"),
]

TESTS = Path(__file__).resolve().parent
WORKER = TESTS / "fsdp_worker.py"
TOL = 1e-10
DATA = dict(model="tiny-llama", n_pairs=24, n_probe=4, dtype="float64")
GRAM = dict(config=DATA, lr=1e-2, batches=[[0, 1, 2, 3], [4, 5, 6, 7]])
BASE = dict(n_pairs=24, n_probe=4, steps=2, batch_size=4, eval_every=1, lr=1e-2, progress=False, dtype="float64",
            parallel="fsdp")
CASES = {
    # tied head (in the root unit), SGD, token Grams of 3 probes (2 on rank 0, 1 on rank 1); in-run rows
    # with their update effects (the tied embedding/head's uses of each rank's rows)
    "llama": dict(model="tiny-llama", optimizer="sgd", token_pairs=3, in_run=True, in_run_update=True),
    # untied head, AdamW, 2 micro-batches, 3 probes split 2 + 1, learning-dynamics probes; in-run rows
    # by book-keeping (the linear layers' per-sequence gradients summed into FSDP's unsharded .grad)
    "neox": dict(model="tiny-neox", optimizer="adamw", grad_accum=2, n_probe=3, probes=True, in_run=True,
                 in_run_bookkeeping=True),
    # LoRA (frozen weights and trainable adapters in one unit), AdamW, in-run rows with update effects
    # from the kept factors of each rank's rows (Δθ of the gathered adapters)
    "lora": dict(model="tiny-llama", optimizer="adamw", lora_r=2, in_run=True, in_run_update=True,
                 in_run_update_from="factors"),
}


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    """One torchrun launch of 2 processes: the probe-pass measurements of each rank and the run
    directory of every case of `CASES`."""
    root = tmp_path_factory.mktemp("fsdp")
    spec = dict(gram=GRAM, runs=[{**BASE, **kw, "out": str(root / name)} for name, kw in CASES.items()])
    (root / "spec.json").write_text(json.dumps(spec))
    cmd = _torchrun() + ["--standalone", "--nproc_per_node", "2", str(WORKER), str(root), str(root / "spec.json")]
    proc = subprocess.Popen(cmd, env=_env(), cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ((rc, _, err),) = _finish([proc])
    assert rc == 0, err[-6000:]
    probes = [torch.load(root / f"probe_rank{r}.pt", weights_only=False) for r in range(2)]
    units = [json.loads((root / f"units_rank{r}.json").read_text()) for r in range(2)]
    return {"probe": probes, "units": units, **{name: root / name for name in CASES}}


_SINGLE: dict = {}


@pytest.fixture
def single_process(float64_exact):
    """The measurements of `GRAM` on the unsharded model in this process: ip and Gram at θ_0,
    θ after the two SGD steps, and ip and Gram there (computed once, with float64 kept exact:
    function scope, as the ``float64_exact`` patches)."""
    if not _SINGLE:
        _SINGLE.update(_single_process())
    return _SINGLE


def _single_process() -> dict:
    train_pairs, probe_pairs = split_config_pairs(TrainConfig.from_flat(**DATA))
    model, tok = load_model(DATA["model"], dtype=torch.float64, seed=0)
    probe, train_tp = tokenize_pairs(tok, probe_pairs), tokenize_pairs(tok, train_pairs)
    an = Analyzer(model, probe.pad_id, params="trainable")
    seqs = probe.chosen + probe.rejected
    res = dict(ip_start=an.pair_inner_products(probe), gram_start=an.sentence_gram(seqs))
    opt = torch.optim.SGD(model.parameters(), lr=GRAM["lr"])
    for idx in GRAM["batches"]:
        out = pair_logprobs(model, train_tp.subset(idx))
        loss = -(out.chosen.logp - out.rejected.logp).sum() / len(idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    res.update(ip_end=an.pair_inner_products(probe), gram_end=an.sentence_gram(seqs),
               params_end={n: p.detach().clone() for n, p in model.named_parameters()})
    return res


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


@pytest.mark.parametrize("rank", [0, 1])
def test_sentence_gram_of_sharded_model_is_the_unsharded_one(fsdp_runs, single_process, rank):
    got = fsdp_runs["probe"][rank]
    for tag, want in (("start", "start"), ("pending", "start"), ("end", "end")):   # pending: still at θ_0
        assert rel_err(got[f"gram_{tag}"], single_process[f"gram_{want}"]) <= TOL, tag
        for k in ("ip_wl", "sq_w", "sq_l", "cos_wl"):
            assert rel_err(got[f"ip_{tag}"][k], single_process[f"ip_{want}"][k]) <= TOL, (tag, k)


def test_full_parameters_leave_the_model_sharded_and_training_exact(fsdp_runs, single_process):
    for got in fsdp_runs["probe"]:
        assert got["units"] == 3                                  # 2 decoder layers + the root (tied head in it)
        for tag in ("start", "pending", "end"):
            assert got[f"types_inside_{tag}"] == ["Parameter"]    # whole tensors inside the window
            assert got[f"types_after_{tag}"] == ["DTensor"]       # sharded again after it
        assert got["grad_untouched"] and got["still_dtensor"]
        # the root keeps its parameters after forward, the layers reshard; all reshard after backward
        assert got["settings_start"] == [(False, True), (True, True), (True, True)]
        assert got["settings_kept"] and got["error_restores"]
        assert got["nested_bytes"] == 0 and got["nested_left_full"]
        want = single_process["params_end"]
        assert sorted(got["params_end"]) == sorted(want)
        for n, p in want.items():                                 # two steps, the first after a window
            assert (got["params_end"][n] - p).abs().max() <= TOL * max(p.abs().max(), 1e-300), n
    a, b = fsdp_runs["probe"]
    assert torch.equal(a["gram_end"], b["gram_end"])             # the same whole model on every rank


def test_gathered_bytes_are_the_analysed_parameters(fsdp_runs):
    """The communication of one window: one all-gather of the units' parameters (their full size,
    float64), timed; printed for the record (``pytest -s``)."""
    model, _ = load_model("tiny-llama", dtype=torch.float64, seed=0)
    full = sum(p.numel() * p.element_size() for p in model.parameters())
    for got in fsdp_runs["probe"]:
        for tag in ("start", "pending", "end"):
            g = got[f"gathered_{tag}"]
            assert g["units"] == 3 and g["bytes"] == full and g["seconds"] >= 0
    got = fsdp_runs["probe"][0]
    g = got["gathered_end"]
    print(f"\nfull_parameters: {g['units']} units, {g['bytes']} bytes all-gathered in {g['seconds'] * 1e3:.2f} ms "
          f"(the sentence Gram of the {len(got['gram_end'])} probe sequences inside: "
          f"{got['gram_seconds_end'] * 1e3:.1f} ms)")


@pytest.mark.parametrize("case", sorted(CASES))
def test_fsdp_training_records_what_one_process_records(fsdp_runs, tmp_path, case):
    single = train(TrainConfig.from_flat(**{**BASE, **CASES[case], "out": str(tmp_path / "single")}))
    assert_same_run(fsdp_runs[case], single.path)
    # trained sharded: 2 decoder layers + the root (the tied head in it, the untied one too)
    assert [u[list(CASES).index(case)] for u in fsdp_runs["units"]] == [3, 3]
    if CASES[case].get("in_run"):                                 # both ranks' pairs of every step
        rows = pd.read_parquet(fsdp_runs[case] / "train_records.parquet")
        assert rows.groupby("step").size().tolist() == [4, 4]
        assert rows[["ip_wl", "sq_w", "sq_l"]].notna().all().all()
        if CASES[case].get("in_run_update"):
            assert rows[["upd_dw", "upd_dl"]].notna().all().all()


def test_fsdp_options(tmp_path):
    """What is not supported with FSDP is refused, with the reason, before anything runs; one process
    ignores it."""
    for extra, why in ((dict(cross=True), "optimizer's state"), (dict(save_every=1), "checkpoints hold whole"),
                       (dict(resume=True), "checkpoints hold whole")):
        with pytest.raises(InputError, match=f"parallel='fsdp' does not support {next(iter(extra))}: .*{why}"):
            TrainConfig.from_flat(**BASE, model="tiny-llama", out=str(tmp_path / "x"), **extra)
    for extra in (dict(in_run=True, in_run_update=True), dict(lora_r=2, in_run=True)):   # supported now
        TrainConfig.from_flat(**BASE, model="tiny-llama", out=str(tmp_path / "x"), **extra)
    with pytest.raises(ValueError, match="unknown parallel"):
        TrainConfig.from_flat(**BASE | {"parallel": "zero"}, model="tiny-llama", out=str(tmp_path / "x"))
    model = torch.nn.Linear(2, 2)
    assert distributed.shard_model(model) is model and not distributed.fsdp_units(model)
    with distributed.full_parameters(model) as g:                 # plain model: nothing gathered
        assert g == distributed.Gathered()
    from analyses.cli import build_parser
    args = build_parser().parse_args(["train", "--parallel", "fsdp", "--model", "tiny-llama"])
    assert args.parallel == "fsdp"
