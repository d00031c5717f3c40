"""Scale (issue 8) on CPU stand-ins: DDP meta-training, bf16 mixed precision, Hydra multirun, SLURM preset.

Every test reads the same tiny pretrained LM and Fisher pass (`base_root`), made once per module.
"""

from __future__ import annotations

import copy
import csv
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import REPO_ROOT, compose_config
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig
from test_meta import fake_fisher

from dynlm_pl.data import UnrollChunks, article_reset_mask, batchify, stream_rows, synthetic_corpus
from dynlm_pl.errors import DynlmError
from dynlm_pl.meta.learner import build_meta_learner
from dynlm_pl.meta.rules import GateRule, RMSRule, SGDRule
from dynlm_pl.meta.scoring import adaptive_eval, score
from dynlm_pl.meta.weights import DynamicWeights, drift_norm
from dynlm_pl.models.awd_lstm import AWDLSTM, StreamLinear, detach_hidden, lm_loss
from dynlm_pl.pipeline import run_stages

# A small synthetic corpus with short articles, so that both training streams hit an article start (θ reset)
# within the first unrolls: a rank reading the wrong stream's reset mask would then change φ.
ARTICLES = {"train": 40, "valid": 4, "test": 4}
ARTICLE_LEN = 60
DATA = [f"data.synthetic.articles.{k}={v}" for k, v in ARTICLES.items()] + [f"data.synthetic.article_len={ARTICLE_LEN}"]
QUIET = ["trainer.enable_progress_bar=false"]
BASE = "base"  # the run holding lm.ckpt and fisher.pt that the other runs start from (from_run=base)
UNROLL, STEPS = 10, 2
# Meta-training small enough for seconds: 2 meta-steps of 10 inner steps, validation on 50 tokens once.
# gate=paper (with the Fisher feature from fisher.pt): krause_init would first tune its rule on the slice.
META_SWEEPABLE = ["experiment=smoke", *DATA, *QUIET, "stage=meta", "gate=paper", "meta.data=train",
                  f"meta.steps={STEPS}", f"meta.val_every={STEPS}", "meta.val_tokens=50"]
META = [*META_SWEEPABLE, f"from_run={BASE}", f"unroll={UNROLL}"]


@pytest.fixture(scope="module")
def base_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """paths.root with runs/base/{lm.ckpt, fisher.pt}: a 2-batch LM and a 600-token Fisher pass."""
    root = tmp_path_factory.mktemp("scale")
    common = ["experiment=smoke", f"name={BASE}", *DATA, *QUIET, "lm.trainer.max_epochs=1",
              "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "fisher.tokens=600",
              "fisher.batch_size=4", "fisher.window=10", "fisher.ms_batch_size=10"]
    for stage in ("lm", "fisher"):
        run_stages(compose_config([*common, f"stage={stage}"], root))
    GlobalHydra.instance().clear()
    return root


def phi(path: Path) -> dict[str, torch.Tensor]:
    """The meta-learner's parameters in a meta checkpoint."""
    sd = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    return {k: v for k, v in sd.items() if k.startswith("meta.")}


def logged(run: Path, key: str) -> list[float]:
    """Values of `key` in the run's CSV log, in step order."""
    (path,) = run.glob("logs/version_*/metrics.csv")
    with path.open() as f:
        return [float(r[key]) for r in csv.DictReader(f) if r.get(key)]


# ----------------------------------------------------------------------------------------------------
# 1. DDP meta-training: 2 ranks × 1 stream make the same φ update as 1 process × 2 streams
# ----------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun_worker(rank: int, world: int, port: int, cfg: DictConfig, record: str) -> None:
    """What torchrun gives each process: Lightning sees TorchElasticEnvironment and launches nothing itself,
    so every rank runs the whole stage, as under torchrun or srun on a cluster. Each rank saves the training
    streams it read to `record.<rank>`."""
    init = UnrollChunks.__init__

    def recording_init(self: UnrollChunks, streams: torch.Tensor, *args: int) -> None:
        torch.save(streams.clone(), f"{record}.{rank}")
        init(self, streams, *args)

    UnrollChunks.__init__ = recording_init  # this forked process only
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world),
                       "RANK": str(rank), "LOCAL_RANK": str(rank), "GROUP_RANK": "0",
                       "LOCAL_WORLD_SIZE": str(world), "TORCHELASTIC_RUN_ID": "test_scale"})
    torch.set_num_threads(1)
    try:
        run_stages(cfg)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# per-step checkpointing, nested groups of 3 steps (CheckpointedSteps), and meta.fast_first_order (its gradients
