"""Experiments as data: YAML configs and their grids (config), what a run of each kind does
(runners), resumable run directories (run) and the digits demo (demo).
"""
