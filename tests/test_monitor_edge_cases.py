"""SparsityMonitor and count_flops on set-ups that went wrong: bf16 autocast, CPU attention, empty layers,
a wrong example input, long layer names."""

import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.nn import functional as F

from lightning_rigl import RigLCallback, SparsityMonitor, count_flops
from tests.helpers import MLP, Attention, RecordingLogger, make_loader, make_trainer
from tests.test_monitor import F_DENSE


def _last_logged(logger):
    return logger.monitored()[max(logger.monitored())]


def test_bf16_mixed_sparse_flops_are_two_per_active_weight():
    rigl = RigLCallback(sparsity=0.8, delta_t=3, t_end=100)
    logger = RecordingLogger()
    model = MLP()
    model.example_input_array = torch.randn(3, 16)
    make_trainer(
        [SparsityMonitor(plot=False), rigl], max_steps=6, log_every_n_steps=6, logger=logger, precision="bf16-mixed"
    ).fit(model, make_loader())

    metrics = _last_logged(logger)
    active = sum(int(mask.sum()) for mask in rigl.masks.values())
    assert metrics["flops/dense_forward"] == F_DENSE
    assert metrics["flops/sparse_forward"] == 2 * active < F_DENSE / 4


def test_cpu_scaled_dot_product_attention_counts_its_two_matmuls():
    tokens, dim = 10, 16
    count = count_flops(Attention(dim), torch.randn(4, tokens, dim))
    attention = 2 * (2 * tokens * tokens * dim)  # Q K^T and A V over all heads, 2 FLOPs a multiply-add
    assert count.other == 2 * attention  # F.scaled_dot_product_attention and the MultiheadAttention
    assert count.per_layer["qkv.weight"].dense == 2 * tokens * dim * 3 * dim
    assert count.per_layer["mha.in_proj_weight"].dense == 2 * tokens * dim * 3 * dim
    assert count.per_layer["mha.out_proj.weight"].dense == 2 * tokens * dim * dim


def test_attention_flops_reach_the_monitor_dense_while_projections_are_scaled():
    class AttentionModel(MLP):
        def __init__(self):
            super().__init__()
            self.attention = Attention()
            self.example_input_array = torch.randn(2, 10, 16)

        def forward(self, x):
            return self.net(self.attention(x).mean(dim=1))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x.unsqueeze(1).expand(-1, 10, -1)), y)  # 10 tokens a sample

    model = AttentionModel()
    logger = RecordingLogger()
    rigl = RigLCallback(sparsity=0.8, delta_t=100)
    make_trainer([SparsityMonitor(plot=False), rigl], max_steps=2, log_every_n_steps=2, logger=logger).fit(
        model, make_loader(64, 16)
    )
    expected = count_flops(model, model.example_input_array)  # the masked weights' zeros count here too
    metrics = _last_logged(logger)
    assert expected.other == 2 * 2 * (2 * 10 * 10 * 16) > 0
    assert metrics["flops/sparse_forward"] == pytest.approx(expected.sparse)
    assert metrics["flops/dense_forward"] == pytest.approx(expected.dense)


def test_a_zero_size_linear_is_left_out_without_error():
    class WithEmpty(MLP):
        def __init__(self):
            super().__init__()
            self.empty = nn.Linear(16, 0)
            self.example_input_array = torch.randn(2, 16)

        def forward(self, x):
            return self.net(x) + self.empty(x).sum()

    logger = RecordingLogger()
    make_trainer([SparsityMonitor(plot=False)], max_steps=2, log_every_n_steps=2, logger=logger).fit(
        WithEmpty(), make_loader()
    )
    metrics = _last_logged(logger)
    assert "sparsity/empty.weight" not in metrics and "sparsity/net.0.weight" in metrics  # nothing to watch
    assert metrics["flops/dense_forward"] == F_DENSE  # a Linear with 0 outputs costs nothing


def test_a_wrong_shaped_example_input_is_refused_naming_the_monitor_the_input_and_the_error():
    monitor = SparsityMonitor(example_input=torch.randn(3, 7), plot=False)
    pattern = (
        r"SparsityMonitor could not count FLOPs: `example_input` \(a Tensor of shape \(3, 7\)\) does not fit the "
        r"forward of MLP: mat1 and mat2 shapes cannot be multiplied \(3x7 and 16x32\)\. Pass an `example_input`"
    )
    with pytest.raises(MisconfigurationException, match=pattern):
        make_trainer([monitor], max_steps=1).fit(MLP(), make_loader())


def _rich_names(out):
    """The layer column of a rich table, a folded name joined back from its lines."""
    names = []
    for line in out.splitlines():
        cells = [cell.strip() for cell in line.split("│")[1:-1]]
        if len(cells) < 2 or cells[0] in ("layer", "total"):
            continue
        if cells[1]:  # the shape column opens a row
            names.append(cells[0])
        else:
            names[-1] += cells[0]
    return names


def test_the_rich_table_keeps_every_long_name_whole(capsys, monkeypatch):
    pytest.importorskip("rich")
    monkeypatch.setenv("COLUMNS", "80")

    class Deep(MLP):
        def __init__(self):
            super().__init__()
            self.encoder = nn.ModuleDict(
                {"layer": nn.ModuleList(nn.ModuleDict({"attention_output_dense": nn.Linear(16, 16)}) for _ in range(3))}
            )

        def forward(self, x):
            for block in self.encoder["layer"]:
                x = block["attention_output_dense"](x)
            return super().forward(x)

    rigl = RigLCallback(sparsity=0.8)
    make_trainer([SparsityMonitor(plot=False), rigl], max_steps=1).fit(Deep(), make_loader())
    out = capsys.readouterr().out.split("SparsityMonitor at fit end")[1]
    assert _rich_names(out) == list(rigl.masks)
    assert any(len(name) > 40 for name in rigl.masks)  # longer than the column


def test_rigl_trains_next_to_a_zero_size_linear_leaving_it_out_of_the_masks():
    class WithEmpty(MLP):
        def __init__(self):
            super().__init__()
            self.empty = nn.Linear(32, 0)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return super().training_step(batch, batch_idx) + self.empty(self.net[0](x)).sum()

    rigl = RigLCallback(0.8, delta_t=2, t_end=6)
    logger = RecordingLogger()
    make_trainer([rigl, SparsityMonitor(plot=False)], max_steps=6, log_every_n_steps=2, logger=logger).fit(
        WithEmpty(), make_loader()
    )
    assert "empty.weight" not in rigl.masks and rigl.sparse.updates == 2
    masked = sum(mask.numel() for mask in rigl.masks.values())
    assert sum(int(mask.sum()) for mask in rigl.masks.values()) == pytest.approx(0.2 * masked, rel=0.02)
    with pytest.raises(MisconfigurationException, match=r"nothing to mask \(include=\['empty.weight'\]"):
        make_trainer([RigLCallback(0.8, include=["empty.weight"])], max_steps=1).fit(WithEmpty(), make_loader())
