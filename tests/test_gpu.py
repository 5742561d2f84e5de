"""RigL on a CUDA device through the public API and a real Trainer; every test is skipped without CUDA."""

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_rigl import RigLCallback, SparsityMonitor, sparsify
from lightning_rigl.core import num_active
from tests.helpers import (
    F64,
    MLP,
    InvariantChecker,
    RecordGrowth,
    RecordingLogger,
    RpropMLP,
    SaveFinal,
    Wide,
    assert_same_run,
    assert_trained_alike,
    big_sparse_mlp,
    example_mlp,
    fit_with_kernels,
    make_loader,
    make_trainer,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
GPU = dict(accelerator="gpu", devices=1)


def _assert_exact_counts_on_the_weight_device(rigl, module):
    params = dict(module.named_parameters())
    for name, mask in rigl.masks.items():
        assert mask.device == params[name].device and mask.device.type == "cuda", name
        assert int(mask.sum()) == num_active(mask.numel(), rigl.sparse.sparsities[name]), name


def test_cuda_masks_live_on_the_weight_device_with_exact_counts_after_updates():
    rigl = RigLCallback(0.8, delta_t=2, t_end=100)
    checker = InvariantChecker(rigl)  # exact counts and zero inactive weights after every step
    model = MLP(optimizer="adam")
    make_trainer([rigl, checker], max_steps=8, **GPU).fit(model, make_loader())
    assert checker.checks == 8 and rigl.sparse.updates == 4
    _assert_exact_counts_on_the_weight_device(rigl, model)


def test_bf16_mixed_keeps_exact_counts_and_zero_inactive_weights():
    rigl = RigLCallback(0.8, delta_t=2, t_end=100)
    checker = InvariantChecker(rigl)
    model = MLP(optimizer="adamw")
    make_trainer([rigl, checker], max_steps=8, precision="bf16-mixed", **GPU).fit(model, make_loader())
    assert checker.checks == 8 and rigl.sparse.updates == 4
    assert all(p.dtype == torch.float32 for p in rigl.sparse.params.values())  # autocast casts copies only
    _assert_exact_counts_on_the_weight_device(rigl, model)


def _run_on_gpu(directory, method, optimizer, epochs, ckpt_path=None):
    """As tests/test_checkpoint.py's runs, on the GPU: fit to `epochs` saving last.ckpt and the final state."""
    pl.seed_everything(0, verbose=False)
    rigl = RigLCallback(0.8, method=method, delta_t=3, t_end=100, alpha=0.5, seed=1)
    callbacks = [rigl, SaveFinal(rigl, directory), ModelCheckpoint(dirpath=directory, save_last=True, save_top_k=0)]
    trainer = make_trainer(callbacks, max_steps=-1, max_epochs=epochs, enable_checkpointing=True, **GPU)
    trainer.fit(MLP(optimizer=optimizer), make_loader(64, 16), ckpt_path=ckpt_path)


@pytest.mark.parametrize(("method", "optimizer"), [("rigl", "adam"), ("set", "sgd")])
def test_resume_on_gpu_is_bit_exact(tmp_path, method, optimizer):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    straight.mkdir(), resumed.mkdir()
    _run_on_gpu(straight, method, optimizer, 5)
    _run_on_gpu(resumed, method, optimizer, 2)  # 4 steps an epoch: stops after step 8, between updates
    _run_on_gpu(resumed, method, optimizer, 5, ckpt_path=resumed / "last.ckpt")
    assert_same_run(straight, resumed)  # torch.equal on every mask and every weight


def _monitored_flops(**trainer_kwargs):
    pl.seed_everything(0, verbose=False)
    logger = RecordingLogger()
    rigl = RigLCallback(0.8, delta_t=2, t_end=100)
    callbacks = [SparsityMonitor(plot=False), rigl]
    make_trainer(callbacks, max_steps=6, log_every_n_steps=3, logger=logger, **trainer_kwargs).fit(
        example_mlp(), make_loader()
    )
    return {step: {k: v for k, v in m.items() if k.startswith("flops/")} for step, m in logger.monitored().items()}


BF16_FLOPS = pytest.mark.xfail(
    strict=True,  # an XPASS fails: drop the mark once the monitor counts autocast's cast weights
    reason="issue 13: under bf16-mixed autocast hands matmuls cast copies of the weights, counted as dense",
)


@pytest.mark.parametrize("precision", ["32-true", pytest.param("bf16-mixed", marks=BF16_FLOPS)])
def test_monitor_flops_on_gpu_equal_the_cpu_count(precision):
    cpu = _monitored_flops(accelerator="cpu")
    gpu = _monitored_flops(precision=precision, **GPU)
    assert sorted(gpu) == sorted(cpu) and cpu
    for step, metrics in cpu.items():
        assert gpu[step] == pytest.approx(metrics, rel=1e-12), step
        assert metrics["flops/sparse_forward"] < metrics["flops/dense_forward"]


def test_regrown_connections_restart_rprop_at_lr_on_cuda():
    rigl = RigLCallback(0.8, delta_t=3, t_end=100)
    recorder = RecordGrowth(rigl)
    make_trainer([rigl, recorder], max_steps=9, **GPU).fit(RpropMLP(), make_loader())
    assert rigl.sparse.updates == 3 and recorder.step_sizes
    for step_size in recorder.step_sizes:
        assert step_size.device.type == "cuda" and step_size.eq(0.0625).all()


def test_sparse_kernels_on_cuda_train_like_dense_kernels_in_float64():
    # The sparse path on cuSPARSE (CSR products, sampled_addmm): the same masks and updates as dense kernels.
    sparse = fit_with_kernels("sparse", precision="64-true", **GPU)
    dense = fit_with_kernels("dense", precision="64-true", **GPU)
    assert_trained_alike(sparse, dense, rtol=1e-10)
    assert all(mask.device.type == "cuda" for mask in sparse[0].masks.values())


def test_auto_keeps_every_layer_dense_on_cuda():
    # Not measured on CUDA (cuSPARSE usually loses below about 95 %): a layer that "auto" serves on CPU
    # (Wide's 1024x1024 at density 0.03, 256 rows) stays dense on the GPU.
    loader = make_loader(512, batch_size=256, in_features=64)
    rigl, _ = fit_with_kernels("auto", module=Wide, loader=loader, steps=2, sparsity=0.95, **GPU)
    assert rigl.kernel_choices == dict.fromkeys(rigl.masks, "dense")


@pytest.mark.parametrize("context", [torch.inference_mode, torch.no_grad])
def test_sparsify_on_cuda_gives_the_masked_outputs(context):
    model, masks = big_sparse_mlp()
    model = model.cuda()
    fast = sparsify(model, masks, kernels="sparse")
    assert fast.sparse_kernels.names == ["0.weight", "2.weight"]
    x = torch.randn(16, 32, dtype=torch.float64, device="cuda")
    masked = [model[0].weight * masks["0.weight"].cuda(), model[2].weight * masks["2.weight"].cuda()]
    with context():
        expected = torch.relu(x @ masked[0].T + model[0].bias) @ masked[1].T + model[2].bias
        torch.testing.assert_close(fast(x), expected, **F64)
