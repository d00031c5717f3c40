"""Reliability (issue 6): exact resume after SIGKILL, one-line errors for bad input, provenance refusals.

Every row of the README's "Bad input" table is a test here. A few cases run the real entry points in a
subprocess (`python train.py ...`, as a user would); the rest call the same code in-process through
`main_guard`, which is what the entry points wrap, to keep the suite fast. Each failing case also checks that
what the run directory already held is left byte for byte as it was.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import REPO_ROOT, compose_config
from omegaconf import DictConfig
from torch import Tensor

from dynlm_pl import evaluation
from dynlm_pl.artifacts import load_meta
from dynlm_pl.cli import main_guard
from dynlm_pl.config import check_config
from dynlm_pl.data import SPLITS, UNK, synthetic_corpus
from dynlm_pl.errors import DynlmError
from dynlm_pl.files import file_sha256
from dynlm_pl.pipeline import run_stages
from dynlm_pl.stages import fisher as fisher_stage
from dynlm_pl.stages import lm as lm_stage
from dynlm_pl.stages import meta as meta_stage

# A corpus small enough that an LM epoch takes about a second, one shared by all tests (and their subprocesses).
BASE = ["experiment=smoke", "data.synthetic.articles={train: 40, valid: 6, test: 6}",
        "trainer.enable_progress_bar=false"]
LM_FAST = ["lm.trainer.max_epochs=1", "+lm.trainer.limit_train_batches=6", "+lm.trainer.limit_val_batches=2"]
FISHER_FAST = ["fisher.tokens=600", "fisher.batch_size=4", "fisher.window=10", "fisher.ms_batch_size=10"]
META_FAST = ["gate=paper", "unroll=3", "meta.steps=4", "meta.val_every=2", "meta.val_tokens=200"]
EVAL_FAST = ["eval.methods=[static]", "eval.splits=[valid]", "eval.smooth=20"]
ARTIFACTS = ("lm.ckpt", "fisher.pt", "meta.ckpt")


# ----------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------


def base_for(overrides: tuple[str, ...] | list[str]) -> list[str]:
    """BASE, without its synthetic-corpus size when another data source is chosen."""
    other_data = any(o.startswith("data=") for o in overrides)
    return [b for b in BASE if not (other_data and b.startswith("data.synthetic"))]


def cfg_for(root: Path, *overrides: str) -> DictConfig:
    return compose_config([*base_for(overrides), *overrides], root)


def cli_env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("DYNLM_RUNS", None)
    return env


def cli_args(script: str, root: Path, *overrides: str) -> list[str]:
    return [sys.executable, script, f"paths.root={root}", "logger=none", *base_for(overrides), *overrides]


def run_cli(script: str, root: Path, *overrides: str, base: bool = True) -> subprocess.CompletedProcess:
    args = cli_args(script, root, *overrides) if base else [sys.executable, script, *overrides]
    return subprocess.run(args, cwd=REPO_ROOT, env=cli_env(), capture_output=True, text=True, timeout=300)


def cli_error(p: subprocess.CompletedProcess) -> str:
    """The one `error:` line of a failed entry point (exit 2, no traceback)."""
    assert "Traceback" not in p.stderr, p.stderr
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert p.returncode == 2 and len(errors) == 1, (p.returncode, p.stderr)
    print(f"\n  exit {p.returncode}: {errors[0]}")
    return errors[0]


def guarded_error(fn: Callable[[], Any], capsys: pytest.CaptureFixture) -> str:
    """What an entry point does with `fn`: exit status 2 and exactly one `error:` line on stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main_guard(fn)
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert e.value.code == 2 and len(errors) == 1, (e.value.code, err)
    with capsys.disabled():
        print(f"\n  exit {e.value.code}: {errors[0]}")
    return errors[0]


def entry(root: Path, stage: str, *overrides: str) -> Callable[[], Any]:
    """What `python train.py stage=...` (or, for stage "evaluate", `python evaluate.py`) runs inside main_guard."""
    if stage == "evaluate":
        cfg = cfg_for(root, *overrides)
        return lambda: evaluation.run(check_config(cfg))
    cfg = cfg_for(root, f"stage={stage}", *overrides)
    return lambda: run_stages(cfg)


def snapshot(run: Path) -> dict[str, str]:
    """sha256 of every file under the run directory (Hydra's own log directories aside)."""
    return {str(p.relative_to(run)): file_sha256(p) for p in sorted(run.rglob("*"))
            if p.is_file() and "hydra" not in p.relative_to(run).parts}


def assert_kept(before: dict[str, str], run: Path) -> None:
    after = snapshot(run)
    changed = [k for k, h in before.items() if after.get(k) != h]
    assert not changed, f"a failed run changed or removed {changed}"


def max_abs_diff(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].numel()), default=0.0)


def best_score(ck: dict[str, Any]) -> float:
    return next(float(v["best_model_score"]) for k, v in ck["callbacks"].items()
                if k.startswith("ModelCheckpoint") and v.get("best_model_score") is not None)


def load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=False)


def copy_run(src: Path, root: Path) -> Path:
    """A private copy of a run directory (`<root>/smoke`), so a test may damage it."""
    dst = root / "smoke"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("hydra"))
    return dst


def kill_at_first_checkpoint(proc: subprocess.Popen, ckpt: Path, timeout: float = 120.0,
                             sig: signal.Signals = signal.SIGKILL) -> dict[str, Any]:
    """Send `sig` to `proc` as soon as `ckpt` appears (it is written by rename, so it is whole); the checkpoint it
    leaves. SIGKILL: dies at once. SIGTERM / SIGINT (Ctrl-C): stops at the end of its step after writing `ckpt`
    again, exit status 143."""
    t0 = time.time()
    while not ckpt.is_file():
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before writing {ckpt}"
        assert time.time() - t0 < timeout, f"no {ckpt} after {timeout}s"
        time.sleep(0.005)
    assert proc.poll() is None, "the run had already finished: nothing was interrupted"
    proc.send_signal(sig)
    proc.wait(timeout=timeout)
    assert proc.returncode == (-signal.SIGKILL if sig == signal.SIGKILL else 143)
    return load(ckpt)


