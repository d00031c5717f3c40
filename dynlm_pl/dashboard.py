"""The W&B dashboard as code: `python -m dynlm_pl.dashboard project=dynlm entity=<you> [split=test] [save=true]`.

Builds a workspace (`pip install -e ".[dashboard]"`: wandb-workspaces) over a project's dynlm runs, the keys the
stages and evaluate.py log (runtime.wandb_settings: one run per stage and job):

  evaluation        meta's gain over static per article (bars from the `<split>/articles` table), each method's gain
                    along the stream (`<split>/gain_along_stream`), perplexity and gain vs static / rms per method
  meta-training     the meta-loss, φ's selection perplexity against its reference lines (static, tuned sgd, rms,
                    rms_pt, φ at init), φ's gain over rms
  pretraining       the LM's training loss and validation perplexity
  sweeps            parallel coordinates from the swept keys to φ's selection perplexity (never a test figure)

Without `save=true` it prints each section's panels and keys and saves nothing (no network, no account): what the
tests check. With it, `Workspace.save()` creates the view in the project (needs `wandb login`).
"""

from __future__ import annotations

import sys
from typing import Any

from dynlm_pl.errors import DynlmError, require

METHODS = ("sgd", "rms", "rms_pt", "meta_noflush", "meta")
REFERENCES = ("static", "sgd", "rms", "rms_pt", "meta_init")  # the meta stage's constant lines (val/<k>_ppl)
SWEPT = ("unroll", "meta.optim.lr", "meta.segment", "meta.steps", "gate.hidden", "gate.lamb0", "gate.clamp")


def _evaluation(wr: Any, split: str) -> list[Any]:
    articles = wr.CustomChart(query={"summaryTable": {"tableKey": f"{split}/articles"}}, chart_name="wandb/bar/v0",
                              chart_fields={"label": "title", "value": "gain_vs_static_meta"},
                              chart_strings={"title": f"meta's gain over static per article ({split}, %)"})
    stream = wr.CustomChart(query={"summaryTable": {"tableKey": f"{split}/gain_along_stream_table"}},
                            chart_name="wandb/lineseries/v0",
                            chart_fields={"step": "step", "lineKey": "lineKey", "lineVal": "lineVal"},
                            chart_strings={"title": f"ppl gain over static along the stream ({split})",
                                           "xname": "token"})
    bars = [wr.BarPlot(title=f"{split}: {what}", metrics=[wr.SummaryMetric(f"{split}/{m}/{key}") for m in METHODS])
            for what, key in (("gain vs static (%)", "gain_vs_static"), ("gain vs rms (%)", "gain_vs_rms"))]
    ppl = wr.BarPlot(title=f"{split}: perplexity", metrics=[wr.SummaryMetric(f"{split}/{m}/ppl")
                                                             for m in ("static", *METHODS)])
    return [articles, stream, *bars, ppl]


def _live(wr: Any, split: str) -> list[Any]:
    """Each method's perplexity so far while evaluate.py reads the split, against its own token axis."""
    return [wr.LinePlot(title=f"{split}: {m}, running ppl", x=f"{split}/{m}/tokens", y=[f"{split}/{m}/running_ppl"])
            for m in ("static", *METHODS)]


def _meta(wr: Any) -> list[Any]:
    return [wr.LinePlot(title="meta-loss", x="trainer/global_step", y=["train/meta_loss"]),
            wr.LinePlot(title="φ on the selection slice vs the tuned rules (ppl)", x="trainer/global_step",
                        y=["val/adaptive_ppl", *[f"val/{k}_ppl" for k in REFERENCES]]),
            wr.LinePlot(title="φ's gain over rms (%)", x="trainer/global_step", y=["val/gain_vs_rms"])]


def _lm(wr: Any) -> list[Any]:
    return [wr.LinePlot(title="LM training loss", x="trainer/global_step", y=["train/loss"]),
            wr.LinePlot(title="LM validation ppl", x="trainer/global_step", y=["val/ppl"])]


def _sweeps(wr: Any) -> list[Any]:
    cols = [wr.ParallelCoordinatesPlotColumn(metric=wr.Config(k)) for k in SWEPT]
    cols.append(wr.ParallelCoordinatesPlotColumn(metric=wr.SummaryMetric("val/adaptive_ppl")))
    return [wr.ParallelCoordinatesPlot(title="sweep: settings -> φ's selection ppl", columns=cols)]


def build(project: str, entity: str = "", name: str = "dynlm", split: str = "test") -> Any:
    """The workspace object (wandb_workspaces.workspaces.Workspace), not saved."""
    try:
        import wandb_workspaces.reports.v2 as wr
        import wandb_workspaces.workspaces as ws
    except ImportError:
        raise DynlmError("the dashboard needs wandb-workspaces: pip install -e \".[dashboard]\"") from None
    sections = [("evaluation", _evaluation(wr, split)), ("evaluation, live", _live(wr, split)),
                ("meta-training", _meta(wr)), ("pretraining", _lm(wr)), ("sweeps", _sweeps(wr))]
    return ws.Workspace(entity=entity, project=project, name=name,
                        sections=[ws.Section(name=n, panels=p, is_open=True) for n, p in sections])


def describe(workspace: Any) -> str:
    """Each section's panels and the keys they read, one line per panel."""
    lines = []
    for sec in workspace.sections:
        lines.append(f"{sec.name}:")
        for p in sec.panels:
            title = getattr(p, "title", None) or (p.chart_strings or {}).get("title", "")
            lines.append(f"  {type(p).__name__}: {title} <- {', '.join(panel_keys(p))}")
    return "\n".join(lines)


def panel_keys(panel: Any) -> list[str]:
    """The logged keys (metrics, summary metrics, config keys, tables) a panel reads."""
    if hasattr(panel, "query") and panel.query:
        return [panel.query["summaryTable"]["tableKey"]]
    items = list(getattr(panel, "y", None) or getattr(panel, "metrics", None) or [])
    items += [c.metric for c in getattr(panel, "columns", None) or []]
    return [str(getattr(i, "name", i)) for i in items]


def main(argv: list[str]) -> None:
    args = dict(a.split("=", 1) for a in argv if "=" in a)
    unknown = sorted(set(args) - {"project", "entity", "name", "split", "save"}) + [a for a in argv if "=" not in a]
    require(not unknown, f"unknown argument(s) {unknown}; use project=... [entity=...] [name=...] [split=test] "
            "[save=true]")
    require("project" in args, "name the W&B project: python -m dynlm_pl.dashboard project=dynlm [entity=...]")
    workspace = build(args["project"], args.get("entity", ""), args.get("name", "dynlm"), args.get("split", "test"))
    print(describe(workspace))
    if args.get("save", "false").lower() in ("1", "true", "yes"):
        workspace.save()
        print(f"[dashboard] saved: {workspace.url}")


if __name__ == "__main__":
    from dynlm_pl.cli import main_guard

    main_guard(lambda: main(sys.argv[1:]))
