"""Stage `meta`: meta-train φ (`python train.py stage=meta unroll=40`) and write `meta.ckpt`.

With a gate that starts at Krause's rule (gate=krause_init / krause_fast) the baselines are tuned first (the
tuned.json evaluate.py reuses) and φ starts exactly at the best of the tuned sgd, rms and (meta.tune_rms_pt) rms_pt
rules. φ at
initialization is a candidate too: meta.ckpt is the best φ by adaptive loss on the selection slice, never worse
there than where it started.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from dynlm_pl import artifacts
from dynlm_pl.config import check_config
from dynlm_pl.data import MetaCut, WikiText2DataModule
from dynlm_pl.errors import require
from dynlm_pl.files import atomic_copy, file_sha256
from dynlm_pl.fisher import FisherArtifact
from dynlm_pl.meta.learner import KRAUSE_FORMS
from dynlm_pl.meta.rules import build_rule, group_values
from dynlm_pl.meta.scoring import adaptive_eval
from dynlm_pl.meta.unroll import group_size
from dynlm_pl.meta.weights import DynamicWeights
from dynlm_pl.models import Backbone
from dynlm_pl.resume import check_resumable
from dynlm_pl.runtime import best_model_score, fit, make_datamodule, make_trainer, run_dir, tuned_baselines
from dynlm_pl.systems.meta import MetaTrainModule

log = logging.getLogger(__name__)


def gate_config(cfg: DictConfig, has_fisher: bool) -> dict[str, Any]:
    """cfg.gate as a dict; features needing fisher.pt are dropped (with a note) when it is absent."""
    gate = OmegaConf.to_container(cfg.gate, resolve=True)
    if gate.get("param") in KRAUSE_FORMS:
        require(has_fisher, "gate=krause_init/krause_fast start from Krause's RMS rule, which needs his gradient "
                "statistics from fisher.pt: run `python train.py stage=fisher` first (or use gate=paper)")
    if not has_fisher:
        drop = [f for f in gate.get("features", []) if f in ("fisher", "rms")]
        if drop:
            log.warning(f"[meta] no fisher.pt in the run directory: meta-learner features {drop} disabled "
                        "(run `python train.py stage=fisher` to use them)")
            gate["features"] = [f for f in gate["features"] if f not in drop]
    return gate


def start_from_tuned(gate: dict[str, Any], tuned: dict[str, Any]) -> str:
    """Set the residual gate's starting rule to whichever tuned best on the selection slice: plain SGD (a = −η, no
    decay), Krause's RMS rule, or rms_pt (his rule with η and λ per group of tensors) when it was tuned. Returns
    the method."""
    best = min((m for m in ("sgd", "rms", "rms_pt") if m in tuned), key=lambda m: float(tuned[m]["tune_loss"]))
    hp = tuned[best]["hparams"]
    if best == "sgd":
        gate.update(lr=hp["lr"], lamb=0.0, rms_scale=False)
    elif best == "rms":
        gate.update(**hp, rms_scale=True)
    else:
        gate.update(lr=group_values(hp, "lr"), lamb=group_values(hp, "lamb"), eps=hp["eps"], rms_scale=True)
    log.info(f"[meta] gate param={gate['param']} starts from the tuned {best} rule {hp} (the best of "
             f"{', '.join(m for m in ('sgd', 'rms', 'rms_pt') if m in tuned)} on the selection slice)")
    return best


def baselines(lm: Backbone, dyn: DynamicWeights, tokens: Tensor, cfg: DictConfig,
              tuned: dict[str, Any] | None = None) -> dict[str, float]:
    """Validation-slice loss of static, SGD and (with ms) Krause's RMS rule: what φ must beat. The tuned
    hyperparameters (tuned.json) when there are, else meta.baseline's."""
    b = cfg.meta.baseline
    tuned = tuned or {}
    hps = {"static": {}, "sgd": tuned["sgd"]["hparams"] if "sgd" in tuned else {"lr": b.sgd_lr},
           "rms": tuned["rms"]["hparams"] if "rms" in tuned else {"lr": b.rms_lr, "lamb": b.rms_lamb,
                                                                   "eps": b.rms_eps}}
    if "rms_pt" in tuned:
        hps["rms_pt"] = tuned["rms_pt"]["hparams"]
    methods = ["static", "sgd"] + (["rms"] if dyn.ms is not None else []) + (["rms_pt"] if "rms_pt" in hps else [])
    # the tuned rules' losses on the whole selection slice at eval.segment are in tuned.json already
    same = tokens.numel() == int(cfg.eval.tune.tokens) and int(cfg.meta.segment) == int(cfg.eval.segment)
    bar = bool(cfg.trainer.get("enable_progress_bar", True))
    return {k: float(tuned[k]["tune_loss"]) if same and k in tuned else
            float(adaptive_eval(lm, tokens, build_rule(k, hps[k], dyn), int(cfg.meta.segment), dyn,
                                max_drift=cfg.eval.get("max_drift"), progress=bar and f"{k} (selection slice)").mean())
            for k in methods}