def run_until_signal(args: list[str], ckpt: Path, sig: signal.Signals, log: Path) -> dict[str, Any]:
    """Start `args`, signal it at its first checkpoint (`kill_at_first_checkpoint`); for SIGTERM / SIGINT, check the
    one line it ends with."""
    with open(log, "w") as err:
        proc = subprocess.Popen(args, cwd=REPO_ROOT, env=cli_env(), stdout=subprocess.DEVNULL, stderr=err)
        at_stop = kill_at_first_checkpoint(proc, ckpt, sig=sig)
    if sig != signal.SIGKILL:
        lines = [line for line in log.read_text().splitlines() if line.startswith(("stopped:", "error:"))]
        assert len(lines) == 1 and lines[0].endswith(f"stopped by a signal after writing {ckpt}; rerun the same "
                                                     "command with resume=true to continue where it stopped"), lines
        assert "Traceback" not in log.read_text()
        print(f"\n  {signal.Signals(sig).name}: exit {proc.returncode}: {lines[0]}")
    return at_stop


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory with lm.ckpt, fisher.pt and meta.ckpt from the small corpus (made once, in-process)."""
    root = tmp_path_factory.mktemp("trained")
    lm_stage.run(cfg_for(root, "stage=lm", *LM_FAST))
    fisher_stage.run(cfg_for(root, "stage=fisher", *FISHER_FAST))
    meta_stage.run(cfg_for(root, "stage=meta", *META_FAST))
    run = root / "smoke"
    assert all((run / a).is_file() for a in ARTIFACTS)
    return run


# ----------------------------------------------------------------------------------------------------
# 1. resume after a kill: the same result as an uninterrupted run
# ----------------------------------------------------------------------------------------------------

LM_RESUME = ["stage=lm", "lm.trainer.max_epochs=3", "lm.trainer.ckpt_every_n_steps=4"]


@pytest.fixture(scope="module")
def lm_uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The LM_RESUME run without interruption (same code and seed as the subprocesses), shared by the variants."""
    root = tmp_path_factory.mktemp("lm_uninterrupted")
    lm_stage.run(cfg_for(root, *LM_RESUME))
    return root / "smoke"


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
def test_lm_resume_after_a_kill_or_sigterm_matches_uninterrupted(sig: signal.Signals, lm_uninterrupted: Path,
                                                                  tmp_path: Path) -> None:
    cut_root = tmp_path / "killed"
    last = cut_root / "smoke" / "checkpoints" / "last.ckpt"
    at_kill = run_until_signal(cli_args("train.py", cut_root, *LM_RESUME), last, sig, tmp_path / "stderr.txt")
    assert not (cut_root / "smoke" / "lm.ckpt").exists()
    p = run_cli("train.py", cut_root, *LM_RESUME, "resume=true")
    assert p.returncode == 0, p.stderr[-3000:]
    assert (p.stdout + p.stderr).count("GPU available:") == 1  # Lightning's lines once (Hydra's log), not twice

    ref, res = lm_uninterrupted, cut_root / "smoke"
    a_lm, b_lm = load(ref / "lm.ckpt"), load(res / "lm.ckpt")
    a_last, b_last = load(ref / "checkpoints" / "last.ckpt"), load(res / "checkpoints" / "last.ckpt")
    d_lm, d_last = max_abs_diff(a_lm["state_dict"], b_lm["state_dict"]), max_abs_diff(a_last["state_dict"],
                                                                                     b_last["state_dict"])
    opt_a, opt_b = a_last["optimizer_states"][0]["state"], b_last["optimizer_states"][0]["state"]
    d_opt = max(max_abs_diff(opt_a[i], opt_b[i]) for i in opt_a)
    print(f"\n  [lm resume] {sig.name} at global step {at_kill['global_step']} (batch "
          f"{at_kill['resume_state']['epoch_batches']} of epoch {at_kill['epoch']}); final step "
          f"{a_last['global_step']} vs {b_last['global_step']}\n"
          f"  uninterrupted: best val ppl {best_score(a_last):.6f}, val loss history "
          f"{[round(v, 6) for v in a_last['val_history']]}\n"
          f"  resumed:       best val ppl {best_score(b_last):.6f}, val loss history "
          f"{[round(v, 6) for v in b_last['val_history']]}\n"
          f"  max |diff|: lm.ckpt weights {d_lm:.3g}, last.ckpt weights {d_last:.3g}, Adam state {d_opt:.3g}")
    assert at_kill["global_step"] < a_last["global_step"]
    assert a_last["global_step"] == b_last["global_step"] and a_last["epoch"] == b_last["epoch"]
    assert a_last["val_history"] == pytest.approx(b_last["val_history"], rel=0, abs=1e-6)
    assert best_score(a_last) == pytest.approx(best_score(b_last), rel=0, abs=1e-6)
    assert d_lm <= 1e-6 and d_last <= 1e-6 and d_opt <= 1e-6
    if sig != signal.SIGKILL:
        return

    # Stopped at an epoch boundary instead (after epoch 1's validation), in-process: the same end again.
    stop_root = tmp_path / "stopped"
    lm_stage.run(cfg_for(stop_root, *LM_RESUME, "lm.trainer.max_epochs=1"))
    lm_stage.run(cfg_for(stop_root, *LM_RESUME, "resume=true"))
    c_last = load(stop_root / "smoke" / "checkpoints" / "last.ckpt")
    d_epoch = max_abs_diff(a_last["state_dict"], c_last["state_dict"])
    print(f"  stopped after epoch 1 and resumed: val loss history {[round(v, 6) for v in c_last['val_history']]}, "
          f"max |diff| last.ckpt weights {d_epoch:.3g}")
    assert c_last["global_step"] == a_last["global_step"] and c_last["val_history"] == a_last["val_history"]
    assert d_epoch <= 1e-6


