"""Plumbing every floor may use: atomic writes and output preflight (files), provenance stamps,
progress bars. No torch model code lives here.
"""
