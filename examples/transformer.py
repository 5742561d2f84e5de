"""RigL on Lightning's demo Transformer (``lightning.pytorch.demos.Transformer``) with random tokens.

The plain-Python way in: an existing LightningModule and Trainer, plus one callback in the list.

Which weights are masked. RigLCallback's default selection takes the ``weight`` of every Linear and
the input projection of every ``nn.MultiheadAttention``. In this model that is, in each encoder and
decoder layer, the attention weights (``self_attn.in_proj_weight``, ``self_attn.out_proj.weight``,
and the decoder's ``multihead_attn`` pair) and the MLP weights (``linear1.weight``,
``linear2.weight``), and also ``model.decoder.weight``, the vocabulary head. The token embedding,
the LayerNorms and all biases are never masked. This example keeps the vocabulary head dense too,
like the embedding it mirrors, with ``exclude=["model.decoder.weight"]``.

The demo's decoder reads the target sequence under a causal mask that includes the current
position, so it can learn to copy its input: the loss goes down even on random tokens, which is
all this example needs (no download).

    python examples/transformer.py
    python examples/transformer.py --method set --sparsity 0.8 --steps 200
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch
from lightning.pytorch.demos import Transformer
from torch import Tensor
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_rigl import RigLCallback

#: The vocabulary head mirrors the embedding, which RigL never masks: keep both dense.
DENSE_HEAD = ["model.decoder.weight"]


class TransformerLM(pl.LightningModule):
    """Lightning's demo Transformer trained on (inputs, targets) token pairs with Adam.

    Args:
        vocab_size: Number of distinct tokens.
        ninp: Embedding and model width.
        nhead: Attention heads.
        nhid: Width of the MLP in each layer.
        nlayers: Encoder layers and decoder layers (each).
        dropout: Dropout probability.
        lr: Adam's learning rate.

    """

    def __init__(
        self,
        vocab_size: int = 64,
        ninp: int = 64,
        nhead: int = 2,
        nhid: int = 128,
        nlayers: int = 2,
        dropout: float = 0.1,
        lr: float = 3e-3,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = Transformer(vocab_size, ninp, nhead, nhid, nlayers, dropout)

    def loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        """Mean negative log-likelihood of the targets."""
        inputs, target = batch
        return F.nll_loss(self.model(inputs, target), target.reshape(-1))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = self.loss(batch)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def random_tokens(n: int, seq_len: int, vocab_size: int, seed: int) -> TensorDataset:
    """``n`` sequences of uniform random tokens, as (inputs, the same shifted by one) pairs."""
    tokens = torch.randint(0, vocab_size, (n, seq_len + 1), generator=torch.Generator().manual_seed(seed))
    return TensorDataset(tokens[:, :-1], tokens[:, 1:])


@torch.no_grad()
def held_out_loss(model: TransformerLM, data: TensorDataset) -> float:
    """The model's loss on ``data`` in eval mode (no dropout)."""
    training = model.training
    model.eval()
    loss = model.loss(data.tensors).item()
    model.train(training)
    return loss


def main(argv: list[str] | None = None) -> dict[str, object]:
    """Train the demo Transformer with RigL and print the loss before and after and each masked weight's sparsity.

    Returns:
        ``loss_before`` and ``loss_after`` on held-out random tokens, ``masked``: the masked parameter
        names, and ``callback``: the RigLCallback.

    """
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--method", default="rigl", choices=["rigl", "set", "snfs", "static"])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--delta-t", type=int, default=20)
    args = parser.parse_args(argv)

    pl.seed_everything(0, verbose=False)
    model = TransformerLM()
    vocab_size = model.hparams.vocab_size
    train = DataLoader(random_tokens(1024, 32, vocab_size, seed=0), batch_size=16, shuffle=True)
    held_out = random_tokens(64, 32, vocab_size, seed=1)

    rigl = RigLCallback(sparsity=args.sparsity, method=args.method, delta_t=args.delta_t, exclude=DENSE_HEAD)
    trainer = pl.Trainer(
        max_steps=args.steps,
        callbacks=[rigl],  # the one line RigL adds to an existing Trainer
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    loss_before = held_out_loss(model, held_out)
    trainer.fit(model, train)
    loss_after = held_out_loss(model, held_out)

    run = f"{args.method} at {args.sparsity:.0%} ERK sparsity"
    print(f"\n{run}: held-out loss {loss_before:.3f} -> {loss_after:.3f}\n  masked weight{'sparsity':>63}")
    params = dict(model.named_parameters())
    for name in rigl.masks:
        print(f"  {name:<68}{1 - params[name].count_nonzero().item() / params[name].numel():.3f}")
    print(f"  topology updates: {rigl.sparse.updates}")
    return {"loss_before": loss_before, "loss_after": loss_after, "masked": list(rigl.masks), "callback": rigl}


if __name__ == "__main__":
    main()