# all-reduced by hand: no autograd graph for DDP's hooks)
DDP_VARIANTS = ("0", "3", "fast")


@pytest.mark.parametrize("variant", DDP_VARIANTS)
def test_ddp_two_ranks_make_the_single_process_phi_update(base_root: Path, variant: str) -> None:
    # Precondition: both streams reset θ at an article start inside the 2 unrolls, at different segments.
    corpus = synthetic_corpus(articles=ARTICLES, article_len=ARTICLE_LEN)
    train = batchify(corpus.splits["train"], 2)
    mask = article_reset_mask(corpus.articles["train"], 2, train.size(1), 5)[:, : STEPS * UNROLL]
    assert mask.any(1).all() and not torch.equal(mask[0], mask[1])

    fast = variant == "fast"
    meta = [*META, "logger=csv", "meta.streams=2", "meta.trainer.log_every_n_steps=1",
            f"meta.checkpoint_group={0 if fast else variant}", f"meta.fast_first_order={fast}"]
    # One process, both streams (per-stream θ [2, P]: batched matmuls, StreamLSTM).
    run_stages(compose_config([*meta, f"name=one{variant}"], base_root))
    # Two processes, one stream each (θ [P], torch.lstm).
    cfg = compose_config([*meta, f"name=two{variant}", "trainer=ddp_cpu", "trainer.strategy=ddp"], base_root)
    # fork: the children inherit the imported modules (a spawned child re-imports Lightning, ~10x slower).
    record = str(base_root / "streams")
    mp.start_processes(_torchrun_worker, args=(2, _free_port(), cfg, record), nprocs=2, join=True,
                       start_method="fork")
    for rank in (0, 1):  # each rank read its own stream, not both
        assert torch.equal(torch.load(f"{record}.{rank}", weights_only=True), train[rank : rank + 1])
        os.unlink(f"{record}.{rank}")

    one, two = base_root / f"one{variant}", base_root / f"two{variant}"
    a, b = phi(one / "meta-last.ckpt"), phi(two / "meta-last.ckpt")
    assert a.keys() == b.keys()
    assert float((a["meta.out.bias"] - torch.tensor([10.0, 0.0, -10.0])).abs().max()) > 1e-4  # φ moved from init
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"max |Δφ| between 1 and 2 processes: {diff:.3g}")
    assert diff <= 1e-6
    # Adam's step hardly depends on the gradient's scale, so φ alone would not catch a rank dividing by the
    # global token count (half the gradient): the logged pre-clip norm of the all-reduced gradient does.
    g1, g2 = logged(one, "train/grad_norm"), logged(two, "train/grad_norm")
    assert len(g1) == len(g2) == STEPS
    for x, y in zip(g1, g2, strict=True):
        assert math.isclose(x, y, rel_tol=1e-5), (g1, g2)
    # One run directory, written once: rank 1 left no log version, checkpoint or hydra directory of its own.
    assert {p.name for p in base_root.iterdir()} - {BASE} <= {f"{w}{g}" for w in ("one", "two") for g in DDP_VARIANTS}
    assert [p.name for p in (two / "logs").iterdir()] == ["version_0"]
    assert {"meta.ckpt", "meta-last.ckpt", "lm.ckpt", "fisher.pt"} <= {p.name for p in two.iterdir()}
    assert os.path.samefile(two / "lm.ckpt", base_root / BASE / "lm.ckpt")  # linked, not retrained


def test_streams_must_split_evenly_over_ranks(base_root: Path) -> None:
    # Checked before any process starts (ddp_spawn with 2 devices: the trainer knows its world size).
    cfg = compose_config([*META, "name=odd", "meta.streams=3", "trainer=ddp_cpu"], base_root)
    with pytest.raises(DynlmError, match=r"meta\.streams=3 cannot be split evenly over 2 processes"):
        run_stages(cfg)


# ----------------------------------------------------------------------------------------------------
# 2. Mixed precision: trainer.precision=bf16-mixed on CPU
# ----------------------------------------------------------------------------------------------------


