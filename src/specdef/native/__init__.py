"""Zero-overhead native deformation: a model's symmetric layer pairs and their tensors (pairs), and
deforming them in place, rebalancing and imbalance scores (apply).
"""
