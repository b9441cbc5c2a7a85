"""What a model releaser runs: load a source and its probe batch (sources), defend it to a
checkpoint (defend) and verify the checkpoint against the source (verify).
"""