def test_bf16_mixed_lm_fisher_meta_stay_finite(base_root: Path) -> None:
    common = ["experiment=smoke", "name=bf16", *DATA, *QUIET, "eval.tune.tokens=100", "trainer.precision=bf16-mixed",
              "gate=paper",
              "lm.trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
              "fisher.tokens=600", "fisher.batch_size=4", "fisher.window=10", "fisher.ms_batch_size=10",
              f"unroll={UNROLL}", f"meta.steps={STEPS}", f"meta.val_every={STEPS}", "meta.val_tokens=50"]
    res = {s: run_stages(compose_config([*common, f"stage={s}"], base_root))[s] for s in ("lm", "fisher", "meta")}
    out = base_root / "bf16"
    assert {"lm.ckpt", "fisher.pt", "meta.ckpt", "meta-last.ckpt"} <= {p.name for p in out.iterdir()}
    assert math.isfinite(res["lm"]["val_ppl"])
    m = res["meta"]
    assert m["skipped"] == 0 and all(math.isfinite(m[k]) for k in ("val_ppl", "val_ppl_trained", "val_ppl_init"))
    for k, v in phi(out / "meta-last.ckpt").items():  # φ stays float32 master weights
        assert v.dtype == torch.float32 and torch.isfinite(v).all(), k
    fisher = torch.load(out / "fisher.pt", map_location="cpu", weights_only=False)
    assert all(t.dtype == torch.float32 for t in fisher["fisher"].values())  # the Fisher pass ran in fp32


@pytest.mark.parametrize("param", ["paper", "krause"])
def test_gate_update_is_float32_under_autocast(param: str) -> None:
    """bf16 gates made f = σ(10) exactly 1 (the paper gate's COPY + FLUSH then drifts θ): the rule must give
    the same θ_t with and without autocast."""
    torch.manual_seed(0)
    lm = AWDLSTM(30, emb_size=6, hidden_size=8, num_layers=2).eval()
    dyn = DynamicWeights.build(lm)
    dyn.ms = torch.rand(dyn.spec.numel) * 1e-4 + 1e-6
    gate = {"param": param, "hidden": [8], "features": ["theta", "delta", "grad", "loss"], "embed_dim": 2}
    rule = GateRule(build_meta_learner(gate, len(dyn.spec.names)), dyn)
    theta = dyn.theta0 + 1e-3 * torch.randn_like(dyn.theta0)
    grad, loss = 1e-2 * torch.randn_like(theta), torch.tensor(3.0)
    ref = rule.update(theta, grad, loss)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = rule.update(theta, grad, loss)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------
# 3. Hydra multirun: one run directory per job
# ----------------------------------------------------------------------------------------------------


def test_run_dir_is_per_job_only_in_multirun(tmp_path: Path) -> None:
    single = compose_config(["experiment=smoke", "unroll=20"], tmp_path)
    assert Path(single.paths.run_dir) == tmp_path / "smoke"  # overrides never move a single run
    swept = compose_config(["experiment=smoke", "unroll=20", "stage=meta", "from_run=x", "hydra.mode=MULTIRUN"],
                           tmp_path)
    assert Path(swept.paths.run_dir) == tmp_path / "smoke" / "unroll-20"  # excluded keys do not name it
    GlobalHydra.instance().clear()


