"""Sink analyses: attention maps, layer profiles, activation profiles and linear probes, written as
PNG + JSON per analysis and one self-contained HTML page (docs/analysis.md).

    lsg-analyze                                              # smol-llava, 8 shapes questions, maps + profiles + activations
    lsg-analyze what=maps n_questions=2 'gates=[var]' maps.heads=all
    lsg-analyze what=profiles profiles.queries=user+answer 'gates=[var,oracle@10:0.3]'
    lsg-analyze what=all model=tiny-random logger=none

Every analysis keeps its outputs under `out_dir/<analysis>/` and marks them complete last
(`done.json`); a re-run with the same settings reuses them, an interrupted one is redone.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Callable

import hydra
from omegaconf import DictConfig

from lsg.cli.common import load_backbone_of, log_results, plain

ANALYSES = ("maps", "profiles", "activations", "probes")


def _runner(name: str) -> Callable:
    """The `run(backbone, records, cfg, out_dir, stacks, ci)` of analysis `name`."""
    if name == "maps":
        from lsg.analysis import attention_maps

        return lambda bb, records, cfg, out, stacks, ci: attention_maps.run(bb, records, cfg, out, stacks)
    if name == "profiles":
        from lsg.analysis import profiles

        return profiles.run_layers
    if name == "activations":
        from lsg.analysis import profiles

        return profiles.run_activations
    try:
        probes = importlib.import_module("lsg.analysis.probes")
    except ModuleNotFoundError as error:
        if error.name != "lsg.analysis.probes":
            raise
        raise ValueError("what=probes: this install has no lsg.analysis.probes module (the linear probes, "
                         "issue 25 item 4); choose among maps, profiles, activations.") from None
    return lambda bb, records, cfg, out, stacks, ci: probes.run(bb, records, {**ci, **cfg}, out)


def resolve_what(what) -> list[str]:
    """`all`, one name or a list -> the analyses to run, in `ANALYSES` order.

    Raises:
        ValueError: an unknown analysis name (naming the allowed ones).
    """
    names = [what] if isinstance(what, str) else list(what)
    if "all" in names:
        return list(ANALYSES)
    unknown = [n for n in names if n not in ANALYSES]
    if unknown or not names:
        raise ValueError(f"Unknown analysis {unknown or names!r}: use what= one of {', '.join(ANALYSES)}, all, "
                         f"or a list of them.")
    return [n for n in ANALYSES if n in names]


def _numbers(tree, prefix: str = "") -> dict[str, float]:
    """The numeric leaves of a nested summary as `a/b/c` keys (for W&B)."""
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in _numbers(value, f"{prefix}{key}/").items()}
    if isinstance(tree, (int, float)) and not isinstance(tree, bool):
        return {prefix.rstrip("/"): float(tree)}
    return {}


def analyze(cfg: DictConfig, backbone=None) -> dict:
    """Run the configured analyses; returns `{"results": [AnalysisResult], "page": path or None}`."""
    from lsg.analysis.data import load_questions
    from lsg.analysis.page import write_page
    from lsg.specs import parse_stack

    names = resolve_what(plain(cfg.what))
    runners = {name: _runner(name) for name in names}  # before loading anything: a missing module fails fast
    backbone = backbone or load_backbone_of(cfg, device=cfg.device)
    records = load_questions(plain(cfg.benchmark), cfg.n_questions, plain(cfg.question_ids))
    stacks = {spec: parse_stack(spec, backbone, cfg.allow_layer_move).layers for spec in cfg.gates}
    out_dir = Path(cfg.out_dir)
    ci = {"ci_level": cfg.ci_level, "bootstrap_samples": cfg.bootstrap_samples}
    results = []
    for name in names:
        section = {"batch_size": cfg.batch_size, **(plain(cfg.get(name)) or {})}
        result = runners[name](backbone, records, section, out_dir, stacks, ci)
        print(f"{name}: wrote {', '.join(str(f) for f in result.files)}", flush=True)
        results.append(result)
    page = write_page(results, out_dir / "index.html", f"{backbone.name}: {', '.join(names)} "
                                                       f"({len(records)} questions)") if cfg.page else None
    if page:
        print(f"Wrote {page}")
    log_results(cfg, f"analyze-{backbone.name}-{'-'.join(names)}",
                images={f"{r.name}/{Path(f).stem}": f for r in results for f in r.files if str(f).endswith(".png")},
                metrics={f"{r.name}/{k}": v for r in results for k, v in _numbers(r.summary).items()})
    return {"results": results, "page": page}


@hydra.main(version_base="1.3", config_path="pkg://lsg.conf", config_name="analyze")
def main(cfg: DictConfig) -> None:
    analyze(cfg)


if __name__ == "__main__":
    main()
