"""The attacker: the one fine-tuning loop, the optimizer registry, learning-rate sweeps and
steps-to-threshold metrics.
"""
