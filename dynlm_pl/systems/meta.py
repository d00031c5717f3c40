"""Stage `meta`: online meta-training of the update rule g_φ (Wolf et al. 2018, §2.1 and appendix B).

The training split is read as `meta.streams` contiguous streams cut into segments of M tokens
(`meta.segment`). Each inner step scores a segment with θ_{t-1} (its loss enters the meta-loss),
takes ∇L_t and applies g_φ: θ_t = f⊙θ_{t-1} + i⊙∇L_t + z⊙θ_0. After `unroll` steps the mean of the
L_t is backpropagated into φ (truncated BPTT through the weights), θ and the hidden state are
detached, and reading continues online. θ goes back to θ_0 every `reset_every` unrolls and/or at
article starts. Only φ trains: the LM is frozen.

Memory: with `checkpointing`, each inner step is one non-reentrant `torch.utils.checkpoint` region,
so an unroll stores about θ_{t-1} and ∇L_t per step (2P floats) and recomputes the step's graph in backward.
`checkpoint_group` G > 1 nests this: groups of G steps run first without any graph and keep only their
input θ and hidden state; backward reruns one group at a time with per-step checkpointing. An unroll of
U steps then holds U/G + 2G parameter-sized tensors instead of 2U (G = √(U/2): 2√(2U)), for one more
forward pass per step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, IterableDataset

from dynlm_pl.common import (
    atomic_copy,
    atomic_torch_save,
    best_model_score,
    check_resumable,
    file_sha256,
    get_rng_state,
    make_datamodule,
    make_trainer,
    run_dir,
    set_rng_state,
)
from dynlm_pl.data import batchify, shard_streams
from dynlm_pl.dynamic import (
    DynamicWeights,
    GateRule,
    RMSRule,
    SGDRule,
    StaticRule,
    adaptive_eval,
    freeze,
    inner_step,
)
from dynlm_pl.errors import DynlmError, require
from dynlm_pl.models.awd_lstm import AWDLSTM, Hidden, detach_hidden
from dynlm_pl.models.meta_learner import KRAUSE_FORMS, MetaLearner, build_meta_learner
from dynlm_pl.systems.lm import check_same_data, load_lm


class UnrollChunks(IterableDataset):
    """(chunk [B, U·M + 1], first segment index) for consecutive unrolls of `streams` [B, N]."""

    def __init__(self, streams: Tensor, unroll: int, segment: int) -> None:
        self.streams, self.span, self.segment, self.start = streams, unroll * segment, segment, 0
        require(streams.size(1) > self.span + 1, f"the training stream ({streams.size(1)} tokens per stream) is "
                f"shorter than one unroll ({self.span} tokens); lower unroll, meta.segment or meta.streams")

    def __iter__(self):
        # `start` > 0 only for a run resumed mid-pass: the tokens before it were read before the checkpoint.
        for s in range(self.start, self.streams.size(1) - self.span - 1 + 1, self.span):
            yield self.streams[:, s : s + self.span + 1], s // self.segment


def article_reset_mask(articles: list[tuple[int, str]], n_streams: int, stream_len: int, segment: int) -> Tensor:
    """[B, n_segments] bool: an article starts among the input tokens of segment j of stream b."""
    n_seg = math.ceil(stream_len / segment)
    mask = torch.zeros(n_streams, n_seg, dtype=torch.bool)
    for off, _ in articles:
        b, p = divmod(off, stream_len)
        if b < n_streams and p > 0:
            mask[b, p // segment] = True
    return mask


class CheckpointedSteps(torch.autograd.Function):
    """A run of inner steps as one region that stores only its input state (θ, hidden tensors).

    forward: `run(*state) -> (θ, *hidden, loss)` without a graph. backward: rerun it with one (its steps
    checkpointed one by one) and backpropagate into the state and φ. A Function rather than a reentrant
    `checkpoint`: φ's gradient is returned as an input gradient, so autograd sums it over regions before
    φ's accumulator fires once (what DDP's hooks expect), and ∇L_t is taken inside the region.
    """

    @staticmethod
    def forward(ctx: Any, run: Callable[..., tuple[Tensor, ...]], n_state: int, *args: Tensor) -> tuple[Tensor, ...]:
        ctx.run, ctx.params = run, args[n_state:]
        ctx.save_for_backward(*args[:n_state])
        return run(*args[:n_state])

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        state = [t.detach().requires_grad_(t.is_floating_point()) for t in ctx.saved_tensors]
        with torch.enable_grad():
            outs = ctx.run(*state)
        pairs = [(o, g) for o, g in zip(outs, grads, strict=True) if g is not None and o.requires_grad]
        wrt = [t for t in (*state, *ctx.params) if t.requires_grad]
        got = iter(torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True))
        return None, None, *[next(got) if t.requires_grad else None for t in (*state, *ctx.params)]


def group_size(setting: int | str | None, unroll: int) -> int:
    """meta.checkpoint_group: 'auto' -> √(unroll/2) rounded (fewest stored tensors); 0 or 1: per step only."""
    if setting in ("auto", None):
        return max(1, round(math.sqrt(unroll / 2)))
    require(isinstance(setting, int) and setting >= 0, f"meta.checkpoint_group must be auto or an integer >= 0, "
            f"got {setting!r}")
    return int(setting)


class MetaTrainModule(L.LightningModule):
    """Manual optimization of φ (Adam) through unrolled dynamic evaluation of a frozen LM."""

    def __init__(self, lm: AWDLSTM, dyn: DynamicWeights, gate: dict[str, Any], segment: int = 5,
                 unroll: int = 40, order: int = 1, checkpointing: bool = True, checkpoint_group: int = 0,
                 reset_every: int = 0,
                 ewc_lambda: float = 0.0, lr: float = 1e-3, weight_decay: float = 0.0, clip: float = 1.0,
                 train_streams: Tensor | None = None, reset_mask: Tensor | None = None,
                 val_tokens: Tensor | None = None, provenance: dict[str, Any] | None = None) -> None:
        super().__init__()
        require(order in (1, 2), f"meta.order must be 1 (first order) or 2 (second order), got {order}")
        require(ewc_lambda == 0 or dyn.fisher is not None,
                "meta.ewc_lambda > 0 needs the Fisher from fisher.pt; run `python train.py stage=fisher`")
        self.save_hyperparameters(ignore=["lm", "dyn", "train_streams", "reset_mask", "val_tokens"])
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints hold φ only, not the (frozen) LM
        self.lm = freeze(lm.eval())
        self.dyn = dyn
        self.meta = build_meta_learner(gate, len(dyn.spec.names))
        self.rule = GateRule(self.meta, dyn)
        self.train_streams, self.reset_mask, self.val_tokens = train_streams, reset_mask, val_tokens
        self._theta: Tensor | None = None
        self._hidden: Hidden | None = None
        self.n_unrolls = 0
        self.skipped = 0
        # Resume state: tokens of each training stream read in this pass (the next chunk's offset), the offset a
        # resumed run starts its first pass at, and θ / hidden / RNG restored from last.ckpt for the next step.
        self._pass_tokens = 0
        self._resume_tokens = 0
        self._pending: dict[str, Any] | None = None

    # -- data ------------------------------------------------------------------------------------------
    def _rank_world(self) -> tuple[int, int]:
        t = self._trainer
        return (t.global_rank, t.world_size) if t is not None else (0, 1)

    def train_dataloader(self) -> DataLoader:
        # Under DDP each rank reads its own contiguous block of the B streams (meta.streams is global): with
        # equal tokens per rank, DDP's gradient average equals one process's per-token mean over all B.
        hp = self.hparams
        streams = shard_streams(self.train_streams, *self._rank_world())
        chunks = UnrollChunks(streams, hp.unroll, hp.segment)
        # A resumed run continues where the checkpoint was taken, where Lightning would restart the stream.
        chunks.start, self._resume_tokens = self._resume_tokens, 0
        # A private generator: an iterator drawn from the global one would shift the RNG of a resumed run.
        return DataLoader(chunks, batch_size=None, generator=torch.Generator())

    def val_dataloader(self) -> DataLoader:
        return DataLoader([0], batch_size=None)  # one "batch": validation reads the whole slice itself

    # -- the inner loop ----------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        self.dyn = self.dyn.to(self.device)
        self.rule.dyn = self.dyn
        self.lm.eval()
        if self.device.type == "cuda" and self.lm.kernel == "fused":
            self.print("meta: cuDNN's LSTM has no double backward and no backward in eval mode: the inner loop "
                       "runs with cuDNN disabled (ATen LSTM kernel)")

    def on_train_epoch_start(self) -> None:
        self._theta, self._hidden = None, None  # a new pass over the stream starts from θ_0
        self._pass_tokens = 0

    def _penalty(self, theta: Tensor) -> Tensor:
        """EWC: λ/2 Σ F (θ_t − θ_0)², as fisher.ewc_penalty, on the flat vector."""
        return 0.5 * self.hparams.ewc_lambda * (self.dyn.fisher * (theta - self.dyn.theta0).square()).sum()

    def unroll(self, chunk: Tensor, first_seg: int, theta: Tensor,
               hidden: Hidden) -> tuple[Tensor, Tensor, Hidden, int]:
        """`unroll` inner steps over chunk [B, U·M+1]: (meta-loss, θ_U, hidden, tokens scored)."""
        hp = self.hparams
        n_tok = hp.unroll * hp.segment * chunk.size(0)
        g = hp.get("checkpoint_group", 0)
        if not (hp.checkpointing and 1 < g < hp.unroll):
            total, theta, hidden = self.steps(chunk, first_seg, 0, hp.unroll, theta, hidden)
            return total / n_tok, theta, hidden, n_tok
        total = theta.new_zeros(())
        params = [p for p in self.meta.parameters() if p.requires_grad]
        for k0 in range(0, hp.unroll, g):
            run = self._group_fn(chunk, first_seg, k0, min(hp.unroll, k0 + g))
            state = [theta, *[t for hc in hidden for t in hc]]
            *state, part = CheckpointedSteps.apply(run, len(state), *state, *params)
            theta, hidden = state[0], list(zip(state[1::2], state[2::2], strict=True))
            total = total + part
        return total / n_tok, theta, hidden, n_tok

    def _group_fn(self, chunk: Tensor, first_seg: int, k0: int, k1: int) -> Callable[..., tuple[Tensor, ...]]:
        """Steps k0..k1 as a function of the flat state (θ, h_1, c_1, ...) -> (θ, h_1, c_1, ..., loss sum)."""

        def run(theta: Tensor, *flat: Tensor) -> tuple[Tensor, ...]:
            hidden = list(zip(flat[0::2], flat[1::2], strict=True))
            total, theta, hidden = self.steps(chunk, first_seg, k0, k1, theta, hidden)
            return theta, *[t for hc in hidden for t in hc], total

        return run

    def steps(self, chunk: Tensor, first_seg: int, k0: int, k1: int, theta: Tensor,
              hidden: Hidden) -> tuple[Tensor, Tensor, Hidden]:
        """Inner steps k0..k1-1 of the unroll: (summed token loss (+ EWC), θ, hidden)."""
        hp = self.hparams
        total = theta.new_zeros(())
        for k in range(k0, k1):
            x = chunk[:, k * hp.segment : (k + 1) * hp.segment]
            y = chunk[:, k * hp.segment + 1 : (k + 1) * hp.segment + 1]
            if self.reset_mask is not None:
                m = shard_streams(self.reset_mask, *self._rank_world())[:, first_seg + k].to(theta.device)
                if bool(m.any()):  # an article starts in this segment: θ ← θ_0 for those streams
                    theta = self.dyn.theta0.clone() if theta.dim() == 1 else torch.where(
                        m[:, None], self.dyn.theta0, theta)
            theta, hidden, lsum = inner_step(self.lm, self.rule, self.dyn.spec, theta, hidden, x, y,
                                             hp.order == 2, hp.checkpointing)
            total = total + lsum
            if hp.ewc_lambda:  # counts once per step, like L_t (the total is divided by tokens)
                pen = checkpoint(self._penalty, theta, use_reentrant=False) if hp.checkpointing else \
                    self._penalty(theta)
                total = total + pen * y.numel()
        return total, theta, hidden

    def initial_state(self, batch: int) -> tuple[Tensor, Hidden]:
        theta = self.dyn.theta0.clone() if batch == 1 else self.dyn.theta0.expand(batch, -1).clone()
        return theta, self.lm.init_hidden(batch)

    def training_step(self, batch: tuple[Tensor, int], batch_idx: int) -> Tensor:
        chunk, first_seg = batch
        hp = self.hparams
        if self._pending is not None:  # first step after resume=true: the RNG state, θ and hidden on this device
            set_rng_state(self._pending["rng"])
            self._pending = None
            if self._theta is not None:
                self._theta = self._theta.to(chunk.device)
            if self._hidden is not None:
                self._hidden = [(h.to(chunk.device), c.to(chunk.device)) for h, c in self._hidden]
        if self._theta is None or (hp.reset_every and self.n_unrolls % hp.reset_every == 0):
            theta, hidden = self.initial_state(chunk.size(0))
            hidden = hidden if self._hidden is None else self._hidden
        else:
            theta, hidden = self._theta, self._hidden
        t0 = time.perf_counter()
        loss, theta, hidden, n_tok = self.unroll(chunk, int(first_seg), theta, hidden)
        opt = self.optimizers()
        opt.zero_grad()
        # A collective decision: a rank that skipped backward while the others all-reduce would hang DDP.
        ok = self.trainer.strategy.reduce_boolean_decision(bool(torch.isfinite(loss)), all=True)
        if ok:
            self.manual_backward(loss)
            grads = [p.grad for p in self.meta.parameters() if p.grad is not None]
            ok = all(bool(torch.isfinite(g).all()) for g in grads)
        if ok:
            gnorm = torch.nn.utils.clip_grad_norm_(self.meta.parameters(), hp.clip or float("inf"))
            opt.step()
            self.log("train/grad_norm", gnorm, on_step=True)
        else:  # NaN/inf guard: drop this update, restart the weights from θ_0
            self.skipped += 1
            opt.zero_grad()
            self.print(f"meta: non-finite meta-loss or gradient at step {self.global_step}, update skipped "
                       f"({self.skipped} so far); θ reset to θ_0")
            theta, fresh = self.initial_state(chunk.size(0))
            if not all(bool(torch.isfinite(h).all() and torch.isfinite(c).all()) for h, c in hidden):
                hidden = fresh  # a non-finite hidden state would make every later step non-finite too
        self._theta, self._hidden = theta.detach(), detach_hidden(hidden)
        if not bool(torch.isfinite(self._theta).all()):
            self._theta = None
        self.n_unrolls += 1
        self._pass_tokens += hp.unroll * hp.segment
        g = self.meta.last_gates
        self.log_dict({"train/meta_loss": loss.detach(), "train/ppl": torch.exp(loss.detach().clamp(max=50)),
                       "train/skipped": float(self.skipped), "train/tokens_per_s": n_tok / (time.perf_counter() - t0),
                       "gates/f": g.get("f", 1.0), "gates/i": g.get("i", 0.0), "gates/z": g.get("z", 0.0)},
                      prog_bar=False, on_step=True)
        self.log("meta_loss", loss.detach(), prog_bar=True, logger=False)
        return loss.detach()

    # -- validation: adaptive evaluation of the current φ -----------------------------------------------
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        loss = self.adaptive_loss()
        self.log_dict({"val/adaptive_loss": loss, "val/adaptive_ppl": math.exp(min(loss, 50.0))}, prog_bar=True,
                      batch_size=1)

    def adaptive_loss(self) -> float:
        """Mean token loss of adaptive evaluation (batch 1, score then update) on the validation slice."""
        with torch.no_grad():
            losses = adaptive_eval(self.lm, self.val_tokens, self.rule, self.hparams.segment, self.dyn)
        return float(losses.mean())

    # -- optimizer and checkpoint content -------------------------------------------------------------
    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        return torch.optim.Adam(self.meta.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("lm.")}
        checkpoint["dynamic_names"] = list(self.dyn.spec.names)
        checkpoint["n_unrolls"] = self.n_unrolls
        # What resume=true needs beyond φ, Adam and the loop counters (which Lightning saves) to continue exactly
        # as an uninterrupted run: the weights θ and hidden state carried across unrolls, the NaN-guard count,
        # the position in the training stream and the RNG state. θ is one LM-sized vector per stream.
        checkpoint["resume_state"] = {
            "theta": self._theta, "hidden": self._hidden, "skipped": self.skipped, "pass_tokens": self._pass_tokens,
            "streams": self.train_streams.size(0) if self.train_streams is not None else None,
            "rng": get_rng_state(), "world_size": self._trainer.world_size if self._trainer is not None else 1}

    # Settings a checkpoint's φ, θ and stream position are only valid for, and how to name them to the user.
    RESUME_MUST_MATCH: ClassVar[dict[str, str]] = {
        "dynamic_names": "dynamic parameters (meta.dynamic)", "gate": "gate", "lm_sha256": "lm.ckpt",
        "fisher_sha256": "fisher.pt", "vocab_hash": "vocabulary", "data_source": "data", "segment": "meta.segment",
        "unroll": "unroll", "streams": "meta.streams"}

    def _resume_key(self, checkpoint: dict[str, Any] | None) -> dict[str, Any]:
        if checkpoint is None:  # this run's own values
            hp, names = dict(self.hparams), list(self.dyn.spec.names)
            streams = self.train_streams.size(0) if self.train_streams is not None else None
        else:
            hp, names = dict(checkpoint.get("hyper_parameters", {})), list(checkpoint.get("dynamic_names", []))
            streams = (checkpoint.get("resume_state") or {}).get("streams", self.train_streams.size(0)
                                                                 if self.train_streams is not None else None)
        prov = hp.get("provenance") or {}
        return {"dynamic_names": names, "gate": hp.get("gate"), "segment": hp.get("segment"),
                "unroll": hp.get("unroll"), "streams": streams,
                **{k: prov.get(k) for k in ("lm_sha256", "fisher_sha256", "vocab_hash", "data_source")}}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # resume=true: refuse a checkpoint whose φ or θ belongs to another LM, data or parameter layout before
        # Lightning loads its tensors (a shape mismatch would be a traceback, equal shapes a silent error).
        old, new = self._resume_key(checkpoint), self._resume_key(None)
        diff = [self.RESUME_MUST_MATCH[k] for k in self.RESUME_MUST_MATCH if old[k] != new[k]]
        require(not diff, f"cannot resume: the meta-training checkpoint (last.ckpt) was made with different "
                f"{', '.join(diff)}; use the settings it was made with, or rerun without resume=true to start over")
        self.n_unrolls = int(checkpoint.get("n_unrolls", 0))
        st = checkpoint.get("resume_state")
        if not st:  # written by an older version: φ and Adam only, as before
            return
        self.skipped = int(st["skipped"])
        self._pass_tokens = self._resume_tokens = int(st["pass_tokens"])
        world = self._trainer.world_size if self._trainer is not None else 1
        # θ and hidden are set now, not at the next step: if the checkpoint ended a pass over the stream,
        # on_train_epoch_start resets them as in an uninterrupted run.
        if st.get("world_size", 1) == 1 and world == 1:
            self._theta, self._hidden = st["theta"], st["hidden"]
            self._pending = {"rng": st["rng"]}
        # else: rank 0's θ and hidden state belong to its own streams: every rank restarts from θ_0


# ----------------------------------------------------------------------------------------------------
# Loading a trained meta-learner (for evaluate.py)
# ----------------------------------------------------------------------------------------------------


def load_meta(path: str | Path, lm_sha256: str | None = None) -> tuple[MetaLearner, dict[str, Any]]:
    """φ from a `meta.ckpt` (eval mode) and its hyperparameters (gate, dynamic selection, provenance)."""
    path = Path(path)
    require(path.is_file(), f"no meta-learner checkpoint at {path}; run `python train.py stage=meta` first")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
        hp = dict(ck["hyper_parameters"])
        meta = build_meta_learner(hp["gate"], len(ck["dynamic_names"]))
        meta.load_state_dict({k[len("meta."):]: v for k, v in ck["state_dict"].items() if k.startswith("meta.")})
    except Exception as e:
        raise DynlmError(f"meta-learner checkpoint {path} cannot be read ({type(e).__name__}); rerun "
                         "`python train.py stage=meta`") from None
    prov = hp.get("provenance") or {}
    require(lm_sha256 is None or prov.get("lm_sha256") == lm_sha256,
            f"{path} was meta-trained on another lm.ckpt; rerun `python train.py stage=meta`")
    hp["dynamic_names"] = list(ck["dynamic_names"])
    return meta.eval(), hp


# ----------------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------------


def load_fisher_optional(out: Path, lm_sha: str) -> Any | None:
    path = out / "fisher.pt"
    if not path.is_file():
        return None
    from dynlm_pl.fisher import load_fisher  # lazy: only when the artifact is there

    return load_fisher(path, lm_sha256=lm_sha)


def gate_config(cfg: DictConfig, has_fisher: bool) -> dict[str, Any]:
    """cfg.gate as a dict; features needing fisher.pt are dropped (with a note) when it is absent."""
    gate = OmegaConf.to_container(cfg.gate, resolve=True)
    if gate.get("param") in KRAUSE_FORMS:
        require(has_fisher, "gate=krause_init/krause_fast start from Krause's RMS rule, which needs his gradient "
                "statistics from fisher.pt: run `python train.py stage=fisher` first (or use gate=paper)")
    if not has_fisher:
        drop = [f for f in gate.get("features", []) if f in ("fisher", "rms")]
        if drop:
            print(f"[meta] no fisher.pt in the run directory: meta-learner features {drop} disabled "
                  "(run `python train.py stage=fisher` to use them)")
            gate["features"] = [f for f in gate["features"] if f not in drop]
    return gate


def baselines(lm: AWDLSTM, dyn: DynamicWeights, tokens: Tensor, cfg: DictConfig,
              tuned: dict[str, Any] | None = None) -> dict[str, float]:
    """Validation-slice loss of static, SGD and (with ms) Krause's RMS rule: what φ must beat. The tuned
    hyperparameters (tuned.json) when there are, else meta.baseline's."""
    m, b = cfg.meta, cfg.meta.baseline
    sgd = tuned["sgd"]["hparams"] if tuned else {"lr": b.sgd_lr}
    rms = tuned["rms"]["hparams"] if tuned else {"lr": b.rms_lr, "lamb": b.rms_lamb, "eps": b.rms_eps}
    rules = {"static": StaticRule(), "sgd": SGDRule(float(sgd["lr"]))}
    if dyn.ms is not None:
        rules["rms"] = RMSRule(dyn, float(rms["lr"]), float(rms["lamb"]), float(rms["eps"]))
    return {k: float(adaptive_eval(lm, tokens, r, int(m.segment), dyn).mean()) for k, r in rules.items()}