def _ppl(loss: float) -> float:
    return math.exp(min(loss, 50.0))  # a diverged rule prints e^50, not an OverflowError


def _inputs(cfg: DictConfig, out: Path) -> tuple[Backbone, WikiText2DataModule, str, FisherArtifact | None]:
    """The frozen LM, the DataModule, lm.ckpt's hash and the optional fisher.pt."""
    m = cfg.meta
    dm = make_datamodule(cfg)
    corpus = dm.load()
    lm_path = out / "lm.ckpt"
    lm, prov = artifacts.load_lm(lm_path)
    artifacts.check_same_data(prov, corpus.vocab_hash, f"the LM in {lm_path}")
    lm_sha = file_sha256(lm_path)
    if int(m.streams) > 1 and int(m.order) == 2 and getattr(lm, "kernel", None) == "fused":
        log.warning("[meta] meta.streams > 1 with meta.order=2: per-stream weights need the double-differentiable "
                    "LSTM, switching the LM to kernel=manual (same weights, same numbers)")
        lm.kernel = "manual"
    return lm, dm, lm_sha, artifacts.load_fisher_optional(out, lm_sha)


def _module(cfg: DictConfig, out: Path, lm: Backbone, dm: WikiText2DataModule, lm_sha: str,
            art: FisherArtifact | None) -> tuple[MetaTrainModule, dict[str, Any] | None]:
    """The module with φ at its starting rule, and the tuned baselines (None unless the gate starts from them);
    the DataModule is cut for meta-training."""
    m = cfg.meta
    gate = gate_config(cfg, art is not None)
    dm.use(MetaCut(str(m.get("data", "train")), int(cfg.unroll), int(m.segment), int(m.streams),
                   int(m.val_tokens or cfg.eval.tune.tokens), bool(m.reset_at_articles), int(cfg.eval.tune.tokens)))
    dyn = DynamicWeights.build(lm, list(m.dynamic.include), list(m.dynamic.exclude), art)
    corpus = dm.load()
    prov = {"lm_sha256": lm_sha, "fisher_sha256": file_sha256(out / "fisher.pt") if art else None,
            "data_source": corpus.source, "vocab_hash": corpus.vocab_hash,
            "dynamic": OmegaConf.to_container(m.dynamic, resolve=True), "roles": dm.roles()}
    _refuse_incompatible_resume(cfg, out, dyn, prov)  # before tuning can rewrite tuned.json
    tuned = _start_gate(cfg, out, lm, lm_sha, art, gate, corpus.splits["valid"])
    group = group_size(m.get("checkpoint_group", 0), int(cfg.unroll))
    log.info(f"[meta] {len(dyn.spec.names)} dynamic tensors, {dyn.spec.numel:,} coordinates; gate={gate['param']}, "
             f"unroll={cfg.unroll}, segment={m.segment}, streams={m.streams}, order={m.order}, "
             f"checkpointing={m.checkpointing} (group {group}), fisher.pt={'yes' if art is not None else 'no'}")
    module = MetaTrainModule(
        lm, dyn, gate, segment=int(m.segment), unroll=int(cfg.unroll), order=int(m.order),
        checkpointing=bool(m.checkpointing), checkpoint_group=group, reset_every=int(m.reset_every),
        ewc_lambda=float(m.ewc_lambda), lr=float(m.optim.lr), weight_decay=float(m.optim.weight_decay),
        clip=float(m.optim.clip), streams=int(m.streams), provenance=prov, max_drift=cfg.eval.get("max_drift"),
        fast_first_order=bool(m.get("fast_first_order", False)), reverse_sample=float(m.get("reverse_sample", 1.0)))
    # The compiled update (MetaLearner.fused_update / fused_apply_): in training and in validation
    module.meta.fused = bool(m.get("fused_gate", False))
    return module, tuned


