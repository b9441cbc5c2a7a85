"""A release on disk: the checkpoint format and its one manifest builder (checkpoint), safetensors
reading without unpickling (safetensors), model_type "specdef" for stock loaders (hf), the model
card (card) and the allowlist of source files a release may carry (allowlist).
"""
