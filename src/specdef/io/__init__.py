"""Checkpoints on disk: the specdef checkpoint format with its one manifest builder (checkpoint)
and reading safetensors files without unpickling (safetensors).
"""
