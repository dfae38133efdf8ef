"""The shipped Hydra configs (package data: `lsg.cli` apps and `lsg.configs` read them)."""
