"""SparsityMonitor: what it logs, when, and what it shows, with a real Trainer on small models."""

import json
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, ThroughputMonitor
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.nn import functional as F

from lightning_rigl import RigLCallback, SparsityMonitor, count_flops
from tests.helpers import MLP, Attention, FusedLinear, RecordingLogger, example_mlp, make_loader, make_trainer

LAYERS = ("net.0.weight", "net.2.weight", "net.5.weight")
NUMEL = {"net.0.weight": 16 * 32, "net.2.weight": 32 * 32, "net.5.weight": 32 * 4}
F_DENSE = 2 * sum(NUMEL.values())  # the MLP's forward FLOPs per sample: 2 per weight (a multiply-add)
FLOPS_KEYS = {f"flops/{k}" for k in ("dense_forward", "sparse_forward", "sparse_ratio", "train_total", "train_ratio")}
RIGL_KEYS = {"rigl/drop_fraction", "rigl/changed", "rigl/itop", "rigl/updates"}
SPARSITY_KEYS = {"sparsity/global"} | {f"sparsity/{name}" for name in LAYERS}


def _active(rigl):
    return {name: int(mask.sum()) for name, mask in rigl.masks.items()}


def _last_logged(logger):
    return logger.monitored()[max(logger.monitored())]


def test_logs_sparsity_and_flops_of_an_mlp_computed_by_hand():
    rigl = RigLCallback(sparsity=0.8, delta_t=100, t_end=100)
    logger = RecordingLogger()
    make_trainer([SparsityMonitor(plot=False), rigl], max_steps=10, log_every_n_steps=5, logger=logger).fit(
        example_mlp(), make_loader()
    )

    logged = logger.monitored()
    assert sorted(logged) == [4, 9]  # Lightning's step index of optimizer steps 5 and 10
    metrics = logged[9]
    assert set(metrics) == SPARSITY_KEYS | FLOPS_KEYS | RIGL_KEYS
    active = _active(rigl)
    for name in LAYERS:
        assert metrics[f"sparsity/{name}"] == pytest.approx(1 - active[name] / NUMEL[name])
        assert int((rigl.sparse.params[name] != 0).sum()) == active[name]  # what the weights hold
    assert metrics["sparsity/global"] == pytest.approx(1 - sum(active.values()) / sum(NUMEL.values()))
    f_sparse = 2 * sum(active.values())  # 2 FLOPs per active weight
    assert metrics["flops/dense_forward"] == F_DENSE
    assert metrics["flops/sparse_forward"] == f_sparse
    assert metrics["flops/sparse_ratio"] == pytest.approx(f_sparse / F_DENSE)
    assert metrics["rigl/updates"] == 0 and metrics["rigl/changed"] == 0
    assert metrics["rigl/itop"] == pytest.approx(rigl.sparse.itop_rate)
    assert metrics["rigl/drop_fraction"] == pytest.approx(rigl.sparse.schedule.drop_fraction(10))


def test_logs_right_after_each_topology_update_with_grown_zeros_counted_active():
    class CountZeros(Callback):  # runs after the monitor in on_train_batch_end
        def __init__(self):
            self.nonzero = {}

        def on_train_batch_end(self, trainer, pl_module, *args):
            self.nonzero[trainer.global_step] = sum(int((p != 0).sum()) for p in rigl.sparse.params.values())

    rigl = RigLCallback(sparsity=0.8, delta_t=3, t_end=10)
    logger, zeros = RecordingLogger(), CountZeros()
    callbacks = [SparsityMonitor(plot=False), rigl, zeros]
    make_trainer(callbacks, max_steps=11, log_every_n_steps=50, logger=logger).fit(example_mlp(), make_loader())

    logged = logger.monitored()
    assert sorted(logged) == [2, 5, 8]  # right after optimizer steps 3, 6 and 9, between logging steps
    active = sum(_active(rigl).values())
    for update, (step, record) in enumerate(zip((3, 6, 9), rigl.sparse.history, strict=True), start=1):
        metrics = logged[step - 1]
        assert record.step == step
        assert metrics["rigl/updates"] == update
        assert metrics["rigl/changed"] == pytest.approx(record.changed / record.active)
        assert metrics["rigl/drop_fraction"] == pytest.approx(rigl.sparse.schedule.drop_fraction(step))
        assert zeros.nonzero[step] < active  # the connections just grown are still exactly 0 ...
        assert metrics["sparsity/global"] == pytest.approx(1 - active / sum(NUMEL.values()))  # ... and count active
    itop = [logged[step]["rigl/itop"] for step in (2, 5, 8)]
    assert itop == sorted(itop) and itop[-1] == pytest.approx(rigl.sparse.itop_rate)


