"""Train one LSG gate at one decoder layer of a frozen LVLM.

    python train.py layer=10                        # the embedded default (README: wall time)
    python train.py model=llava-1.5-7b data=llava-json data.train_json=... trainer=ddp

Re-running the same command resumes an interrupted run (killed at any point) from its last
checkpoint, with the same data order.
"""

from __future__ import annotations

from pathlib import Path

import hydra
import lightning as L
from omegaconf import DictConfig

import lsg
from lsg.cli.common import fast_dev_run_metrics, fit_gates, gate_run_identity, load_backbone_of, plain
from lsg.answers import answers_for, read_answers
from lsg.datamodule import load_records
from lsg.evaluation import EvalResult, evaluate_many, print_comparison
from lsg.loggers import multirun_group
from lsg.prefix import PREFIX_CACHE_KINDS
from lsg.training import EpochGateExport, GateTrainingModule, build_gate


def validation_results(path: Path, records) -> tuple[EvalResult | None, EvalResult | None]:
    """Baseline and gated answers on `records` from the epoch's validation (`val-epoch{e}.json`,
    written by training; the same questions scored the same way), so the exported gate is not
    evaluated twice. (None, None) when the file is absent or misses a question."""
    found = read_answers(path)
    answers = answers_for(records, found[1]) if found is not None else None
    if answers is None or any(a.baseline is None for a in answers):
        return None, None
    return (EvalResult.from_predictions(records, [a.baseline for a in answers]),
            EvalResult.from_predictions(records, [a.prediction for a in answers]))


@hydra.main(version_base="1.3", config_path="pkg://lsg.conf", config_name="train")
def main(cfg: DictConfig) -> dict:
    L.seed_everything(cfg.seed, workers=True)
    backbone, _ = load_backbone_of(cfg)
    layer = backbone.check_layer(cfg.layer)
    gate = build_gate(plain(cfg.gate), backbone, cfg.seed)
    data_cfg = plain(cfg.data)
    run_dir = Path(cfg.run_dir)
    if cfg.prefix_cache not in PREFIX_CACHE_KINDS:
        raise ValueError(f"prefix_cache={cfg.prefix_cache!r}: use one of {', '.join(PREFIX_CACHE_KINDS)}.")
    module = GateTrainingModule(backbone, gate, layer, cfg.lr, cfg.prefix_cache_mb, cfg.activation_checkpointing,
                                run_dir / "prefix-cache" if cfg.prefix_cache == "disk" else None, data_cfg)
    identity = gate_run_identity(backbone, gate, data_cfg, layer=layer)
    module.identity = identity
    module.batch_log = Path(cfg.batch_log) if cfg.batch_log else None
    trainer, logger = fit_gates(cfg, module, backbone, run_dir, EpochGateExport(run_dir, identity),
                                f"{backbone.name}-{gate.name}-L{layer}", multirun_group(plain(cfg.logger)))
    if (metrics := fast_dev_run_metrics(trainer)) is not None:
        return metrics
    if not trainer.is_global_zero:  # under DDP only rank 0 evaluates and writes the export
        return {}

    export = lsg.gates.Gate.load(run_dir / f"gate-epoch{cfg.export_epoch}.safetensors")  # attach moves it
    val = [r for r in load_records(data_cfg, "val") if r.options and r.answer_letter]
    metrics = {}
    if val:
        baseline, gated = validation_results(run_dir / f"val-epoch{cfg.export_epoch}.json", val)
        if baseline is None:  # e.g. limit_val_batches: evaluate both in one pass (prefix reuse)
            both = evaluate_many(backbone, val, {"baseline": None, "gated": {layer: export}}, cfg.eval_batch_size,
                                 progress=f"baseline and gated L{layer} (val)")
            baseline, gated = both["baseline"], both["gated"]
        label = f"{gate.name.upper()} L{layer} (epoch {cfg.export_epoch})"
        print_comparison(baseline, {label: gated}, cfg.bootstrap_samples, cfg.ci_level)
        metrics = {"baseline": baseline.as_dict(), "gated": gated.as_dict()}
        if logger:
            logger.log_metrics({f"final/{name}_acc_{t}": a for name, r in (("baseline", baseline), ("gated", gated))
                                for t, a in r.accuracy.items()})
    else:  # free-form answers (e.g. Cambrian-10K): the validation loss is the only validation figure
        print("The validation split has no multiple-choice question, so there is no accuracy to compare; the "
              "validation loss is logged per epoch. Score the gate on a benchmark: python evaluate.py "
              f"benchmark=mmstar 'gates=[lsg:{cfg.export_path}]'")
    meta = export.metadata
    export.save(cfg.export_path, **{k: meta[k] for k in meta if k not in ("gate", "config", "git_commit", "gate_config")},
                metrics=metrics)
    print(f"Saved gate to {cfg.export_path}")
    if logger:
        logger.experiment.finish()  # a multirun's next job starts its own run
    return metrics


if __name__ == "__main__":
    main()
