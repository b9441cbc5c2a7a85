"""The attacker's fine-tuning: the one training loop (loop), the optimizer registry (optim), sweeps
(sweep), the threshold ladder (metrics), the stability edge (edge) and the Optuna search (search).
"""