@pytest.mark.parametrize("method", ["rigl", "snfs", "set", "static"])
def test_train_total_follows_the_paper_accounting(method):
    rigl = RigLCallback(sparsity=0.8, method=method, delta_t=2, t_end=6)
    logger = RecordingLogger()
    make_trainer([SparsityMonitor(plot=False), rigl], max_steps=10, log_every_n_steps=10, logger=logger).fit(
        example_mlp(), make_loader(batch_size=16)
    )

    f_s, f_d = 2 * sum(_active(rigl).values()), F_DENSE
    per_sample = {  # 10 optimizer steps: 0..5 while updates run (t_end = 6), 6..9 after
        "rigl": 6 * (3 * f_s * 2 + 2 * f_s + f_d) / 3 + 4 * 3 * f_s,
        "snfs": 10 * (2 * f_s + f_d),
        "set": 10 * 3 * f_s,
        "static": 10 * 3 * f_s,
    }[method]
    metrics = logger.monitored()[9]
    assert metrics["flops/sparse_forward"] == f_s
    assert metrics["flops/train_total"] == pytest.approx(16 * per_sample, rel=1e-6)
    assert metrics["flops/train_ratio"] == pytest.approx(per_sample / (10 * 3 * f_d), rel=1e-6)


def test_train_total_counts_micro_batches_and_phases_by_optimizer_step():
    rigl = RigLCallback(sparsity=0.8, delta_t=2, t_end=4)
    monitor = SparsityMonitor(plot=False)
    make_trainer([monitor, rigl], max_steps=5, accumulate_grad_batches=2).fit(example_mlp(), make_loader(batch_size=16))

    f_s = 2 * sum(_active(rigl).values())
    # 10 batches of 16: steps 0..3 (8 batches) while updates run, step 4 (2 batches) after t_end.
    expected = 16 * (8 * (3 * f_s * 2 + 2 * f_s + F_DENSE) / 3 + 2 * 3 * f_s)
    assert monitor.train_flops == pytest.approx(expected)
    assert monitor.dense_train_flops == pytest.approx(16 * 10 * 3 * F_DENSE)


def test_sets_flops_per_batch_for_throughput_monitor():
    class WithValidation(MLP):
        trained, validated = [], []

        def training_step(self, batch, batch_idx):
            self.trained.append(self.flops_per_batch)
            return super().training_step(batch, batch_idx)

        def validation_step(self, batch, batch_idx):
            if not self.trainer.sanity_checking:  # FLOPs are counted at train start, after the sanity check
                self.validated.append((len(batch[0]), self.flops_per_batch))

    model = WithValidation()
    model.example_input_array = torch.randn(2, 16)
    rigl = RigLCallback(sparsity=0.8, method="static")  # no updates: 3 f_S per trained sample, every step
    throughput = ThroughputMonitor(batch_size_fn=lambda batch: len(batch[0]), window_size=4)
    logger = RecordingLogger()
    trainer = make_trainer([throughput, SparsityMonitor(plot=False), rigl], max_steps=8, log_every_n_steps=1)
    trainer.loggers = [logger]
    trainer.fit(model, make_loader(64, 16), make_loader(24, 8, seed=1))

    f_s = 2 * sum(_active(rigl).values())
    assert model.trained == [3 * f_s * 16] * 8  # training FLOPs of the batch
    last = logger.steps[max(s for s, m in logger.steps.items() if "train/device/flops_per_sec" in m)]
    assert last["train/device/flops_per_sec"] / last["train/device/samples_per_sec"] == pytest.approx(3 * f_s)
    assert model.validated and all(flops == f_s * size for size, flops in model.validated)  # forward only


