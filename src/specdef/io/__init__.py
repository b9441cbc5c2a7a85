"""Checkpoints on disk: the specdef checkpoint format with its one manifest builder (checkpoint)
reading safetensors files without unpickling (safetensors), and the Hugging Face face of it (hf).
"""
