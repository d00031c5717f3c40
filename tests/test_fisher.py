"""The Fisher pass (issue 3): estimators against explicit loops, DDP, the artifact, the stage end to end."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dynlm_pl.artifacts import load_fisher, load_lm, save_fisher
from dynlm_pl.data import StreamWindows, fisher_streams
from dynlm_pl.errors import DynlmError
from dynlm_pl.files import file_sha256
from dynlm_pl.fisher import FisherArtifact, estimate_fisher, ewc_penalty, log_prior
from dynlm_pl.models.awd_lstm import AWDLSTM, detach_hidden, lm_loss

V = 40


def tiny_model(seed: int = 0) -> AWDLSTM:
    torch.manual_seed(seed)
    m = AWDLSTM(V, emb_size=6, hidden_size=10, num_layers=2).eval()
    with torch.no_grad():  # a non-zero decoder bias, so its gradient is not trivially shared
        m.decoder_bias.normal_(0, 0.1)
    return m


def tiny_tokens(n: int = 700, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(seed))


def _sq_grad_sums(model: AWDLSTM, streams: torch.Tensor, window: int) -> tuple[dict[str, torch.Tensor], int]:
    """Σ over windows of the squared gradient of each window's mean loss (hidden carried), and the count."""
    sq = {k: torch.zeros_like(p, dtype=torch.float64) for k, p in model.named_parameters()}
    hidden, n = model.init_hidden(streams.size(0)), 0
    for x, y in StreamWindows(streams, window):
        model.zero_grad()
        out = model(x, hidden)
        lm_loss(out.logits, y).backward()
        hidden = detach_hidden(out.hidden)
        for k, p in model.named_parameters():
            sq[k] += p.grad.double().square()
        n += 1
    return sq, n


def loop_empirical(model: AWDLSTM, tokens: torch.Tensor, n_tokens: int, batch: int, window: int,
                   seed: int) -> dict[str, torch.Tensor]:
    """The definition, one example at a time: each stream alone, its windows in order, hidden carried."""
    streams = fisher_streams(tokens, n_tokens, batch, seed)
    per_stream = [_sq_grad_sums(model, streams[b : b + 1], window) for b in range(streams.size(0))]
    n = sum(c for _, c in per_stream)
    return {k: sum(sq[k] for sq, _ in per_stream) / n for k in per_stream[0][0]}


def loop_batch_ms(model: AWDLSTM, tokens: torch.Tensor, n_tokens: int, batch: int, window: int,
                  seed: int) -> dict[str, torch.Tensor]:
    """Krause's gradstat: squared gradient of each mini-batch's mean loss, averaged over mini-batches."""
    sq, n = _sq_grad_sums(model, fisher_streams(tokens, n_tokens, batch, seed), window)
    return {k: v / n for k, v in sq.items()}


def assert_matches(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], model: AWDLSTM) -> None:
    names = {k: tuple(p.shape) for k, p in model.named_parameters()}
    assert list(got) == list(names), "keys must follow named_parameters() (tied weight once)"
    assert "decoder.weight" not in got
    for k, f in got.items():
        assert tuple(f.shape) == names[k] and f.dtype == torch.float32
        assert torch.isfinite(f).all() and (f >= 0).all(), k
        r = ref[k].float()
        assert r.abs().max() > 0, k  # a zero reference would make the comparison vacuous
        # Within 1e-6 of each tensor's scale (float32 per-example gradients, float64 sums).
        torch.testing.assert_close(f, r, rtol=1e-6, atol=1e-6 * float(r.abs().max()), msg=k)


@pytest.mark.parametrize("window", [7, 1])
def test_empirical_matches_one_example_at_a_time(window: int) -> None:
    model, tokens = tiny_model(), tiny_tokens()
    fisher, n = estimate_fisher(model, tokens, "empirical", 240, batch_size=4, window=window, seed=3)
    assert n == 240
    assert_matches(fisher, loop_empirical(model, tokens, 240, 4, window, seed=3), model)