def test_multirun_jobs_write_separate_run_dirs(base_root: Path) -> None:
    cmd = [sys.executable, "train.py", "-m", *META_SWEEPABLE, f"from_run={BASE}", f"paths.root={base_root}",
           "name=sweep", "logger=none", "unroll=2,3", "gate.hidden=[8],[16]"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = base_root / "sweep"
    jobs = sorted(p.parent for p in sweep.glob("*/meta.ckpt"))
    assert len(jobs) == 4, [p.name for p in sweep.iterdir()]
    assert not (sweep / "meta.ckpt").exists()  # no job wrote into a shared directory
    seen = set()
    for job in jobs:
        hp = torch.load(job / "meta.ckpt", map_location="cpu", weights_only=False)["hyper_parameters"]
        unroll, hidden = hp["unroll"], tuple(hp["gate"]["hidden"])
        seen.add((unroll, hidden))
        # The directory is named by the job's own overrides and holds that job's result.
        assert f"_gate.hidden-{hidden[0]}_" in job.name and job.name.endswith(f"_unroll-{unroll}"), job.name
        assert not set("=,[]'\" ") & set(job.name), job.name  # a name the command line carries unquoted
        assert os.path.samefile(job / "lm.ckpt", base_root / BASE / "lm.ckpt")
    assert seen == {(u, (h,)) for u in (2, 3) for h in (8, 16)}


def test_from_run_links_lm_fisher_and_tuned_baselines_and_never_writes_back(tmp_path: Path) -> None:
    """from_run brings lm.ckpt, fisher.pt and tuned.json (what it has of them) as links; the job re-saving its
    tuned.json (a method tuned there) replaces its own link, the source run's file stays as it was."""
    from dynlm_pl.artifacts import import_artifacts, save_tuned

    src, dst = tmp_path / "src", tmp_path / "job"
    src.mkdir()
    dst.mkdir()
    for name, text in (("lm.ckpt", "lm"), ("tuned.json", '{"key": {}, "best": {}}')):
        (src / name).write_text(text)
    import_artifacts(src, dst)
    assert sorted(p.name for p in dst.iterdir()) == ["lm.ckpt", "tuned.json"]  # no fisher.pt in src: none here
    assert os.path.samefile(src / "tuned.json", dst / "tuned.json")
    save_tuned(dst / "tuned.json", {"lm_sha256": "x"}, {"sgd": {"hparams": {"lr": 1.0}}})
    assert (src / "tuned.json").read_text() == '{"key": {}, "best": {}}'
    assert not os.path.samefile(src / "tuned.json", dst / "tuned.json")


def test_from_run_without_lm_says_what_to_do(tmp_path: Path) -> None:
    cfg = compose_config([*META_SWEEPABLE, "from_run=nowhere"], tmp_path)
    with pytest.raises(DynlmError, match=r"from_run: no lm\.ckpt in .*nowhere"):
        run_stages(cfg)


# ----------------------------------------------------------------------------------------------------
# 4. SLURM: the submitit launcher preset composes (nothing is submitted)
# ----------------------------------------------------------------------------------------------------


def test_slurm_launcher_preset_composes(tmp_path: Path) -> None:
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher",
                        reason="hydra/launcher=slurm needs the optional plugin: pip install -e '.[slurm]'")
    import hydra

    cfg = compose_config(["hydra/launcher=slurm", "experiment=paper", "trainer=ddp", "trainer.devices=4",
                          "trainer.num_nodes=2", "hydra.launcher.partition=gpu"], tmp_path)
    launcher = hydra.utils.instantiate(cfg.hydra.launcher)  # builds the launcher; submits nothing
    assert type(launcher).__name__ == "SlurmLauncher"
    p = launcher.params
    # One SLURM task per GPU on every node: what Lightning's SLURMEnvironment expects for trainer=ddp.
    assert (p["nodes"], p["tasks_per_node"], p["gpus_per_node"], p["partition"]) == (2, 4, 4, "gpu")
    assert p["max_num_timeout"] == 0
    single = compose_config(["hydra/launcher=slurm", "trainer=gpu"], tmp_path)  # no num_nodes key: one node
    assert hydra.utils.instantiate(single.hydra.launcher).params["nodes"] == 1
    GlobalHydra.instance().clear()


# ----------------------------------------------------------------------------------------------------
# 5. Per-stream dynamic weights in evaluation: B streams, each with its own θ, == B batch-1 runs
# ----------------------------------------------------------------------------------------------------


def _tiny_model(vocab: int, kernel: str = "manual") -> AWDLSTM:
    torch.manual_seed(0)
    return AWDLSTM(vocab, emb_size=8, hidden_size=12, num_layers=2, dropout=0.0, dropouth=0.0, dropouti=0.0,
                   dropoute=0.0, wdrop=0.0, kernel=kernel).eval().requires_grad_(False)


@pytest.mark.parametrize(("rule_name", "kernel"), [("sgd", "manual"), ("rms", "manual"), ("meta", "manual"),
                                                   ("sgd", "fused"), ("meta", "fused"), ("meta_compiled", "fused")])
