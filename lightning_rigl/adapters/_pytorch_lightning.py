"""The classes :mod:`lightning_rigl.pytorch_lightning` serves, in a private module on purpose.

They derive from ``lightning.pytorch.Callback`` too (through the one implementation), so under a public
path jsonargparse would find two classes named ``RigLCallback`` among lightning's callbacks as soon
as this module is imported, and ``--trainer.callbacks+=RigLCallback`` would stop resolving in
lightning's LightningCLI. jsonargparse leaves classes of private modules out of that search.
"""

from __future__ import annotations

import pytorch_lightning

from lightning_rigl.adapters import callback, monitor


class RigLCallback(callback.RigLCallback, pytorch_lightning.Callback):
    """:class:`lightning_rigl.RigLCallback`, also a ``pytorch_lightning.Callback`` (for its LightningCLI)."""


class SparsityMonitor(monitor.SparsityMonitor, pytorch_lightning.Callback):
    """:class:`lightning_rigl.SparsityMonitor`, also a ``pytorch_lightning.Callback`` (for its LightningCLI)."""
