"""The informed attacker: detection of defended pairs from the weights alone and the
function-preserving transforms (fuse, factor, inject, untouched, rebalance) that undo the defense.
"""
