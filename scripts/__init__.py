"""Research and measurement scripts, run from a source checkout with `lsg` installed; not part of
the installed package. Around the embedded backbone `smol-llava`:

- `train_embedded.py`: the command line of `lsg.embedded.recipe` (rebuilds the committed
  weights in `lsg/embedded/weights/`);
- `probe_captions.py`: caption grounding of a set of embedded weights;
- `probe_readout.py`: can SmolLM2 + a LoRA read a given visual-token form (oracle tokens)?

Measurements: `overhead.py`, `prefix_ratios.py`, `suffix_memory.py`; `export_shapes.py` (a shapes
split in the hub's dataset format, for lmms-eval); `gpu_check.sh`, `lmms_eval_check.sh`.
Importable as `scripts.<name>` from the repository root (the tests do).
"""
