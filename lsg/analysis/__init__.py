"""Sink analysis (`lsg-analyze`): attention maps, layer and activation profiles, linear probes,
and one self-contained HTML page per run (docs/analysis.md)."""
