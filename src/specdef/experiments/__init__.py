"""Experiments as data: YAML configs expanded into runs, the runners for each experiment kind,
resumable run directories and the demo.
"""
