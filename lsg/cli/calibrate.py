"""Measure a backbone's sinks and suggest a sink config (docs/methods.md section 7).

    lsg-calibrate                                 # embedded default, 32 validation prompts
    lsg-calibrate model=tiny-random n_samples=8   # or python -m lsg.cli.calibrate ...

Prints the massive-activation dims, per-layer statistics of the visual tokens' sink
value, and a `sinks:` snippet to paste into conf/model/<name>.yaml. Batches are built
one at a time as calibration reads them.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import hydra
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from lsg.cli.common import load_backbone_of, plain
from lsg.calibration import calibrate, plot_report
from lsg.datamodule import load_records
from lsg.evaluation import images_and_questions


class PromptBatches:
    """Prompt-only batches of `records`, `batch_size` at a time, built (images loaded) as each is
    read; re-iterable, so calibration can read them twice when it must find the sink dim first."""

    def __init__(self, backbone, records: Sequence, batch_size: int):
        self.backbone, self.records, self.batch_size = backbone, records, batch_size

    def __iter__(self) -> Iterator[dict]:
        for i in range(0, len(self.records), self.batch_size):
            yield self.backbone.build_batch(*images_and_questions(self.records[i : i + self.batch_size]))


@hydra.main(version_base="1.3", config_path="pkg://lsg.conf", config_name="calibrate")
def main(cfg: DictConfig) -> None:
    # eager: attention weights for the share statistic
    backbone = load_backbone_of(cfg, attn_implementation="eager", device=cfg.device)
    records = load_records(plain(cfg.data), cfg.split)[: cfg.n_samples]
    report = calibrate(backbone, PromptBatches(backbone, records, cfg.batch_size), cfg.tau, cfg.min_abs, cfg.ratio,
                       cfg.top_fraction, cfg.phi_bins_per_decade, tuple(cfg.phi_log10_range))
    console = Console()
    console.print(f"LLM massive dims (dim, layers flagged): {report.massive_dims}")
    console.print(f"Positions of the top dim's largest |x| at the middle layer: {report.massive_positions}")
    console.print(f"ViT feature layer: max token norm / median = {report.vit_norm_ratio_max:.2f}; "
                  f"massive dims: {report.vit_massive_dims or 'none'}")
    table = Table(title=f"Visual-token sink value per layer ({backbone.name}, dims {backbone.sinks.llm_dims}, "
                        f"{backbone.sinks.normalisation}, tau {cfg.tau or backbone.sinks.tau_llm})")
    for col in ("layer", "phi median", "phi p99", "phi max", "flagged/img", "flagged<=l/img", "text sinks",
                "attn share", "suggested tau"):
        table.add_column(col, justify="right")
    for s in report.layers:
        table.add_row(str(s.layer), f"{s.vis_phi_median:.2f}", f"{s.vis_phi_p99:.2f}", f"{s.vis_phi_max:.1f}",
                      f"{s.flagged_per_image:.2f}", f"{s.flagged_any_upto_per_image:.2f}",
                      f"{s.text_sinks_per_sample:.2f}", f"{s.flagged_attention_share:.3f}",
                      "-" if s.suggested_tau is None else f"{s.suggested_tau:.1f}")
    console.print(table)
    taus = [s.suggested_tau for s in report.layers]
    console.print("Suggested per-layer sinks snippet:\n" + OmegaConf.to_yaml({"sinks": {
        **backbone.sinks.to_dict(), "tau_llm": [round(t, 1) if t else None for t in taus]}}))
    paths = plot_report(report, cfg.out_dir, backbone.name)
    console.print(f"Wrote {paths[0]} and {paths[1]} (Figure S2)")


if __name__ == "__main__":
    main()
