"""SpecDef Algorithm 1: the config, the per-layer step every defend path shares, the defended
layer, apply/undo, target selection, the tolerance table and guard, probe batches, certificates.
"""
