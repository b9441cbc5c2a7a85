"""The attacker's fine-tuning: the one training loop (loop), the optimizer registry (optim) with its
natural-gradient (natural) and random-step (stochastic) optimizers, sweeps
(sweep), the threshold ladder (metrics), the stability edge (edge) and the Optuna search (search).
"""
