"""Sparse kernels: Linear-type layers computing with their active weights only, their choice, and ``sparsify``."""

from lightning_rigl.core._moved import old_names

__getattr__ = old_names(__name__)  # the names of the former module lightning_rigl.core.kernels, deprecated
