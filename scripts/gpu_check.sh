#!/usr/bin/env bash
# CUDA checks on a GPU machine, on tiny hub-format checkpoints of every family the tests build
# (no download): gated generation in bf16 through the KV cache, FlashAttention-2 kept inside
# attach (when flash_attn is installed: every gate vs the SDPA backbone, overhead.py on both
# bases), train.py (one GPU, and the
# ddp trainer config), eval.py overhead=true, lsg-calibrate, overhead.py, and the workflow (train.py layer=[1,2],
# lsg-summarize, lsg-oracle, lsg-stack, train.py gate=lora) on the accelerator.
#
#   bash scripts/gpu_check.sh [OUT_DIR]          # needs torch with CUDA and the project's packages
#
# Exits non-zero at the first failing check; the log says which.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-runs/gpu_check}}
mkdir -p "$OUT"
WORK=$(mktemp -d)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 WANDB_MODE=disabled
python3 - <<'EOF'
import torch, transformers, lightning
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, device {torch.cuda.get_device_name(0)}, "
      f"transformers {transformers.__version__}, lightning {lightning.__version__}")
EOF

echo "== tiny hub-format checkpoint"
python3 -c "from tests.conftest import save_tiny_hub_checkpoint as s; s('$WORK/hub')"
# The tiny model's sinks (conf/model/tiny-random.yaml): the llava-1.5-7b config's dims do not exist in it.
MODEL=(model=llava-1.5-7b "model.hf_id=$WORK/hub" "model.sinks.vit_dims=[0,1]" "model.sinks.llm_dims=[0,1]"
       model.sinks.tau_vit=1.5 model.sinks.tau_llm=1.2)
DATA=("data.root=$WORK/shapes" data.n_train=64 data.n_val=28 data.n_test=0)

echo "== gated generation on CUDA, every family (tiny hub-format LLaVA-1.5, Qwen2-VL, Qwen2.5-VL, LLaVA-OneVision):"
echo "   KV cache vs full recompute, float32 and bf16"
python3 - "$WORK" <<'EOF'
import sys, time
from pathlib import Path
import torch
import lsg
from lsg.specs import parse_stack
from tests.conftest import samples
from tests.hand import generate_and_recompute
from tests.tiny_families import save_tiny_onevision, save_tiny_qwen2_vl
from tests.tiny_gemma3 import save_tiny_gemma3
from tests.tiny_idefics3 import save_tiny_idefics3
from tests.tiny_internvl import save_tiny_internvl
from tests.tiny_llava_next import save_tiny_llava_next
from tests.tiny_qwen3_vl import save_tiny_qwen3_vl

sinks = {"vit_dims": [0, 1], "llm_dims": [0, 1], "tau_vit": 1.5, "tau_llm": 1.2, "normalisation": "rms",
         "lsink_scope": "layer"}
work = Path(sys.argv[1])
dirs = {"llava-1.5-7b": work / "hub", "qwen2-vl": save_tiny_qwen2_vl(work / "qwen2"),
        "qwen2.5-vl": save_tiny_qwen2_vl(work / "qwen25", image_size=64, version="2.5"),
        "llava-onevision": save_tiny_onevision(work / "ov"), "llava-next": save_tiny_llava_next(work / "next"),
        "qwen3-vl": save_tiny_qwen3_vl(work / "qwen3"), "internvl3": save_tiny_internvl(work / "internvl"),
        "gemma3": save_tiny_gemma3(work / "gemma3"), "smolvlm2": save_tiny_idefics3(work / "smolvlm", seed=1,
                                                                                     family="smolvlm")}
for name, folder in dirs.items():
    for dtype, tol in (("float32", 1e-4), ("bfloat16", 3e-2)):
        bb = lsg.load_backbone(name, hf_id=str(folder), dtype=dtype, device="cuda", sinks=sinks)
        images, questions, _ = samples(3)
        batch = bb.on_device(bb.build_batch(images, questions, padding_side="left"))
        for spec in ("oracle@2:0.3", "var", "vaf@1-2", "spear@1-2", "outro", "knockout@2", "mean-v@2"):
            stack = parse_stack(spec, bb)  # attach moves the gates
            t = time.perf_counter()
            with torch.no_grad():
                gen, recomputed = generate_and_recompute(bb, batch, stack.layers, 4)
            worst = max((g.float() - r.float()).abs().max().item() for g, r in zip(gen.logits, recomputed))
            print(f"{name:16s} {dtype:9s} {spec:14s} cache vs recompute max |dlogit| {worst:.2e} (tol {tol:g}) "
                  f"{'ok' if worst <= tol else 'FAIL'}  {1000 * (time.perf_counter() - t):.0f} ms", flush=True)
            assert worst <= tol, (name, spec)
