"""Every shipped preset composes, and those that can run on this CPU train a few steps of stage=lm.

Presets are discovered from conf/ so a new yaml file is tested without editing this file.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import hydra
import pytest
import torch
from conftest import CONF_DIR, compose_config
from omegaconf import DictConfig, OmegaConf

from dynlm_pl.runtime import make_loggers
from dynlm_pl.stages import lm as lm_mod


def presets(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


GROUPS = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and any(p.glob("*.yaml")))
ALL_PRESETS = [(g, name) for g in GROUPS for name in presets(g)]
# Small runs: a few windows of a few tokens, a tiny synthetic corpus unless WikiText-2 is the point.
TINY = ["debug=fast", "data.batch_size=2", "data.eval_batch_size=2", "data.bptt=8"]
TINY_SYNTHETIC = [*TINY, "data.synthetic.articles={train: 6, valid: 2, test: 2}",
                  "data.synthetic.article_len=120"]


def test_groups_discovered() -> None:
    # Guard against a silently empty parametrization (e.g. conf/ moved).
    assert {"experiment", "model", "data", "trainer", "logger", "debug", "stage", "gate"} <= set(GROUPS)
    assert {"smoke", "cpu", "paper"} <= set(presets("experiment"))


def _resolve_all(cfg: DictConfig) -> None:
    """Resolve every interpolation outside Hydra's own node (typos in ${...} fail here)."""
    for key in cfg:
        if key != "hydra":
            node = cfg[key]
            if OmegaConf.is_config(node):
                OmegaConf.to_container(node, resolve=True)


def _check_target(node: DictConfig) -> None:
    """`_target_` names an importable callable (instantiation itself may need a GPU or a package)."""
    if OmegaConf.is_dict(node) and "_target_" in node:
        assert callable(hydra.utils.get_object(node._target_)), node._target_


@pytest.mark.parametrize(("group", "name"), ALL_PRESETS, ids=[f"{g}={n}" for g, n in ALL_PRESETS])
def test_preset_composes(group: str, name: str, compose_cfg) -> None:
    cfg = compose_cfg([f"{group}={name}"])
    _resolve_all(cfg)
    assert Path(cfg.paths.run_dir).parent == Path(cfg.paths.root)
    for node in (cfg.data, cfg.model, cfg.trainer):
        _check_target(node)
    for node in (cfg.get("logger") or {}).values():
        _check_target(node)
    if group == "experiment":
        assert cfg.name == name, "each experiment needs its own run directory (runs/<name>/)"
    if group == "stage":
        assert cfg.stage == name


def _run_lm(cfg: DictConfig) -> dict:
    metrics = lm_mod.run(cfg)
    assert (Path(cfg.paths.run_dir) / "lm.ckpt").is_file()
    assert math.isfinite(metrics["val_ppl"])
    return metrics


@pytest.mark.slow
@pytest.mark.parametrize("model", presets("model"))
def test_model_preset_trains(model: str, compose_cfg) -> None:
    """Each model preset (awd_lstm at full width) trains a few steps on the synthetic corpus."""
    cfg = compose_cfg(["experiment=smoke", f"model={model}", *TINY_SYNTHETIC])
    _run_lm(cfg)


def _cpu_trainer(name: str, tmp_path: Path) -> bool:
    cfg = compose_config([f"trainer={name}"], tmp_path)
    return cfg.trainer.accelerator in ("cpu", "auto") or torch.cuda.is_available()  # auto: the CPU here


@pytest.mark.slow
@pytest.mark.parametrize("trainer", presets("trainer"))
def test_trainer_preset_trains(trainer: str, compose_cfg, tmp_path: Path) -> None:
    if not _cpu_trainer(trainer, tmp_path):
        pytest.skip(f"trainer={trainer} needs a GPU (composes: see test_preset_composes)")
    cfg = compose_cfg(["experiment=smoke", f"trainer={trainer}", *TINY_SYNTHETIC])
    _run_lm(cfg)


