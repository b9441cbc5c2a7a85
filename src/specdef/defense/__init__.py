"""SpecDef Algorithm 1 on a live model: the config (config), DefendedLinear (layer), apply/undo
(apply), target selection (targets), the precision guard (guard), probe batches (probe) and
SpecDef-aware curvature bounds (certify).
"""
