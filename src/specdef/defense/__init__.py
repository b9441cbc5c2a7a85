"""SpecDef Algorithm 1 on a live model: the config (config), the per-layer step every defend path
shares (step), DefendedLinear (layer), apply/undo (apply), target selection (targets), the tolerance
table and guard (guard), probe batches (probe), inference cost (cost) and certificates (certify).
"""
