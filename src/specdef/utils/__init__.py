"""Plumbing every floor may use: atomic writes, output preflight and path confinement (files), dtype
names (dtypes), --device (devices), bounded YAML (safe_yaml), provenance stamps (provenance), progress bars (progress).
"""
