"""Train gates inside a frozen LVLM: one decoder layer, or many in one pass over the data.

    python train.py layer=10                        # the embedded default (README: wall time)
    python train.py layer=every:3                   # a layer sweep: 0, 3, 6, ... (shared prefix, one pass)
    python train.py layer=all epochs=1              # every decoder layer (lsg-summarize reads Table 1)
    python train.py model=llava-1.5-7b data=llava-json data.train_json=... trainer=ddp

Per layer l it writes `<run_dir>/gate-epoch<e>.safetensors` and `val-epoch<e>.json` (one layer) or
the same under `<run_dir>/<gate>-L<l>/` (many; `lsg.runs`), prints the baseline against each gate
per sub-task with paired 95% CIs, and exports the gate of epoch `export_epoch` to `export_path`.
Re-running the same command resumes an interrupted run (killed at any point) from its last
optimizer step, with the same data order.
"""

from __future__ import annotations

from pathlib import Path

import hydra
import lightning as L
from omegaconf import DictConfig

import lsg
import lsg.configs  # noqa: F401  (registers the configs' resolvers)
from lsg.answers import answers_for, read_answers
from lsg.benchmarks.base import DataSplit
from lsg.cli.common import fast_dev_run_metrics, fit_gates, gate_run_identity, load_backbone_of, plain
from lsg.comparison import print_comparison
from lsg.evaluation import Result, answer_stacks, scored
from lsg.loggers import multirun_group
from lsg.prefix import PREFIX_CACHE_KINDS
from lsg.runs import export_file, gate_file, layer_dir, val_file
from lsg.specs import GateStack, baseline_stack, parse_sweep_layers
from lsg.training import EpochGateExport, GateTrainingModule, build_gate


def validation_results(path: Path, split: DataSplit, records) -> tuple[Result | None, Result | None]:
    """Baseline and gated answers to `records` (the validation split's questions) from the epoch's
    validation (`val-epoch{e}.json`, written by training), scored by `split` as a fresh evaluation
    would be, so the exported gate is not evaluated twice. (None, None) when the file is absent or
    misses a question."""
    found = read_answers(path)
    answers = answers_for(records, found[1]) if found is not None else None
    if answers is None or any(a.baseline is None for a in answers):
        return None, None
    return (scored(split, records, [a.baseline for a in answers], "none", cached=True),
            scored(split, records, [a.prediction for a in answers], "gated", cached=True))


def check_devices(trainer_cfg: dict) -> None:
    """One device, or many under DDP (every rank holds every gate).

    Raises:
        ValueError: several devices with another strategy.
    """
    one_device = trainer_cfg.get("devices") in (1, "1", None)
    if trainer_cfg.get("strategy", "auto") not in (("auto", "ddp") if one_device else ("ddp",)):
        raise ValueError(f"train.py trains on one device, or on many with trainer.strategy=ddp (trainer=ddp); got "
                         f"devices={trainer_cfg.get('devices')!r}, strategy={trainer_cfg.get('strategy')!r}. For one "
                         f"job per GPU instead, run one W&B agent per GPU over conf/wandb-sweep.yaml (README).")


@hydra.main(version_base="1.3", config_path="pkg://lsg.conf", config_name="train")
def main(cfg: DictConfig) -> dict:
    L.seed_everything(cfg.seed, workers=True)
    backbone = load_backbone_of(cfg)
    layers = parse_sweep_layers(cfg.layer, backbone.num_layers)
    gate_cfg = plain(cfg.gate)
    gates = {l: build_gate(gate_cfg, backbone, cfg.seed) for l in layers}  # each from the seed alone
    name = gates[layers[0]].name
    check_devices(plain(cfg.trainer))
    if cfg.prefix_cache not in PREFIX_CACHE_KINDS:
        raise ValueError(f"prefix_cache={cfg.prefix_cache!r}: use one of {', '.join(PREFIX_CACHE_KINDS)}.")
    exports = {l: export_file(cfg.export_path, l, layers) for l in layers}  # refused before training if ambiguous
    data_cfg = plain(cfg.data)
    run_dir = Path(cfg.run_dir)
    identity = gate_run_identity(backbone, gates[layers[0]], data_cfg, layers=layers)
    module = GateTrainingModule(backbone, gates, identity, cfg.lr, cfg.effective_batch_size, cfg.batch_size,
                                cfg.activation_checkpointing, cfg.prefix_cache_mb,
                                run_dir / "prefix-cache" if cfg.prefix_cache == "disk" else None, cfg.batch_log)
    run_name = f"{backbone.name}-{name}-L{layers[0]}" if len(layers) == 1 else \
        f"{backbone.name}-{name}-{len(layers)}-layers"
    trainer, logger = fit_gates(cfg, module, backbone, run_dir, EpochGateExport(run_dir), run_name,
                                multirun_group(plain(cfg.logger)))
    if (metrics := fast_dev_run_metrics(trainer)) is not None:
        return metrics
    if not trainer.is_global_zero:  # under DDP only rank 0 evaluates and writes the exports
        return {}

    folders = {l: layer_dir(run_dir, name, l, layers) for l in layers}
    trained = {l: lsg.gates.Gate.load(gate_file(folders[l], cfg.export_epoch)) for l in layers}
    split = DataSplit(data_cfg, "val")
    val = split.load()
    results: dict[int, tuple[Result, Result]] = {}
    if val:
        results = {l: validation_results(val_file(folders[l], cfg.export_epoch), split, val) for l in layers}
        missing = [l for l in layers if results[l][0] is None]
        if missing:  # e.g. limit_val_batches: the baseline and those gates in one pass (prefix reuse)
            stacks = [baseline_stack(), *[GateStack(f"L{l}", {l: [trained[l]]}, None) for l in missing]]
            fresh = answer_stacks(backbone, split, stacks, val, batch_size=cfg.eval_batch_size,
                                  progress=f"baseline and gated {', '.join(f'L{l}' for l in missing)} (val)")
            results.update({l: (fresh[baseline_stack().spec], fresh[f"L{l}"]) for l in missing})
        print_comparison(results[layers[0]][0],
                         {f"{name.upper()} L{l} (epoch {cfg.export_epoch})": results[l][1] for l in layers},
                         cfg.bootstrap_samples, cfg.ci_level)
        if logger:
            logger.log_metrics({f"final/{'' if len(layers) == 1 else f'L{l}/'}{kind}_acc_pct_{t}": a
                                for l, (baseline, gated) in results.items()
                                for kind, r in (("baseline", baseline), ("gated", gated))
                                for t, a in r.acc_pct.items()})
    else:  # free-form answers (e.g. Cambrian-10K): the validation loss is the only validation figure
        print("The validation split has no multiple-choice question, so there is no accuracy to compare; the "
              "validation loss is logged per epoch. Score the gate on a benchmark: python eval.py "
              f"benchmark=mmstar 'gates=[ckpt:{exports[layers[0]]}]'")
    out = {}
    for layer in layers:
        meta = trained[layer].metadata
        metrics = {"baseline": results[layer][0].summary(), "gated": results[layer][1].summary()} \
            if layer in results else {}
        trained[layer].save(exports[layer], metrics=metrics,
                            **{k: meta[k] for k in meta if k not in ("gate", "config", "git_commit", "gate_config")})
        print(f"Saved gate to {exports[layer]}")
        out[layer] = metrics
    if logger:
        logger.experiment.finish()  # a multirun's next job starts its own run
    return out[layers[0]] if len(layers) == 1 else out


if __name__ == "__main__":
    main()