def test_works_without_rigl_callback_on_a_model_with_zeros():
    model = MLP(lr=0.0)  # nothing trains: the zeros put in below stay, as in a loaded sparse checkpoint
    with torch.no_grad():
        model.net[0].weight[:, :12] = 0.0  # 3/4 of the first layer
        model.net[2].weight[:8] = 0.0  # 1/4 of the second
    nonzero = {name: int((p != 0).sum()) for name, p in model.named_parameters() if name in LAYERS}
    logger = RecordingLogger()
    monitor = SparsityMonitor(example_input=torch.randn(5, 16), plot=False)
    make_trainer([monitor], max_steps=4, log_every_n_steps=4, logger=logger).fit(model, make_loader())

    metrics = logger.monitored()[3]
    assert set(metrics) == SPARSITY_KEYS | FLOPS_KEYS  # no rigl/*
    assert metrics["sparsity/net.0.weight"] == pytest.approx(0.75)
    assert metrics["sparsity/net.2.weight"] == pytest.approx(0.25)
    assert metrics["sparsity/net.5.weight"] == 0.0
    assert metrics["flops/sparse_forward"] == 2 * sum(nonzero.values())
    assert metrics["flops/train_total"] == pytest.approx(4 * 16 * 3 * 2 * sum(nonzero.values()))


def test_include_patterns_choose_the_weights_watched():
    logger = RecordingLogger()
    monitor = SparsityMonitor(include=["net.2.*"], plot=False)
    make_trainer([monitor], max_steps=2, log_every_n_steps=2, logger=logger).fit(example_mlp(), make_loader())
    sparsity_keys = {k for k in logger.monitored()[1] if k.startswith("sparsity/")}
    assert sparsity_keys == {"sparsity/global", "sparsity/net.2.weight", "sparsity/net.2.bias"}

    with pytest.raises(MisconfigurationException, match="`include` pattern 'nope.*' matches no parameter"):
        make_trainer([SparsityMonitor(include=["nope.*"])], max_steps=1).fit(example_mlp(), make_loader())


def test_without_example_input_warns_once_and_still_logs_sparsity():
    model = example_mlp(example=False)
    logger = RecordingLogger()
    with pytest.warns(UserWarning, match="no example input") as warned:
        make_trainer([SparsityMonitor(plot=False)], max_steps=4, log_every_n_steps=2, logger=logger).fit(
            model, make_loader()
        )
    assert len([w for w in warned if "no example input" in str(w.message)]) == 1
    assert all(set(metrics) == SPARSITY_KEYS for metrics in logger.monitored().values())
    assert not hasattr(model, "flops_per_batch")


class SequenceClassifier(MLP):
    """The 16 inputs read as 4 steps of 4 features by an LSTM; a Linear head classifies its last state."""

    def __init__(self):
        super().__init__()
        del self.net
        self.lstm = nn.LSTM(4, 8, batch_first=True)
        self.head = nn.Linear(8, 4)
        self.example_input_array = torch.randn(3, 16)

    def forward(self, x):
        out, _ = self.lstm(x.view(len(x), 4, 4))
        return self.head(out[:, -1])


def test_an_lstm_counts_the_flops_of_every_step():
    # On CPU nn.LSTM runs one oneDNN kernel that torch's FLOP counter cannot see into: it counted 0.
    rigl = RigLCallback(sparsity=0.75, delta_t=100, t_end=100)  # masks the head
    logger = RecordingLogger()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer([SparsityMonitor(plot=False), rigl], max_steps=2, log_every_n_steps=1, logger=logger).fit(
            SequenceClassifier(), make_loader()
        )
    lstm = 4 * 2 * (4 * 8) * (4 + 8)  # steps x 2 x gate rows x (inputs + hidden): both weights, every step
    head = 2 * 8 * 4
    metrics = logger.monitored()[1]
    assert metrics["flops/dense_forward"] == lstm + head
    assert metrics["flops/sparse_forward"] == pytest.approx(
        lstm + head * float(rigl.masks["head.weight"].float().mean())
    )
    assert not [w for w in caught if "No FLOP formula" in str(w.message)]