def _start_gate(cfg: DictConfig, out: Path, lm: Backbone, lm_sha: str, art: FisherArtifact | None,
                gate: dict[str, Any], valid: Tensor) -> dict[str, Any] | None:
    """Set the gate's starting rule from the tuned baselines (tuned.json, tuned now if needed): the best of sgd, rms
    and rms_pt for the residual gates, the sgd step for gate=paper without gate.lr. Returns the tuning (None if
    unused)."""
    if gate.get("param") in KRAUSE_FORMS and cfg.meta.get("init_from_tuned", True):
        # meta.tune_rms_pt: also the per-group rule (the yardstick evaluate.py compares φ with), a candidate start
        methods = ["sgd", "rms"] + (["rms_pt"] if cfg.meta.get("tune_rms_pt", False) else [])
        tuned = tuned_baselines(cfg, out, lm, valid, DynamicWeights.build(lm, fisher_art=art), lm_sha, methods)
        start_from_tuned(gate, tuned)
        return tuned
    if gate.get("param") == "paper" and gate.get("lr") is None:
        # A fair paper gate: its UPDATE gate starts at the tuned SGD step, so at init it IS the tuned sgd rule
        # (f ≈ 1, z ≈ 0); a step the user sets (gate.lr=...) is kept.
        tuned = tuned_baselines(cfg, out, lm, valid, DynamicWeights.build(lm, fisher_art=art), lm_sha, ["sgd"])
        gate["lr"] = float(tuned["sgd"]["hparams"]["lr"])
        log.info(f"[meta] gate=paper starts at the tuned sgd step lr={gate['lr']:.4g} (set gate.lr to choose another)")
        return tuned
    return None


def _refuse_incompatible_resume(cfg: DictConfig, out: Path, dyn: DynamicWeights, prov: dict[str, Any]) -> None:
    """resume=true with a last.ckpt made under other settings stops here, before anything is written (the module
    checks again, the gate included, when Lightning loads the checkpoint)."""
    name = "meta" if cfg.gate.get("flush", True) else "meta_noflush"
    last = out / "checkpoints" / name / "last.ckpt"
    if not (cfg.get("resume") and last.is_file()):
        return
    check_resumable(last)
    ck = torch.load(last, map_location="cpu", weights_only=False)
    new = MetaTrainModule.resume_key({"segment": int(cfg.meta.segment), "unroll": int(cfg.unroll),
                                      "provenance": prov}, list(dyn.spec.names), int(cfg.meta.streams))
    new.pop("gate")
    MetaTrainModule.require_resumable(ck, new)


def _fit(cfg: DictConfig, module: MetaTrainModule, dm: WikiText2DataModule,
         ckdir: Path) -> tuple[L.Trainer, ModelCheckpoint]:
    m = cfg.meta
    ckpt = ModelCheckpoint(dirpath=ckdir, filename="meta-best", monitor="val/adaptive_loss", mode="min",
                           save_last=True, save_top_k=1, enable_version_counter=False)
    n_sel = int(m.val_tokens or cfg.eval.tune.tokens)
    trainer = make_trainer(cfg, m.get("trainer"), callbacks=[ckpt], stage="meta", max_epochs=-1,
                           bar={"validation": f"φ on the selection slice ({n_sel:,} tokens)"},
                           max_steps=int(m.steps), max_time=m.get("max_time"), val_check_interval=int(m.val_every),
                           check_val_every_n_epoch=None, limit_val_batches=1.0)
    require(int(m.streams) % trainer.world_size == 0, f"meta.streams={m.streams} cannot be split evenly over "
            f"{trainer.world_size} processes; make it a multiple of trainer.devices × trainer.num_nodes")
    resume = ckdir / "last.ckpt"
    ckpt_path = str(resume) if cfg.get("resume") and resume.is_file() else None
    if ckpt_path:
        check_resumable(resume)
    fit(trainer, module, dm, ckpt_path, "meta-training")
    return trainer, ckpt


