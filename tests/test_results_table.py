"""bench/results_table.py: the README's results tables, made from an evaluate.py results.json."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "results_table.py"


def _load():
    spec = importlib.util.spec_from_file_location("results_table", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


results_table = _load()


def _row(ppl: float, tokens: int, tokens_per_s: float) -> dict:
    return {"ppl": ppl, "loss": 0.0, "tokens": tokens, "tokens_per_s": tokens_per_s, "seconds": 1.0, "hparams": {}}


# Hand-made: static 200 on test, so sgd at 150 is +25.0% and meta at 100 is +50.0% (perplexity reductions).
RESULTS = {
    "protocol": {"streams": 1, "theta": "per stream", "segment": 5},
    "skipped": {"meta_noflush": "skipped: no meta_noflush.ckpt (python train.py stage=meta gate.flush=false)"},
    "splits": {
        "valid": {"static": _row(250.0, 999, 30000.4), "sgd": _row(275.0, 999, 1200.0)},
        "test": {"static": _row(200.0, 1234, 30000.4), "sgd": _row(150.0, 1234, 1500.6),
                 "meta": _row(100.0, 1234, 250)},
    },
}


@pytest.fixture
def results_json(tmp_path: Path) -> Path:
    path = tmp_path / "results.json"
    path.write_text(json.dumps(RESULTS))
    return path


def test_one_split_gives_ppl_and_change_against_static(results_json: Path, capsys: pytest.CaptureFixture) -> None:
    assert results_table.main([str(results_json), "--split", "test"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[:7] == [
        "**test** (segment 5, one stream)",
        "",
        "| method | ppl | vs static | tokens | tokens/s |",
        "|---|---:|---:|---:|---:|",
        "| static | 200.00 |  | 1,234 | 30,000 |",
        "| sgd | 150.00 | +25.0% | 1,234 | 1,501 |",
        "| meta | 100.00 | +50.0% | 1,234 | 250 |",
    ]
    assert "**valid**" not in out
    assert "Skipped: meta_noflush, no meta_noflush.ckpt (python train.py stage=meta gate.flush=false)." in out


def test_every_split_by_default_and_a_worse_method_is_positive(results_json: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    assert results_table.main([str(results_json)]) == 0
    out = capsys.readouterr().out
    assert out.index("**valid** (segment 5, one stream)") < out.index("**test** (segment 5, one stream)")
    assert "| sgd | 275.00 | -10.0% | 999 | 1,200 |" in out


def test_several_streams_are_named() -> None:
    res = {**RESULTS, "protocol": {"streams": 4, "theta": "shared", "segment": 20}}
    assert results_table.split_table(res, "test").splitlines()[0] == "**test** (segment 20, 4 streams, θ shared)"


def test_unknown_split_or_unreadable_file_is_one_line_and_exit_2(results_json: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    assert results_table.main([str(results_json), "--split", "train"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"error: no split 'train' in {results_json}; it has valid, test"
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert results_table.main([str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad} is not a readable evaluate.py results.json") and err.count("\n") == 1


def test_the_readme_quotes_the_smoke_run_verbatim() -> None:
    """README.md's synthetic-corpus results are this script's output for bench/results/smoke/results.json."""
    res = json.loads((SCRIPT.parent / "results" / "smoke" / "results.json").read_text())
    table = results_table.render(res)
    assert "| meta | 110.24 | +33.2% | 0.8989 [0.8792, 0.9202] | 0.9801 [0.9483, 1.0080] | 8,354 | 256 |" in table
    assert table in (SCRIPT.parents[1] / "README.md").read_text()


def test_the_readme_quotes_the_wikitext2_run_verbatim() -> None:
    """README.md's WikiText-2 results are this script's output for bench/results/wikitext2_cpu/results.json: the
    whole test split, every method with its intervals."""
    res = json.loads((SCRIPT.parent / "results" / "wikitext2_cpu" / "results.json").read_text())
    table = results_table.render(res)
    assert "| meta | 78.11 | +39.7% | 0.9524 [0.9480, 0.9566] | 0.9892 [0.9875, 0.9910] | 245,568 | 154 |" in table
    assert table in (SCRIPT.parents[1] / "README.md").read_text()


def test_ratio_columns_with_intervals_when_the_file_has_them(tmp_path: Path) -> None:
    """A results.json with paired-bootstrap ratios (evaluate.py's `vs`) gets a column per baseline it names."""
    res = json.loads(json.dumps(RESULTS))
    res["protocol"]["bootstrap"] = {"level": 0.9}
    res["splits"]["test"]["meta"]["vs"] = {"rms": {"ratio": 0.98765, "lo": 0.97, "hi": 1.0049}}
    res["splits"]["test"]["sgd"]["vs"] = {"static": {"ratio": 0.75, "lo": 0.7, "hi": 0.8}}
    lines = results_table.split_table(res, "test").splitlines()
    assert lines[2:6] == ["| method | ppl | vs static | ÷ rms [90% CI] | tokens | tokens/s |",
                          "|---|---:|---:|---:|---:|---:|",
                          "| static | 200.00 |  |  | 1,234 | 30,000 |",
                          "| sgd | 150.00 | +25.0% |  | 1,234 | 1,501 |"]
    assert lines[6] == "| meta | 100.00 | +50.0% | 0.9877 [0.9700, 1.0049] | 1,234 | 250 |"
