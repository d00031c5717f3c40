"""evaluate.py: methods under one protocol, per-article aggregation, outputs on disk."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from omegaconf import DictConfig

from dynlm_pl import dashboard, evaluation, report, runtime
from dynlm_pl.artifacts import load_fisher, load_lm
from dynlm_pl.errors import DynlmError
from dynlm_pl.files import file_sha256
from dynlm_pl.meta.rules import SGDRule
from dynlm_pl.meta.scoring import adaptive_eval, static_losses
from dynlm_pl.meta.tuning import compass_search, krause_grid
from dynlm_pl.meta.weights import DynamicWeights
from dynlm_pl.runtime import make_datamodule
from dynlm_pl.stages import fisher as fisher_stage
from dynlm_pl.stages import lm as lm_stage

# A small corpus and short grids: the point is the protocol and the outputs, not the tuning.
OVERRIDES = [
    "experiment=smoke", "data.synthetic.articles={train:60,valid:3,test:3}", "data.synthetic.article_len=150",
    "lm.trainer.max_epochs=4", "trainer.enable_progress_bar=false", "fisher.tokens=2000", "fisher.batch_size=4",
    "eval.tune.tokens=400", "eval.tune.sgd_lr=[0.01,0.03]", "eval.tune.rms_lr=[2e-5,1e-4]",
    "eval.tune.rms_lamb=[0.0,0.002]", "eval.tune.refine=1", "eval.smooth=20", "eval.methods=[static,sgd,rms,rms_pt]",
    "eval.splits=[valid,test]",
]


def fresh_run(out: Path, root: Path, *overrides: str) -> tuple[DictConfig, Path]:
    """A run directory under `root` holding the evaluated run's lm.ckpt, fisher.pt and tuned.json (no results)."""
    import shutil

    from tests.conftest import compose_config

    cfg = compose_config([*OVERRIDES, *overrides], root)
    run = Path(cfg.paths.run_dir)
    run.mkdir(parents=True)
    for f in ("lm.ckpt", "fisher.pt", "tuned.json"):
        shutil.copy(out / f, run / f)
    return cfg, run


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory) -> tuple[DictConfig, dict, Path]:
    from tests.conftest import compose_config

    root = tmp_path_factory.mktemp("eval")
    cfg = compose_config(OVERRIDES, root)
    lm_stage.run(cfg)
    fisher_stage.run(cfg)
    res = evaluation.run(cfg)
    return cfg, res, Path(cfg.paths.run_dir)


def test_sgd_with_zero_lr_equals_static(evaluated: tuple[DictConfig, dict, Path]) -> None:
    _, _, out = evaluated
    lm, _ = load_lm(out / "lm.ckpt")
    tokens = torch.randint(0, lm.vocab_size, (203,))
    static = static_losses(lm, tokens, bptt=35)
    sgd0 = adaptive_eval(lm, tokens, SGDRule(0.0), segment=5, dyn=DynamicWeights.build(lm)).view(-1)
    assert static.shape == sgd0.shape == (202,)
    torch.testing.assert_close(sgd0, static, atol=1e-5, rtol=1e-5)


def test_per_article_aggregates_to_global(evaluated: tuple[DictConfig, dict, Path]) -> None:
    _, res, out = evaluated
    losses = np.load(out / "losses-test.npz")
    from dynlm_pl.data import synthetic_corpus

    cfg, _, _ = evaluated
    articles = synthetic_corpus(**cfg.data.synthetic).articles["test"]
    for m in ("static", "sgd", "rms"):
        rows = report.per_article(losses[m].astype(np.float64), articles)
        assert sum(r["tokens"] for r in rows) == losses[m].size == res["splits"]["test"][m]["tokens"]
        weighted = sum(r["tokens"] * math.log(r["ppl"]) for r in rows) / sum(r["tokens"] for r in rows)
        assert math.exp(weighted) == pytest.approx(res["splits"]["test"][m]["ppl"], rel=1e-5)


