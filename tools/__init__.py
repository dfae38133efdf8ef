"""Research tooling around the embedded backbone `smol-llava`, run from a source checkout with
`lsg` installed; not part of the installed package.

- `train_embedded.py`: the command line of `lsg.embedded.recipe` (rebuilds the committed
  weights in `lsg/embedded/weights/`);
- `probe_captions.py`: caption grounding of a set of embedded weights;
- `probe_readout.py`: can SmolLM2 + a LoRA read a given visual-token form (oracle tokens)?

Importable as `tools.<name>` from the repository root (the tests do).
"""
