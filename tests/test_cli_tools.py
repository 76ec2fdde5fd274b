"""`dynamics screen`, `attribute` and `diagnose` as a user runs them: tiny models, built-in pairs,
a real `dynamics train` run; the outputs hold what the library functions compute."""
import json

import pandas as pd
import pytest

from analyses.cli import main
from dynamics.core.logprobs import tokenize_pairs
from dynamics.core.screen import screen_pairs
from dynamics.inputs.data import load_kind
from dynamics.inputs.models import load_model
from dynamics.tools.diagnose import SCREEN_SECTION_IDS, SECTION_IDS

DATA = ["--kind", "sentiment", "--style", "short_suffix", "--limit", "6", "--model", "tiny-llama"]


def test_screen_writes_the_library_table(tmp_path, capsys):
    out, page = tmp_path / "screen.parquet", tmp_path / "screen.html"
    assert main(["screen", *DATA, "--out", str(out), "--impl", "autograd", "--top", "2", "--html", str(page)]) == 0
    table = pd.read_parquet(out)
    summary = json.loads(capsys.readouterr().out.split("\nwrote")[0])
    model, tok = load_model("tiny-llama")
    tp = tokenize_pairs(tok, load_kind("sentiment", None, style="short_suffix", limit=6))
    ref = screen_pairs(model, tp, impl="autograd")
    assert table.pair_id.tolist() == ref.pair_id.tolist() == tp.pair_ids
    for col in ("ches", "ches_norm", "cos_wl", "pred_dw"):
        assert (table[col] - ref[col]).abs().max() <= 1e-5 * max(ref[col].abs().max(), 1e-12), col
    assert summary["n_pairs"] == 6 and len(summary["top"]) == 2
    html = page.read_text()
    assert all(f'id="{s}"' in html for s in SCREEN_SECTION_IDS) and "data:image/png;base64," in html
    top = table.sort_values("ches_norm", ascending=False).pair_id.iloc[0]
    assert html.index(top) < html.index('id="cases"')                               # listed as most at risk
    median = f"{table.ches_norm.median():.4g}"
    assert median in html[html.index('id="distribution"'):html.index('id="at-risk"')]   # the quantile table


def test_attribute_margin_is_complete(tmp_path):
    out = tmp_path / "attr.parquet"
    # tiny GPT-2: learned positions keep the pad-baseline path smooth (a tiny Llama's pad row is zero,
    # a nearly singular path for RMSNorm: see dynamics.core.attribution)
    assert main(["attribute", *DATA, "--model", "tiny-gpt2", "--first", "2", "--targets", "margin", "chosen", "--n-steps", "32",
                 "--out", str(out)]) == 0
    table = pd.read_parquet(out)
    assert set(table.pair_id) == set(table.pair_id.unique()) and table.pair_id.nunique() == 2
    for (pid, target), g in table.groupby(["pair_id", "target"]):
        # completeness: Σ attributions = f(x) - f(baseline) up to captum's reported delta
        assert abs(g.attribution.sum() - g.gap.iloc[0] - g.delta.iloc[0]) < 1e-4 * max(abs(g.gap.iloc[0]), 1.0)
        assert abs(g.delta.iloc[0]) < 0.05 * max(abs(g.gap.iloc[0]), 1e-3), (pid, target)


def test_attribute_unknown_pair(tmp_path, capsys):
    assert main(["attribute", *DATA, "--pairs", "nope", "--out", str(tmp_path / "a.parquet")]) == 2
    assert "no pair with id ['nope']" in capsys.readouterr().err


def test_diagnose_a_training_run(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--model", "tiny-gpt2", "--n-pairs", "12", "--n-probe", "3", "--steps", "4",
                 "--batch-size", "3", "--eval-every", "2", "--lr", "1e-2", "--token-pairs", "1", "--no-progress",
                 "--out", str(run)]) == 0
    assert main(["diagnose", str(run)]) == 0
    html = (run / "report.html").read_text()
    assert all(f'id="{s}"' in html for s in SECTION_IDS)
    assert "data:image/png;base64," in html and "http://" not in html and "https://" not in html
    assert main(["diagnose", str(tmp_path / "nothing")]) == 2
    assert "not a run directory" in capsys.readouterr().err
