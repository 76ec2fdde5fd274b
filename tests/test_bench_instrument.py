"""`dynamics bench instrument` (and its alias `bench inrun`) on tiny models: the table's structure,
ratios taken against the plain median of the same run, the written files, and bad arguments.
No timing is asserted: speed targets are the benchmark's output, not a test."""
import math

import pandas as pd
import pytest

from analyses.cli import main
from dynamics.errors import InputError
from dynamics.tools.bench_instrument import (GROUP, LOOP_VARIANTS, SHAPES, TRL_VARIANTS, Shape, check_variants,
                                             parse_shape, summarize, target_lines)

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = ["--model", "tiny-llama", "--shapes", "8:3:4", "--batch-sizes", "2", "--threads", "1"]


def _check_ratios(summary: pd.DataFrame, steps: pd.DataFrame, baseline: str) -> None:
    """Every row's medians are those of its own timed steps, and its ratios are its medians over
    the baseline's medians of the same (mode, shape, batch size)."""
    for _, r in summary.iterrows():
        mine = steps[(steps.variant == r.variant) & (steps["shape"] == r["shape"]) & (steps.batch_size == r.batch_size)]
        assert len(mine) == r.steps
        assert r.wall_s == pytest.approx(mine.wall_s.median(), rel=1e-12)
        assert r.cpu_s == pytest.approx(mine.cpu_s.median(), rel=1e-12)
        base = summary[(summary.variant == baseline) & (summary["shape"] == r["shape"])
                       & (summary.batch_size == r.batch_size)].iloc[0]
        assert r.x_plain_wall == pytest.approx(r.wall_s / base.wall_s, rel=1e-12)
        assert r.x_plain_cpu == pytest.approx(r.cpu_s / base.cpu_s, rel=1e-12)


