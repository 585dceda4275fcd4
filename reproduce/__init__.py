"""Reproducing the ALBEF paper tables, one command per table cell: python -m reproduce list|check|run|report|docs|plot.

The cells live in reproduce/cells.yaml; docs/REPRODUCE.md is generated from it. events.py writes TensorBoard scalar
event files without tensorboard installed.
"""
