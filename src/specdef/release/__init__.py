"""What a model releaser runs: load a source, defend it (one entry point for every mode) and
verify the defended checkpoint against the source.
"""
