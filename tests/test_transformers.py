"""Hugging Face models built from tiny configs (no download), trained with RigL through a real Trainer."""

import warnings

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_rigl import RigLCallback, count_flops, layer_sparsities
from lightning_rigl.core import num_active
from tests.helpers import InvariantChecker, make_trainer

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

VOCAB, TOKENS = 100, 16


def gpt2():
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(config)


def bert():
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=3,
    )
    return transformers.BertForSequenceClassification(config)


class HFModule(pl.LightningModule):
    """Any Hugging Face model that returns a loss from ``input_ids`` and ``labels``."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def training_step(self, batch, batch_idx):
        ids, labels = batch
        return self.net(input_ids=ids, labels=labels).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def token_loader(classify=False, n=64, batch_size=8):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(VOCAB, (n, TOKENS), generator=g)
    labels = ids[:, 0] % 3 if classify else ids  # GPT-2 shifts the labels itself
    return DataLoader(TensorDataset(ids, labels), batch_size=batch_size)


def expected_active(net, names, sparsity=0.9):
    """Per-layer active counts from the ERK distribution of the weights' shapes, computed apart from the run."""
    params = dict(net.named_parameters())
    sparsities = layer_sparsities({n: tuple(params[n].shape) for n in names}, sparsity, "erk")
    return {n: num_active(params[n].numel(), sparsities[n]) for n in names}


def fit(module, loader, steps=6):
    rigl = RigLCallback(0.9, delta_t=2, t_end=100)
    checker = InvariantChecker(rigl)  # exact counts and zero inactive weights after every step
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        make_trainer([rigl, checker], max_steps=steps).fit(module, loader)
    assert checker.checks == steps and rigl.sparse.updates == steps // 2
    return rigl, [str(w.message) for w in record if "RigL leaves dense" in str(w.message)]


GPT2_BLOCK_WEIGHTS = [
    f"net.transformer.h.{i}.{layer}.weight"
    for i in range(2)
    for layer in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
]


def test_gpt2_masks_every_conv1d_at_erk_counts_and_leaves_the_tied_embedding_dense():
    module = HFModule(gpt2())
    embedding = module.net.transformer.wte.weight
    assert module.net.lm_head.weight is embedding  # tied by the model itself
    rigl, tie_warnings = fit(module, token_loader())

    assert list(rigl.masks) == GPT2_BLOCK_WEIGHTS
    assert all(isinstance(module.get_submodule(n.rsplit(".", 1)[0]), Conv1D) for n in GPT2_BLOCK_WEIGHTS)
    active = {n: int(m.sum()) for n, m in rigl.masks.items()}
    assert active == expected_active(module, GPT2_BLOCK_WEIGHTS)
    assert int(embedding.count_nonzero()) == embedding.numel()  # no zeros added to the token embedding
    assert len(tie_warnings) == 1 and "net.transformer.wte.weight = net.lm_head.weight" in tie_warnings[0]


def test_gpt2_topology_changes_at_updates_with_exact_counts():
    module = HFModule(gpt2())
    rigl = RigLCallback(0.9, delta_t=2, t_end=100)
    first = {}

    class Initial(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            first.update(rigl.masks)

    with pytest.warns(UserWarning, match="RigL leaves dense"):
        make_trainer([rigl, Initial()], max_steps=6).fit(module, token_loader())
    assert rigl.sparse.updates == 3 and all(record.changed > 0 for record in rigl.sparse.history)
    for name, mask in rigl.masks.items():
        assert not torch.equal(mask, first[name]), name
        assert int(mask.sum()) == int(first[name].sum()), name


def test_gpt2_conv1d_flops_are_counted_with_their_true_fan_in_and_fan_out():
    net = gpt2()
    count = count_flops(net, torch.randint(VOCAB, (2, TOKENS)))
    for i in range(2):
        block = f"transformer.h.{i}"
        assert count.per_layer[f"{block}.attn.c_attn.weight"].dense == 2 * 32 * 96 * TOKENS
        assert count.per_layer[f"{block}.mlp.c_fc.weight"].dense == 2 * 32 * 128 * TOKENS
        assert count.per_layer[f"{block}.mlp.c_proj.weight"].dense == 2 * 128 * 32 * TOKENS


BERT_WEIGHTS = [
    f"net.bert.encoder.layer.{i}.{layer}.weight"
    for i in range(2)
    for layer in (
        "attention.self.query",
        "attention.self.key",
        "attention.self.value",
        "attention.output.dense",
        "intermediate.dense",
        "output.dense",
    )
] + ["net.bert.pooler.dense.weight", "net.classifier.weight"]


def test_bert_masks_every_linear_at_erk_counts_and_no_embedding():
    module = HFModule(bert())
    embeddings = module.net.bert.embeddings
    tables = (embeddings.word_embeddings, embeddings.position_embeddings, embeddings.token_type_embeddings)
    nonzero = [int(table.weight.count_nonzero()) for table in tables]  # the padding row is zero from the start
    rigl, tie_warnings = fit(module, token_loader(classify=True))

    assert list(rigl.masks) == BERT_WEIGHTS
    active = {n: int(m.sum()) for n, m in rigl.masks.items()}
    assert active == expected_active(module, BERT_WEIGHTS)
    assert [int(table.weight.count_nonzero()) for table in tables] == nonzero  # no zeros added
    assert tie_warnings == []  # nothing tied in a classifier
