"""Masks back from the child processes of ``ddp_spawn`` / ``ddp_fork``, which return only the weights."""

from __future__ import annotations

import os
import tempfile
import uuid

import torch
from torch import Tensor

from lightning_rigl.core.sparse_training import SparseTraining
from lightning_rigl.core.state.packing import pack_bits, unpack_bits


class MaskHandoff:
    """A file through which rank 0 of a spawned or forked fit hands its masks to the process that made it.

    Created in the main process (its pid and a unique path travel to the children with the callback);
    a child's rank 0 :meth:`send` s at fit end; the main process :meth:`receive` s them, as often as it
    asks (the same masks each time) until :meth:`reset` (a new fit) forgets them.

    Example:
        >>> MaskHandoff().receive() is None  # nothing was sent
        True
    """

    def __init__(self) -> None:
        self.main_pid = os.getpid()
        self.path = os.path.join(tempfile.gettempdir(), f"lightning_rigl_masks_{uuid.uuid4().hex}.pt")
        self._received: dict[str, Tensor] | None = None

    def __getstate__(self) -> dict:
        return {"main_pid": self.main_pid, "path": self.path, "_received": None}

    def __del__(self) -> None:
        if os.getpid() == self.main_pid:
            self.reset()

    def reset(self) -> None:
        """In the main process, forget what a child sent (a new fit begins)."""
        if os.getpid() == self.main_pid:
            self._received = None
            if os.path.exists(self.path):
                os.remove(self.path)

    def send(self, sparse: SparseTraining, is_global_zero: bool) -> None:
        """In a child process, write the run's masks (rank 0); every rank calls it (a collective under FSDP2)."""
        if os.getpid() == self.main_pid:
            return
        packed = sparse.layer_masks.packed()["masks"]
        if is_global_zero:
            packed.update({name: pack_bits(sparse.compact.mask(name)) for name in sparse.compact})
            shapes = {name: list(shape) for name, shape in sparse.shapes().items()}
            torch.save({"masks": packed, "shapes": shapes}, self.path)

    def receive(self) -> dict[str, Tensor] | None:
        """In the main process, the masks a child sent since the last :meth:`reset` (bool, by name); None if none."""
        if self._received is None and os.getpid() == self.main_pid and os.path.exists(self.path):
            saved = torch.load(self.path, weights_only=True)
            self._received = {name: unpack_bits(saved["masks"][name], s) for name, s in saved["shapes"].items()}
        return None if self._received is None else {name: mask.clone() for name, mask in self._received.items()}
