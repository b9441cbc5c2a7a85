"""What a model releaser runs: load a source and its probe batch (sources), defend it to a
checkpoint (defend), verify the checkpoint against the source (verify), and the same defense in
TamperBench's interface (tamperbench).
"""
