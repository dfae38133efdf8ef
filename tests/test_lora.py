"""The LoRA baseline: equal to peft's injected adapter, parameter-matched, trained by train.py."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lsg
from lsg.gates import Gate, LoRAGate
from lsg.gates.lora import TARGETS, lsg_parameter_count
from lsg.scoring import decoder_hidden

ROOT = Path(__file__).resolve().parents[1]


def test_lora_gate_equals_peft_lora_on_that_layer_and_is_identity_at_init(tiny, batch):
    from peft import LoraConfig, inject_adapter_in_model

    gate = LoRAGate.build(tiny, rank=4, alpha=8.0)
    with torch.no_grad():
        plain = decoder_hidden(tiny, batch)
        with lsg.attach(tiny, {2: gate}):
            torch.testing.assert_close(decoder_hidden(tiny, batch), plain)  # B = 0 at init
        for b in gate.lora_B.values():
            torch.nn.init.normal_(b.weight, std=0.2)
        with lsg.attach(tiny, {2: gate}):
            ours = decoder_hidden(tiny, batch)
    reference = copy.deepcopy(tiny.model)
    language_model = tiny.family.language_model(reference)
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=list(TARGETS), layers_to_transform=[2], layers_pattern="layers"),
                            language_model)
    with torch.no_grad():
        for name, module in language_model.layers[2].self_attn.named_children():
            if name in TARGETS:
                module.lora_A["default"].weight.copy_(gate.lora_A[name].weight)
                module.lora_B["default"].weight.copy_(gate.lora_B[name].weight)
        ref_bb = lsg.Backbone(tiny.name, reference, tiny.processor, tiny.system_prompt, tiny.padding_side, tiny.sinks)
        expected = decoder_hidden(ref_bb, batch)
    assert (expected - plain).abs().max() > 1e-3  # the adapter does something
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4)


def test_auto_rank_matches_the_lsg_gates_parameter_count(tiny):
    gate = LoRAGate.build(tiny)
    n_lora = sum(p.numel() for p in gate.parameters())
    n_lsg = lsg_parameter_count(tiny.hidden_size)
    per_rank = sum(i + o for i, o in gate.shapes.values())
    assert abs(n_lora - n_lsg) <= per_rank / 2
    # SmolLM2-135M: q, o 576 -> 576; k, v 576 -> 192: 3840 per rank; LSG (D=576, 64, 2) = 38,210 -> r = 10
    smol = LoRAGate({"q_proj": [576, 576], "k_proj": [576, 192], "v_proj": [576, 192], "o_proj": [576, 576]},
                    hidden_size=576)
    assert smol.rank == 10 and lsg_parameter_count(576) == 38210
    with pytest.raises(ValueError, match="LoRA target 'w_proj'"):
        LoRAGate.build(tiny, targets=["w_proj"])


@pytest.mark.slow
def test_train_py_gate_lora_trains_and_saves_a_loadable_checkpoint(tmp_path):
    args = [sys.executable, str(ROOT / "train.py"), "model=tiny-random", "gate=lora", "layer=2", "logger=none",
            f"data.root={tmp_path / 'shapes'}", "data.n_train=16", "data.n_val=7", "batch_size=4",
            "effective_batch_size=8", "epochs=1", f"run_dir={tmp_path / 'run'}",
            f"export_path={tmp_path / 'ck' / 'lora-L2.safetensors'}", f"hydra.run.dir={tmp_path / 'h'}"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    gate = Gate.load(tmp_path / "ck" / "lora-L2.safetensors", backbone="tiny-random", layer=2)
    assert isinstance(gate, LoRAGate) and gate.metadata["steps"] == 2
    assert any(b.weight.abs().sum() > 0 for b in gate.lora_B.values())  # trained away from zero