@pytest.mark.slow
@pytest.mark.parametrize("logger", presets("logger"))
def test_logger_preset_trains(logger: str, compose_cfg, tmp_path: Path) -> None:
    if logger == "tensorboard":
        pytest.importorskip("tensorboard", reason="logger=tensorboard needs `pip install tensorboard`")
    cfg = compose_cfg(["experiment=smoke", f"logger={logger}", *TINY_SYNTHETIC])
    loggers = make_loggers(cfg)
    assert len(loggers) == len([k for k in (cfg.get("logger") or {})])
    _run_lm(cfg)
    if "csv" in (cfg.get("logger") or {}):
        assert list((tmp_path / "smoke" / "logs").rglob("metrics.csv")), "the CSV logger wrote no metrics"


def test_command_line_trainer_settings_win_over_a_stages_own(compose_cfg, caplog: pytest.LogCaptureFixture) -> None:
    """`trainer.max_epochs=1` on the command line beats `lm.trainer.max_epochs` (experiment=smoke: 3); what a stage's
    code sets (the meta stage's max_steps from meta.steps) stays, with a note. A sweeper minimises the last stage's
    validation perplexity, never a test figure."""
    from dynlm_pl.pipeline import objective
    from dynlm_pl.runtime import make_trainer

    cfg = compose_cfg(["experiment=smoke", "trainer.max_epochs=1", "trainer.max_steps=2"])
    caplog.set_level(logging.INFO)
    assert make_trainer(cfg, cfg.lm.trainer).max_epochs == 1
    assert make_trainer(cfg, None, stage="meta", max_steps=40).max_steps == 40
    labels = {"test": "Fisher pass (batch_ms)", "validation": "φ on the selection slice"}
    bars = [c for c in make_trainer(cfg, bar=labels).callbacks if hasattr(c, "test_description")]
    assert [(b.test_description, b.validation_description) for b in bars] == [tuple(labels.values())]
    note = "[meta] trainer.max_steps=2 does not apply here: this stage sets max_steps=40 itself"
    assert any(m.startswith(note) for m in caplog.messages), caplog.messages
    cfg = compose_cfg(["experiment=smoke"])
    assert make_trainer(cfg, cfg.lm.trainer).max_epochs == 3 and make_trainer(cfg, None, max_steps=40).max_steps == 40
    assert objective({"lm": {"val_ppl": 120.0}, "fisher": {}, "meta": {"val_ppl": 90.0}, "evaluate": {}}) == 90.0
    assert objective({"evaluate": {"splits": {}}}) is None


def test_a_sweep_job_without_its_lm_is_told_to_start_from_the_run_above(tmp_path: Path) -> None:
    """`-m stage=meta unroll=2,3` after `stage=lm`: each job reads runs/<name>/<overrides>/, which has no lm.ckpt;
    the error names the fix (from_run=<name>) instead of telling the user to pretrain again."""
    from dynlm_pl.artifacts import load_lm
    from dynlm_pl.errors import DynlmError

    (tmp_path / "smoke" / "unroll-2").mkdir(parents=True)
    with pytest.raises(DynlmError, match=r"run `python train\.py stage=lm`"):
        load_lm(tmp_path / "smoke" / "unroll-2" / "lm.ckpt")
    (tmp_path / "smoke" / "lm.ckpt").write_bytes(b"")
    with pytest.raises(DynlmError, match=r"add from_run=smoke to start from .*smoke/lm.ckpt$"):
        load_lm(tmp_path / "smoke" / "unroll-2" / "lm.ckpt")