def test_instrument_table_and_files(tmp_path, capsys):
    out = tmp_path / "bench" / "instrument.csv"
    assert main(["bench", "instrument", *TINY, "--steps", "2", "--n-probe", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    summary = pd.read_csv(out)
    steps = pd.read_csv(tmp_path / "bench" / "instrument_steps.csv")
    assert summary.variant.tolist() == list(LOOP_VARIANTS)                     # one row each, in this order
    assert set(summary.columns) >= set(GROUP) | {"wall_s", "cpu_s", "x_plain_wall", "x_plain_cpu",
                                                 "step_peak_mib", "cuda_peak_mib", "steps"}
    assert (summary["mode"] == "loop").all() and (summary.batch_size == 2).all()
    assert (summary[["prompt", "len_w", "len_l"]].to_numpy() == [8, 3, 4]).all()
    assert (summary.steps == 2).all() and sorted(set(steps["round"])) == [1, 2]
    assert (summary.wall_s > 0).all() and (summary.cpu_s >= 0).all() and summary.step_peak_mib.notna().all()
    assert summary.cuda_peak_mib.isna().all()                                    # CPU run
    _check_ratios(summary, steps, "plain")
    assert summary.set_index("variant").loc["plain", "x_plain_wall"] == 1.0
    # targets: in_run judged, probe not (stated for 16 probe pairs, run with 2)
    assert "target in_run <= 1.25x plain: 8:3:4 B=2:" in printed
    assert "not evaluated: stated for n_probe=16, run with n_probe=2" in printed
    md = (tmp_path / "bench" / "instrument.md").read_text()
    assert "| mode | shape |" in md and "dynamics bench instrument --model tiny-llama" in md
    assert "token_pairs=0" in md and "whatif=True" in md                       # the probe recorder's configuration


def test_inrun_alias_runs_plain_and_the_in_run_variants_only(tmp_path, capsys):
    out = tmp_path / "inrun.parquet"
    assert main(["bench", "inrun", *TINY, "--steps", "1", "--out", str(out)]) == 0
    summary = pd.read_parquet(out)
    assert summary.variant.tolist() == ["plain", "in_run", "in_run_bookkeeping"]
    _check_ratios(summary, pd.read_parquet(tmp_path / "inrun_steps.parquet"), "plain")
    ratio = float(capsys.readouterr().out.split("target in_run <= 1.25x plain: 8:3:4 B=2: ")[1].split("x wall")[0])
    assert ratio == pytest.approx(summary.x_plain_wall.iloc[1], abs=1e-3)


@pytest.mark.parametrize("lora_r", ["2", "0"])                                  # 0: full fine-tuning
def test_trl_variants(tmp_path, capsys, lora_r):
    pytest.importorskip("trl")
    pytest.importorskip("peft")
    out = tmp_path / "trl.csv"
    assert main(["bench", "instrument", *TINY, "--variants", "plain", "--trl", "--steps", "2", "--lora-r", lora_r,
                 "--out", str(out)]) == 0
    summary, steps = pd.read_csv(out), pd.read_csv(tmp_path / "trl_steps.csv")
    assert summary.variant.tolist() == ["plain", *TRL_VARIANTS]
    assert summary["mode"].tolist() == ["loop", "trl", "trl"]
    # the two trainers took turns: both timed rounds of each, ratios to trl_plain (not to the loop's plain)
    trl = steps[steps["mode"] == "trl"]
    assert sorted(trl.groupby("variant")["round"].apply(list).tolist()) == [[1, 2], [1, 2]]
    _check_ratios(summary[summary["mode"] == "trl"], trl, "trl_plain")
    assert "target trl_in_run <= 1.25x trl_plain: 8:3:4 B=2:" in capsys.readouterr().out


def test_summarize_divides_by_the_plain_median_of_the_same_run():
    key = dict(mode="loop", shape="s", prompt=1, len_w=1, len_l=1)
    walls = {(2, "plain"): [1.0, 3.0, 2.0], (2, "in_run"): [3.0, 3.0, 9.0], (4, "plain"): [4.0, 4.0, 4.0],
             (4, "probe"): [10.0, 6.0, 8.0]}
    steps = pd.DataFrame([dict(key, batch_size=B, variant=v, round=k + 1, wall_s=w, cpu_s=w / 2)
                          for (B, v), ws in walls.items() for k, w in enumerate(ws)])
    memory = pd.DataFrame([dict(key, batch_size=B, variant=v, step_peak_mib=1.0, cuda_peak_mib=math.nan)
                           for B, v in walls])
    res = summarize(steps, memory, dict(n_probe=16))
    got = res.summary.set_index(["batch_size", "variant"])
    assert got.loc[(2, "in_run"), "x_plain_wall"] == 3.0 / 2.0                  # medians, B=2's plain
    assert got.loc[(4, "probe"), "x_plain_cpu"] == 4.0 / 2.0                    # B=4's plain, not B=2's
    assert res.targets.met.tolist() == [False, True]                             # 1.5 > 1.25; 2.0 <= 2
    lines = target_lines(res)
    assert lines[0].endswith("B=2: 1.500x wall (1.500x CPU): NOT met")
    assert lines[1].endswith("B=4: 2.000x wall (2.000x CPU): met; the recording itself adds 1.000x wall "
                             "(1.000x CPU) for 16 probe pairs on a 4-pair step")


def test_shapes_and_variants():
    assert parse_shape("tweets") == SHAPES["tweets"] and parse_shape("8:3:4") == Shape("8:3:4", 8, 3, 4)
    for bad in ("huge", "8:0:4", "8:3", "a:b:c"):
        with pytest.raises(InputError, match="PROMPT:CHOSEN:REJECTED"):
            parse_shape(bad)
    assert check_variants(["probe", "plain"]) == ["plain", "probe"]
    with pytest.raises(InputError, match="ratio to plain"):
        check_variants(["in_run"])
    with pytest.raises(InputError, match="known: plain"):
        check_variants(["plain", "fast"])
    with pytest.raises(InputError, match="ratio to trl_plain"):
        check_variants(["trl_in_run"])


@pytest.mark.parametrize("argv, message", [
    (["--shapes", "huge"], "unknown shape 'huge'"),
    (["--shapes", "8:0:4"], "PROMPT:CHOSEN:REJECTED token counts >= 1"),
    (["--variants", "in_run"], "add plain"),
    (["--variants", "plain", "turbo"], "unknown variant 'turbo'"),
    (["--out", "table.txt"], "write a .csv or .parquet file"),
    (["--shapes", "tldr"], "longer than the model's context of 256 tokens"),        # 349 + 38 on tiny-llama
    (["--batch-sizes", "0"], "must be >= 1"),
    (["--model", "tiny-nope"], "unknown tiny architecture"),
    (["--device", "gpu0"], "invalid device"),
])
def test_bad_arguments_exit_2_with_one_line(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["bench", "instrument", "--model", "tiny-llama", "--shapes", "8:3:4", "--batch-sizes", "2", *argv]
    try:
        code = main(args)
    except SystemExit as e:                                                      # argparse's own refusals
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())                                          # nothing written
