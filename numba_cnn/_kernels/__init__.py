"""Numba kernels, one module per operation family. Kernels never validate their arguments."""