def test_batch_ms_matches_explicit_loop() -> None:
    model, tokens = tiny_model(), tiny_tokens()
    ms, n = estimate_fisher(model, tokens, "batch_ms", 300, batch_size=6, window=5, seed=3)
    assert n == 300
    assert_matches(ms, loop_batch_ms(model, tokens, 300, 6, 5, seed=3), model)
    # Not the same statistic as the empirical Fisher (guards against one estimator standing in for both).
    emp, _ = estimate_fisher(model, tokens, "empirical", 300, batch_size=6, window=5, seed=3)
    assert not torch.allclose(ms["decoder_bias"], emp["decoder_bias"])


def test_whole_split_and_bad_estimator() -> None:
    model, tokens = tiny_model(), tiny_tokens(203)
    _, n = estimate_fisher(model, tokens, "batch_ms", None, batch_size=4, window=5, seed=0)
    assert n == 4 * (203 // 4 - 1)  # every stream scores all but its first token
    with pytest.raises(DynlmError, match=r"fisher\.estimator"):
        estimate_fisher(model, tokens, "true", None, batch_size=4, window=5, seed=0)


def test_deterministic_for_a_seed() -> None:
    model, tokens = tiny_model(), tiny_tokens()
    a, _ = estimate_fisher(model, tokens, "empirical", 120, batch_size=4, window=6, seed=5)
    b, _ = estimate_fisher(model, tokens, "empirical", 120, batch_size=4, window=6, seed=5)
    c, _ = estimate_fisher(model, tokens, "empirical", 120, batch_size=4, window=6, seed=6)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["encoder.weight"], c["encoder.weight"])  # the seed picks the slice


