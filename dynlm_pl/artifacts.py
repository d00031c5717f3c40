"""The files stages hand each other in a run directory, saved atomically and loaded with their provenance checked.

  lm.ckpt     the pretrained backbone: its model spec (`_target_` and settings), weights θ*, vocabulary and data
              provenance, in the manner of nanoGPT's checkpoints (readable without Lightning or `systems/`)
  fisher.pt   θ_0, diagonal Fisher F and Krause's gradient statistics ms of one lm.ckpt (`fisher.FisherArtifact`)
  meta.ckpt   φ of a trained meta-learner with its gate settings and the hashes of the LM and fisher.pt it used
  tuned.json  the tuned sgd/rms hyperparameters, keyed by everything the tuning depended on

Every loader turns a missing, corrupt or mismatched file into a one-line `DynlmError` saying what to rerun.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dynlm_pl.errors import DynlmError, require
from dynlm_pl.files import atomic_write, atomic_write_text, file_sha256, link_or_copy
from dynlm_pl.fisher import FisherArtifact
from dynlm_pl.meta.learner import MetaLearner, build_meta_learner
from dynlm_pl.meta.weights import DynamicWeights
from dynlm_pl.models import Backbone, build_model

LM_FORMAT = "dynlm-lm/1"
FISHER_FORMAT = "dynlm-fisher/1"
# What `from_run=<other run>` brings into this run's directory: the pretrained LM, its Fisher pass and the baselines
# tuned on them (tuned.json is keyed by both hashes and the grid: a different setting re-tunes, never reuses)
FROM_RUN_ARTIFACTS = ("lm.ckpt", "fisher.pt", "tuned.json")


def atomic_torch_save(obj: Any, dst: str | Path) -> None:
    atomic_write(dst, lambda tmp: torch.save(obj, tmp))


def import_artifacts(src: Path, dst: Path, names: tuple[str, ...] = FROM_RUN_ARTIFACTS) -> None:
    """Hard-link (else copy) `names` from run directory `src` into `dst`, replacing what `dst` had.

    So each job of a sweep (`-m stage=meta from_run=smoke unroll=10,20`) is a complete run directory that
    the next stages (evaluate) read as usual, and a job never writes into the run it started from.
    A link keeps the file as it was even if `src` is retrained later (stages replace files, never
    rewrite them), so a job's provenance hashes stay true. Safe when every DDP rank does it at once.
    """
    require(src.is_dir() and (src / names[0]).is_file(),
            f"from_run: no {names[0]} in {src}; run `python train.py stage=lm` there first (from_run names a "
            "run under paths.root, or a path)")
    for name in names:
        s, t = src / name, dst / name
        if s.is_file() and not (t.exists() and os.path.samefile(s, t)):
            link_or_copy(s, t)


# ----------------------------------------------------------------------------------------------------
# lm.ckpt
# ----------------------------------------------------------------------------------------------------


def save_lm(path: str | Path, model: nn.Module, spec: dict[str, Any], vocab: list[str] | None,
            provenance: dict[str, Any]) -> None:
    """The backbone as `build_model(spec, len(vocab))` rebuilds it, its weights, vocabulary and provenance (the
    data's `data_source` and `vocab_hash`, the training settings)."""
    blob = {"format": LM_FORMAT, "model": dict(spec), "vocab_size": int(model.vocab_size),
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "vocab": vocab,
            "provenance": dict(provenance)}
    atomic_torch_save(blob, path)


def _legacy_lm(blob: dict[str, Any]) -> tuple[dict[str, Any], int, dict[str, Any], dict[str, Any]]:
    """(spec, vocab size, state dict, provenance) of an lm.ckpt written as the LM stage's Lightning checkpoint
    (before LM_FORMAT): θ* is the NT-ASGD average once averaging has begun, else the raw weights."""
    hp, sd = dict(blob["hyper_parameters"]), blob["state_dict"]
    prefix = "swa.module." if int(sd.get("swa.n_averaged", 0)) > 0 else "model."
    weights = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return dict(hp["model"]), int(hp["vocab_size"]), weights, hp


def load_lm(path: str | Path) -> tuple[Backbone, dict[str, Any]]:
    """θ* from an `lm.ckpt` in eval mode, and its provenance (`vocab_hash`, `data_source`, `vocab`, `model`...)."""
    path = Path(path)
    above = path.parent.parent / path.name  # a sweep job's directory is runs/<name>/<overrides>/: the run above it
    require(path.is_file(), f"no LM checkpoint at {path}; " + (
        f"a sweep job reads its own directory: add from_run={above.parent.name} to start from {above}" if
        above.is_file() else "run `python train.py stage=lm` with the same experiment/name first"))
    try:
        blob = torch.load(path, map_location="cpu", weights_only=False)
        if blob.get("format") == LM_FORMAT:
            spec, vocab_size, weights, prov = blob["model"], blob["vocab_size"], blob["state_dict"], blob["provenance"]
        else:
            spec, vocab_size, weights, prov = _legacy_lm(blob)
        model = build_model(spec, vocab_size)
        model.load_state_dict(weights)
    except Exception as e:
        raise DynlmError(f"LM checkpoint {path} cannot be read ({type(e).__name__}); it is corrupt or not an "
                         "lm.ckpt: rerun `python train.py stage=lm`") from None
    return model.eval(), {**prov, "model": dict(spec), "vocab_size": vocab_size, "vocab": blob.get("vocab")}


def check_same_data(provenance: dict[str, Any], vocab_hash: str, what: str) -> None:
    """Refuse an LM trained on another vocabulary than the one this run reads."""
    require(provenance.get("vocab_hash") == vocab_hash,
            f"{what} was trained with another vocabulary than this run's data; use the same data=... "
            "as the LM stage, or retrain it with `python train.py stage=lm`")


# ----------------------------------------------------------------------------------------------------
# fisher.pt
# ----------------------------------------------------------------------------------------------------


def save_fisher(art: FisherArtifact, path: str | Path) -> None:
    atomic_torch_save({"format": FISHER_FORMAT, "theta0": art.theta0, "fisher": art.fisher, "ms": art.ms,
                       "estimator": art.estimator, "tokens": int(art.tokens), "lm_sha256": art.lm_sha256,
                       "meta": art.meta}, path)


def load_fisher(path: str | Path, lm_sha256: str | None = None) -> FisherArtifact:
    """Read a fisher.pt; refuse a missing or corrupt file, or one made from another LM checkpoint."""
    path = Path(path)
    require(path.is_file(), f"no Fisher artifact at {path}; run `python train.py stage=fisher` first")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        require(isinstance(blob, dict) and blob.get("format") == FISHER_FORMAT, "")
        art = FisherArtifact(blob["theta0"], blob["fisher"], blob["ms"], blob["estimator"], blob["tokens"],
                             blob["lm_sha256"], blob["meta"])
        require(art.theta0.keys() == art.fisher.keys() == art.ms.keys(), "")
    except Exception:
        raise DynlmError(f"Fisher artifact {path} is corrupt or not a fisher.pt; delete it and rerun "
                         "`python train.py stage=fisher`") from None
    require(lm_sha256 is None or art.lm_sha256 == lm_sha256,
            f"Fisher artifact {path} was made from another LM checkpoint (sha256 {art.lm_sha256[:12]}, "
            f"expected {lm_sha256[:12] if lm_sha256 else ''}); rerun `python train.py stage=fisher`")
    return art


def load_fisher_optional(run: Path, lm_sha256: str) -> FisherArtifact | None:
    """The run directory's fisher.pt (checked against the LM), or None when there is none."""
    path = run / "fisher.pt"
    return load_fisher(path, lm_sha256=lm_sha256) if path.is_file() else None


# ----------------------------------------------------------------------------------------------------
# meta.ckpt
# ----------------------------------------------------------------------------------------------------


def load_meta(path: str | Path, lm_sha256: str | None = None) -> tuple[MetaLearner, dict[str, Any]]:
    """φ from a `meta.ckpt` (eval mode) and its hyperparameters (gate, dynamic selection, provenance)."""
    path = Path(path)
    require(path.is_file(), f"no meta-learner checkpoint at {path}; run `python train.py stage=meta` first")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
        hp = dict(ck["hyper_parameters"])
        coord = ck["state_dict"].get("meta.coord_step")  # gate.per_coordinate: one offset per dynamic coordinate
        meta = build_meta_learner(hp["gate"], len(ck["dynamic_names"]), n_coords=0 if coord is None else coord.numel())
        meta.load_state_dict({k[len("meta."):]: v for k, v in ck["state_dict"].items() if k.startswith("meta.")})
    except Exception as e:
        raise DynlmError(f"meta-learner checkpoint {path} cannot be read ({type(e).__name__}); rerun "
                         "`python train.py stage=meta`") from None
    prov = hp.get("provenance") or {}
    require(lm_sha256 is None or prov.get("lm_sha256") == lm_sha256,
            f"{path} was meta-trained on another lm.ckpt; rerun `python train.py stage=meta`")
    hp["dynamic_names"] = list(ck["dynamic_names"])
    return meta.eval(), hp


def meta_provenance(path: Path) -> dict[str, Any]:
    """A meta.ckpt's provenance (the LM and Fisher it was trained with, and the data roles it read)."""
    return load_meta(path)[1].get("provenance") or {}


def load_meta_for(path: Path, lm: nn.Module, lm_sha256: str,
                  art: FisherArtifact | None) -> tuple[MetaLearner, DynamicWeights]:
    """φ of `path` and the dynamic weights of `lm` it adapts, refused unless φ was trained on this LM, this
    fisher.pt (its Fisher/RMS features and Krause's coefficients are read from it) and this parameter layout."""
    meta, hp = load_meta(path, lm_sha256=lm_sha256)
    prov = hp.get("provenance") or {}
    fisher_sha = prov.get("fisher_sha256")
    now_sha = file_sha256(path.parent / "fisher.pt") if art is not None else None
    require(fisher_sha is None or fisher_sha == now_sha,
            f"{path} was meta-trained with another fisher.pt than {path.parent / 'fisher.pt'} "
            f"({'absent now' if now_sha is None else 'recomputed since'}); rerun `python train.py stage=meta`")
    dyn_cfg = prov.get("dynamic") or {"include": ["*"], "exclude": []}
    dyn = DynamicWeights.build(lm, dyn_cfg["include"], dyn_cfg["exclude"], art)
    require(list(dyn.spec.names) == list(hp["dynamic_names"]),
            f"{path} adapts other parameters than this LM has; rerun `python train.py stage=meta`")
    return meta, dyn


# ----------------------------------------------------------------------------------------------------
# tuned.json
# ----------------------------------------------------------------------------------------------------


def load_tuned(path: Path, key: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The methods stored in tuned.json if it was made under exactly `key`; {} otherwise (also when the file is
    unreadable: what is needed is then tuned again and the file replaced)."""
    if not path.is_file():
        return {}
    try:
        stored = json.loads(path.read_text())
        if stored.get("key") == key and isinstance(stored["best"], dict):
            return stored["best"]
    except (json.JSONDecodeError, KeyError):
        pass
    return {}


def save_tuned(path: Path, key: dict[str, Any], best: dict[str, dict[str, Any]]) -> None:
    atomic_write_text(path, json.dumps({"key": key, "best": best}, indent=2))