def _export(out: Path, art_name: str, ckpt: ModelCheckpoint, init: float, init_ckpt: dict[str, Any]) -> float:
    """Write `<art_name>.ckpt`: the best φ, or the initial φ if no validation beat it; returns its loss."""
    best = ckpt.best_model_path or ckpt.last_model_path
    require(bool(best), "meta-training ended without a checkpoint (no validation ran); lower meta.val_every "
            "below meta.steps")
    score = best_model_score(ckpt)  # ddp_spawn sends back only the path
    best_loss = float(score) if score is not None else math.nan
    if best_loss <= init:
        # meta.ckpt is φ and its provenance: the resume state (θ and hidden state, one LM-sized vector per
        # stream) stays in checkpoints/ only
        state = torch.load(best, map_location="cpu", weights_only=False)
        state.pop("resume_state", None)
        artifacts.atomic_torch_save(state, out / f"{art_name}.ckpt")
    else:
        log.warning(f"[meta] no validation beat φ at initialization (best ppl {_ppl(best_loss):.2f} vs "
                    f"{_ppl(init):.2f}): {art_name}.ckpt keeps the initial φ")
        best_loss = init
        artifacts.atomic_torch_save(init_ckpt, out / f"{art_name}.ckpt")
    last = ckpt.last_model_path or str(Path(best).parent / "last.ckpt")  # ddp_spawn sends back only the best
    if Path(last).is_file():
        atomic_copy(last, out / f"{art_name}-last.ckpt")
    return best_loss


def run(cfg: DictConfig) -> dict[str, Any]:
    """`python train.py stage=meta unroll=40`: meta-train φ, write `<run_dir>/meta.ckpt` (best by val;
    `meta_noflush.ckpt` with gate.flush=false), and `*-last.ckpt`."""
    out = run_dir(check_config(cfg))
    if cfg.meta.get("num_threads"):
        torch.set_num_threads(int(cfg.meta.num_threads))
    L.seed_everything(cfg.seed, workers=True)
    lm, dm, lm_sha, art = _inputs(cfg, out)
    module, tuned = _module(cfg, out, lm, dm, lm_sha, art)
    t0 = time.time()
    val = dm.selection_slice()
    base = baselines(lm, module.dyn, val, cfg, tuned)
    init = module.adaptive_loss(val, progress=bool(cfg.trainer.get("enable_progress_bar", True))
                                and "meta@init (selection slice)")
    log.info("[meta] validation slice (" + f"{val.numel()} tokens) ppl: "
             + ", ".join(f"{k} {_ppl(v):.2f}" for k, v in base.items()) + f", meta@init {_ppl(init):.2f}")
    # logged at every validation as constant lines (val/<k>_ppl): φ against the tuned rules and its own start
    module.baseline_ppl = {**{k: _ppl(v) for k, v in base.items()}, "meta_init": _ppl(init)}
    # φ at initialization is a candidate too: with gate=krause_init it IS Krause's rule, which meta.ckpt
    # must never do worse than on the validation slice.
    init_ckpt = {"hyper_parameters": dict(module.hparams), "dynamic_names": list(module.dyn.spec.names),
                 "n_unrolls": 0,
                 "state_dict": {f"meta.{k}": v.detach().clone() for k, v in module.meta.state_dict().items()}}
    # Without FLUSH (gate.flush=false) the artifact is the two-level model evaluate.py calls meta_noflush.
    art_name = "meta" if module.hparams.gate.get("flush", True) else "meta_noflush"
    trainer, ckpt = _fit(cfg, module, dm, out / "checkpoints" / art_name)
    if not trainer.is_global_zero:  # under strategy=ddp / torchrun every rank runs this; rank 0 writes
        return {}
    best_loss = _export(out, art_name, ckpt, init, init_ckpt)
    score = best_model_score(ckpt)
    res = {"val_ppl": _ppl(best_loss), "val_ppl_trained": _ppl(float(score)) if score is not None else math.nan,
           "val_ppl_init": _ppl(init), **{f"val_ppl_{k}": _ppl(v) for k, v in base.items()},
           "steps": trainer.global_step, "skipped": module.skipped, "seconds": time.time() - t0}
    log.info(f"[meta] best val adaptive ppl {res['val_ppl']:.2f} (init {res['val_ppl_init']:.2f}, static "
             f"{res['val_ppl_static']:.2f}); wrote {out / f'{art_name}.ckpt'} in {res['seconds']:.0f}s")
    return res