EOF

echo "== FlashAttention-2 kept where gates allow it (tiny hub-format LLaVA-1.5 and Qwen2-VL, bf16):"
echo "   every gate kind: KV cache vs recompute, logits vs the SDPA backbone's, flash called in the planned layers"
if python3 -c "import flash_attn" 2>/dev/null; then
python3 - "$WORK" <<'EOF'
import sys
from pathlib import Path
import torch
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
import lsg
from lsg.attach import kernel_plan
from lsg.specs import parse_stack
from tests.conftest import samples
from tests.hand import generate_and_recompute
from tests.tiny_families import SINKS, SPECS

FA, DEVICE, TOL = "flash_attention_2", "cuda", 3e-2  # bf16 logits of the tiny models are < 1; eager vs SDPA: ~4e-3
flash_forward = ALL_ATTENTION_FUNCTIONS[FA]
called = set()  # decoder layers that called the flash kernel (vision attention has no layer_idx)


def counted(module, *args, **kwargs):
    if getattr(module, "layer_idx", None) is not None:
        called.add(module.layer_idx)
    return flash_forward(module, *args, **kwargs)


AttentionInterface.register(FA, counted)
work = Path(sys.argv[1])
images, questions, answers = samples(3)
questions = [q + " ?" * (3 * i) for i, q in enumerate(questions)]  # different lengths: padding
for name, folder in {"llava-1.5-7b": work / "hub", "qwen2-vl": work / "qwen2", "llava-next": work / "next",
                     "internvl3": work / "internvl", "qwen3-vl": work / "qwen3"}.items():  # Gemma 3 has no FA2
    flash, sdpa = (lsg.load_backbone(name, hf_id=str(folder), dtype="bfloat16", device=DEVICE, sinks=SINKS,
                                     attn_implementation=impl) for impl in (FA, "sdpa"))
    for spec in SPECS:
        gates = parse_stack(spec, flash).layers  # attach moves the gates to the GPU
        worst = 0.0
        for side in ("left", "right"):  # prefill with teacher-forced answers: flash vs SDPA on real tokens
            batch = flash.on_device(flash.build_batch(images, questions, answers, padding_side=side))
            real = batch["attention_mask"].bool()
            logits = []
            for bb in (flash, sdpa):
                with torch.no_grad(), lsg.attach(bb, gates):
                    logits.append(bb.model(**batch).logits[real].float())
            worst = max(worst, (logits[0] - logits[1]).abs().max().item())
        batch = flash.on_device(flash.build_batch(images, questions, padding_side="left"))
        called.clear()
        with torch.no_grad():
            gen, recomputed = generate_and_recompute(flash, batch, gates, 4)
            with lsg.attach(sdpa, gates):
                ref = sdpa.model.generate(**batch, max_new_tokens=1, do_sample=False, output_logits=True,
                                          return_dict_in_generate=True)
        cache = max((g.float() - r.float()).abs().max().item() for g, r in zip(gen.logits, recomputed))
        worst = max(worst, (gen.logits[0].float() - ref.logits[0].float()).abs().max().item())
        planned = {layer for layer, k in enumerate(kernel_plan(flash, gates)) if k.kernel == FA}
        ok = cache <= TOL and worst <= TOL and called == planned
        print(f"{name:13s} {spec:22s} cache vs recompute {cache:.1e}, flash vs sdpa {worst:.1e} (tol {TOL:g}); "
              f"flash in layers {sorted(called)} (planned {sorted(planned)}) {'ok' if ok else 'FAIL'}", flush=True)
        assert ok, (name, spec)
EOF
echo "== overhead.py: gate cost on the FlashAttention-2 base, then on the SDPA base (ratios to each base's none)"
for IMPL in flash_attention_2 sdpa; do
  python3 scripts/overhead.py "${MODEL[@]}" model.dtype=bfloat16 "model.attn_implementation=$IMPL" batch=4 \
      new_tokens=8 repeats=5 "specs=[none,var,oracle@1:0.3]" "hydra.run.dir=$WORK/h-kernels-$IMPL" 2>&1 | tail -8
