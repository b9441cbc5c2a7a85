"""Zero-overhead native deformation: finding a model's symmetric layer pairs and deforming them
in place (apply, rebalance, imbalance scores).
"""
