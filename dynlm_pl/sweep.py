"""What a Hydra sweep (`python train.py -m ...`) leaves besides its jobs' run directories: a summary.

`SweepSummary` is a Hydra callback (conf/config.yaml, hydra.callbacks): each job writes `job.json` into its Hydra
output directory (runs/multirun/<time>/<n>/: its overrides, status, objective — the validation perplexity
train.py returns, never a test figure — and run directory); when the sweep ends, `summary.md` and `summary.json`
in the sweep directory list every job, best objective first. Jobs write their own record, so a launcher that
runs them elsewhere (SLURM) is summarised too, from the shared file system.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from dynlm_pl.files import atomic_write_text

log = logging.getLogger(__name__)


class SweepSummary(Callback):
    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        ok = job_return.status == JobStatus.COMPLETED
        value = job_return.return_value if ok else None
        record = {"job": int(config.hydra.job.num), "overrides": list(job_return.overrides or []),
                  "status": job_return.status.name, "objective": None if value is None else float(value),
                  "run_dir": str(OmegaConf.select(config, "paths.run_dir", default=""))}
        out = Path(config.hydra.runtime.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "job.json", json.dumps(record, indent=2))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep = Path(config.hydra.sweep.dir)
        jobs = sorted((json.loads(p.read_text()) for p in sweep.glob("*/job.json")), key=_order)
        if not jobs:
            return
        atomic_write_text(sweep / "summary.json", json.dumps(jobs, indent=2))
        atomic_write_text(sweep / "summary.md", markdown(jobs) + "\n")
        best = jobs[0]
        note = f"best {' '.join(best['overrides'])} (val ppl {best['objective']:.2f})" \
            if best["objective"] is not None else "no job returned a validation perplexity"
        log.info(f"[sweep] {len(jobs)} jobs; {note}; {sweep / 'summary.md'}")


def _order(job: dict[str, Any]) -> tuple[float, int]:
    v = job.get("objective")
    return (v if v is not None and math.isfinite(v) else math.inf), int(job["job"])


def markdown(jobs: list[dict[str, Any]]) -> str:
    """The sweep's jobs as a table, best objective (validation perplexity) first."""
    lines = ["| job | overrides | status | val ppl | run directory |", "|---:|---|---|---:|---|"]
    for j in jobs:
        v = "" if j["objective"] is None else f"{j['objective']:.2f}"
        lines.append(f"| {j['job']} | {' '.join(j['overrides'])} | {j['status']} | {v} | {j['run_dir']} |")
    return "\n".join(lines)
