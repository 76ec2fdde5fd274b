"""`dynamics attribute` names every attribution that has not converged (issue 13).

The CLI prints one line per (pair, target) on stderr; the line must say "not converged" exactly
when the written table's |δ| > CONVERGED_REL·|gap| (the one threshold the report uses too). A
1-point quadrature is far from converged on these pairs and a 32-point one converged
(test_cli_tools.test_attribute_margin_is_complete), so both branches are exercised.
"""
import re

import pandas as pd

from analyses.cli import main
from dynamics.core.attribution import CONVERGED_REL

DATA = ["--kind", "sentiment", "--style", "short_suffix", "--limit", "6", "--model", "tiny-gpt2"]
LINE = re.compile(r"^(?P<pid>\S+) (?P<target>chosen|rejected|margin): f\(x\) - f\(baseline\) = ")


def _run(tmp_path, capsys, n_steps: int) -> tuple[pd.DataFrame, dict[tuple[str, str], str]]:
    out = tmp_path / f"attr{n_steps}.parquet"
    assert main(["attribute", *DATA, "--first", "3", "--targets", "chosen", "margin", "--n-steps", str(n_steps),
                 "--out", str(out)]) == 0
    lines = {}
    for line in capsys.readouterr().err.splitlines():
        m = LINE.match(line)
        if m:
            lines[(m["pid"], m["target"])] = line
    return pd.read_parquet(out), lines


def test_attribute_warns_exactly_on_unconverged(tmp_path, capsys):
    seen = set()
    for n_steps in (1, 32):
        table, lines = _run(tmp_path, capsys, n_steps)
        per = table.groupby(["pair_id", "target"])[["delta", "gap"]].first()
        assert set(lines) == set(per.index)                                   # one line per (pair, target)
        for key, r in per.iterrows():
            bad = bool(abs(r.delta) > CONVERGED_REL * abs(r.gap))
            assert ("not converged" in lines[key]) is bad, (n_steps, key, r.delta, r.gap, lines[key])
            if bad:
                assert "raise --n-steps" in lines[key]
            seen.add(bad)
    assert seen == {True, False}                                              # both branches exercised