META_RESUME = ["stage=meta", "gate=paper", "unroll=3", "meta.steps=15", "meta.val_every=5", "meta.val_tokens=200",
               "meta.optim.lr=0.02", "meta.trainer.ckpt_every_n_steps=3"]


@pytest.fixture(scope="module")
def meta_uninterrupted(trained: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """The META_RESUME run without interruption, and what run() returned, shared by the variants."""
    root = tmp_path_factory.mktemp("meta_uninterrupted")
    (root / "smoke").mkdir(parents=True)
    shutil.copy(trained / "lm.ckpt", root / "smoke" / "lm.ckpt")  # gate=paper without fisher.pt
    return root / "smoke", meta_stage.run(cfg_for(root, *META_RESUME))


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["sigkill", "ctrl-c"])
def test_meta_resume_after_a_kill_or_ctrl_c_matches_uninterrupted(
        sig: signal.Signals, trained: Path, meta_uninterrupted: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    cut_root = tmp_path / "killed"
    (cut_root / "smoke").mkdir(parents=True)
    shutil.copy(trained / "lm.ckpt", cut_root / "smoke" / "lm.ckpt")
    ref, ref_res = meta_uninterrupted
    last = cut_root / "smoke" / "checkpoints" / "meta" / "last.ckpt"
    at_kill = run_until_signal(cli_args("train.py", cut_root, *META_RESUME), last, sig, tmp_path / "stderr.txt")
    assert at_kill["resume_state"]["theta"] is not None  # θ carried across unrolls is in the checkpoint
    assert not (cut_root / "smoke" / "meta.ckpt").exists()
    p = run_cli("train.py", cut_root, *META_RESUME, "resume=true")
    assert p.returncode == 0, p.stderr[-3000:]

    res = cut_root / "smoke"
    a_last, b_last = load(ref / "checkpoints" / "meta" / "last.ckpt"), load(res / "checkpoints" / "meta" / "last.ckpt")
    d_meta = max_abs_diff(load(ref / "meta.ckpt")["state_dict"], load(res / "meta.ckpt")["state_dict"])
    d_phi = max_abs_diff(a_last["state_dict"], b_last["state_dict"])
    d_theta = float((a_last["resume_state"]["theta"] - b_last["resume_state"]["theta"]).abs().max())
    opt_a, opt_b = a_last["optimizer_states"][0]["state"], b_last["optimizer_states"][0]["state"]
    d_opt = max(max_abs_diff(opt_a[i], opt_b[i]) for i in opt_a)
    ppl = lambda ck: float(torch.exp(torch.tensor(best_score(ck))))
    print(f"\n  [meta resume] {sig.name} at global step {at_kill['global_step']} ({at_kill['n_unrolls']} unrolls, "
          f"{at_kill['resume_state']['pass_tokens']} tokens per stream read); final step {a_last['global_step']} "
          f"vs {b_last['global_step']}\n"
          f"  uninterrupted: best val adaptive ppl {ppl(a_last):.6f} (run() returned {ref_res['val_ppl_trained']:.6f}),"
          f" unrolls {a_last['n_unrolls']}, skipped {a_last['resume_state']['skipped']}\n"
          f"  resumed:       best val adaptive ppl {ppl(b_last):.6f}, unrolls {b_last['n_unrolls']}, skipped "
          f"{b_last['resume_state']['skipped']}\n"
          f"  max |diff|: meta.ckpt phi {d_meta:.3g}, last.ckpt phi {d_phi:.3g}, theta {d_theta:.3g}, Adam {d_opt:.3g}")
    assert at_kill["global_step"] < a_last["global_step"]
    assert (a_last["global_step"], a_last["n_unrolls"]) == (b_last["global_step"], b_last["n_unrolls"])
    assert a_last["resume_state"]["pass_tokens"] == b_last["resume_state"]["pass_tokens"]
    assert a_last["resume_state"]["skipped"] == b_last["resume_state"]["skipped"]
    assert best_score(a_last) == pytest.approx(best_score(b_last), rel=0, abs=1e-6)
    assert max(d_meta, d_phi, d_theta, d_opt) <= 1e-6
    if sig != signal.SIGKILL:
        return

    # Stopped right after a validation instead (meta.steps=5 = meta.val_every), in-process: the same end again.
    stop_root = tmp_path / "stopped"
    (stop_root / "smoke").mkdir(parents=True)
    shutil.copy(trained / "lm.ckpt", stop_root / "smoke" / "lm.ckpt")
    meta_stage.run(cfg_for(stop_root, *META_RESUME, "meta.steps=5"))
    meta_stage.run(cfg_for(stop_root, *META_RESUME, "resume=true"))
    c_last = load(stop_root / "smoke" / "checkpoints" / "meta" / "last.ckpt")
    d_val = max(max_abs_diff(a_last["state_dict"], c_last["state_dict"]),
                float((a_last["resume_state"]["theta"] - c_last["resume_state"]["theta"]).abs().max()))
    print(f"  stopped after the validation at step 5 and resumed: best val adaptive ppl {ppl(c_last):.6f}, "
          f"max |diff| phi and theta {d_val:.3g}")
    assert c_last["global_step"] == a_last["global_step"] and best_score(c_last) == best_score(a_last)
    assert d_val <= 1e-6


def test_corrupt_last_ckpt_with_resume_is_one_line(trained: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    run = copy_run(trained, tmp_path)
    (run / "checkpoints").mkdir(exist_ok=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"not a checkpoint")
    before = snapshot(run)
    msg = guarded_error(lambda: run_stages(cfg_for(tmp_path, "stage=lm", *LM_FAST, "resume=true")), capsys)
    assert "cannot resume" in msg and "last.ckpt" in msg
    assert_kept(before, run)


@pytest.mark.parametrize(("change", "expect"), [("model.hidden_size=24", "model"),
                                                ("data.synthetic.vocab_size=300", "vocabulary")])
def test_lm_resume_refuses_another_model_or_vocabulary(change: str, expect: str, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "r"
    lm_stage.run(cfg_for(root, "stage=lm", *LM_FAST))
    before = snapshot(root / "smoke")
    msg = guarded_error(lambda: run_stages(cfg_for(root, "stage=lm", *LM_FAST, change, "resume=true")), capsys)
    assert "cannot resume" in msg and expect in msg and "resume=true" in msg
    assert_kept(before, root / "smoke")


# ----------------------------------------------------------------------------------------------------
# 2. bad input: one line on stderr, exit status 2, nothing already written lost
# ----------------------------------------------------------------------------------------------------


def write_wikitext_like(root: Path, bad: str | None = None) -> Path:
    """train/valid/test.txt from the small synthetic corpus (with some <unk>), one of them made bad."""
    corpus = synthetic_corpus(seed=0, articles={"train": 8, "valid": 2, "test": 2}, article_len=150)
    root.mkdir(parents=True, exist_ok=True)
    for s in SPLITS:
        ids = corpus.splits[s].tolist()
        words = [corpus.vocab[i] if k % 50 else UNK for k, i in enumerate(ids)]
        text = " ".join(words).replace(" <eos> ", " \n ").replace("<eos>", "\n")
        (root / f"{s}.txt").write_text(text if text.endswith("\n") else text + "\n")
    if bad == "missing":
        (root / "train.txt").unlink()
    elif bad is not None:
        (root / "train.txt").write_bytes(BAD_DATA[bad][0])
    return root


BAD_DATA = {  # content of train.txt, what the message must say
    "empty": (b"", "is empty"),
    "non-utf8": (b" = T = \n caf\xe9 \xff\xfe \n", "not UTF-8"),
    "binary": (bytes(range(256)) * 4, "binary"),
}
WIKI = ["data=wikitext2", "data.download=false", "data.verify=false", "data.batch_size=4", "data.bptt=20",
        "data.eval_batch_size=2"]


def test_missing_data_file_cli(tmp_path: Path) -> None:
    data = write_wikitext_like(tmp_path / "data", bad="missing")
    p = run_cli("train.py", tmp_path / "runs", "stage=lm", *WIKI, f"data.root={data}")
    msg = cli_error(p)
    assert "not found" in msg and str(data) in msg and "data.root" in msg
    assert not (tmp_path / "runs" / "smoke" / "lm.ckpt").exists()


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_data_file(case: str, trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = write_wikitext_like(tmp_path / "data", bad=case)
    run = copy_run(trained, tmp_path)  # a good lm.ckpt from before must survive the failed run
    before = snapshot(run)
    msg = guarded_error(lambda: run_stages(cfg_for(tmp_path, "stage=lm", *WIKI, f"data.root={data}")), capsys)
    assert BAD_DATA[case][1] in msg and "train.txt" in msg
    assert_kept(before, run)


def test_wrong_token_counts(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = write_wikitext_like(tmp_path / "data")
    run = copy_run(trained, tmp_path)
    before = snapshot(run)
    over = [o for o in WIKI if o != "data.verify=false"]
    msg = guarded_error(lambda: run_stages(cfg_for(tmp_path, "stage=lm", *over, f"data.root={data}")), capsys)
    assert "tokens, expected" in msg and "2088628" in msg and "data.verify=false" in msg
    assert_kept(before, run)


def test_textfile_of_unseen_words_maps_to_unk_and_warns(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    """Decided behaviour: it runs (unseen words score as <unk>, whose probability the LM learned) and logs a
    warning of what share of the tokens were unknown when it is over half (the perplexity is then optimistic)."""
    data = write_wikitext_like(tmp_path / "data")
    lm_stage.run(cfg_for(tmp_path, "stage=lm", *WIKI, f"data.root={data}", *LM_FAST))
    text = tmp_path / "notes.txt"
    text.write_text(" = Notes = \n\n" + " ".join(f"never{i}seen" for i in range(60)) + " \n")
    caplog.set_level(logging.INFO)
    res = evaluation.run(check_config(cfg_for(tmp_path, "data=textfile", f"data.path={text}", *EVAL_FAST)))
    warning = next(r.message for r in caplog.records if "unknown to the LM" in r.message and r.levelname == "WARNING")
    with capsys.disabled():
        print(f"\n  exit 0; log: {warning}")
    assert "warning" in warning and "<unk>" in warning
    ppl = res["splits"]["text"]["static"]["ppl"]
    assert ppl > 0 and ppl == ppl


def test_textfile_with_a_vocabulary_without_unk(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = copy_run(trained, tmp_path)  # the synthetic corpus has no <unk>: unseen words cannot be scored
    text = tmp_path / "notes.txt"
    text.write_text(" zzz yyy w1 \n")
    before = snapshot(run)
    msg = guarded_error(lambda: evaluation.run(check_config(cfg_for(tmp_path, "data=textfile", f"data.path={text}",
                                                                    *EVAL_FAST))), capsys)
    assert "no <unk>" in msg
    assert_kept(before, run)


@pytest.mark.parametrize(("overrides", "expect"), [
    (["experiment=smoke", "data.no_such_key=1"], "Could not override 'data.no_such_key'"),
    (["model=no_such_model"], "Could not find 'model/no_such_model'; Available options in 'model': awd_lstm"),
    (["unroll=["], "no viable alternative"),
])
def test_bad_command_line_cli(overrides: list[str], expect: str, tmp_path: Path) -> None:
    p = run_cli("train.py", tmp_path, f"paths.root={tmp_path}", *overrides, base=False)
    msg = cli_error(p)
    assert msg.startswith("error: bad command line: ") and expect in msg and "--help" in msg
    assert not any(tmp_path.rglob("*.ckpt"))


@pytest.mark.parametrize(("args", "expected"), [
    (("stage=all", "unroll=0"), "error: unroll must be a positive integer, got 0"),
    (("stage=meta", "meta.optim.lr=fast"), "error: meta.optim.lr must be a number >= 0, got 'fast'")])
def test_bad_value_cli(args: tuple[str, ...], expected: str, trained: Path, tmp_path: Path) -> None:
    """A size out of range or a value of the wrong type: one line and exit status 2 through the real entry point,
    before any stage runs (nothing in the run directory changes)."""
    run = copy_run(trained, tmp_path)
    before = snapshot(run)
    assert cli_error(run_cli("train.py", tmp_path, *args)) == expected
    assert_kept(before, run)


@pytest.mark.parametrize(("key", "value"), [("unroll", -2), ("meta.segment", 0), ("meta.segment", -5),
                                            ("eval.segment", 0), ("eval.streams", 0), ("data.bptt", 0),
                                            ("data.bptt", -3),
                                            ("data.batch_size", 0), ("data.batch_size", -1)])
def test_non_positive_sizes(key: str, value: int, trained: Path, tmp_path: Path,
                            capsys: pytest.CaptureFixture) -> None:
    run = copy_run(trained, tmp_path)
    before = snapshot(run)
    cfg = cfg_for(tmp_path, "stage=meta", f"{key}={value}")
    if key.startswith("eval."):  # evaluate.py's own entry point
        msg = guarded_error(lambda: evaluation.run(check_config(cfg)), capsys)
    else:
        msg = guarded_error(lambda: run_stages(cfg), capsys)
    assert msg == f"error: {key} must be a positive integer, got {value}"
    assert_kept(before, run)


@pytest.mark.parametrize("value", [0, -0.5])
def test_non_positive_max_drift(value: float, trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = copy_run(trained, tmp_path)
    before = snapshot(run)
    cfg = cfg_for(tmp_path, "stage=meta", f"eval.max_drift={value}")
    msg = guarded_error(lambda: evaluation.run(check_config(cfg)), capsys)
    assert msg == f"error: eval.max_drift must be a positive number or null (no bound), got {value}"
    assert_kept(before, run)


@pytest.mark.parametrize(("override", "expected"), [
    ("meta.checkpoint_group=-1", "error: meta.checkpoint_group must be auto or an integer >= 0, got -1"),
    ("meta.optim.lr=fast", "error: meta.optim.lr must be a number >= 0, got 'fast'"),
    ("meta.reverse_sample=0", "error: meta.reverse_sample must be a fraction in (0, 1], got 0"),
    ("meta.segment=10", "error: meta.segment=10 differs from eval.segment=5, where the baselines φ starts from are "
                        "tuned and every method is evaluated; set both to the same value, or "
                        "meta.allow_segment_mismatch=true"),
    ("lm.optim.clip=-1", "error: lm.optim.clip must be a number >= 0, got -1"),
    ("meta.order=3", "error: meta.order must be one of 1, 2, got 3"),
    ("fisher.estimator=exact", "error: fisher.estimator must be one of empirical, batch_ms, got 'exact'"),
    ("fisher.window=2.5", "error: fisher.window must be a positive integer, got 2.5"),
    ("eval.methods=[static,nope]", "error: eval.methods has unknown ['nope']; choose from static, sgd, rms, "
                                   "rms_pt, meta_noflush, meta"),
    ("meta.val_tokens=3000", "error: meta.val_tokens=3000 must be at most eval.tune.tokens=2000: φ is selected on the "
                             "selection slice where the baselines are tuned, and meta-training reads the validation "
                             "split only past it"),
    ("eval.tune.refine_step=1", "error: eval.tune.refine_step must be a factor > 1, got 1"),
    ("pipeline=[lm,nope]", "error: unknown stage 'nope'; use one of lm, fisher, meta, evaluate, meta_noflush or all")])
def test_bad_stage_all_setting(override: str, expected: str, trained: Path, tmp_path: Path,
                               capsys: pytest.CaptureFixture) -> None:
    """Refused before any stage of stage=all runs."""
    run = copy_run(trained, tmp_path)
    before = snapshot(run)
    msg = guarded_error(lambda: run_stages(cfg_for(tmp_path, "stage=all", override)), capsys)
    assert msg == expected
    assert_kept(before, run)


def test_every_preset_passes_the_config_check(tmp_path: Path) -> None:
    for exp in ("smoke", "cpu", "paper"):
        check_config(compose_config([f"experiment={exp}"], tmp_path))
    check_config(compose_config([], tmp_path))


@pytest.mark.parametrize(("stage", "missing"), [("fisher", "lm.ckpt"), ("meta", "lm.ckpt"), ("evaluate", "lm.ckpt"),
                                                ("meta", "fisher.pt")])
def test_missing_artifact(stage: str, missing: str, trained: Path, tmp_path: Path,
                          capsys: pytest.CaptureFixture) -> None:
    run = copy_run(trained, tmp_path)
    (run / missing).unlink()
    before = snapshot(run)
    over = ["gate=krause_init"] if missing == "fisher.pt" else []  # gate=paper only drops the Fisher features
    msg = guarded_error(entry(tmp_path, stage, *over, *FISHER_FAST, *EVAL_FAST), capsys)
    assert missing in msg and ("stage=lm" in msg if missing == "lm.ckpt" else "stage=fisher" in msg)
    assert_kept(before, run)


def test_missing_meta_ckpt_is_skipped_with_a_note(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    run = copy_run(trained, tmp_path)
    (run / "meta.ckpt").unlink()
    caplog.set_level(logging.INFO)
    res = evaluation.run(check_config(cfg_for(tmp_path, "eval.methods=[static,meta]", "eval.splits=[valid]",
                                              "eval.smooth=20")))
    note = next(m for m in caplog.messages if "skipped: no meta.ckpt" in m)
    with capsys.disabled():
        print(f"\n  exit 0; log: {note}")
    assert "meta" in res["skipped"] and "static" in res["splits"]["valid"]
    # results.json names the artifacts it used by their sha256
    hashes = json.loads((run / "results.json").read_text())["checkpoints"]
    assert hashes == {a: file_sha256(run / a) for a in ("lm.ckpt", "fisher.pt")}


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
@pytest.mark.parametrize(("artifact", "stage", "expect"), [
    ("lm.ckpt", "fisher", "LM checkpoint"), ("fisher.pt", "meta", "Fisher artifact"),
    ("meta.ckpt", "evaluate", "meta-learner checkpoint")])
def test_corrupt_artifact(artifact: str, stage: str, expect: str, damage: str, trained: Path, tmp_path: Path,
                          capsys: pytest.CaptureFixture) -> None:
    run = copy_run(trained, tmp_path)
    blob = (run / artifact).read_bytes()
    (run / artifact).write_bytes(b"\x00garbage" * 100 if damage == "garbage" else blob[: len(blob) // 2])
    before = snapshot(run)
    over = ["gate=krause_init"] if artifact == "fisher.pt" else []
    msg = guarded_error(entry(tmp_path, stage, *over, *FISHER_FAST, "eval.methods=[static,meta]",
                              "eval.splits=[valid]"), capsys)
    assert expect in msg and "rerun" in msg and str(run / artifact) in msg
    assert_kept(before, run)


def test_nan_meta_loss_skips_the_update_and_goes_on(trained: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    run = copy_run(trained, tmp_path)
    seen: dict[str, Any] = {}

    class NaNOnce(meta_stage.MetaTrainModule):
        """The second unroll's meta-loss is NaN (as a diverging inner loop would make it)."""

        def unroll(self, *a: Any, **k: Any) -> tuple[Tensor, Tensor, Any, int]:
            loss, theta, hidden, n = super().unroll(*a, **k)
            return (loss * float("nan") if self.n_unrolls == 1 else loss), theta, hidden, n

        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            phi = [p.detach().clone() for p in self.meta.parameters()]
            out = super().training_step(batch, batch_idx)
            seen.setdefault("losses", []).append(float(out))
            if self.n_unrolls == 2:  # the step just taken was the NaN one: φ must be untouched
                seen["phi_kept"] = all(torch.equal(a, b) for a, b in zip(phi, self.meta.parameters(), strict=True))
            return out

    monkeypatch.setattr(meta_stage, "MetaTrainModule", NaNOnce)
    caplog.set_level(logging.INFO)
    res = meta_stage.run(cfg_for(tmp_path, "stage=meta", *META_FAST))
    note = next(r.message for r in caplog.records if "non-finite" in r.message and r.levelname == "WARNING")
    with capsys.disabled():
        print(f"\n  exit 0; log: {note}")
    assert res["skipped"] == 1 and res["steps"] == 4  # one more batch was read to make up the skipped update
    assert seen["phi_kept"] and len(seen["losses"]) == 5
    assert all(v == v for i, v in enumerate(seen["losses"]) if i != 1)  # finite again after the skip
    meta, _ = load_meta(run / "meta.ckpt")
    assert all(bool(torch.isfinite(p).all()) for p in meta.parameters())


def test_output_under_a_regular_file_cli(tmp_path: Path) -> None:
    """Root ignores permission bits (the tests may run as root), but nobody can create a directory inside a file."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    msg = cli_error(run_cli("train.py", blocker / "runs", "stage=lm"))
    assert "cannot write" in msg and str(blocker) in msg and "paths.root" in msg
    assert blocker.read_text() == "not a directory"


def test_output_under_a_regular_file_in_process(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    msg = guarded_error(lambda: run_stages(cfg_for(blocker / "runs", "stage=lm")), capsys)
    assert "cannot create the run directory" in msg and "paths.root" in msg


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="running as root, which ignores permission bits; "
                           "test_output_under_a_regular_file_* cover an unwritable paths.root")
def test_read_only_run_directory(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = copy_run(trained, tmp_path)
    before = snapshot(run)
    run.chmod(0o555)
    try:
        msg = guarded_error(lambda: run_stages(cfg_for(tmp_path, "stage=lm", *LM_FAST)), capsys)
    finally:
        run.chmod(0o755)
    assert "not writable" in msg and "paths.root" in msg
    assert_kept(before, run)


# ----------------------------------------------------------------------------------------------------
# 3. provenance: each artifact records what it was made from, and later stages refuse a mismatch
# ----------------------------------------------------------------------------------------------------


def test_artifacts_record_their_inputs(trained: Path) -> None:
    lm_ck = load(trained / "lm.ckpt")
    lm_hp = lm_ck["provenance"]
    assert lm_ck["format"] == "dynlm-lm/1" and lm_ck["model"]["_target_"] == "dynlm_pl.models.AWDLSTM"
    assert len(lm_hp["vocab_hash"]) == 64 and lm_hp["data_source"].startswith("synthetic:")
    assert len(lm_ck["vocab"]) == lm_ck["vocab_size"]
    fisher = torch.load(trained / "fisher.pt", weights_only=True)
    assert fisher["lm_sha256"] == file_sha256(trained / "lm.ckpt")
    assert fisher["meta"]["vocab_hash"] == lm_hp["vocab_hash"]
    meta = load(trained / "meta.ckpt")
    prov = meta["hyper_parameters"]["provenance"]
    assert prov["lm_sha256"] == file_sha256(trained / "lm.ckpt")
    assert prov["fisher_sha256"] == file_sha256(trained / "fisher.pt")
    assert prov["vocab_hash"] == lm_hp["vocab_hash"] and prov["dynamic"]["include"] == ["*"]
    assert meta["dynamic_names"] and len(meta["dynamic_names"]) == len(set(meta["dynamic_names"]))


@pytest.fixture
def retrained(trained: Path, tmp_path: Path) -> Path:
    """The trained run with lm.ckpt replaced by another LM (another seed): fisher.pt and meta.ckpt are stale."""
    run = copy_run(trained, tmp_path)
    other = tmp_path / "other"
    lm_stage.run(cfg_for(other, "stage=lm", *LM_FAST, "seed=7"))
    shutil.copy(other / "smoke" / "lm.ckpt", run / "lm.ckpt")
    return run


@pytest.mark.parametrize("stage", ["meta", "evaluate"])
def test_fisher_from_another_lm_is_refused(stage: str, retrained: Path, capsys: pytest.CaptureFixture) -> None:
    before = snapshot(retrained)
    msg = guarded_error(entry(retrained.parent, stage, "gate=krause_init", *EVAL_FAST), capsys)
    assert "made from another LM checkpoint" in msg and "stage=fisher" in msg
    assert_kept(before, retrained)


def test_meta_ckpt_from_another_lm_is_refused(retrained: Path, capsys: pytest.CaptureFixture) -> None:
    (retrained / "fisher.pt").unlink()  # else the stale fisher.pt is refused first
    before = snapshot(retrained)
    msg = guarded_error(entry(retrained.parent, "evaluate", "eval.methods=[static,meta]", "eval.splits=[valid]"),
                        capsys)
    assert "meta-trained on another lm.ckpt" in msg and "stage=meta" in msg
    assert_kept(before, retrained)


@pytest.mark.parametrize("stage", ["fisher", "meta", "evaluate"])
def test_another_vocabulary_is_refused(stage: str, trained: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture) -> None:
    run = copy_run(trained, tmp_path)
    before = snapshot(run)
    msg = guarded_error(entry(tmp_path, stage, "data.synthetic.vocab_size=300", *FISHER_FAST, *EVAL_FAST), capsys)
    assert "another vocabulary" in msg and "stage=lm" in msg
    assert_kept(before, run)


def test_meta_ckpt_for_another_parameter_layout_is_refused(trained: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    run = copy_run(trained, tmp_path)
    ck = load(run / "meta.ckpt")
    # φ trained on all tensors (dynamic_names), but its recorded selection now gives fewer: evaluate.py rebuilds the
    # selection from the checkpoint and must not pair φ's per-tensor embeddings with the wrong tensors.
    ck["hyper_parameters"]["provenance"]["dynamic"] = {"include": ["*"], "exclude": ["rnns.*"]}
    torch.save(ck, run / "meta.ckpt")
    before = snapshot(run)
    msg = guarded_error(entry(tmp_path, "evaluate", "eval.methods=[static,meta]", "eval.splits=[valid]"), capsys)
    assert "adapts other parameters" in msg and "stage=meta" in msg
    assert_kept(before, run)


def test_meta_resume_with_another_dynamic_selection_is_refused(trained: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    run = copy_run(trained, tmp_path)
    assert (run / "checkpoints" / "meta" / "last.ckpt").is_file()
    before = snapshot(run)
    msg = guarded_error(lambda: run_stages(cfg_for(tmp_path, "stage=meta", *META_FAST, "meta.steps=6",
                                                   "meta.dynamic.exclude=[rnns.*]", "resume=true")), capsys)
    assert "cannot resume" in msg and "meta.dynamic" in msg and "resume=true" in msg
    assert_kept(before, run)


def _write_lock(run: Path, pid: int, host: str | None = None) -> None:
    (run / ".lock").write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(), "stage": "meta",
                                           "started": "2026-12-03 10:00:00"}))


def test_a_second_process_on_a_run_directory_stops_at_once(trained: Path, tmp_path: Path) -> None:
    """A run directory held by a live process (here: this test's own, as `python train.py stage=meta` would hold
    it) or by a process on another host refuses a second writer with one line naming the holder."""
    run = copy_run(trained, tmp_path)
    _write_lock(run, os.getpid())
    before = snapshot(run)
    p = run_cli("train.py", tmp_path, "stage=meta", *META_FAST)
    assert cli_error(p) == (f"error: run directory {run} is in use by pid {os.getpid()} on {socket.gethostname()} "
                            f"(meta, since 2026-12-03 10:00:00); wait for it to finish or use another name= "
                            f"(delete {run / '.lock'} only if it is gone)")
    assert_kept(before, run)
    _write_lock(run, 1, host="another-node")  # pid 1 exists here, but the holder is elsewhere: cannot be checked
    p = run_cli("evaluate.py", tmp_path, *EVAL_FAST)
    assert "is in use by pid 1 on another-node" in cli_error(p)


def test_a_lock_left_by_a_killed_process_is_taken_over(trained: Path, tmp_path: Path) -> None:
    run = copy_run(trained, tmp_path)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    _write_lock(run, gone.pid)
    p = run_cli("evaluate.py", tmp_path, *EVAL_FAST)
    assert p.returncode == 0, p.stderr
    notice = [line for line in p.stdout.splitlines() if "taking over" in line]
    assert notice == [f"[dynlm] taking over {run / '.lock'}: its holder, pid {gone.pid} (meta, since "
                      "2026-12-03 10:00:00), is gone"]
    assert not (run / ".lock").exists()  # released when the run ends


def test_the_lock_is_held_while_a_stage_writes_and_released_after(trained: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    run = copy_run(trained, tmp_path)
    seen: list[dict[str, Any]] = []
    real = evaluation._run

    def spy(cfg: DictConfig) -> dict[str, Any]:
        seen.append(json.loads((run / ".lock").read_text()))
        return real(cfg)

    monkeypatch.setattr(evaluation, "_run", spy)
    run_stages(cfg_for(tmp_path, "stage=all", "pipeline=[evaluate]", *EVAL_FAST))
    assert seen and seen[0]["pid"] == os.getpid() and seen[0]["stage"] == "evaluate"
    assert not (run / ".lock").exists()


@pytest.mark.parametrize(("command", "limit"), [
    (["train.py", "stage=lm", *LM_FAST], 200_000),  # Lightning's checkpoints (~1 MB here)
    (["train.py", "stage=fisher", *FISHER_FAST], 200_000),  # fisher.pt (~0.7 MB)
    (["evaluate.py", *EVAL_FAST], 12_000),  # per-method losses, results, plots
], ids=["lm", "fisher", "evaluate"])
def test_a_full_disk_keeps_every_previous_artifact(command: list[str], limit: int, trained: Path,
                                                   tmp_path: Path) -> None:
    """A write that fails for lack of space (here: a file-size limit, EFBIG, which needs no privileges) stops with
    one line naming the file, and every artifact already in the run directory is left exactly as it was."""
    run = copy_run(trained, tmp_path)
    before = snapshot(run)

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    p = subprocess.run(cli_args(command[0], tmp_path, *command[1:]), cwd=REPO_ROOT, env=cli_env(),
                       capture_output=True, text=True, timeout=300, preexec_fn=small_files)
    msg = cli_error(p)
    assert re.fullmatch(rf"error: cannot write {re.escape(str(run))}/\S+: (file larger than the file-size limit|the "
                        r"write failed \(a full disk or a file-size limit\)); the previous \S+ \(if any\) is kept: "
                        r"free some space \(or raise the limit\) and rerun", msg), msg
    assert_kept(before, run)
    assert not list(run.rglob("*.tmp")), "no temporary file is left behind"


def test_a_requeued_slurm_job_resumes_and_takes_over_its_own_lock(trained: Path, tmp_path: Path) -> None:
    """hydra/launcher=slurm requeues a preempted job, which reruns the same command: SLURM_RESTART_COUNT makes it
    resume, and the lock its first run left (same SLURM_JOB_ID, another node) is its own."""
    run = copy_run(trained, tmp_path)
    (run / ".lock").write_text(json.dumps({"pid": 1, "host": "node-that-was-preempted", "stage": "lm",
                                           "started": "2026-12-03 10:00:00", "job": "77"}))
    p = subprocess.run(cli_args("train.py", tmp_path, "stage=lm", *LM_FAST), cwd=REPO_ROOT, capture_output=True,
                       text=True, timeout=300, env={**cli_env(), "SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    assert "[dynlm] SLURM requeued this job (1 times): resume=true" in p.stdout
    assert "taking over" in p.stdout and "Restoring states from the checkpoint path" in p.stdout + p.stderr
    assert not (run / ".lock").exists()
    other_job = {**cli_env(), "SLURM_JOB_ID": "78"}  # another job is refused as usual
    (run / ".lock").write_text(json.dumps({"pid": 1, "host": "elsewhere", "stage": "lm", "started": "-",
                                           "job": "77"}))
    p = subprocess.run(cli_args("train.py", tmp_path, "stage=lm", *LM_FAST), cwd=REPO_ROOT, capture_output=True,
                       text=True, timeout=300, env=other_job)
    assert "is in use by pid 1 on elsewhere" in cli_error(p)


def test_meta_stage_trains_with_the_fast_first_order_meta_gradient(trained: Path, tmp_path: Path) -> None:
    """meta.fast_first_order=true through the stage: φ moves, every step is taken, and meta.order=2 with it is
    refused in one line."""
    copy_run(trained, tmp_path)
    res = run_stages(cfg_for(tmp_path, "stage=meta", *META_FAST, "meta.fast_first_order=true",
                             "meta.optim.lr=0.05"))["meta"]
    assert res["steps"] == 4 and res["skipped"] == 0 and math.isfinite(res["val_ppl_trained"])
    last = load(tmp_path / "smoke" / "checkpoints" / "meta" / "last.ckpt")
    assert last["hyper_parameters"]["fast_first_order"] is True
    init = load(trained / "meta.ckpt")["state_dict"]  # trained by the autograd path from the same start
    assert max_abs_diff(init, last["state_dict"]) > 0
    with pytest.raises(DynlmError, match=r"meta\.fast_first_order is the first-order meta-gradient"):
        run_stages(cfg_for(tmp_path, "stage=meta", *META_FAST, "meta.fast_first_order=true", "meta.order=2"))


def test_meta_stage_trains_on_a_sample_of_the_coordinates(trained: Path, tmp_path: Path) -> None:
    """meta.reverse_sample=0.5 through the stage: φ moves, every step is taken, the checkpoint records the fraction;
    without meta.fast_first_order it is refused in one line."""
    copy_run(trained, tmp_path)
    res = run_stages(cfg_for(tmp_path, "stage=meta", *META_FAST, "meta.fast_first_order=true",
                             "meta.reverse_sample=0.5", "meta.optim.lr=0.05"))["meta"]
    assert res["steps"] == 4 and res["skipped"] == 0 and math.isfinite(res["val_ppl_trained"])
    last = load(tmp_path / "smoke" / "checkpoints" / "meta" / "last.ckpt")
    assert last["hyper_parameters"]["reverse_sample"] == 0.5
    assert max_abs_diff(load(trained / "meta.ckpt")["state_dict"], last["state_dict"]) > 0
    with pytest.raises(DynlmError, match=r"meta\.reverse_sample=0\.5 samples the coordinates of the fast first-order"):
        run_stages(cfg_for(tmp_path, "stage=meta", *META_FAST, "meta.reverse_sample=0.5"))