def test_per_stream_eval_equals_separate_batch1_runs(synthetic_corpus_session, rule_name: str, kernel: str) -> None:
    """B streams with their own θ (batched matmuls; kernel=fused: StreamLSTM) == B runs at batch 1 (meta_compiled:
    the gate=krause_fast form as eval.fused_gate runs it, one compiled pass over the [B, P] streams)."""
    tokens = synthetic_corpus_session.splits["valid"][:403]
    model = _tiny_model(len(synthetic_corpus_session.vocab), kernel)
    dyn = DynamicWeights.build(model, fisher_art=fake_fisher(model))
    gate = {"param": "krause", "hidden": [], "features": ["theta", "delta", "grad", "loss", "rms"], "embed_dim": 2,
            "lr": 0.3, "lamb": 0.01}
    if rule_name == "meta_compiled":  # η 0.1: at 0.3 this form's ×6 corrections amplify the batched matmuls'
        # float rounding over 80 updates to ~1.4e-5 (the eager pass as much: a property of the rule, not the pass)
        gate.update(param="rational", features=["theta", "dnorm", "gnorm", "loss", "rms"], lr=0.1)
    meta = build_meta_learner(gate, len(dyn.spec.names))
    meta.fused = rule_name == "meta_compiled"
    with torch.no_grad():  # a rule away from its Krause initialisation: corrections that depend on the features
        meta.out.weight.normal_(0, 0.3)
    rules = {"sgd": SGDRule(0.5), "rms": RMSRule(dyn, 1e-4, 0.01, 2e-5), "meta": GateRule(meta, dyn)}
    rule = rules["meta" if rule_name == "meta_compiled" else rule_name]
    B = 4
    got = adaptive_eval(model, tokens, rule, 5, dyn, batch_size=B)  # [B, n]
    rows = stream_rows(tokens, B)
    assert got.shape == (B, rows.size(1) - 1)
    for b in range(B):
        alone = adaptive_eval(model, rows[b], rule, 5, dyn)[0]
        assert torch.allclose(got[b], alone, atol=1e-5, rtol=0), (rule_name, b, (got[b] - alone).abs().max())
    assert (got.std(0) > 0).any()  # the streams read different text (a test that cannot pass by symmetry)


@pytest.mark.parametrize(("streams", "kernel"), [(1, "fused"), (3, "fused"), (3, "manual")])
def test_adaptation_gradient_equals_plain_autograd(streams: int, kernel: str) -> None:
    """The first-order adaptation gradient (sparse embedding lookup; per stream, its rows added in place into the
    tied decoder's gradient from StreamLinear) == autograd through the dense ops (float64, to rounding)."""
    torch.manual_seed(0)
    model = AWDLSTM(40, emb_size=6, hidden_size=8, num_layers=2, kernel=kernel).double().eval().requires_grad_(False)
    dyn = DynamicWeights.build(model)
    theta = dyn.theta0 + 0.01 * torch.randn(streams, dyn.spec.numel, dtype=torch.float64)
    theta = theta[0] if streams == 1 else theta
    tokens = torch.randint(0, 40, (streams, 7))
    tokens[:, 2] = tokens[:, 4]  # a word twice in a segment: its rows accumulate
    grads = []
    buf = torch.full_like(theta, float("nan"))  # adaptive_eval's persistent gradient buffer (UnflattenInto)
    for sparse, into in ((False, None), (True, None), (True, buf)):
        th = theta.clone().requires_grad_(True)
        losses, _ = score(model, dyn.spec, th, tokens[:, :-1], tokens[:, 1:], model.init_hidden(streams), sparse,
                          grad_into=into)
        grads.append(torch.autograd.grad(losses.mean(1).sum(), th)[0])
    assert grads[1].layout == torch.strided and torch.allclose(grads[1], grads[0], rtol=1e-10, atol=1e-13)
    assert grads[2] is buf and torch.allclose(buf, grads[0], rtol=1e-10, atol=1e-13)  # every slice written
    emb = slice(0, 40 * 6)  # encoder.weight comes first: both its uses (lookup and decoder) reach the gradient
    assert float(grads[0][..., emb].abs().min()) > 0
    # StreamLinear is twice differentiable (second-order meta-training runs the per-stream LM through it)
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(StreamLinear.apply, (x, w))


