"""Pure tensor math: the spectral deformation of one weight (spectral) and the native symmetry
math of one layer pair (symmetry). No nn.Module, no I/O.
"""