def _ppl(loss: float) -> float:
    return math.exp(min(loss, 50.0))  # a diverged rule prints e^50, not an OverflowError


def run(cfg: DictConfig) -> dict[str, Any]:
    """`python train.py stage=meta unroll=40`: meta-train φ, write `<run_dir>/meta.ckpt` (best by val;
    `meta_noflush.ckpt` with gate.flush=false), and `*-last.ckpt`."""
    out = run_dir(cfg)
    m = cfg.meta
    if m.get("num_threads"):
        torch.set_num_threads(int(m.num_threads))
    L.seed_everything(cfg.seed, workers=True)
    dm = make_datamodule(cfg)
    corpus = dm.load()
    lm_path = out / "lm.ckpt"
    lm, lm_hp = load_lm(lm_path)
    check_same_data(lm_hp, corpus.vocab_hash, f"the LM in {lm_path}")
    lm_sha = file_sha256(lm_path)
    art = load_fisher_optional(out, lm_sha)
    gate = gate_config(cfg, art is not None)
    unroll, segment, streams = int(cfg.unroll), int(m.segment), int(m.streams)
    require(unroll >= 1 and segment >= 1 and streams >= 1, "unroll, meta.segment and meta.streams must be >= 1")
    if streams > 1 and int(m.order) == 2 and lm.kernel == "fused":
        print("[meta] meta.streams > 1 with meta.order=2: per-stream weights need the double-differentiable LSTM, "
              "switching the LM to kernel=manual (same weights, same numbers)")
        lm.kernel = "manual"
    val = corpus.splits["valid"]
    tuned: dict[str, Any] | None = None
    if gate.get("param") in KRAUSE_FORMS and m.get("init_from_tuned", True):
        # Start from the TUNED Krause rule: the same grid search and tuned.json evaluate.py uses
        from dynlm_pl.evaluation import tuned_baselines  # lazy: evaluation imports this module

        tuned = tuned_baselines(cfg, out, lm, val, DynamicWeights.build(lm, fisher_art=art), lm_sha, ["sgd", "rms"])
        # ... whichever tuned best on the validation slice: Krause's RMS rule, or plain SGD (a = −η, no decay)
        if tuned["sgd"]["tune_loss"] < tuned["rms"]["tune_loss"]:
            gate.update(lr=tuned["sgd"]["hparams"]["lr"], lamb=0.0, rms_scale=False)
            print(f"[meta] gate param={gate['param']} starts from the tuned sgd rule {tuned['sgd']['hparams']} (it"
                  " beat rms on the validation slice)")
        else:
            gate.update(**tuned["rms"]["hparams"], rms_scale=True)
            print(f"[meta] gate param={gate['param']} starts from the tuned rms rule {tuned['rms']['hparams']}")
    dyn = DynamicWeights.build(lm, list(m.dynamic.include), list(m.dynamic.exclude), art)
    module_group = group_size(m.get("checkpoint_group", 0), unroll)
    print(f"[meta] {len(dyn.spec.names)} dynamic tensors, {dyn.spec.numel:,} coordinates; gate={gate['param']}, "
          f"unroll={unroll}, segment={segment}, streams={streams}, order={m.order}, "
          f"checkpointing={m.checkpointing} (group {module_group}), fisher.pt={'yes' if art is not None else 'no'}")
    # The stream φ learns from: the training split, or the validation split past the selection slice
    # (the LM has fitted its training text, so adaptation there can teach a rule that held-out text
    # punishes -- measured on the synthetic corpus: larger and larger steps; Krause tunes on valid too).
    source = str(m.get("data", "train"))
    require(source in ("train", "valid"), f"meta.data must be train or valid, got {source!r}")
    n_sel = int(m.val_tokens) if m.val_tokens else val.numel()
    if source == "train":
        stream, arts = corpus.splits["train"], corpus.articles["train"]
    else:
        require(val.numel() - n_sel > 2 * unroll * segment * streams, f"meta.data=valid trains on the validation "
                f"split past its first meta.val_tokens={n_sel} tokens, and {val.numel() - n_sel} are left; lower "
                "meta.val_tokens")
        stream, arts = val[n_sel:], [(o - n_sel, t) for o, t in corpus.articles["valid"] if o >= n_sel]
    train = batchify(stream, streams)
    reset_mask = article_reset_mask(arts, streams, train.size(1), segment) if m.reset_at_articles else None
    val = val[:n_sel]
    module = MetaTrainModule(
        lm, dyn, gate, segment=segment, unroll=unroll, order=int(m.order), checkpointing=bool(m.checkpointing),
        checkpoint_group=module_group,
        reset_every=int(m.reset_every), ewc_lambda=float(m.ewc_lambda), lr=float(m.optim.lr),
        weight_decay=float(m.optim.weight_decay), clip=float(m.optim.clip), train_streams=train,
        reset_mask=reset_mask, val_tokens=val,
        provenance={"lm_sha256": lm_sha, "fisher_sha256": file_sha256(out / "fisher.pt") if art else None,
                    "data_source": corpus.source, "vocab_hash": corpus.vocab_hash,
                    "dynamic": OmegaConf.to_container(m.dynamic, resolve=True)})
    # The compiled update (MetaLearner.fused_update / fused_apply_): in training and in validation
    module.meta.fused = bool(m.get("fused_gate", False))
    t0 = time.time()
    base = baselines(lm, dyn, val, cfg, tuned)
    init = module.adaptive_loss()
    print("[meta] validation slice (" + f"{val.numel()} tokens) ppl: "
          + ", ".join(f"{k} {_ppl(v):.2f}" for k, v in base.items()) + f", meta@init {_ppl(init):.2f}")
    # φ at initialization is a candidate too: with gate=krause_init it IS Krause's rule, which meta.ckpt
    # must never do worse than on the validation slice.
    init_ckpt = {"hyper_parameters": dict(module.hparams), "dynamic_names": list(dyn.spec.names), "n_unrolls": 0,
                 "state_dict": {f"meta.{k}": v.detach().clone() for k, v in module.meta.state_dict().items()}}
    # Without FLUSH (gate.flush=false) the artifact is the two-level model evaluate.py calls meta_noflush.
    art_name = "meta" if gate.get("flush", True) else "meta_noflush"
    ckdir = out / "checkpoints" / art_name
    ckpt = ModelCheckpoint(dirpath=ckdir, filename="meta-best", monitor="val/adaptive_loss", mode="min",
                           save_last=True, save_top_k=1, enable_version_counter=False)
    trainer = make_trainer(cfg, m.get("trainer"), callbacks=[ckpt], max_epochs=-1, max_steps=int(m.steps),
                           max_time=m.get("max_time"), val_check_interval=int(m.val_every),
                           check_val_every_n_epoch=None, limit_val_batches=1)
    require(streams % trainer.world_size == 0, f"meta.streams={streams} cannot be split evenly over "
            f"{trainer.world_size} processes; make it a multiple of trainer.devices × trainer.num_nodes")
    resume = ckdir / "last.ckpt"
    ckpt_path = str(resume) if cfg.get("resume") and resume.is_file() else None
    if ckpt_path:
        check_resumable(resume)
    trainer.fit(module, ckpt_path=ckpt_path)
    if trainer.interrupted:
        raise DynlmError("meta-training was interrupted; rerun with resume=true to continue from last.ckpt")
    if not trainer.is_global_zero:  # under strategy=ddp / torchrun every rank runs this; rank 0 writes
        return {}
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
        atomic_torch_save(state, out / f"{art_name}.ckpt")
    else:
        print(f"[meta] no validation beat φ at initialization (best ppl {_ppl(best_loss):.2f} vs "
              f"{_ppl(init):.2f}): {art_name}.ckpt keeps the initial φ")
        best_loss = init
        atomic_torch_save(init_ckpt, out / f"{art_name}.ckpt")
    last = ckpt.last_model_path or str(ckdir / "last.ckpt")  # ddp_spawn sends back only the best path
    if Path(last).is_file():
        atomic_copy(last, out / f"{art_name}-last.ckpt")
    res = {"val_ppl": _ppl(best_loss), "val_ppl_trained": _ppl(float(score)) if score is not None
           else math.nan,
           "val_ppl_init": _ppl(init), **{f"val_ppl_{k}": _ppl(v) for k, v in base.items()},
           "steps": trainer.global_step, "skipped": module.skipped, "seconds": time.time() - t0}
    print(f"[meta] best val adaptive ppl {res['val_ppl']:.2f} (init {res['val_ppl_init']:.2f}, static "
          f"{res['val_ppl_static']:.2f}); wrote {out / f'{art_name}.ckpt'} in {res['seconds']:.0f}s")
    return res