class FusedHead(MLP):
    """The MLP with its last layer computed by an operator that has no FLOP formula."""

    def __init__(self):
        super().__init__()
        self.net[5] = FusedLinear(32, 4)
        self.example_input_array = torch.randn(3, 16)


def test_a_layer_without_a_flop_formula_is_named_in_one_warning():
    with pytest.warns(UserWarning, match="No FLOP formula") as warned:
        make_trainer([SparsityMonitor(plot=False)], max_steps=4).fit(FusedHead(), make_loader())
    messages = [str(w.message) for w in warned if "No FLOP formula" in str(w.message)]
    assert len(messages) == 1
    assert messages[0].startswith(
        "SparsityMonitor: No FLOP formula for rigl_tests.unformulated_matmul in `net.5` (FusedLinear): "
    )


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


def _assert_table_rows(out, rigl, separator):
    active = _active(rigl)
    for name in LAYERS:
        row = next(line for line in out.splitlines() if name in line)
        cells = [cell.strip() for cell in row.strip().strip(separator).split(separator)]
        share = f"{100 * active[name] / sum(active.values()):.1f}%"
        kernels = [rigl.kernel_choices[name]] if len(cells) == 6 else []  # shown once chosen
        assert cells == [
            name,
            "x".join(map(str, rigl.sparse.params[name].shape)),
            f"{active[name] / NUMEL[name]:.3f}",
            f"{active[name]:,} / {NUMEL[name]:,}",
            share,
            *kernels,
        ]
    assert f"{sum(active.values()):,} / {sum(NUMEL.values()):,}" in out
    assert f"dense {F_DENSE / 1000:.2f} k" in out


def test_prints_a_table_at_fit_start_and_end(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "rich", None)  # the plain-text table
    rigl = RigLCallback(sparsity=0.8, delta_t=100)
    make_trainer([SparsityMonitor(plot=False), rigl], max_steps=2).fit(example_mlp(), make_loader())

    out = capsys.readouterr().out
    assert out.count("SparsityMonitor at fit start") == out.count("SparsityMonitor at fit end") == 1
    _assert_table_rows(out, rigl, "|")


def test_prints_the_table_with_rich_when_installed(capsys):
    pytest.importorskip("rich")
    rigl = RigLCallback(sparsity=0.8)
    make_trainer([SparsityMonitor(plot=False), rigl], max_steps=2).fit(example_mlp(), make_loader())
    out = capsys.readouterr().out
    assert "SparsityMonitor at fit end" in out and "FLOPs share" in out
    at_end = out.split("SparsityMonitor at fit end")[1]
    assert "kernels" in at_end
    _assert_table_rows(at_end, rigl, "│")


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


def test_saves_a_png_in_the_log_dir_without_tensorboard(tmp_path):
    pytest.importorskip("matplotlib")
    logger = CSVLogger(tmp_path)
    make_trainer([SparsityMonitor(), RigLCallback(sparsity=0.8, delta_t=2)], max_steps=6, logger=logger).fit(
        example_mlp(), make_loader()
    )
    image = tmp_path / "lightning_logs" / "version_0" / "sparsity_step6.png"
    assert image.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_logs_the_image_to_tensorboard(tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path)
    make_trainer([SparsityMonitor(), RigLCallback(sparsity=0.8, delta_t=2)], max_steps=6, logger=logger).fit(
        example_mlp(), make_loader()
    )
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    assert "sparsity_monitor" in events.Tags()["images"]
    assert [image.step for image in events.Images("sparsity_monitor")] == [6]
    assert not list(tmp_path.rglob("*.png"))


