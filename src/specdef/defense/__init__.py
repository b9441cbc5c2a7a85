"""SpecDef Algorithm 1 on a live model: the config, the defended layer, apply/undo, target
selection, the precision guard, probe batches and SpecDef-aware curvature certificates.
"""