def test_results_json_fields(evaluated: tuple[DictConfig, dict, Path]) -> None:
    _, _, out = evaluated
    r = json.loads((out / "results.json").read_text())
    assert r["protocol"]["segment"] == 5 and r["protocol"]["streams"] == 1
    assert set(r["checkpoints"]) >= {"lm.ckpt", "fisher.pt"}
    assert all(len(h) == 64 for h in r["checkpoints"].values())
    assert set(r["splits"]) == {"valid", "test"}
    assert r["protocol"]["max_drift"] is None  # no hidden decay: sgd and rms are the published rules
    for split in ("valid", "test"):
        assert set(r["splits"][split]) == {"static", "sgd", "rms", "rms_pt"}
        for m, v in r["splits"][split].items():
            assert set(v) >= {"ppl", "loss", "tokens", "tokens_per_s", "seconds", "hparams", "vs"}
            assert math.exp(v["loss"]) == pytest.approx(v["ppl"])
            assert v["tokens"] > 0 and v["tokens_per_s"] > 0
            # the ratio to each other baseline, with its bootstrap interval around it
            assert set(v["vs"]) == {"static", "sgd", "rms", "rms_pt"} - {m}
            for base, ci in v["vs"].items():
                assert ci["ratio"] == pytest.approx(v["ppl"] / r["splits"][split][base]["ppl"], rel=1e-9)
                assert ci["lo"] <= ci["ratio"] <= ci["hi"] and ci["articles"] == 3 and ci["resamples"] == 2000
        assert set(r["splits"][split]["rms"]["hparams"]) == {"lr", "lamb", "eps"}
        groups = {"bias", "encoder", "rnns.0", "rnns.1"}
        assert set(r["splits"][split]["rms_pt"]["hparams"]) == {"eps"} | {f"{k}@{g}" for k in ("lr", "lamb")
                                                                           for g in groups}
        for m in ("sgd", "rms", "rms_pt"):  # ‖θ_t − θ_0‖ is logged for adaptive methods: it moved, stayed finite
            v = r["splits"][split][m]
            assert 0 < v["theta_drift_final"] <= v["theta_drift_max"] < math.inf
        assert "theta_drift_max" not in r["splits"][split]["static"]
    md = (out / "results.md").read_text()
    assert "| method |" in md and "÷ rms [95% CI]" in md and "Data roles: tuning (sgd, rms, rms_pt) valid[0:400]" in md
    assert r["roles"]["evaluation (test)"].startswith("test[0:")
    tuned = json.loads((out / "tuned.json").read_text())
    rms = tuned["best"]["rms"]
    assert set(tuned["best"]) == {"sgd", "rms", "rms_pt"} and len(rms["trials"]) >= 4  # the 2x2 grid, then more
    assert rms["tune_loss"] == min(t["loss"] for t in rms["trials"]) <= min(t["loss"] for t in rms["trials"][:4])
    # rms_pt starts at the tuned rms rule (every group at its η, λ) and keeps only what lowers the loss
    pt = tuned["best"]["rms_pt"]
    assert all(pt["trials"][0][f"lr@{g}"] == rms["hparams"]["lr"] for g in groups)
    assert pt["trials"][0]["loss"] == rms["tune_loss"] and pt["trials"][0]["seconds"] == 0  # rms's, not rerun
    assert pt["tune_loss"] == min(t["loss"] for t in pt["trials"]) <= rms["tune_loss"] + 1e-6
    assert r["tuning"]["rms_pt"]["trials"] == pt["trials"]  # every trial reported
    assert (out / "tuning.md").read_text().count("| ") > len(rms["trials"]) + len(pt["trials"])


def test_plots_and_html_written(evaluated: tuple[DictConfig, dict, Path]) -> None:
    _, _, out = evaluated
    for name in ("gain-test.png", "articles-test.png", "tokens-test.html", "gain-valid.png"):
        p = out / "plots" / name
        assert p.is_file() and p.stat().st_size > 1000, name
    assert (out / "plots" / "gain-test.png").read_bytes()[:4] == b"\x89PNG"
    html = (out / "plots" / "tokens-test.html").read_text()
    assert html.count("<section>") == 3 and "rgba(" in html
    rows = (out / "articles-test.csv").read_text().splitlines()
    assert len(rows) == 1 + 3 and rows[0].startswith("article,title,tokens,ppl_static")


