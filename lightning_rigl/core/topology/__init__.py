"""The masks and their updates: initial masks, the drop and grow of each update and its exact top-k.

Also the grow criteria (methods), the update schedule, the optimizer-state reset of changed
connections and the check that inactive weights stay at 0.
"""

from lightning_rigl.core._moved import old_names

__getattr__ = old_names(__name__)  # the names of the former module lightning_rigl.core.topology, deprecated