def test_sweep_job_directories_have_names_a_command_line_can_carry() -> None:
    """A job's directory is named by its overrides with no `=`, comma, bracket or quote, so that one job is addressed
    as `name=smoke/<job>` unquoted (Hydra's parser takes it as one plain string)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from dynlm_pl.resolvers import job_dirname

    job = job_dirname(["unroll=10", "gate.hidden=[8,8]", "+meta.note='a b'", "from_run=smoke", "meta.optim.lr=1e-3"],
                      exclude=["from_run"])
    assert job == "gate.hidden-8-8_meta.note-ab_meta.optim.lr-1e-3_unroll-10"
    assert OverridesParser.create().parse_override(f"name=smoke/{job}").value() == f"smoke/{job}"


@pytest.mark.slow
def test_wandb_opens_one_run_per_stage_and_job(compose_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """logger=wandb (offline): `stage=all` gives each stage its own finished W&B run (job_type the stage, grouped by
    experiment, the whole resolved config, the user's tags kept); a sweep's jobs are named by their overrides and
    grouped by the sweep."""
    from dynlm_pl import runtime
    from dynlm_pl.pipeline import run_stages
    from tests.conftest import read_wandb_runs

    cfg = compose_cfg(["experiment=smoke", "logger=wandb", "stage=all", "pipeline=[lm,fisher]", "fisher.tokens=200",
                       "logger.wandb.tags=[mine]", *TINY_SYNTHETIC])
    run_stages(cfg)
    runs = read_wandb_runs(tmp_path / "smoke")
    assert [r["run"]["job_type"] for r in runs] == ["lm", "fisher"]
    assert [r["run"]["name"] for r in runs] == ["smoke-lm", "smoke-fisher"]
    assert all(r["exited"] and r["run"]["group"] == "smoke" for r in runs)
    assert all({"mine", "smoke", "gate=krause", "data=synthetic"} <= set(r["run"]["tags"]) for r in runs)
    conf = runs[0]["run"]["config"]
    assert conf["seed"] == 1111 and conf["meta.optim.lr"] == cfg.meta.optim.lr and conf["data.bptt"] == 8
    assert "train/ppl" in runs[0]["keys"] and not any(k.startswith("train/") for k in runs[1]["keys"])
    assert {"fisher/tensors", "fisher/log10_F/encoder.weight"} <= runs[1]["keys"]  # the Fisher's statistics
    monkeypatch.setattr(runtime, "sweep_job", lambda: ("2026-12-04_15-00-00", "unroll-2"))
    w = runtime.wandb_settings(cfg, "meta")
    assert (w["group"], w["name"], w["job_type"]) == ("smoke-sweep-2026-12-04_15-00-00", "smoke-meta-unroll-2", "meta")


@pytest.mark.slow
@pytest.mark.parametrize("experiment", presets("experiment"))
def test_experiment_preset_trains(experiment: str, compose_cfg, tmp_path: Path, request) -> None:
    cfg = compose_cfg([f"experiment={experiment}"])
    overrides = [f"experiment={experiment}", *TINY]
    if cfg.data.source == "wikitext2":
        root = request.getfixturevalue("wikitext_root")  # skips with a reason when absent
        overrides += [f"data.root={root}", "data.download=false"]
    else:
        overrides += TINY_SYNTHETIC[len(TINY):]
    if not _cpu_trainer(cfg.hydra.runtime.choices.trainer, tmp_path):
        overrides.append("trainer=default")  # the paper's GPU trainer, checked for composition only
    if cfg.get("from_run"):  # starts from another experiment's run (cpu_scale: cpu's): its settings train an LM here
        overrides += ["from_run=null", "trainer=default"]  # (trainer=ddp_cpu trains in test_trainer_preset_trains)
    cfg = compose_cfg(overrides)
    metrics = _run_lm(cfg)
    assert Path(cfg.paths.run_dir).name == experiment
    if cfg.data.source == "wikitext2":  # the real data at full vocabulary went through the model
        ckpt = torch.load(Path(cfg.paths.run_dir) / "lm.ckpt", map_location="cpu", weights_only=False)
        assert ckpt["vocab_size"] == 33_278
        assert metrics["val_ppl"] > 100


@pytest.mark.parametrize("stage", [s for s in presets("stage") if s != "lm"])
def test_other_stage_presets_name_a_known_stage(stage: str, compose_cfg) -> None:
    from dynlm_pl.pipeline import PIPELINE, STAGES

    cfg = compose_cfg([f"stage={stage}"])
    assert cfg.stage == "all" or cfg.stage in STAGES
    assert set(PIPELINE) <= set(STAGES)


@pytest.mark.parametrize("experiment", [None, *presets("experiment")])
def test_every_pipeline_names_known_stages(experiment: str | None, compose_cfg) -> None:
    from dynlm_pl.pipeline import stage_config, stage_fn

    cfg = compose_cfg(["stage=all"] + ([f"experiment={experiment}"] if experiment else []))
    assert list(cfg.pipeline)[-1] == "evaluate"
    for name in cfg.pipeline:
        assert callable(stage_fn(name))
        c = stage_config(cfg, name)
        assert c.gate.flush is (name != "meta_noflush")
    assert cfg.gate.flush is True  # the variant changed a copy


@pytest.mark.parametrize("experiment", presets("experiment"))
def test_debug_fast_limits_every_experiment(experiment: str, compose_cfg) -> None:
    """debug=fast must win over an experiment's own stage-lm trainer settings (lm.trainer is merged
    over trainer), or e.g. experiment=cpu validated 100 batches after every training batch."""
    cfg = compose_cfg([f"experiment={experiment}", "debug=fast"])
    # not struct: lm.trainer carries our own ckpt_every_n_steps key
    eff = OmegaConf.merge(OmegaConf.to_container(cfg.trainer), cfg.lm.get("trainer") or {})
    assert eff.max_epochs == 1
    assert eff.limit_train_batches <= 3 and eff.limit_val_batches <= 2
    assert eff.val_check_interval in (None, 1.0)


@pytest.mark.parametrize("gate", presets("gate"))
def test_gate_preset_updates(gate: str, compose_cfg) -> None:
    """Each gate preset builds a meta-learner whose update (eager and compiled) runs on a tiny LM with fisher.pt's
    statistics, stays finite and moves θ; the residual forms start exactly at Krause's RMS rule."""
    from test_meta import eager_and_compiled_updates, fake_fisher, tiny_lm

    from dynlm_pl.meta.learner import build_meta_learner
    from dynlm_pl.meta.rules import RMSRule
    from dynlm_pl.meta.weights import DynamicWeights
    from dynlm_pl.stages.meta import gate_config

    g = gate_config(compose_cfg([f"gate={gate}"]), has_fisher=True)
    if g.get("lr") is None:  # gate=paper: the meta stage starts it at the tuned sgd step (tests/test_meta.py)
        g["lr"] = 0.5
    model = tiny_lm(30)
    dyn = DynamicWeights.build(model, fisher_art=fake_fisher(model))
    meta = build_meta_learner(g, len(dyn.spec.names), n_coords=dyn.spec.numel)
    theta = dyn.theta0 + 1e-3 * torch.randn_like(dyn.theta0)
    grad, loss = 1e-2 * torch.randn_like(theta), torch.tensor(4.0)
    outs = eager_and_compiled_updates(meta, dyn, theta, grad, loss)
    assert all(bool(torch.isfinite(o).all()) and not torch.equal(o, theta) for o in outs)
    assert torch.allclose(outs[0], outs[1], atol=1e-6, rtol=1e-5)
    if g["param"] != "paper":
        krause = RMSRule(dyn, g["lr"], g["lamb"], g["eps"]).update(theta, grad, loss)
        assert torch.allclose(outs[0], krause, atol=1e-7, rtol=1e-5)


def test_optuna_search_space_names_real_keys(compose_cfg) -> None:
    """hparams_search=meta_optuna: Optuna is the sweeper, minimising what train.py returns, and every key it samples
    exists in the composed config (a renamed key would otherwise fail only in the middle of a study)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    cfg = compose_cfg(["hparams_search=meta_optuna", "experiment=smoke", "stage=meta"])
    sw = cfg.hydra.sweeper
    assert sw._target_.endswith("OptunaSweeper") and sw.direction == "minimize" and cfg.hydra.mode.name == "MULTIRUN"
    parser = OverridesParser.create()
    for key, space in sw.params.items():
        assert OmegaConf.select(cfg, key) is not None, key
        assert parser.parse_override(f"{key}={space}").is_sweep_override(), space