def test_shared_theta_eval_equals_an_independent_batch_loop(synthetic_corpus_session) -> None:
    """eval.shared_theta: one θ for all B streams, updated with the gradient of Σ_b mean loss of stream b."""
    tokens = synthetic_corpus_session.splits["valid"][:403]
    model = _tiny_model(len(synthetic_corpus_session.vocab))
    model.kernel = "fused"
    B, lr = 4, 0.5
    got = adaptive_eval(model, tokens, SGDRule(lr), 5, batch_size=B, shared=True)
    rows = stream_rows(tokens, B)
    ref = copy.deepcopy(model).requires_grad_(True)
    hidden, want = ref.init_hidden(B), []
    for s in range(0, rows.size(1) - 1, 5):
        x, y = rows[:, s : s + 5], rows[:, s + 1 : s + 6]
        ref.zero_grad()
        o = ref(x, hidden)
        hidden = detach_hidden(o.hidden)
        losses = lm_loss(o.logits, y, reduction="none").view(B, -1)
        losses.mean(1).sum().backward()
        with torch.no_grad():
            for p in ref.parameters():
                p -= lr * p.grad
        want.append(losses.detach())
    assert torch.allclose(got, torch.cat(want, 1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("streams", [1, 3])
def test_max_drift_keeps_theta_on_the_trust_region(synthetic_corpus_session, streams: int) -> None:
    """eval.max_drift: a rule that drifts far (SGD at a large step, no decay) stays within max_drift·‖θ_0‖ after
    every update, per stream; a radius it never reaches changes nothing. The drift adaptive_eval records itself
    (`drift=`, blocked `drift_norm`) is the largest ‖θ_t − θ_0‖ over streams, computed here from θ_t directly."""
    tokens = synthetic_corpus_session.splits["valid"][:303]
    model = _tiny_model(len(synthetic_corpus_session.vocab))
    dyn = DynamicWeights.build(model)
    r0 = float(dyn.theta0.norm())

    def run(max_drift: float | None) -> tuple[torch.Tensor, list[float]]:
        drift: list[float] = []
        recorded: list[float] = []

        def log(_s: int, th: torch.Tensor, _losses: torch.Tensor) -> None:
            drift.append(float((th.detach().double() - dyn.theta0.double()).norm(dim=-1).max()))

        losses = adaptive_eval(model, tokens, SGDRule(2.0), 5, dyn, batch_size=streams, max_drift=max_drift,
                               on_segment=log, drift=recorded)
        assert len(recorded) == len(drift) > 0
        assert recorded == pytest.approx(drift, rel=1e-5)
        return losses, drift

    free, free_drift = run(None)
    assert max(free_drift) > 0.2 * r0  # without the bound it leaves the ball below
    capped, capped_drift = run(0.1)
    assert max(capped_drift) <= 0.1 * r0 * (1 + 1e-5)
    assert torch.isfinite(capped).all()
    assert not torch.allclose(free, capped)  # the bound acted
    wide, _ = run(1e3)
    assert torch.equal(wide, free)


def test_drift_norm_in_blocks_equals_the_norm_of_the_difference() -> None:
    """`drift_norm` sums squares block by block (several blocks here, the last one short): the same ‖θ − θ_0‖ per
    stream as the norm of the whole difference, for [B, P] and [P]."""
    g = torch.Generator().manual_seed(0)
    theta0 = torch.randn(5000, generator=g)
    theta = theta0 + 1e-3 * torch.randn(3, 5000, generator=g)
    want = (theta.double() - theta0.double()).norm(dim=-1)
    got = drift_norm(theta, theta0, block=4096)  # 1365 columns per block: 4 blocks
    assert got.shape == (3,) and got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    torch.testing.assert_close(drift_norm(theta[1], theta0, block=1024), want[1], rtol=1e-6, atol=0)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_keep_freed_memory_sets_glibc_and_can_be_turned_off() -> None:
    """train.py/evaluate.py make glibc keep freed parameter-sized buffers for reuse (`keep_freed_memory`): a
    touched, freed 64 MB block stays resident (no munmap), where glibc's default returns it to the OS at once.
    DYNLM_MALLOC_KEEP=0: off, the default behaviour."""
    code = ("import ctypes, os; from dynlm_pl.cli import keep_freed_memory; ok = keep_freed_memory(); "
            "libc = ctypes.CDLL('libc.so.6'); libc.malloc.restype = ctypes.c_void_p; "
            "libc.free.argtypes = [ctypes.c_void_p]; n = 64 << 20; "
            "rss = lambda: int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE'); "
            "a = libc.malloc(n); ctypes.memset(a, 1, n); before = rss(); libc.free(a); "
            "print(ok, (before - rss()) >> 20)")  # MB given back to the OS by free
    def run(env: dict[str, str]) -> tuple[str, int]:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**os.environ, **env}).stdout.split()
        return out[0], int(out[1])

    ok, released = run({})
    assert ok == "True" and released < 8
    ok, released = run({"DYNLM_MALLOC_KEEP": "0"})
    assert ok == "False" and released > 56