done
else
  echo "   skipped: flash_attn is not importable here (pip install flash-attn to run this section)"
fi

echo "== train.py on one GPU (bf16-mixed), then resume is a no-op"
python3 train.py "${MODEL[@]}" "${DATA[@]}" model.dtype=bfloat16 layer=2 logger=none batch_size=8 \
    effective_batch_size=16 trainer.accelerator=gpu trainer.precision=bf16-mixed trainer.enable_progress_bar=false \
    "run_dir=$WORK/run1" "export_path=$WORK/ck/lsg-L2.safetensors" "hydra.run.dir=$WORK/h1" 2>&1 | tail -16

echo "== train.py trainer=ddp (devices=-1: every GPU here), final evaluation on the GPU"
python3 train.py "${MODEL[@]}" "${DATA[@]}" model.dtype=bfloat16 layer=2 logger=none batch_size=8 \
    effective_batch_size=16 trainer=ddp trainer.enable_progress_bar=false \
    "run_dir=$WORK/run2" "export_path=$WORK/ck2/lsg-L2.safetensors" "hydra.run.dir=$WORK/h2" 2>&1 | tail -16
test -f "$WORK/ck2/lsg-L2.safetensors"

echo "== eval.py with the overhead column on the GPU (device=auto)"
python3 eval.py "${MODEL[@]}" "benchmark.root=$WORK/shapes" benchmark.split=val benchmark.n=28 overhead=true model.dtype=bfloat16 \
    logger=none "out_dir=$WORK/compare" \
    "gates=[none,var,vaf,spear,outro,oracle@2:0.3,ckpt:$WORK/ck/lsg-L2.safetensors]" batch_size=14 \
    "hydra.run.dir=$WORK/h3" 2>&1 | tail -14

echo "== lsg-calibrate on the GPU"
python3 -m lsg.cli.calibrate "${MODEL[@]}" "${DATA[@]}" n_samples=8 "hydra.run.dir=$WORK/h4" 2>&1 | tail -12

echo "== overhead.py model=... on the GPU"
python3 scripts/overhead.py "${MODEL[@]}" model.dtype=bfloat16 batch=4 new_tokens=8 repeats=3 \
    "specs=[none,oracle@1:0.3,var,vaf,outro]" "hydra.run.dir=$WORK/h5" 2>&1 | tail -10
echo "== train.py layer=[1,2] (a sweep: shared prefix, bf16-mixed), summarize, oracle grid, greedy stack, LoRA on the GPU"
python3 train.py "${MODEL[@]}" "${DATA[@]}" model.dtype=bfloat16 "layer=[1,2]" logger=none batch_size=8 \
    effective_batch_size=16 epochs=1 trainer.accelerator=gpu trainer.precision=bf16-mixed \
    trainer.enable_progress_bar=false "run_dir=$WORK/sweep" "export_path=\"$WORK/sweep-ck/lsg-L{layer}.safetensors\"" \
    "hydra.run.dir=$WORK/h6" 2>&1 | tail -4
python3 -m lsg.cli.summarize "sweep_dir=$WORK/sweep" logger=none "hydra.run.dir=$WORK/h6b" | tail -8
python3 -m lsg.cli.oracle "${MODEL[@]}" "${DATA[@]}" model.dtype=bfloat16 "layers=[1,2]" "alphas=[0.0,0.5,1.0]" \
    logger=none "out_dir=$WORK/oracle" "hydra.run.dir=$WORK/h7" 2>&1 | tail -5
python3 -m lsg.cli.stack "${MODEL[@]}" "${DATA[@]}" data.n_test=28 model.dtype=bfloat16 "candidates_dir=$WORK/sweep" \
    "free=[oracle@3:0.2]" max_size=3 logger=none "out_dir=$WORK/stack" "hydra.run.dir=$WORK/h8" 2>&1 | tail -8
python3 train.py "${MODEL[@]}" "${DATA[@]}" model.dtype=bfloat16 gate=lora layer=2 logger=none batch_size=8 \
    effective_batch_size=16 epochs=1 trainer.accelerator=gpu trainer.precision=bf16-mixed \
    trainer.enable_progress_bar=false "run_dir=$WORK/run3" "export_path=$WORK/ck3/lora-L2.safetensors" \
    "hydra.run.dir=$WORK/h9" 2>&1 | tail -4
test -f "$WORK/ck3/lora-L2.safetensors"
echo "ALL GPU CHECKS PASSED"
