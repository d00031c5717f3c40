"""Shared fixtures: a small synthetic corpus, the real WikiText-2 (skipped when absent), Hydra composition.

Every test runs with `DYNLM_CACHE` pointing at a per-session temporary directory, so the user's cache
(`~/.cache/dynlm`) is never read or written, and WikiText-2 is tokenized at most once per session.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from dynlm_pl import data as dyn_data
from dynlm_pl.data import Corpus, find_wikitext2, load_wikitext2

REPO_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = REPO_ROOT / "conf"
# Small enough to build in well under a second, large enough for several windows per stream.
SYNTHETIC_ARTICLES = {"train": 20, "valid": 4, "test": 4}

ComposeCfg = Callable[..., DictConfig]

# The tests run tiny models on a machine whose 2 cores are usually busy (pretraining, other suites):
# there, intra-op threads oversubscribe the cores and made the model tests ~10x slower (39 s vs 3.6 s).
# DYNLM_TEST_THREADS overrides it.
torch.set_num_threads(int(os.environ.get("DYNLM_TEST_THREADS", "1")))


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """All tests share one throw-away cache; the user's DYNLM_CACHE / ~/.cache/dynlm stay untouched."""
    cache = tmp_path_factory.mktemp("dynlm-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DYNLM_CACHE", str(cache))
        # A stray DYNLM_RUNS would send test runs into the user's run directory.
        mp.delenv("DYNLM_RUNS", raising=False)
        # Never let a test reach the network (HF hub or W&B).
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("WANDB_MODE", "offline")
        yield cache


@pytest.fixture(scope="session")
def synthetic_corpus_session() -> Corpus:
    # Module-qualified: the fixture below shadows the generator's name in this file.
    return dyn_data.synthetic_corpus(seed=0, articles=SYNTHETIC_ARTICLES, article_len=200)


@pytest.fixture
def synthetic_corpus(synthetic_corpus_session: Corpus) -> Corpus:
    """A small deterministic topic-structured corpus (same generator as `data=synthetic`)."""
    return synthetic_corpus_session


def _wikitext_dir() -> Path:
    env = os.environ.get("DYNLM_DATA")
    return Path(env) if env else (REPO_ROOT.parent / "shared" / "data" / "wikitext-2")


@pytest.fixture(scope="session")
def wikitext_root() -> Path:
    """The real WikiText-2 directory (DYNLM_DATA, else ../shared/data/wikitext-2); skips when absent."""
    root = _wikitext_dir()
    if find_wikitext2(root) is None:
        pytest.skip(f"WikiText-2 not found under {root} (set DYNLM_DATA to a directory with "
                    "train.txt/valid.txt/test.txt to run this test)")
    return root


@pytest.fixture(scope="session")
def wikitext_corpus(wikitext_root: Path, _isolated_cache: Path) -> Corpus:
    """WikiText-2 tokenized once per session (verified against the official counts)."""
    return load_wikitext2(wikitext_root, cache_dir=_isolated_cache, download=False, verify=True)


def compose_config(overrides: list[str], root: Path) -> DictConfig:
    """conf/config.yaml with `overrides`, run directory under `root`, no logger unless one is asked for.

    Sets HydraConfig like `@hydra.main` does, so `${hydra:...}` interpolations resolve.
    """
    GlobalHydra.instance().clear()
    defaults = [f"paths.root={root}"]
    if not any(o.startswith(("logger=", "+logger=")) for o in overrides):
        defaults.append("logger=none")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=defaults + list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return cfg


@pytest.fixture
def compose_cfg(tmp_path: Path) -> Iterator[ComposeCfg]:
    """`compose_cfg(["experiment=smoke", ...], root=None)` -> DictConfig with paths.root = tmp_path."""

    def _compose(overrides: list[str] | None = None, root: Path | None = None) -> DictConfig:
        return compose_config(list(overrides or []), root or tmp_path)

    yield _compose
    GlobalHydra.instance().clear()


def read_wandb_runs(save_dir: Path) -> list[dict]:
    """Every offline W&B run under `save_dir`/wandb, in the order they started (`read_wandb_run`; the directories'
    names sort by second only, and a tiny stage takes less)."""
    return sorted((read_wandb_run(d) for d in save_dir.glob("wandb/offline-run-*")), key=lambda r: r["run"]["start"])


def read_wandb_run(run_dir: Path) -> dict:
    """What an offline W&B run (`<save_dir>/wandb/offline-run-*`) recorded: {"run": its group, job_type, name, tags,
    config and start time (ns), "keys": the metric keys logged, "history": each log call's numbers {key: value},
    "summary": summary keys, "exited": whether it was finished, "artifacts": {name: its files}}.

    wandb (0.2x+) writes the `.wandb` file from its Go core, with no Python reader: it is a LevelDB log (32 KiB
    blocks of records, each a 7-byte header — CRC, length, type: full/first/middle/last — and a fragment) after a
    7-byte file header, each record a `wandb_internal_pb2.Record`.
    """
    import json

    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_dir.glob("*.wandb")
    raw, block = path.read_bytes(), 32768
    pos, frags, records = 7, b"", []
    while pos + 7 <= len(raw):
        room = block - pos % block
        if room < 7:  # a block's tail too short for a header is padding
            pos += room
            continue
        length, kind = int.from_bytes(raw[pos + 4 : pos + 6], "little"), raw[pos + 6]
        if kind == 0:  # zeros: the rest of the block (or file) is padding
            pos += room
            continue
        frags += raw[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # full, last: a whole record
            rec = pb.Record()
            rec.ParseFromString(frags)
            records.append(rec)
            frags = b""
    out: dict = {"run": {}, "keys": set(), "history": [], "summary": set(), "exited": False, "artifacts": {}}
    for rec in records:
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            r = rec.run
            out["run"] = {"group": r.run_group, "job_type": r.job_type, "name": r.display_name, "tags": list(r.tags),
                          "config": {u.key: json.loads(u.value_json) for u in r.config.update},
                          "start": r.start_time.ToNanoseconds()}
        elif kind == "config":
            out["run"].setdefault("config", {}).update({u.key: json.loads(u.value_json) for u in rec.config.update})
        elif kind == "history":
            out["keys"] |= {i.key or i.nested_key[0] for i in rec.history.item}  # a media's own fields: its key
            values = {i.key or i.nested_key[0]: json.loads(i.value_json) for i in rec.history.item}
            out["history"].append({k: v for k, v in values.items() if isinstance(v, (int, float))})
        elif kind == "summary":
            out["summary"] |= {i.key or i.nested_key[0] for i in rec.summary.update}
        elif kind == "exit":
            out["exited"] = True
        elif kind == "artifact":  # {name: [the paths of its files]}
            out["artifacts"][rec.artifact.name] = [e.path for e in rec.artifact.manifest.contents]
    return out