def test_without_matplotlib_warns_once_and_makes_no_image(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monitor = SparsityMonitor()
    with pytest.warns(UserWarning, match="needs matplotlib") as warned:
        for _ in range(2):  # two fits, one warning
            make_trainer([monitor], max_steps=2, default_root_dir=tmp_path).fit(example_mlp(), make_loader())
    assert len([w for w in warned if "needs matplotlib" in str(w.message)]) == 1
    assert not list(tmp_path.rglob("*.png"))


def test_resumed_run_keeps_counting_training_flops(tmp_path):
    def fit(max_steps, ckpt_path=None):
        monitor = SparsityMonitor(plot=False)
        saver = ModelCheckpoint(tmp_path / str(ckpt_path is None), "{step}", every_n_train_steps=4, save_top_k=-1)
        callbacks = [monitor, RigLCallback(sparsity=0.8, delta_t=2, t_end=6, seed=0), saver]
        trainer = make_trainer(callbacks, max_steps=max_steps, enable_checkpointing=True)
        trainer.fit(example_mlp(), make_loader(), ckpt_path=ckpt_path)
        return monitor

    straight = fit(8)
    resumed = fit(8, ckpt_path=tmp_path / "True" / "step=4.ckpt")
    assert resumed.train_flops == pytest.approx(straight.train_flops)
    assert resumed.dense_train_flops == pytest.approx(straight.dense_train_flops)
    assert resumed.itop_curve == straight.itop_curve  # the curve from before the resume is kept


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"example_input": "x"}, TypeError, "`example_input` must be None, a tensor, a tuple or a dict, got 'x'"),
        ({"example_batch_size": 2.0}, TypeError, "`example_batch_size` must be None or an int >= 1, got 2.0"),
        (
            {"example_batch_size": 0},
            MisconfigurationException,
            r"`example_batch_size` must be None \(dim 0 of the example input\) or an int >= 1, got 0",
        ),
        ({"include": "net.*"}, TypeError, "`include` must be None or a list of fnmatch patterns"),
        ({"exclude": [1]}, TypeError, "`exclude` must be None or a list of fnmatch patterns"),
        ({"table": 1}, TypeError, "`table` must be a bool, got 1"),
        ({"plot": "yes"}, TypeError, "`plot` must be a bool, got 'yes'"),
    ],
)
def test_rejects_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        SparsityMonitor(**kwargs)


class _SaveRankMetrics(Callback):
    def __init__(self, path):
        self.path = path

    def on_train_end(self, trainer, pl_module):
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        (self.path / f"rank{trainer.global_rank}.json").write_text(json.dumps(metrics))


def ddp_fit_with_the_monitor(directory: Path) -> None:
    """Run on each of 2 ranks: a DDP fit with SparsityMonitor logging to a CSV file in `directory`."""
    # A collective behind rank_zero_only would hang: the ranks' process group times out (TwoRanks makes it
    # with a 2-minute timeout), which turns a hang into an error.
    pl.seed_everything(0, verbose=False)
    rigl = RigLCallback(sparsity=0.8, delta_t=3, t_end=100)
    callbacks = [SparsityMonitor(), rigl, _SaveRankMetrics(directory)]
    trainer = make_trainer(
        callbacks, devices=2, strategy="ddp", max_steps=8, log_every_n_steps=4, logger=CSVLogger(directory)
    )
    trainer.fit(example_mlp(), make_loader(256, 16))


def test_logs_under_two_process_ddp_without_deadlock(tmp_path, two_ranks):
    two_ranks(ddp_fit_with_the_monitor, tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1] and set(ranks[0]) >= SPARSITY_KEYS | FLOPS_KEYS | RIGL_KEYS
    f_s = ranks[0]["flops/sparse_forward"]
    # Both ranks' samples: 2 x 8 batches of 16, all while updates run.
    assert ranks[0]["flops/train_total"] == pytest.approx(2 * 8 * 16 * (3 * f_s * 3 + 2 * f_s + F_DENSE) / 4, rel=1e-6)
    rows = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    steps = [row.split(",")[header.index("step")] for row in rows[1:] if row.split(",")[header.index("rigl/itop")]]
    assert steps == ["2", "3", "5", "7"]  # updates after steps 3 and 6, logging steps 4 and 8