def _ddp_worker(rank: int, world: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        model, tokens = tiny_model(), tiny_tokens()
        res = {est: estimate_fisher(model, tokens, est, 240, batch_size=4, window=5, seed=3, rank=rank,
                                    world=world) for est in ("empirical", "batch_ms")}
        torch.save(res, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_one_and_two_ddp_processes_agree(tmp_path: Path) -> None:
    out = str(tmp_path / "res")
    # fork: the children inherit the imported modules (a spawned child re-imports Lightning, ~10x slower).
    mp.start_processes(_ddp_worker, args=(2, f"file://{tmp_path / 'store'}", out), nprocs=2, join=True,
                       start_method="fork")
    model, tokens = tiny_model(), tiny_tokens()
    for rank in (0, 1):
        res = torch.load(f"{out}.{rank}", weights_only=True)
        for est in ("empirical", "batch_ms"):
            single, n = estimate_fisher(model, tokens, est, 240, batch_size=4, window=5, seed=3)
            two, n2 = res[est]
            assert n2 == n  # tokens counted once, not per rank
            for k in single:  # a double count or a missing all-reduce is off by ~2x, far outside this
                torch.testing.assert_close(two[k], single[k], rtol=1e-6, atol=1e-6 * float(single[k].max()))


def _artifact(sha: str = "a" * 64) -> FisherArtifact:
    theta = {"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "b": torch.tensor([0.5, -0.5])}
    fisher = {"w": torch.tensor([[1.0, 0.0], [2.0, 0.5]]), "b": torch.tensor([3.0, 4.0])}
    ms = {k: v * 2 for k, v in fisher.items()}
    return FisherArtifact(theta, fisher, ms, "empirical", 123, sha, {"seed": 1})


def test_ewc_penalty_and_log_prior_by_hand() -> None:
    art = _artifact()
    params = {"w": torch.tensor([[2.0, 0.0], [3.0, 6.0]], requires_grad=True), "b": torch.tensor([0.5, 0.5])}
    # F (θ − θ0)²: w: 1·1 + 0·4 + 2·0 + 0.5·4 = 3; b: 3·0 + 4·1 = 4.
    lam = 0.3
    pen = ewc_penalty(params, art, lam)
    assert math.isclose(pen.item(), lam / 2 * 7.0, rel_tol=1e-6)
    assert math.isclose(log_prior(params, art).item(), -0.5 * 7.0, rel_tol=1e-6)
    assert math.isclose(ewc_penalty({"b": params["b"]}, art, 2.0).item(), 4.0, rel_tol=1e-6)  # subset of keys
    pen.backward()  # d/dθ = λ F (θ − θ0)
    torch.testing.assert_close(params["w"].grad, lam * torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    with pytest.raises(DynlmError, match="no Fisher entry"):
        ewc_penalty({"other": torch.zeros(2)}, art, 1.0)
    with pytest.raises(DynlmError, match="shape"):
        ewc_penalty({"b": torch.zeros(3)}, art, 1.0)


def test_save_load_and_rejections(tmp_path: Path) -> None:
    path = tmp_path / "fisher.pt"
    with pytest.raises(DynlmError, match="stage=fisher"):
        load_fisher(path)
    save_fisher(_artifact("a" * 64), path)
    art = load_fisher(path, lm_sha256="a" * 64)
    assert art.tokens == 123 and art.estimator == "empirical" and art.meta == {"seed": 1}
    assert torch.equal(art.fisher["w"], _artifact().fisher["w"]) and torch.equal(art.ms["b"], _artifact().ms["b"])
    with pytest.raises(DynlmError, match="another LM checkpoint") as e:
        load_fisher(path, lm_sha256="b" * 64)
    assert "\n" not in str(e.value) and "rerun `python train.py stage=fisher`" in str(e.value)
    path.write_bytes(b"not a torch file")
    with pytest.raises(DynlmError, match="corrupt"):
        load_fisher(path)


def test_stage_end_to_end(compose_cfg, tmp_path: Path) -> None:
    from dynlm_pl.stages import fisher as fisher_stage
    from dynlm_pl.stages import lm as lm_stage

    small = ["data.synthetic.articles={train: 20, valid: 4, test: 4}", "data.synthetic.article_len=150",
             "trainer.enable_progress_bar=false"]
    fisher_over = ["fisher.tokens=600", "fisher.batch_size=4", "fisher.window=10", "fisher.ms_batch_size=10"]
    cfg = compose_cfg(["experiment=smoke", "stage=fisher", *small, *fisher_over])
    with pytest.raises(DynlmError, match=r"python train\.py stage=lm"):
        fisher_stage.run(cfg)  # no lm.ckpt yet
    lm_cfg = compose_cfg(["experiment=smoke", "stage=lm", *small, "lm.trainer.max_epochs=1",
                          "trainer.limit_train_batches=2", "trainer.limit_val_batches=1"])
    lm_stage.run(lm_cfg)
    run = Path(cfg.paths.run_dir)
    res = fisher_stage.run(cfg)
    art = load_fisher(run / "fisher.pt", lm_sha256=file_sha256(run / "lm.ckpt"))
    model, _ = load_lm(run / "lm.ckpt")
    shapes = {k: p.shape for k, p in model.named_parameters()}
    assert art.estimator == "empirical" and res["tokens"] == art.tokens == 600
    assert {k: v.shape for k, v in art.fisher.items()} == shapes == {k: v.shape for k, v in art.ms.items()}
    assert all(torch.equal(art.theta0[k], p.detach()) for k, p in model.named_parameters())
    assert all((f >= 0).all() for f in art.fisher.values()) and art.meta["ms_batch_size"] == 10
    assert not list(run.glob(".fisher-*"))  # no partial results left behind
    # Another vocabulary: refused before any work, and the good fisher.pt is kept.
    before = file_sha256(run / "fisher.pt")
    other = compose_cfg(["experiment=smoke", "stage=fisher", *small, *fisher_over, "data.synthetic.vocab_size=300"])
    with pytest.raises(DynlmError, match="another vocabulary"):
        fisher_stage.run(other)
    assert file_sha256(run / "fisher.pt") == before
    # The LM changes (retrained): the old fisher.pt no longer belongs to it.
    with (run / "lm.ckpt").open("ab") as f:
        f.write(b"\0")
    with pytest.raises(DynlmError, match="another LM checkpoint"):
        load_fisher(run / "fisher.pt", lm_sha256=file_sha256(run / "lm.ckpt"))
