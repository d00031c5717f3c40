"""Stage `lm` end to end through Hydra: learning, checkpoints, NT-ASGD, resume, entry-point errors."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import REPO_ROOT, compose_config
from omegaconf import DictConfig
from torch import Tensor

from dynlm_pl.artifacts import load_lm
from dynlm_pl.cli import main_guard
from dynlm_pl.errors import DynlmError, Stopped
from dynlm_pl.meta.scoring import static_eval
from dynlm_pl.models.awd_lstm import AWDLSTM
from dynlm_pl.pipeline import run_stages
from dynlm_pl.runtime import make_datamodule, primitives
from dynlm_pl.stages import lm as lm_mod
from dynlm_pl.systems import lm as lm_system
from dynlm_pl.systems.lm import LMPretrainModule

# Fewer, shorter articles than the smoke preset: a full epoch and a full validation in about a second.
SMALL_DATA = ["experiment=smoke", "data.synthetic.articles={train: 40, valid: 6, test: 6}",
              "trainer.enable_progress_bar=false"]


class Recorded:
    """Makes `dynlm_pl.stages.lm.run` build a recording subclass, so tests can inspect the module."""

    def __init__(self, mp: pytest.MonkeyPatch) -> None:
        self.modules: list[LMPretrainModule] = []
        self.train_steps = 0
        self.tokens = 0  # target tokens of the training steps run
        self.avg_snapshots: list[dict[str, Tensor]] = []  # the iterates NT-ASGD should be averaging
        rec = self

        class Module(LMPretrainModule):
            def __init__(self, *a: Any, **k: Any) -> None:
                super().__init__(*a, **k)
                rec.modules.append(self)

            def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
                out = super().training_step(batch, batch_idx)
                rec.train_steps += 1
                rec.tokens += batch[1].numel()
                if self.averaging:
                    rec.avg_snapshots.append(_snapshot(self.model))
                return out

            def on_validation_epoch_end(self) -> None:
                was = self.averaging
                super().on_validation_epoch_end()
                if self.averaging and not was:  # the trigger folds the current iterate in first
                    rec.avg_snapshots.append(_snapshot(self.model))

        mp.setattr(lm_mod, "LMPretrainModule", Module)

    @property
    def module(self) -> LMPretrainModule:
        return self.modules[0]


def _snapshot(model: torch.nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def valid_loss(model: AWDLSTM, cfg: DictConfig, tokens: Tensor) -> float:
    loss, n = static_eval(model, tokens, cfg.data.eval_batch_size, cfg.data.bptt)
    return loss / n


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DictConfig, dict, Recorded]]:
    """One epoch of `experiment=smoke` (shared by the tests that only read its results)."""
    root = tmp_path_factory.mktemp("smoke")
    cfg = compose_config([*SMALL_DATA, "lm.trainer.max_epochs=1"], root)
    with pytest.MonkeyPatch.context() as mp:
        rec = Recorded(mp)
        metrics = lm_mod.run(cfg)
        yield cfg, metrics, rec


def test_loss_falls_on_synthetic(smoke_run: tuple[DictConfig, dict, Recorded]) -> None:
    cfg, _, rec = smoke_run
    corpus = make_datamodule(cfg).load()
    torch.manual_seed(cfg.seed)
    init = AWDLSTM(len(corpus.vocab), **primitives(cfg.model))
    before = valid_loss(init, cfg, corpus.splits["valid"])
    assert abs(before - math.log(len(corpus.vocab))) < 0.5, "a fresh model should be near uniform"
    trained, _ = load_lm(Path(cfg.paths.run_dir) / "lm.ckpt")
    after = valid_loss(trained, cfg, corpus.splits["valid"])
    assert after < before - 1.0, f"validation loss only went {before:.3f} -> {after:.3f}"
    assert rec.train_steps > 10


def test_reloaded_checkpoint_same_val_loss(smoke_run: tuple[DictConfig, dict, Recorded]) -> None:
    cfg, metrics, rec = smoke_run
    corpus = make_datamodule(cfg).load()
    lm_ckpt = Path(cfg.paths.run_dir) / "lm.ckpt"
    assert lm_ckpt.is_file() and (Path(cfg.paths.run_dir) / "checkpoints" / "last.ckpt").is_file()
    own = valid_loss(rec.module.eval_model(), cfg, corpus.splits["valid"])
    reloaded, hp = load_lm(lm_ckpt)
    assert not reloaded.training
    assert valid_loss(reloaded, cfg, corpus.splits["valid"]) == pytest.approx(own, rel=1e-6)
    # static_eval reads the split like Lightning's validation loop (same streams, windows, carried
    # state), so it reproduces the val/ppl that picked the checkpoint.
    assert math.exp(own) == pytest.approx(metrics["val_ppl"], rel=1e-4)
    assert hp["vocab_hash"] == corpus.vocab_hash and hp["data_source"] == corpus.source
    # The budget the LM was trained with travels in lm.ckpt: the tokens read up to the exported checkpoint.
    best = torch.load(Path(cfg.paths.run_dir) / "checkpoints" / "lm-best.ckpt", map_location="cpu",
                      weights_only=False)
    assert 0 < hp["tokens_seen"] == best["tokens_seen"] <= rec.tokens == metrics["tokens_seen"]


def test_nt_asgd_triggers_and_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Validation losses are steered (worse, worse, then much better) so the trigger fires at a known
    check; the best checkpoint then holds averaged weights that validation and export must use."""
    offsets = [0.0, 0.5, 1.0, -5.0, -5.0, -5.0]
    rec = Recorded(monkeypatch)
    real_loss = lm_system.lm_loss

    def steered(logits: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
        loss = real_loss(logits, targets, reduction)
        if torch.is_grad_enabled():  # training: untouched
            return loss
        return loss + offsets[len(rec.module.val_history)]

    monkeypatch.setattr(lm_system, "lm_loss", steered)
    cfg = compose_config([*SMALL_DATA, "lm.optim.optimizer=sgd", "lm.optim.lr=2.0", "lm.optim.nonmono=1",
                          "lm.trainer.max_epochs=1", "trainer.limit_train_batches=8",
                          "trainer.val_check_interval=2"], tmp_path)
    metrics = lm_mod.run(cfg)
    module = rec.module
    # Checks after steps 2, 4, 6, 8; the third (step 6) is worse than the first -> averaging from there.
    assert len(module.val_history) == 4
    assert module.averaging and module.eval_model() is module.swa.module
    assert int(module.swa.n_averaged) == 3 == len(rec.avg_snapshots)  # iterates of steps 6, 7, 8
    for name, p in module.swa.module.named_parameters():
        mean = torch.stack([s[name] for s in rec.avg_snapshots]).mean(0)
        torch.testing.assert_close(p.detach(), mean, rtol=1e-5, atol=1e-6)

    # The exported θ* is the average (best checkpoint = the last check, after averaging began).
    ckpt = torch.load(Path(cfg.paths.run_dir) / "checkpoints" / "lm-best.ckpt", map_location="cpu", weights_only=False)
    sd = ckpt["state_dict"]
    assert int(sd["swa.n_averaged"]) == 3
    exported, _ = load_lm(Path(cfg.paths.run_dir) / "lm.ckpt")
    # lm.ckpt files of earlier versions were this Lightning checkpoint itself: they load as the same θ*
    legacy, prov = load_lm(Path(cfg.paths.run_dir) / "checkpoints" / "lm-best.ckpt")
    assert prov["vocab_hash"] == ckpt["hyper_parameters"]["vocab_hash"]
    for name, p in exported.named_parameters():
        assert torch.equal(p, sd[f"swa.module.{name}"]), name
        assert torch.equal(p, dict(legacy.named_parameters())[name]), name
    assert not torch.equal(sd["swa.module.encoder.weight"], sd["model.encoder.weight"])

    # Validation used the average: its val/ppl is the averaged model's loss (+ the steering offset),
    # and measurably not the raw iterate's.
    corpus = make_datamodule(cfg).load()
    monkeypatch.setattr(lm_system, "lm_loss", real_loss)
    avg = valid_loss(exported, cfg, corpus.splits["valid"])
    assert math.exp(avg + offsets[3]) == pytest.approx(metrics["val_ppl"], rel=1e-4)
    raw = AWDLSTM(len(corpus.vocab), **primitives(cfg.model))
    raw.load_state_dict({k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")})
    assert abs(valid_loss(raw, cfg, corpus.splits["valid"]) - avg) > 1e-4


def test_no_averaging_with_adam_or_asgd_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rec = Recorded(monkeypatch)
    monkeypatch.setattr(lm_system, "lm_loss", lambda logits, targets, reduction="mean": (
        torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                                          reduction=reduction)
        + (0.0 if torch.is_grad_enabled() else 0.5 * len(rec.module.val_history))))  # always worse
    cfg = compose_config([*SMALL_DATA, "lm.optim.optimizer=sgd", "lm.optim.asgd=false", "lm.optim.nonmono=1",
                          "lm.trainer.max_epochs=1", "trainer.limit_train_batches=8",
                          "trainer.val_check_interval=2"], tmp_path)
    lm_mod.run(cfg)
    assert len(rec.module.val_history) == 4 and not rec.module.averaging


def test_resume_continues_from_last_ckpt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    quick = [*SMALL_DATA, "trainer.limit_train_batches=3", "trainer.limit_val_batches=2"]
    first = Recorded(monkeypatch)
    lm_mod.run(compose_config([*quick, "lm.trainer.max_epochs=1"], tmp_path))
    assert first.train_steps == 3
    last = tmp_path / "smoke" / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 3

    second = Recorded(monkeypatch)
    lm_mod.run(compose_config([*quick, "lm.trainer.max_epochs=2", "resume=true"], tmp_path))
    # Only the second epoch ran; a fresh start would have run 6 steps from scratch.
    assert second.train_steps == 3
    state = torch.load(last, map_location="cpu", weights_only=False)
    assert state["global_step"] == 6 and state["epoch"] == 1
    assert len(second.module.val_history) == 2, "the NT-ASGD history is restored on resume"
    assert state["tokens_seen"] == first.tokens + second.tokens, "the token count continues across a resume"


def test_max_time_is_a_safety_net_that_warns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rec = Recorded(monkeypatch)
    cfg = compose_config([*SMALL_DATA, "lm.trainer.max_epochs=3", '+lm.trainer.max_time="00:00:00:00"'], tmp_path)
    # The clock stops it after one step, before any validation: a warning naming the budget, then the one-line error.
    with pytest.warns(UserWarning, match=r"max_time stopped pretraining after 0 of 3 epochs \(\d[\d,]* tokens\)"), \
            pytest.raises(DynlmError, match="ended without a checkpoint"):
        lm_mod.run(cfg)
    assert rec.train_steps <= 1
    # An epoch budget that is reached says nothing.
    cfg = compose_config([*SMALL_DATA, "lm.trainer.max_epochs=1", "trainer.limit_train_batches=2"], tmp_path / "b")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*max_time")
        lm_mod.run(cfg)


def test_bad_batch_size_in_process_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = compose_config(["experiment=smoke", "data.batch_size=0"], tmp_path)
    with pytest.raises(SystemExit) as e:
        main_guard(lambda: run_stages(cfg))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: data.batch_size must be a positive integer, got 0"]


def test_unknown_optimizer_is_dynlm_error(tmp_path: Path) -> None:
    cfg = compose_config(["experiment=smoke", "lm.optim.optimizer=rmsprop"], tmp_path)
    with pytest.raises(DynlmError, match="rmsprop"):
        lm_mod.run(cfg)


# ----------------------------------------------------------------------------------------------------
# the entry points as a user runs them
# ----------------------------------------------------------------------------------------------------


def run_cli(script: str, *overrides: str, root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
    env.pop("DYNLM_RUNS", None)
    return subprocess.run([sys.executable, script, f"paths.root={root}", "logger=none", *overrides],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)


def error_lines(p: subprocess.CompletedProcess) -> list[str]:
    assert "Traceback" not in p.stderr, p.stderr
    return [line for line in p.stderr.splitlines() if line.startswith("error:")]


def test_evaluate_without_lm_ckpt_exits_2(tmp_path: Path) -> None:
    p = run_cli("evaluate.py", "experiment=smoke", root=tmp_path)
    assert p.returncode == 2, p.stderr
    (line,) = error_lines(p)
    assert "lm.ckpt" in line and "stage=lm" in line


@pytest.mark.parametrize("script", ["train.py", "evaluate.py"])
def test_help_explains_the_stages_not_a_config_dump(script: str, tmp_path: Path) -> None:
    p = run_cli(script, "--help", root=tmp_path)
    assert p.returncode == 0, p.stderr
    for line in ("lm      pretrain the LM", "runs/<name>/", "gate: krause_drift, krause_fast", "--cfg job"):
        assert line in p.stdout, p.stdout
    assert "seed: 1111" not in p.stdout and len(p.stdout.splitlines()) < 60  # no 200-line dump of every key


def test_a_sweep_writes_its_summary_best_first(tmp_path: Path) -> None:
    """`python train.py -m ...`: each job returns its validation perplexity (what a sweeper plugin minimises), and
    the sweep directory gets summary.json / summary.md listing every job, best first."""
    p = subprocess.run([sys.executable, "train.py", "-m", f"paths.root={tmp_path}", "logger=none", "experiment=smoke",
                        "stage=lm", "debug=fast", "data.bptt=8,12", "data.synthetic.articles={train: 6, valid: 2, "
                        "test: 2}"], cwd=REPO_ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    (sweep,) = (tmp_path / "multirun").iterdir()
    jobs = json.loads((sweep / "summary.json").read_text())
    assert sorted(j["job"] for j in jobs) == [0, 1] and all(j["status"] == "COMPLETED" for j in jobs)
    assert jobs[0]["objective"] <= jobs[1]["objective"] and all(math.isfinite(j["objective"]) for j in jobs)
    assert {j["run_dir"].rsplit("/", 1)[-1].split("_")[0] for j in jobs} == {"data.bptt-8", "data.bptt-12"}
    assert (sweep / "summary.md").read_text().startswith("| job | overrides | status | val ppl | run directory |")
    assert "[sweep] 2 jobs; best " in p.stdout


def test_unknown_override_fails(tmp_path: Path) -> None:
    p = run_cli("train.py", "experiment=smoke", "data.no_such_key=1", root=tmp_path)
    assert p.returncode != 0
    assert "no_such_key" in p.stderr
    p = run_cli("train.py", "model=no_such_model", root=tmp_path)
    assert p.returncode != 0 and "no_such_model" in p.stderr
    assert not (tmp_path / "smoke" / "lm.ckpt").exists()


def test_negative_bptt_exits_2_with_one_line(tmp_path: Path) -> None:
    p = run_cli("train.py", "experiment=smoke", "stage=lm", "data.bptt=-3", root=tmp_path)
    assert p.returncode == 2, p.stderr
    assert error_lines(p) == ["error: data.bptt must be a positive integer, got -3"]


def test_sigterm_right_before_a_validation_stops_after_it_and_resumes_exactly(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM during the last step of an epoch, right before its validation: a checkpoint there would make the
    resumed run skip that validation, so the stop is held until the validation has run and last.ckpt is written
    after it; the resumed run then ends exactly where an uninterrupted one does."""
    quick = [*SMALL_DATA, "trainer.limit_val_batches=2", "lm.trainer.max_epochs=2"]
    ref = lm_mod.run(compose_config(quick, tmp_path / "ref"))

    class SignalledBeforeValidation(LMPretrainModule):
        def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
            out = super().training_step(batch, batch_idx)
            if self.current_epoch == 0 and batch_idx == self.trainer.num_training_batches - 1:
                self.trainer._signal_connector.received_sigterm = True  # what Lightning's SIGTERM handler sets
            return out

    monkeypatch.setattr(lm_mod, "LMPretrainModule", SignalledBeforeValidation)
    cfg = compose_config(quick, tmp_path / "cut")
    with pytest.raises(Stopped, match=r"pretraining stopped by a signal after writing .*last\.ckpt; rerun the same "
                                      r"command with resume=true"):
        lm_mod.run(cfg)
    last = torch.load(Path(cfg.paths.run_dir) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert len(last["val_history"]) == 1, "the validation the signal preceded ran before the stop"
    monkeypatch.setattr(lm_mod, "LMPretrainModule", LMPretrainModule)
    res = lm_mod.run(compose_config([*quick, "resume=true"], tmp_path / "cut"))
    assert res["val_ppl"] == ref["val_ppl"] and res["tokens_seen"] == ref["tokens_seen"]
    a, b = (torch.load(Path(r) / "smoke" / "lm.ckpt", map_location="cpu", weights_only=False)["state_dict"]
            for r in (tmp_path / "ref", tmp_path / "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)
