"""Meta-training of the update rule g_φ (Wolf et al. 2018, §2.1 and appendix B) as a LightningModule.

The DataModule (`MetaCut`) reads the meta-training text as `meta.streams` contiguous streams cut into unroll
chunks of U segments of M tokens (`meta.segment`). Each chunk is one optimizer step on φ: `meta.unroll.Unroller`
runs the U inner steps of dynamic evaluation with the rule θ_t = f⊙θ_{t-1} + i⊙∇L_t + z⊙θ_0 and returns the mean
token loss, which is backpropagated into φ; θ and the hidden state are then detached and reading continues online.
θ goes back to θ_0 every `reset_every` unrolls and/or at article starts. Only φ trains: the LM is frozen.
Validation is adaptive evaluation of the current φ on the selection slice (the DataModule's validation pieces).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, ClassVar

import lightning as L
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch import Tensor

from dynlm_pl.errors import require
from dynlm_pl.meta.learner import build_meta_learner
from dynlm_pl.meta.rules import GateRule, RecordingGateRule, with_trust_region
from dynlm_pl.meta.scoring import adaptive_eval
from dynlm_pl.meta.unroll import FastFirstOrder, Unroller
from dynlm_pl.meta.weights import DynamicWeights, freeze
from dynlm_pl.models import Backbone
from dynlm_pl.resume import get_rng_state, set_rng_state

log = logging.getLogger(__name__)


class MetaTrainModule(L.LightningModule):
    """Manual optimization of φ (Adam) through unrolled dynamic evaluation of a frozen LM."""

    def __init__(self, lm: Backbone, dyn: DynamicWeights, gate: dict[str, Any], segment: int = 5,
                 unroll: int = 40, order: int = 1, checkpointing: bool = True, checkpoint_group: int = 0,
                 reset_every: int = 0, ewc_lambda: float = 0.0, lr: float = 1e-3, weight_decay: float = 0.0,
                 clip: float = 1.0, streams: int = 1, provenance: dict[str, Any] | None = None,
                 max_drift: float | None = None, fast_first_order: bool = False,
                 reverse_sample: float = 1.0) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["lm", "dyn"])
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints hold φ only, not the (frozen) LM
        self.lm = freeze(lm.eval())
        self.dyn = dyn
        self.meta = build_meta_learner(gate, len(dyn.spec.names), n_coords=dyn.spec.numel)
        self.rule = GateRule(self.meta, dyn)
        self.unroller()  # refuse a bad order or EWC setting now
        self._theta: Tensor | None = None
        self._hidden: Any = None
        self.n_unrolls = 0
        self.skipped = 0
        # Resume state: tokens of each training stream read in this pass (the next chunk's offset), and θ / hidden
        # / RNG restored from last.ckpt for the next step.
        self._pass_tokens = 0
        self._pending: dict[str, Any] | None = None
        # The hand-designed rules' perplexities on the selection slice (set by the meta stage): logged next to φ's
        # at every validation, the lines a dashboard draws it against
        self.baseline_ppl: dict[str, float] = {}

    def unroller(self) -> Unroller:
        """The inner loop over the current rule (built per call: tests and benches swap `rule`), inside the trust
        region of eval.max_drift when it is on (the same map as in tuning and evaluation)."""
        hp = self.hparams
        rule = with_trust_region(self.rule, self.dyn, hp.get("max_drift"))
        fast = bool(hp.get("fast_first_order", False))
        require(not (fast and hp.order == 2), "meta.fast_first_order is the first-order meta-gradient; use "
                "meta.order=1 with it, or meta.fast_first_order=false for the second order")
        sample = float(hp.get("reverse_sample", 1.0))
        require(fast or sample == 1, "meta.reverse_sample < 1 needs meta.fast_first_order=true (it samples the "
                "coordinates of that reverse pass)")
        args = (self.lm, rule, self.dyn, list(self.meta.parameters()), hp.segment, hp.unroll, hp.order,
                hp.checkpointing, hp.get("checkpoint_group", 0), hp.ewc_lambda)
        return FastFirstOrder(*args, sample=sample) if fast else Unroller(*args)

    # -- the inner loop ----------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        self.dyn = self.dyn.to(self.device)
        self.rule.dyn = self.dyn
        self.lm.eval()
        if self.device.type == "cuda" and self.lm.kernel == "fused":
            rank_zero_only(log.info)("[meta] cuDNN's LSTM has no double backward and no backward in eval mode: "
                                     "the inner loop runs with cuDNN disabled (ATen LSTM kernel)")

    def on_train_epoch_start(self) -> None:
        self._theta, self._hidden = None, None  # a new pass over the stream starts from θ_0
        self._pass_tokens = 0

    def unroll(self, chunk: Tensor, resets: Tensor | None, theta: Tensor,
               hidden: Any) -> tuple[Tensor, Tensor, Any, int]:
        """`unroll` inner steps over chunk [B, U·M+1]: (meta-loss, θ_U, hidden, tokens scored)."""
        return self.unroller()(chunk, resets, theta, hidden)

    def initial_state(self, batch: int) -> tuple[Tensor, Any]:
        return self.unroller().initial_state(batch)

    def training_step(self, batch: tuple[Tensor, Tensor | None], batch_idx: int) -> Tensor:
        chunk, resets = batch
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
        opt = self.optimizers()
        opt.zero_grad()  # before the unroll: meta.fast_first_order accumulates φ's gradients inside it
        loss, theta, hidden, n_tok = self.unroll(chunk, resets, theta, hidden)
        # A collective decision: a rank that skipped backward while the others all-reduce would hang DDP.
        ok = self.trainer.strategy.reduce_boolean_decision(bool(torch.isfinite(loss)), all=True)
        if ok:
            if loss.requires_grad:  # the autograd path (FastFirstOrder has filled the gradients already)
                self.manual_backward(loss)
            grads = [p.grad for p in self.meta.parameters() if p.grad is not None]
            ok = all(bool(torch.isfinite(g).all()) for g in grads)
        if ok:
            gnorm = torch.nn.utils.clip_grad_norm_(self.meta.parameters(), hp.clip or float("inf"))
            opt.step()
            self.meta.pull_(hp.lr)  # gate.per_coordinate: the offsets' pull toward their initialisation
            self.log("train/grad_norm", gnorm, on_step=True)
        else:  # NaN/inf guard: drop this update, restart the weights from θ_0
            self.skipped += 1
            opt.zero_grad()
            rank_zero_only(log.warning)(f"[meta] non-finite meta-loss or gradient at step {self.global_step}, "
                                        f"update skipped ({self.skipped} so far); θ reset to θ_0")
            theta, fresh = self.initial_state(chunk.size(0))
            if not all(bool(torch.isfinite(h).all() and torch.isfinite(c).all()) for h, c in hidden):
                hidden = fresh  # a non-finite hidden state would make every later step non-finite too
        self._theta, self._hidden = theta.detach(), self.lm.detach_state(hidden)
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
        # tokens of meta-training data read so far, over all streams and ranks
        seen = self.n_unrolls * n_tok * self.trainer.world_size
        self.log("tokens", float(seen), prog_bar=True, logger=False)
        self.log("train/tokens", float(seen), on_step=True)
        return loss.detach()

    # -- validation: adaptive evaluation of the current φ -----------------------------------------------
    # The selection slice comes as consecutive pieces (`data.stream_pieces`) read as one stream: θ, the hidden state
    # and the losses carried from piece to piece, so the bar moves and the loss is that of one pass.
    def on_validation_epoch_start(self) -> None:
        # φ's own rule records its per-tensor mean gates every 10 segments (the same updates); a swapped rule does not
        rec = RecordingGateRule(self.meta, self.dyn) if type(self.rule) is GateRule else None
        self._val: dict[str, Any] = {"carry": {}, "losses": [], "rule": rec}

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        v = self._val
        with torch.no_grad():
            v["losses"].append(adaptive_eval(self.lm, batch, v["rule"] or self.rule, self.hparams.segment, self.dyn,
                                             max_drift=self.hparams.get("max_drift"), carry=v["carry"]))

    def on_validation_epoch_end(self) -> None:
        v, self._val = self._val, {}
        loss = float(torch.cat(v["losses"], dim=1).mean())  # [1, N-1]: the targets of the whole slice
        rec = v["rule"]
        if rec is not None and rec.history:
            self._log_gates(torch.stack(rec.history))
        self.log_dict({"val/adaptive_loss": loss, "val/adaptive_ppl": math.exp(min(loss, 50.0))}, prog_bar=True,
                      batch_size=1)
        if self.baseline_ppl:  # φ against the tuned rules on the same slice (constant lines)
            self.log_dict({f"val/{k}_ppl": v for k, v in self.baseline_ppl.items()}, prog_bar=False, batch_size=1)
        if "rms" in self.baseline_ppl:  # the bar shows 3 digits: 130 for 129.6; the gain over rms (%) is readable
            self.log("val/gain_vs_rms", 100.0 * (1.0 - math.exp(min(loss, 50.0)) / self.baseline_ppl["rms"]),
                     prog_bar=True, batch_size=1)

    def _log_gates(self, history: Tensor) -> None:
        """φ's gates over a validation pass, per dynamic tensor (history [S, 3, n_tensors]: mean f, i, z every few
        segments): their means as `val/gate_<f|i|z>/<tensor>`, and under logger=wandb histograms over the pass."""
        names = self.dyn.spec.names
        mean = history.mean(0)
        self.log_dict({f"val/gate_{g}/{n}": float(mean[j, k]) for j, g in enumerate("fiz") for k, n in
                       enumerate(names)}, batch_size=1)
        for lg in self.loggers:
            if type(lg).__name__ == "WandbLogger":
                import wandb

                lg.experiment.log({f"val/gate_hist_{g}/{n}": wandb.Histogram(history[:, j, k].double().numpy())
                                   for j, g in enumerate("fiz") for k, n in enumerate(names)}, commit=False)

    def adaptive_loss(self, tokens: Tensor, progress: bool | str = False, rule: GateRule | None = None) -> float:
        """Mean token loss of adaptive evaluation (batch 1, score then update) over `tokens` [N] (`progress`: a bar,
        or its label) with φ's rule (or `rule`: the same rule recording its gates)."""
        with torch.no_grad():
            losses = adaptive_eval(self.lm, tokens, rule or self.rule, self.hparams.segment, self.dyn,
                                   max_drift=self.hparams.get("max_drift"), progress=progress)
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
            "streams": self.hparams.get("streams", 1),
            "rng": get_rng_state(), "world_size": self._trainer.world_size if self._trainer is not None else 1}

    # Settings a checkpoint's φ, θ and stream position are only valid for, and how to name them to the user.
    RESUME_MUST_MATCH: ClassVar[dict[str, str]] = {
        "dynamic_names": "dynamic parameters (meta.dynamic)", "gate": "gate", "lm_sha256": "lm.ckpt",
        "fisher_sha256": "fisher.pt", "vocab_hash": "vocabulary", "data_source": "data", "segment": "meta.segment",
        "unroll": "unroll", "streams": "meta.streams"}

    @staticmethod
    def resume_key(hp: dict[str, Any], names: list[str], streams: int) -> dict[str, Any]:
        """The values of RESUME_MUST_MATCH from a module's hyperparameters and dynamic tensor names."""
        prov = hp.get("provenance") or {}
        return {"dynamic_names": list(names), "gate": hp.get("gate"), "segment": hp.get("segment"),
                "unroll": hp.get("unroll"), "streams": streams,
                **{k: prov.get(k) for k in ("lm_sha256", "fisher_sha256", "vocab_hash", "data_source")}}

    @classmethod
    def require_resumable(cls, checkpoint: dict[str, Any], new: dict[str, Any]) -> None:
        """Refuse `checkpoint` if it differs from `new` (a `resume_key`) in a setting of RESUME_MUST_MATCH; keys
        absent from `new` are not compared (the stage checks before the gate is known, before tuning)."""
        streams = (checkpoint.get("resume_state") or {}).get("streams", new.get("streams", 1))
        old = cls.resume_key(dict(checkpoint.get("hyper_parameters", {})), checkpoint.get("dynamic_names", []),
                             streams)
        diff = [cls.RESUME_MUST_MATCH[k] for k in cls.RESUME_MUST_MATCH if k in new and old[k] != new[k]]
        require(not diff, f"cannot resume: the meta-training checkpoint (last.ckpt) was made with different "
                f"{', '.join(diff)}; use the settings it was made with, or rerun without resume=true to start over")

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # resume=true: refuse a checkpoint whose φ or θ belongs to another LM, data or parameter layout before
        # Lightning loads its tensors (a shape mismatch would be a traceback, equal shapes a silent error).
        self.require_resumable(checkpoint, self.resume_key(dict(self.hparams), list(self.dyn.spec.names),
                                                           self.hparams.get("streams", 1)))
        self.n_unrolls = int(checkpoint.get("n_unrolls", 0))
        st = checkpoint.get("resume_state")
        if not st:  # a checkpoint without resume state: φ and Adam only
            return
        self.skipped = int(st["skipped"])
        self._pass_tokens = int(st["pass_tokens"])
        dm = self._trainer.datamodule if self._trainer is not None else None
        if dm is not None:  # a resumed run continues where the checkpoint was taken, not at the stream's start
            dm.skip_tokens = self._pass_tokens
        world = self._trainer.world_size if self._trainer is not None else 1
        # θ and hidden are set now, not at the next step: if the checkpoint ended a pass over the stream,
        # on_train_epoch_start resets them as in an uninterrupted run.
        if st.get("world_size", 1) == 1 and world == 1:
            self._theta, self._hidden = st["theta"], st["hidden"]
            self._pending = {"rng": st["rng"]}
        # else: rank 0's θ and hidden state belong to its own streams: every rank restarts from θ_0


