"""Plumbing every floor may use: atomic writes and output preflight (files), provenance stamps
(provenance), progress bars (progress). No model code.
"""
