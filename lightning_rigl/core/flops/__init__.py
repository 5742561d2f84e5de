"""FLOP counts of a sparse model (dense, sparse, training per sample) and the monitor's report of them."""

from lightning_rigl.core._moved import old_names

__getattr__ = old_names(__name__)  # the names of the former module lightning_rigl.core.flops, deprecated
