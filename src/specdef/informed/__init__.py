"""The informed attacker: finding defended pairs from the weights alone (detect, detect_native,
detection) and the function-preserving transforms that undo it (transforms, inject, targets).
"""
