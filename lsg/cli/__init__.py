"""The command-line entry points: one Hydra app per command, exposed as console scripts
(`lsg-train`, `lsg-sweep`, `lsg-compare`, `lsg-evaluate`, `lsg-oracle`, `lsg-stack`,
`lsg-calibrate`, `lsg-summarize`, `lsg-overhead`) and as `python <command>.py` from a checkout.
The configs are `conf/` (package data); `lsg.cli.common` holds the wiring they share."""