def test_adaptive_methods_beat_static_on_synthetic(evaluated: tuple[DictConfig, dict, Path]) -> None:
    _, res, _ = evaluated
    for split in ("valid", "test"):
        r = res["splits"][split]
        assert r["sgd"]["ppl"] < r["static"]["ppl"]
        assert r["rms"]["ppl"] < r["static"]["ppl"]


def test_tuned_baselines_are_reused(evaluated: tuple[DictConfig, dict, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, _, _ = evaluated

    def no_tuning(*a: object, **k: object) -> None:
        raise AssertionError("tuned.json should have been reused")

    monkeypatch.setattr(runtime, "tune", no_tuning)
    cfg2 = cfg.copy()
    cfg2.eval.splits = ["valid"]
    res = evaluation.run(cfg2)
    assert res["splits"]["valid"]["sgd"]["ppl"] > 0


def test_tuned_baselines_are_retuned_for_another_fisher_pt_or_dynamic_set(
        evaluated: tuple[DictConfig, dict, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """tuned.json is keyed by what tuning depended on: a recomputed fisher.pt (Krause's RMS statistics) or another
    meta.dynamic selection tunes again instead of reusing stale hyperparameters."""
    cfg, _, out = evaluated
    run = tmp_path / "run"
    run.mkdir()
    for name in ("lm.ckpt", "fisher.pt", "tuned.json"):
        (run / name).write_bytes((out / name).read_bytes())
    calls: list[int] = []

    def counting(*a: object, **k: object) -> dict:
        calls.append(1)
        return json.loads((out / "tuned.json").read_text())["best"]

    monkeypatch.setattr(runtime, "tune", counting)
    lm, _ = load_lm(run / "lm.ckpt")
    valid = torch.zeros(10, dtype=torch.long)
    sha = file_sha256(run / "lm.ckpt")
    runtime.tuned_baselines(cfg, run, lm, valid, None, sha, ["sgd", "rms"])
    assert calls == []  # the same LM, fisher.pt, segment, grid and dynamic set: reused
    with (run / "fisher.pt").open("ab") as f:  # the same statistics' file, recomputed: another hash
        f.write(b"\0")
    runtime.tuned_baselines(cfg, run, lm, valid, None, sha, ["sgd", "rms"])
    assert calls == [1]
    other = cfg.copy()
    other.meta.dynamic.exclude = ["encoder.weight"]
    runtime.tuned_baselines(other, run, lm, valid, None, sha, ["sgd", "rms"])
    assert calls == [1, 1]


def test_textfile_unknown_words_and_bad_method(evaluated: tuple[DictConfig, dict, Path], tmp_path: Path) -> None:
    cfg, _, _ = evaluated
    bad = cfg.copy()
    bad.eval.methods = ["static", "nope"]
    with pytest.raises(DynlmError, match="unknown"):
        evaluation.run(bad)
    # The synthetic vocabulary has no <unk>: a file of unseen words cannot be read, and says so.
    text = tmp_path / "t.txt"
    text.write_text(" = A = \n\n zzz yyy w1 \n")
    tf = cfg.copy()
    tf.data.source, tf.eval.methods = "textfile", ["static"]
    tf.data.path = str(text)
    with pytest.raises(DynlmError, match="no <unk>"):
        evaluation.run(tf)


def test_without_a_validation_split_the_baselines_come_from_tuned_json(
        evaluated: tuple[DictConfig, dict, Path], tmp_path: Path) -> None:
    """data=textfile has no validation split (valid None): sgd and rms come from the run's tuned.json, tuned on the
    LM's own corpus; without it the error says what to do."""
    import shutil

    cfg, _, src = evaluated
    lm, _ = load_lm(src / "lm.ckpt")
    sha = file_sha256(src / "lm.ckpt")
    got = runtime.tuned_baselines(cfg, src, lm, None, None, sha, ["sgd", "rms"])
    assert got == {m: json.loads((src / "tuned.json").read_text())["best"][m] for m in ("sgd", "rms")}
    for name in ("lm.ckpt", "fisher.pt"):
        shutil.copy(src / name, tmp_path / name)
    with pytest.raises(DynlmError, match=r"tuning sgd, rms needs the LM's validation split, and .*tuned\.json holds"):
        runtime.tuned_baselines(cfg, tmp_path, lm, None, None, sha, ["sgd", "rms"])


def test_meta_gates_plot_and_wandb_offline(evaluated: tuple[DictConfig, dict, Path],
                                           tmp_path: Path) -> None:
    """A trained meta-learner's gate plot is drawn, and `logger=wandb` under WANDB_MODE=offline writes a local
    W&B run holding the per-article table and the plots (no account, no network), and each method's running
    perplexity along the split, sent from the worker processes as they score (eval.workers=2)."""
    import shutil

    from dynlm_pl.stages import meta as meta_stage
    from tests.conftest import compose_config, read_wandb_run, read_wandb_runs

    _, _, src = evaluated
    cfg = compose_config([*OVERRIDES, "unroll=3", "meta.steps=4", "meta.val_every=2", "meta.val_tokens=300",
                          "eval.methods=[static,rms,meta]", "eval.max_tokens=300", "logger=wandb",
                          "meta.trainer.log_every_n_steps=1"], tmp_path)
    out = Path(cfg.paths.run_dir)
    out.mkdir(parents=True)
    for name in ("lm.ckpt", "fisher.pt", "tuned.json"):
        shutil.copy(src / name, out / name)
    meta_stage.run(cfg)
    cfg.eval.workers = 2
    res = evaluation.run(cfg)
    cfg.eval.workers = 1
    assert res["protocol"]["max_tokens"] == 300
    assert res["splits"]["test"]["meta"]["tokens"] == 299  # the prefix: 300 tokens, 299 predicted
    gates = out / "plots" / "gates-test.png"
    assert gates.is_file() and gates.stat().st_size > 1000 and gates.read_bytes()[:4] == b"\x89PNG"
    # two runs: stage meta's, then evaluate's (the newest)
    runs = sorted((out / "wandb").glob("offline-run-*"), key=lambda d: read_wandb_run(d)["run"]["start"])
    assert runs, list((out / "wandb").iterdir())
    logged = [p.name for p in runs[-1].rglob("*") if p.is_file()]
    assert any(n.endswith(".wandb") for n in logged), logged  # the offline run's event log
    media = [n for n in logged if n.endswith(".png")]
    assert any(n.startswith("gates-test") for n in media), media  # plots uploaded as images
    assert any(n.endswith(".table.json") for n in logged), logged  # the per-article table
    recorded = read_wandb_runs(out)  # one finished run per stage: meta's, then evaluate's
    assert [r["run"]["job_type"] for r in recorded] == ["meta", "evaluate"] and all(r["exited"] for r in recorded)
    assert {"val/adaptive_ppl", "val/rms_ppl", "val/meta_init_ppl", "val/gain_vs_rms"} <= recorded[0]["keys"]
    assert {"val/gate_f/encoder.weight", "val/gate_hist_z/encoder.weight"} <= recorded[0]["keys"]  # φ's gates
    assert recorded[1]["run"]["config"]["eval.max_tokens"] == 300
    assert {"test/meta/ppl", "test/methods_done"} <= recorded[1]["keys"]  # logged live, as each method finished
    for m in ("static", "rms", "meta"):  # the running perplexity against the method's own token axis, to its end
        along = [(h[f"test/{m}/tokens"], h[f"test/{m}/running_ppl"]) for h in recorded[1]["history"]
                 if f"test/{m}/running_ppl" in h]
        assert len(along) >= 5 and [n for n, _ in along] == sorted(n for n, _ in along), m
        assert along[-1][0] == 299 and along[-1][1] == pytest.approx(res["splits"]["test"][m]["ppl"], rel=1e-6), m
    files = recorded[1]["artifacts"]["smoke-results"]
    assert {"results.json", "results.md", "tuned.json"} <= set(files) and "lm.ckpt" not in files  # log_model off
    cfg.logger.wandb.log_model = True  # a rerun (every method reused from eval/): the checkpoints go along
    evaluation.run(cfg)
    (new,) = set((out / "wandb").glob("offline-run-*")) - set(runs)
    assert {"lm.ckpt", "fisher.pt", "meta.ckpt"} <= set(read_wandb_run(new)["artifacts"]["smoke-results"])
    cfg.logger.wandb.log_model = False
    assert {"test/meta/ppl", "test/meta/gain_vs_static", "test/meta/gain_vs_rms_lo"} <= recorded[1]["summary"]
    assert {"test/articles", "test/meta_gain_per_article_table", "test/tokens", "test/gain_along_stream_table"} <= \
        recorded[1]["keys"]
    # the dashboard as code reads what these runs logged: every key of its evaluation and meta-training panels
    panels = {s.name: s.panels for s in dashboard.build("dynlm", split="test").sections}
    ran, logged = set(res["splits"]["test"]), recorded[1]["keys"] | recorded[1]["summary"]
    for key in [k for s in ("evaluation", "evaluation, live") for p in panels[s] for k in dashboard.panel_keys(p)]:
        parts = key.split("/")
        if len(parts) == 3 and (parts[1] not in ran or parts[2] == f"gain_vs_{parts[1]}"):
            continue  # a method this run did not evaluate (sgd, rms_pt, meta_noflush), or rms against itself
        assert key in logged, key
    assert all(k in recorded[0]["keys"] for p in panels["meta-training"] for k in dashboard.panel_keys(p))
    assert dashboard.panel_keys(panels["sweeps"][0])[:2] == ["unroll", "meta.optim.lr"]
    # fisher.pt recomputed after meta-training: φ read other features than it was trained on -> refused
    art = torch.load(out / "fisher.pt", map_location="cpu", weights_only=False)
    art["meta"] = {**art.get("meta", {}), "recomputed": True}
    torch.save(art, out / "fisher.pt")  # another file: the hash recorded in meta.ckpt no longer matches
    before = (out / "results.json").read_bytes()
    with pytest.raises(DynlmError, match=r"another fisher\.pt"):
        evaluation.run(cfg)
    assert (out / "results.json").read_bytes() == before  # nothing already written is touched


def _counting(loss: Callable[[dict[str, float]], float], calls: list[dict[str, float]]) -> Callable:
    def trials(hps: list[dict[str, float]]) -> list[float]:
        calls.extend(hps)
        return [loss(hp) for hp in hps]
    return trials


def test_compass_search_leaves_the_grid_for_a_better_point() -> None:
    """The tuned baseline is not stuck on a grid's edge: a loss with its minimum at lr = 0.05, beyond a grid
    whose largest lr is 0.01, is found to within the last step (3^(1/4) ≈ 1.32x)."""
    calls: list[dict[str, float]] = []
    loss = lambda hp: (math.log(hp["lr"]) - math.log(0.05)) ** 2
    best = compass_search({"lr": 0.01}, _counting(loss, calls), [["lr"]], step=3.0, rounds=3, zero_to={})
    assert abs(math.log(best["lr"] / 0.05)) <= math.log(3.0) / 8 + 1e-9
    assert all(c["lr"] > 0 for c in calls)


def test_compass_search_moves_a_zero_key_off_zero_when_that_helps() -> None:
    """λ = 0 is a starting point the search can leave (to the grid's smallest positive λ, then by steps), and
    keeps when no decay is best: the tuned rms baseline wins a fair contest, not a grid that could not move."""
    def loss(best_lamb: float) -> Callable[[dict[str, float]], float]:
        return lambda hp: (math.log(hp["lr"]) - math.log(2e-4)) ** 2 + (
            (math.log(max(hp["lamb"], 1e-12)) - math.log(best_lamb)) ** 2 if best_lamb else 100 * hp["lamb"])

    calls: list[dict[str, float]] = []
    got = compass_search({"lr": 2e-4, "lamb": 0.0}, _counting(loss(0.008), calls), [["lr", "lamb"]], 2.0, 3,
                         {"lamb": 0.001})
    assert got["lamb"] > 0 and abs(math.log(got["lamb"] / 0.008)) <= math.log(2.0) / 4 + 1e-9
    assert {"lr": 2e-4, "lamb": 0.001} in calls  # the first move off zero: the smallest positive grid value
    no_decay = compass_search({"lr": 2e-4, "lamb": 0.0}, _counting(loss(0.0), []), [["lr", "lamb"]], 2.0, 3,
                              {"lamb": 0.001})
    assert no_decay == {"lr": 2e-4, "lamb": 0.0}


def test_krause_grid_scales_with_the_segment() -> None:
    """dynamiceval.py's --grid: η and λ stated at segment 5, multiplied by M/5."""
    grid = {"rms_lr": [3e-5, 1e-4], "rms_lamb": [0.0, 2e-3]}
    assert krause_grid(grid, 20) == (pytest.approx([1.2e-4, 4e-4]), pytest.approx([0.0, 8e-3]))
    assert krause_grid({**grid, "scale_with_segment": False}, 20) == ([3e-5, 1e-4], [0.0, 2e-3])


def test_eval_streams_reads_every_target_once_with_a_theta_per_stream(evaluated: tuple[DictConfig, dict, Path],
                                                                      tmp_path: Path) -> None:
    """eval.streams=3: the split as 3 contiguous rows, each with its own θ; the static LM reads the same rows."""
    _, res1, out = evaluated
    cfg, run = fresh_run(out, tmp_path, "eval.streams=3", "eval.splits=[test]")
    res = evaluation.run(cfg)
    assert res["protocol"]["streams"] == 3 and res["protocol"]["theta"] == "per stream"
    n = res1["splits"]["test"]["static"]["tokens"]  # N − 1 targets in one stream
    test = res["splits"]["test"]
    assert {m: r["tokens"] for m, r in test.items()} == {m: 3 * (n // 3) for m in test}
    assert np.load(run / "losses-test.npz")["sgd"].size == 3 * (n // 3)
    for m in ("sgd", "rms"):  # adaptation still pays with three independent θ (each reads a third of the text)
        assert test[m]["ppl"] < test["static"]["ppl"]
    assert "3 streams, θ per stream" in (run / "results.md").read_text()


def test_paired_bootstrap_equals_a_direct_computation() -> None:
    """The vectorized bootstrap (draw counts @ per-article sums) against resampling articles one by one with the
    same draws; a constant per-token shift is a ratio with no spread; identical methods are 1 [1, 1]."""
    rng = np.random.default_rng(3)
    a = rng.gamma(2.0, 2.0, size=57)
    b = a + rng.normal(0.0, 0.5, size=57)
    articles = [(0, "a"), (10, "b"), (11, "c"), (30, "d"), (45, "e")]  # spans of 9, 1, 19, 15, 13 losses
    got = report.paired_bootstrap(a, b, articles, resamples=500, seed=7, level=0.9)
    spans = report.article_spans([o for o, _ in articles], a.size)
    draws = np.random.default_rng(7).integers(0, len(spans), size=(500, len(spans)))
    ratios = []
    for row in draws:
        pick = [spans[k] for k in row]
        la = sum(a[s:e].sum() for s, e in pick)
        lb = sum(b[s:e].sum() for s, e in pick)
        n = sum(e - s for s, e in pick)
        ratios.append(math.exp((la - lb) / n))
    assert got["ratio"] == pytest.approx(math.exp((a.sum() - b.sum()) / a.size), rel=1e-12)
    assert (got["lo"], got["hi"]) == pytest.approx(tuple(np.percentile(ratios, [5, 95])), rel=1e-12)
    assert got["lo"] < got["ratio"] < got["hi"] and got["articles"] == 5
    shift = report.paired_bootstrap(a + 0.1, a, articles, resamples=200)
    assert shift["lo"] == pytest.approx(math.exp(0.1)) and shift["hi"] == pytest.approx(math.exp(0.1))
    same = report.paired_bootstrap(a, a, articles, resamples=200)
    assert (same["ratio"], same["lo"], same["hi"]) == (1.0, 1.0, 1.0)


def test_a_half_finished_evaluation_resumes_per_method(evaluated: tuple[DictConfig, dict, Path], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Each finished method's losses are kept under eval/; rerunning the same command after a kill recomputes
    only what is missing (here: rms's test losses), and a changed setting (the segment) recomputes all."""
    import shutil

    from tests.conftest import compose_config

    _, res1, out = evaluated
    cfg = compose_config([*OVERRIDES, "eval.splits=[test]"], tmp_path)
    run = Path(cfg.paths.run_dir)
    shutil.copytree(out, run)
    (run / "eval" / "test-rms.npz").unlink()  # as if killed while rms ran
    (run / "results.json").unlink()
    computed: list[str] = []
    real = evaluation._score_method

    def counting(*a: Any, **k: Any) -> evaluation.Scored:
        computed.append(a[3])
        return real(*a, **k)

    monkeypatch.setattr(evaluation, "_score_method", counting)
    res = evaluation.run(cfg)
    assert computed == ["rms"]
    for m, r in res1["splits"]["test"].items():
        assert res["splits"]["test"][m]["ppl"] == pytest.approx(r["ppl"], rel=1e-12)
    assert res["splits"]["test"]["static"]["reused"] and not res["splits"]["test"]["rms"]["reused"]
    computed.clear()
    evaluation.run(compose_config([*OVERRIDES, "eval.splits=[test]", "eval.segment=4", "meta.segment=4"], tmp_path))
    assert sorted(computed) == ["rms", "rms_pt", "sgd", "static"]


def test_parallel_workers_give_the_same_results(evaluated: tuple[DictConfig, dict, Path], tmp_path: Path) -> None:
    """eval.workers=2: the methods run in forked one-thread processes and give the numbers of one process."""
    _, res1, out = evaluated
    cfg, run = fresh_run(out, tmp_path, "eval.splits=[test]", "eval.workers=2")
    res = evaluation.run(cfg)
    for m, r in res1["splits"]["test"].items():
        assert not res["splits"]["test"][m]["reused"]
        assert res["splits"]["test"][m]["ppl"] == pytest.approx(r["ppl"], rel=1e-5)
    assert sorted(p.name for p in (run / "eval").iterdir()) == [f"test-{m}.npz" for m in
                                                               ("rms", "rms_pt", "sgd", "static")]


def test_a_forked_worker_compiles_after_the_parent_has(tmp_path: Path) -> None:
    """torch.compile in the parent (stage=all: the meta stage's fused gate) leaves a compile thread pool that does not
    exist in a forked worker; `init_worker` makes the worker compile in-process instead of waiting on it forever."""
    import multiprocessing
    import time

    salt = time.time() % 1000  # constants baked into the kernels: nothing comes from the on-disk compile cache
    torch.compile(lambda x: torch.sin(x) * salt)(torch.ones(8))  # the parent's compile pool is live now
    done = tmp_path / "done"

    def job() -> None:
        torch.compile(lambda x: torch.cos(x) + salt)(torch.ones(8))  # another graph: a fresh compile
        done.write_text("ok")

    ctx = multiprocessing.get_context("fork")
    p = ctx.Process(target=evaluation._in_worker, args=(job,))
    p.start()
    p.join(timeout=240)
    alive = p.is_alive()
    if alive:
        p.kill()
    assert not alive and p.exitcode == 0 and done.read_text() == "ok"


def test_a_killed_tuning_keeps_the_methods_it_finished(evaluated: tuple[DictConfig, dict, Path], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """tuned.json is written as each method finishes: tuning killed during rms keeps sgd, and the rerun tunes only
    rms (on WikiText-2 a method's tuning takes a quarter of an hour)."""
    from dynlm_pl.meta import tuning

    cfg, _, out = evaluated
    run = tmp_path / "run"
    run.mkdir()
    for name in ("lm.ckpt", "fisher.pt"):
        (run / name).write_bytes((out / name).read_bytes())
    lm, _ = load_lm(run / "lm.ckpt")
    art = load_fisher(run / "fisher.pt")
    dyn = DynamicWeights.build(lm, fisher_art=art)
    valid = make_datamodule(cfg).load().splits["valid"]
    sha = file_sha256(run / "lm.ckpt")
    real = tuning._trial

    def killed_in_rms(method: str, hp: dict[str, float]) -> tuple[float, float]:
        if method == "rms":
            raise KeyboardInterrupt
        return real(method, hp)

    monkeypatch.setattr(tuning, "_trial", killed_in_rms)
    with pytest.raises(KeyboardInterrupt):
        runtime.tuned_baselines(cfg, run, lm, valid, dyn, sha, ["sgd", "rms"])
    assert set(json.loads((run / "tuned.json").read_text())["best"]) == {"sgd"}
    tuned: list[str] = []
    monkeypatch.setattr(tuning, "_trial", lambda m, hp: (tuned.append(m), real(m, hp))[1])
    best = runtime.tuned_baselines(cfg, run, lm, valid, dyn, sha, ["sgd", "rms"])
    assert set(tuned) == {"rms"} and set(best) == {"sgd", "rms"}
