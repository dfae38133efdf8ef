"""The command-line entry points: one Hydra app per command, exposed as console scripts
(`lsg-train`, `lsg-eval`, `lsg-oracle`, `lsg-stack`, `lsg-calibrate`, `lsg-summarize`, `lsg-overhead`,
`lsg-reproduce`); `python train.py` and `python eval.py` run the first two from a checkout.
The configs are `conf/` (shipped as `lsg.conf`); `lsg.cli.common` holds the wiring they share."""
