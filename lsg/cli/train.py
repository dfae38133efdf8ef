"""Train gates inside a frozen LVLM: one decoder layer, or many in one pass over the data.

    python train.py layer=10                        # the embedded default (README: wall time)
    python train.py layer=every:3                   # a layer sweep: 0, 3, 6, ... (shared prefix, one pass)
    python train.py layer=all epochs=1              # every decoder layer (lsg-summarize reads Table 1)
    python train.py model=llava-1.5-7b data=llava-json data.train_json=... trainer=ddp
    python train.py layer=[3,6,7,10,19] joint=true  # the gates trained together, one loss (paper App. D.2)

Per layer l it writes `<run_dir>/gate-epoch<e>.safetensors` and `val-epoch<e>.json` (one layer) or
the same under `<run_dir>/<gate>-L<l>/` (many; `lsg.runs`), prints the baseline against each gate
per sub-task with paired 95% CIs, and exports the gate of epoch `export_epoch` to `export_path`.
Re-running the same command resumes an interrupted run (killed at any point) from its last
optimizer step, with the same data order. A joint run (`joint=true`) writes its gates, a stack
manifest and the stack's answers in its run directory (`lsg.runs`), and exports the gates of epoch
`export_epoch` beside a stack manifest at `stack_export_path` (`eval.py 'gates=[stack:<it>]'`).
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
from lsg.runs import export_file, gate_file, joint_gate_file, layer_dir, val_file
from lsg.specs import GateStack, baseline_stack, manifest, parse_sweep_layers, write_manifest
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
    joint = bool(cfg.joint)
    if joint:  # the gates beside the stack manifest
        exports = {l: Path(cfg.stack_export_path).parent / f"{name}-L{l}.safetensors" for l in layers}
    else:
        exports = {l: export_file(cfg.export_path, l, layers) for l in layers}  # refused before training if ambiguous
    data_cfg = plain(cfg.data)
    run_dir = Path(cfg.run_dir)
    identity = gate_run_identity(backbone, gates[layers[0]], data_cfg, layers=layers, joint=joint)
    module = GateTrainingModule(backbone, gates, identity, cfg.lr, cfg.effective_batch_size, cfg.batch_size,
                                cfg.activation_checkpointing, cfg.prefix_cache_mb,
                                run_dir / "prefix-cache" if cfg.prefix_cache == "disk" else None, cfg.batch_log,
                                joint=joint)
    run_name = f"{backbone.name}-{name}-L{layers[0]}" if len(layers) == 1 else \
        f"{backbone.name}-{name}-{len(layers)}-layers{'-joint' if joint else ''}"
    def write_stack(path: Path, specs: list[str], **info) -> Path:
        return write_manifest(path, manifest(specs, backbone, **info))

    trainer, logger = fit_gates(cfg, module, backbone, run_dir, EpochGateExport(run_dir, write_stack), run_name,
                                multirun_group(plain(cfg.logger)))
    if (metrics := fast_dev_run_metrics(trainer)) is not None:
        return metrics
    if not trainer.is_global_zero:  # under DDP only rank 0 evaluates and writes the exports
        return {}

    # units: key -> the layers whose gates answer together (each layer alone, or one joint stack)
    epoch = cfg.export_epoch
    if joint:
        units = {layers[0]: layers}
        trained = {l: lsg.gates.Gate.load(joint_gate_file(run_dir, l, epoch)) for l in layers}
        val_files = {layers[0]: val_file(run_dir, epoch)}
        labels = {layers[0]: f"{name.upper()} joint L{'+'.join(map(str, layers))} (epoch {epoch})"}
    else:
        units = {l: [l] for l in layers}
        folders = {l: layer_dir(run_dir, name, l, layers) for l in layers}
        trained = {l: lsg.gates.Gate.load(gate_file(folders[l], epoch)) for l in layers}
        val_files = {l: val_file(folders[l], epoch) for l in layers}
        labels = {l: f"{name.upper()} L{l} (epoch {epoch})" for l in layers}
    split = DataSplit(data_cfg, "val")
    val = split.load()
    results: dict[int, tuple[Result, Result]] = {}
    if val:
        results = {k: validation_results(val_files[k], split, val) for k in units}
        missing = [k for k in units if results[k][0] is None]
        if missing:  # e.g. limit_val_batches: the baseline and those gates in one pass (prefix reuse)
            stacks = [baseline_stack(), *[GateStack(f"L{k}", {l: [trained[l]] for l in units[k]}, None)
                                          for k in missing]]
            fresh = answer_stacks(backbone, split, stacks, val, batch_size=cfg.eval_batch_size,
                                  progress=f"baseline and {', '.join(labels[k] for k in missing)} (val)")
            results.update({k: (fresh[baseline_stack().spec], fresh[f"L{k}"]) for k in missing})
        print_comparison(results[layers[0]][0], {labels[k]: results[k][1] for k in units},
                         cfg.bootstrap_samples, cfg.ci_level)
        if logger:
            logger.log_metrics({f"final/{'' if len(units) == 1 else f'L{k}/'}{kind}_acc_pct_{t}": a
                                for k, (baseline, gated) in results.items()
                                for kind, r in (("baseline", baseline), ("gated", gated))
                                for t, a in r.acc_pct.items()})
    else:  # free-form answers (e.g. Cambrian-10K): the validation loss is the only validation figure
        spec = f"stack:{cfg.stack_export_path}" if joint else f"ckpt:{exports[layers[0]]}"
        print("The validation split has no multiple-choice question, so there is no accuracy to compare; the "
              f"validation loss is logged per epoch. Score the gate on a benchmark: python eval.py "
              f"benchmark=mmstar 'gates=[{spec}]'")
    out = {}
    for key, unit in units.items():
        metrics = {"baseline": results[key][0].summary(), "gated": results[key][1].summary()} \
            if key in results else {}
        for layer in unit:
            meta = trained[layer].metadata
            trained[layer].save(exports[layer], metrics=metrics,
                                **{k: meta[k] for k in meta if k not in ("gate", "config", "git_commit", "gate_config")})
            print(f"Saved gate to {exports[layer]}")
        out[key] = metrics
    if joint:
        path = write_manifest(Path(cfg.stack_export_path), manifest(
            [f"ckpt:{exports[l].resolve()}" for l in layers], backbone, joint=True, layers=layers, epoch=epoch,
            steps=trained[layers[0]].metadata.get("steps"), metrics=out[layers[0]]))
        print(f"Saved the joint stack manifest to {path} (eval.py 'gates=[stack:{path}]')")
    if logger:
        logger.experiment.finish()  # a multirun's next job starts its own run
    return out[layers[0]] if len(units) == 1 else out


if __name__ == "__main__":
    main()
