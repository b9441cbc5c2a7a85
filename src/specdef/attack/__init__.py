"""The attacker's fine-tuning: the one training loop (loop), the optimizer registry with capability
flags (optim), learning-rate sweeps (sweep) and steps-to-threshold metrics (metrics).
"""
