"""Sub-commands of the ``specdef`` CLI, one module each exposing ``register(subparsers)``: demo,
defend, verify, inspect, zoo, curvature, attack, detect, transform, run, report (shared options and output: common).
"""
