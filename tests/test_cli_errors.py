"""Bad input to the `dynamics` command (issue 10 §4) and machine-independent diagnostics (§5).

Each row of `CASES` is one bad command line: it must exit with status 2, print a message naming
the problem (no traceback), return within seconds (checks run before any model or data set is
loaded), and leave an existing run directory byte-identical.
"""
from __future__ import annotations

import hashlib
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from analyses.cli import main


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A small existing run directory (tiny model, 2 steps) and the bad input files of the table."""
    d = tmp_path_factory.mktemp("cli_errors")
    run = d / "run"
    assert main(["train", "--model", "tiny-gpt2", "--out", str(run), "--n-pairs", "10", "--n-probe", "2",
                 "--steps", "2", "--eval-every", "1", "--no-whatif", "--token-pairs", "0", "--no-progress",
                 "--lr", "1e-3"]) == 0
    (d / "empty_model").mkdir()
    # GGUF v3, one F32 tensor of 4 elements, header complete but no tensor data: truncated
    name = b"w"
    header = (b"GGUF" + struct.pack("<IQQ", 3, 1, 0) + struct.pack("<Q", len(name)) + name
              + struct.pack("<I", 1) + struct.pack("<Q", 4) + struct.pack("<IQ", 0, 0))
    (d / "truncated.gguf").write_bytes(header)
    (d / "cut_header.gguf").write_bytes(header[:30])  # cut inside the tensor table
    (d / "garbage.gguf").write_bytes(b"not a gguf file at all")
    (d / "latin1.jsonl").write_bytes(b'{"prompt": "a", "chosen": " b", "rejected": " c"}\n'
                                     b'{"prompt": "caf\xe9", "chosen": " b", "rejected": " c"}\n')
    (d / "binary.jsonl").write_bytes(b'{"prompt": "a"}\n\x00\x01\x02')
    rows = ["textID,text,selected_text,sentiment"] + [f"m{i},some text {i},x,mixed" for i in range(3)] + \
        [f"p{i},good text {i},x,positive" for i in range(2)]
    (d / "mixed.csv").write_text("\n".join(rows) + "\n")
    (d / "a_file").write_text("x")
    return d


def _cases(d: Path):
    run = str(d / "run")
    train = ["train", "--out", run, "--model", "tiny-gpt2", "--no-progress"]
    return [
        # (id, argv, substrings of the message)
        ("model-path-missing", ["train", "--out", run, "--model", str(d / "no_such_model")], ["does not exist"]),
        ("model-dir-empty", ["train", "--out", run, "--model", str(d / "empty_model")], ["is empty"]),
        ("model-dir-no-config", ["train", "--out", run, "--model", str(d)], ["no config.json"]),
        ("gguf-truncated", ["train", "--out", run, "--model", str(d / "truncated.gguf")], ["truncated.gguf is truncated"]),
        ("gguf-cut-header", ["train", "--out", run, "--model", str(d / "cut_header.gguf")], ["truncated or corrupt"]),
        ("gguf-garbage", ["train", "--out", run, "--model", str(d / "garbage.gguf")], ["is not a GGUF file"]),
        ("gguf-missing", ["train", "--out", run, "--model", str(d / "nope.gguf")], ["no such GGUF file"]),
        ("tiny-unknown", ["train", "--out", run, "--model", "tiny-bert"], ["unknown tiny architecture"]),
        ("device-cuda", train + ["--device", "cuda"], ["CUDA is not available"]),
        ("device-bad", train + ["--device", "gpu0"], ["invalid device"]),
        ("grads-out-is-dir", ["grads", "--model", "tiny-llama", "--out", str(d)], ["is a directory"]),
        ("grads-token-out-is-file", ["grads", "--model", "tiny-llama", "--level", "token", "--out",
                                     str(d / "a_file")], ["is an existing file"]),
        ("logprobs-out-is-dir", ["logprobs", "--model", "tiny-llama", "--out", run], ["is a directory"]),
        ("data-missing", train + ["--data", str(d / "nope.csv")], ["does not exist"]),
        ("data-is-dir", train + ["--data", str(d)], ["is a directory"]),
        ("data-not-utf8", ["data-summary", "--kind", "pairs", "--data", str(d / "latin1.jsonl")],
         ["latin1.jsonl", "not UTF-8", "byte 0xe9", "line 2"]),
        ("data-binary", ["data-summary", "--kind", "pairs", "--data", str(d / "binary.jsonl")],
         ["binary.jsonl", "NUL byte", "line 2"]),
        ("sentiment-mixed", ["data-summary", "--data", str(d / "mixed.csv")],
         ["mixed.csv", "unknown sentiment label", "'mixed' (3 rows)"]),
        ("pairs-without-data", ["data-summary", "--kind", "pairs"], ["needs a data file"]),
        ("lr-negative", train + ["--lr", "-1e-5"], ["lr must be > 0"]),
        ("lr-inf", train + ["--lr", "inf"], ["--lr", "finite"]),
        ("lr-nan", train + ["--lr", "nan"], ["--lr", "finite"]),
        ("sft-lr-negative", train + ["--sft-lr", "-1"], ["sft_lr must be > 0"]),
        ("beta-negative", train + ["--loss-params", '{"beta": -0.1}'], ["loss 'dpo'", "beta must be > 0"]),
        ("beta-string", train + ["--loss-params", '{"beta": "0.1"}'], ["loss 'dpo'", "beta must be a number"]),
        ("gamma-negative", train + ["--loss", "simpo", "--loss-params", '{"gamma": -1}'], ["gamma must be >= 0"]),
        ("variant-unknown", train + ["--loss", "dpop", "--loss-params", '{"variant": "x"}'], ["variant='x'"]),
        ("hyper-unknown", train + ["--loss-params", '{"betta": 1}'], ["unknown hyper-parameter"]),
        ("loss-params-not-json", train + ["--loss-params", "{beta: 1}"], ["not valid JSON"]),
        ("impl-unknown", train + ["--impl", "foo"], ["--impl", "invalid choice"]),
        ("optimizer-unknown", train + ["--optimizer", "adam"], ["--optimizer", "invalid choice"]),
        ("loss-unknown", train + ["--loss", "foo"], ["--loss", "invalid choice"]),
        ("steps-negative", train + ["--steps", "-3"], ["steps"]),
        ("grads-impl-unknown", ["grads", "--model", "tiny-llama", "--impl", "foo", "--out", str(d / "g.parquet")],
         ["invalid choice"]),
        ("trl-lr-negative", ["trl-dpo", "--model", "tiny-llama", "--lr", "-1e-5", "--out", str(d / "t")],
         ["lr must be > 0"]),
        ("trl-beta-negative", ["trl-dpo", "--model", "tiny-llama", "--beta", "-0.1", "--out", str(d / "t")],
         ["beta must be > 0"]),
        ("predict-lrs-negative", ["predict-check", "--model", "tiny-llama", "--lrs", "-1e-4", "--out", str(d / "p")],
         ["must be > 0"]),
        ("plot-not-a-run", ["plot", str(d / "empty_model")], ["not a run directory"]),
    ]


CASE_IDS = [c[0] for c in _cases(Path("/x"))]


@pytest.mark.parametrize("case", CASE_IDS)
def test_bad_input_exits_2_with_a_message(case, files, capsys):
    argv, expect = next((a, e) for i, a, e in _cases(files) if i == case)
    if case == "device-cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    before = _hashes(files / "run")
    capsys.readouterr()
    t0 = time.perf_counter()
    try:
        code = main(argv)
    except SystemExit as e:  # argparse usage errors
        code = e.code
    elapsed = time.perf_counter() - t0
    out = capsys.readouterr()
    text = out.out + out.err
    assert code == 2, text
    assert "Traceback" not in text
    for sub in expect:
        assert sub in out.err, f"{sub!r} not in {out.err!r}"
    assert elapsed < 20, f"{case}: refused only after {elapsed:.1f} s"
    assert _hashes(files / "run") == before


def test_hub_id_offline_is_refused_quickly(files, capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    t0 = time.perf_counter()
    code = main(["train", "--out", str(files / "run"), "--model", "no-such-org/no-such-model-4f2a"])
    err = capsys.readouterr().err
    assert code == 2 and time.perf_counter() - t0 < 10
    assert "hub is unreachable" in err and "local directory" in err and "smollm2-135m" in err


def test_sentiment_labels_any_case_and_skips_counted(tmp_path, capsys):
    import json

    rows = ["textID,text,selected_text,sentiment"] + [f"p{i},good {i},x,Positive" for i in range(3)] + \
        [f"n{i},bad {i},x,NEGATIVE" for i in range(2)] + ["u0,meh,x,neutral", "e0,,x,positive"]
    (tmp_path / "t.csv").write_text("\n".join(rows) + "\n")
    assert main(["data-summary", "--data", str(tmp_path / "t.csv")]) == 0
    summary = json.loads(capsys.readouterr().out)
    # 2 positive + 2 negative (balanced); skipped: neutral, empty text, the surplus positive
    assert summary["n_pairs"] == 4 and summary["n_skipped"] == 3


def test_gguf_check_accepts_a_complete_file(tmp_path):
    from dynamics.inputs.models import check_gguf

    name = b"w"
    header = (b"GGUF" + struct.pack("<IQQ", 3, 1, 0) + struct.pack("<Q", len(name)) + name
              + struct.pack("<I", 1) + struct.pack("<Q", 4) + struct.pack("<IQ", 0, 0))
    pad = (-len(header)) % 32
    (tmp_path / "ok.gguf").write_bytes(header + b"\0" * pad + np.zeros(4, np.float32).tobytes())
    assert check_gguf(tmp_path / "ok.gguf") == tmp_path / "ok.gguf"


# ----------------------------------------------------------------------------- §5 precision
def test_native_bf16_follows_the_hardware():
    from dynamics.inputs.models import cpu_flags, native_bf16

    cap = torch.backends.cpu.get_cpu_capability()
    want = cap.upper().startswith("AVX512") and bool({"avx512_bf16", "amx_bf16"} & cpu_flags())
    assert native_bf16("cpu") is want
    assert native_bf16("meta") is False


def test_diagnostics_do_not_depend_on_autocast(tmp_path):
    """Same parameters: the recorder's θ-level diagnostics are the same under an active bf16 autocast
    (ambient, and accelerate-style patched forward) as without it."""
    import types

    from dynamics.inputs.data import builtin_sentiment_pairs
    from dynamics.core.logprobs import pair_logprobs, reference_logprobs, tokenize_pairs
    from dynamics.inputs.models import tiny_model, tiny_tokenizer
    from dynamics.runs.rundir import RunDir
    from dynamics.runs.recorder import Recorder, RecorderConfig

    tok, model = tiny_tokenizer(), tiny_model("llama", seed=1)
    probe = tokenize_pairs(tok, builtin_sentiment_pairs("short_suffix", n=3))
    ref = reference_logprobs(model, probe)
    cols = ["logp_w", "logp_l", "ip_wl", "sq_w", "sq_l", "cos_wl", "d_w", "d_l", "pred_dw", "pred_dl"]

    def record(name, ctx):
        rec = Recorder(model, probe, ref, RunDir(tmp_path / name), RecorderConfig(token_pairs=0, whatif=False), loss="dpo")
        with ctx:
            rec.before_update(0)
            rec.after_update()  # no update in between: act_dw = 0
        return rec.run.path

    from dynamics.runs.rundir import read_table

    base = read_table(record("fp32", torch.autocast("cpu", enabled=False)), "records")
    amb = read_table(record("ambient", torch.autocast("cpu", dtype=torch.bfloat16)), "records")
    model._original_forward = model.forward  # what accelerate's prepare_model does for bf16
    model.forward = types.MethodType(torch.autocast("cpu", dtype=torch.bfloat16)(type(model).forward), model)
    try:
        patched = read_table(record("patched", torch.autocast("cpu", enabled=False)), "records")
    finally:
        model.forward = model._original_forward
        del model._original_forward
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        naive = pair_logprobs(model, probe).chosen.logp.double().numpy()  # what autocast would record
    # float32 tolerance: 8 ulps of the largest magnitude (the same float32 computation either way)
    eps = torch.finfo(torch.float32).eps
    for other in (amb, patched):
        for c in cols:
            a, b = base[c].to_numpy(), other[c].to_numpy()
            assert np.allclose(a, b, rtol=8 * eps, atol=8 * eps * np.abs(a).max()), c
    # the check is sensitive: the same log-probs under bf16 autocast are off by far more
    tol = 8 * eps * np.abs(base.logp_w.to_numpy()).max()
    assert np.abs(naive - base.logp_w.to_numpy()).max() > 10 * tol
