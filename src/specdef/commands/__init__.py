"""Sub-commands of the ``specdef`` CLI; each module exposes ``register(subparsers)``."""
