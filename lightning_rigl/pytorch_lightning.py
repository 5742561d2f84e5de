"""RigLCallback and SparsityMonitor for projects that import the standalone ``pytorch_lightning`` package.

``pytorch_lightning.Trainer`` runs :mod:`lightning_rigl`'s callbacks as they are, but its
``LightningCLI`` only accepts subclasses of ``pytorch_lightning.Callback``. The classes here add that
base and nothing else: every hook, argument and check is the one implementation in
:mod:`lightning_rigl`, so ``isinstance(cb, lightning_rigl.RigLCallback)`` holds for them too and
checkpoints (whose state key is the class name) load under either package. Give them to
``pytorch_lightning.cli.LightningCLI`` by this full path: ``lightning_rigl.pytorch_lightning.RigLCallback``.

Example:
    >>> import pytorch_lightning as pl
    >>> from lightning_rigl.pytorch_lightning import RigLCallback, SparsityMonitor
    >>> issubclass(RigLCallback, pl.Callback)
    True
    >>> trainer = pl.Trainer(callbacks=[RigLCallback(sparsity=0.9), SparsityMonitor()])  # doctest: +SKIP
"""

from lightning_rigl.adapters._pytorch_lightning import RigLCallback, SparsityMonitor

__all__ = ["RigLCallback", "SparsityMonitor"]
