"""Same training whatever the user's code does: sparse and dense kernels train alike around user code.

A differential harness: each case runs one user pattern (manual optimization, gradient hooks, clipping,
rollbacks, shared layers, double backward, ...) twice in float64, once with ``kernels="sparse"`` and once
with ``kernels="dense"``, and demands the same masks after every update, the same update history and the
same weights to rtol 1e-10. A second group checks what user code sees between backward and the step.
"""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.checkpoint import checkpoint

from lightning_rigl import RigLCallback
from tests.helpers import make_loader, make_trainer


class Net(pl.LightningModule):
    """Three Linear layers (16-32-32-4) with signed data; subclasses change how they are used."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.hidden, self.out = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 4)

    def forward(self, x):
        return self.out(torch.tanh(self.hidden(torch.tanh(self.inp(x)))))

    def loss(self, batch):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def training_step(self, batch, batch_idx):
        return self.loss(batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)


class MasksAfterUpdates(Callback):
    """Records every mask after every topology update (listed after RigLCallback)."""

    def __init__(self, rigl: RigLCallback) -> None:
        self.rigl, self.masks, self._seen = rigl, [], 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.rigl.sparse is not None and self.rigl.sparse.updates > self._seen:
            self._seen = self.rigl.sparse.updates
            self.masks.append((trainer.global_step, self.rigl.masks))


def train(kernels, module, steps=14, before=(), after=(), **trainer_kwargs):
    pl.seed_everything(0, verbose=False)
    rigl = RigLCallback(0.8, delta_t=3, t_end=100, alpha=0.5, seed=1, kernels=kernels)
    recorder = MasksAfterUpdates(rigl)
    model = module()
    callbacks = [*(copy.deepcopy(c) for c in before), rigl, recorder, *(copy.deepcopy(c) for c in after)]
    make_trainer(callbacks, max_steps=steps, precision="64-true", **trainer_kwargs).fit(model, make_loader(seed=3))
    return rigl, recorder, model


def assert_same_training(module, **kwargs):
    rigl_s, rec_s, model_s = train("sparse", module, **kwargs)
    rigl_d, rec_d, model_d = train("dense", module, **kwargs)
    assert "sparse" in rigl_s.kernel_choices.values()  # the case did run on sparse kernels
    assert set(rigl_d.kernel_choices.values()) == {"dense"}
    assert rigl_s.sparse.updates == rigl_d.sparse.updates >= 3
    assert [(r.step, r.changed) for r in rigl_s.sparse.history] == [(r.step, r.changed) for r in rigl_d.sparse.history]
    assert all(r.changed > 0 for r in rigl_d.sparse.history)  # every update grew new connections
    assert len(rec_s.masks) == len(rec_d.masks)
    for (step_s, masks_s), (step_d, masks_d) in zip(rec_s.masks, rec_d.masks, strict=True):
        assert step_s == step_d
        for name, mask in masks_d.items():
            assert torch.equal(masks_s[name], mask), (step_d, name)
    for name, value in model_d.state_dict().items():
        torch.testing.assert_close(model_s.state_dict()[name], value, rtol=1e-10, atol=1e-10 * value.abs().max())
    for name, mask in rigl_s.masks.items():  # and the masked model is what both trained
        assert model_s.get_parameter(name)[~mask].eq(0).all(), name
        assert model_d.get_parameter(name)[~mask].eq(0).all(), name
    return rigl_s, rigl_d


# ---- the user patterns ----


class ManualNet(Net):
    """Net under manual optimization: subclasses make the steps in ``training_step``."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False


class HalfBatchSteps(ManualNet):
    """Manual optimization: two optimizer steps per batch, one per half batch."""

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        x, y = batch
        for part in (slice(0, len(x) // 2), slice(len(x) // 2, None)):
            opt.zero_grad()
            self.manual_backward(self.loss((x[part], y[part])))
            opt.step()


class OneGraphTwoSteps(ManualNet):
    """Manual optimization: one forward whose graph serves two optimizer steps (retain_graph).

    The first optimizer holds the first layer (whose weight no backward reads: its input needs no
    gradient), the second the others; so the first step does not change what the second backward reads.
    """

    def training_step(self, batch, batch_idx):
        first, rest = self.optimizers()
        x, y = batch
        logits = self(x)
        first.zero_grad()
        rest.zero_grad()
        self.manual_backward(nn.functional.cross_entropy(logits[:8], y[:8]), retain_graph=True)
        first.step()
        rest.zero_grad()
        self.manual_backward(nn.functional.cross_entropy(logits[8:], y[8:]))
        rest.step()

    def configure_optimizers(self):
        others = [*self.hidden.parameters(), *self.out.parameters()]
        return torch.optim.SGD(self.inp.parameters(), lr=0.1, momentum=0.9), torch.optim.SGD(others, lr=0.1)


class ManualClipping(ManualNet):
    """Lightning's documented manual pattern: clip the gradients, then step."""

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(self.loss(batch))
        self.clip_gradients(opt, gradient_clip_val=0.05, gradient_clip_algorithm="norm")
        opt.step()


class ReplaceGradients(Callback):
    """Differential-privacy style: each gradient replaced by a freshly allocated, noised tensor."""

    def on_after_backward(self, trainer, pl_module):
        gen = torch.Generator().manual_seed(trainer.global_step)
        for p in pl_module.parameters():
            clipped = p.grad * 0.5
            p.grad = None  # frees the old gradient: the new one may get its address
            fresh = torch.empty_like(p)
            fresh.copy_(clipped + 0.01 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
            p.grad = fresh


class ClipByNorm(Callback):
    """A callback listed before RigLCallback that reads every gradient: global-norm clipping of its own."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        torch._foreach_mul_(grads, float(min(1.0, 0.05 / (float(norm) + 1e-12))))


class Rollback(Callback):
    """Snapshots model and optimizer after step 4, rolls back to them after step 10 (a loss-spike guard)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 4:
            self.saved = (copy.deepcopy(pl_module.state_dict()), copy.deepcopy(trainer.optimizers[0].state_dict()))
        if trainer.global_step == 10:
            pl_module.load_state_dict(self.saved[0])
            trainer.optimizers[0].load_state_dict(self.saved[1])


class LayerUsedTwice(Net):
    def forward(self, x):
        h = torch.tanh(self.inp(x))
        return self.out(torch.tanh(self.hidden(torch.tanh(self.hidden(h)))))


class SharedModule(Net):
    """One module under two names, as N-BEATS does."""

    def __init__(self) -> None:
        super().__init__()
        self.theta_b = self.theta_f = nn.Linear(32, 32)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        return self.out(torch.tanh(self.theta_f(h)) + torch.tanh(self.theta_b(h)))


class Checkpointed(Net):
    """Activation checkpointing: the hidden layers are recomputed in the backward pass."""

    def forward(self, x):
        block = lambda h: torch.tanh(self.hidden(torch.tanh(self.inp(h))))  # noqa: E731
        return self.out(checkpoint(block, x, use_reentrant=False))


class GradientPenalty(Net):
    """A gradient penalty (WGAN-GP, R1): a double backward through every layer, at every step."""

    def loss(self, batch):
        x, y = batch
        x = x.clone().requires_grad_(True)
        logits = self(x)
        (grad_x,) = torch.autograd.grad(logits.square().sum(), x, create_graph=True)
        return nn.functional.cross_entropy(logits, y) + 0.1 * grad_x.square().sum(dim=1).mean()


class LazyPenalty(GradientPenalty):
    """The penalty every 4th batch only, as StyleGAN2's lazy regularization does."""

    def training_step(self, batch, batch_idx):
        return self.loss(batch) if batch_idx % 4 == 1 else Net.loss(self, batch)


class Compiled(Net):
    def __init__(self) -> None:
        super().__init__()
        self.compiled = torch.compile(self.forward_eager, backend="aot_eager")

    def forward_eager(self, x):
        return super().forward(x)

    def forward(self, x):
        return self.compiled(x)


@pytest.mark.parametrize(
    ("module", "kwargs"),
    [
        (Net, {}),
        (HalfBatchSteps, {"steps": 16}),
        (OneGraphTwoSteps, {"steps": 16}),
        (ManualClipping, {}),
        (Net, {"after": [ReplaceGradients()]}),
        (Net, {"before": [ReplaceGradients()]}),
        (Net, {"before": [ClipByNorm()]}),
        (Net, {"after": [Rollback()]}),
        (Net, {"accumulate_grad_batches": 2}),
        (Net, {"gradient_clip_val": 0.05}),
        (LayerUsedTwice, {}),
        (SharedModule, {}),
        (Checkpointed, {}),
        (GradientPenalty, {}),
        (LazyPenalty, {}),
    ],
    ids=[
        "plain",
        "manual-two-steps-per-batch",
        "manual-one-graph-two-steps",
        "manual-clipping",
        "gradients-replaced-after",
        "gradients-replaced-before",
        "callback-reads-gradients-first",
        "rollback",
        "accumulation",
        "clipping",
        "layer-used-twice",
        "shared-module",
        "activation-checkpointing",
        "gradient-penalty",
        "lazy-gradient-penalty",
    ],
)
def test_sparse_and_dense_kernels_train_alike_around_user_code(module, kwargs):
    assert_same_training(module, **kwargs)


def test_a_compiled_model_trains_alike_on_sparse_and_dense_kernels():
    assert_same_training(Compiled, steps=10)


class StepBetweenBackwards(ManualNet):
    """One graph, two backward passes and an optimizer step in between that writes a weight the graph uses."""

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        x, y = batch
        logits = self(x)
        self.manual_backward(nn.functional.cross_entropy(logits[:8], y[:8]), retain_graph=True)
        opt.step()
        if batch_idx > 0:  # the first batch runs on dense kernels (it measures the rows): later ones on the chosen
            self.manual_backward(nn.functional.cross_entropy(logits[8:], y[8:]))


@pytest.mark.parametrize("kernels", ["sparse", "dense"])
def test_a_step_between_two_backward_passes_of_one_graph_raises_on_either_kernels(kernels):
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        train(kernels, StepBetweenBackwards, steps=4)


# ---- what user code sees, and what the run does around it ----


class GradientsSeen(Callback):
    """Records, after each backward, whether each masked gradient is 0 at every inactive position."""

    def __init__(self, rigl: RigLCallback) -> None:
        self.rigl, self.seen = rigl, []

    def on_after_backward(self, trainer, pl_module):
        masks = self.rigl.masks
        zero = [bool(pl_module.get_parameter(n).grad[~m].eq(0).all()) for n, m in masks.items()]
        self.seen.append((trainer.global_step, all(zero), not any(zero)))


@pytest.mark.parametrize("kernels", ["sparse", "dense"])
def test_user_code_sees_masked_gradients_except_at_the_steps_whose_dense_gradient_is_read(kernels):
    pl.seed_everything(0, verbose=False)
    rigl = RigLCallback(0.8, delta_t=3, t_end=100, alpha=0.5, seed=1, kernels=kernels)
    seen = GradientsSeen(rigl)
    make_trainer([rigl, seen], max_steps=10, precision="64-true").fit(Net(), make_loader(seed=3))
    for step, masked, dense in seen.seen:
        reads = (step + 1) % 3 == 0  # RigL's update steps: the dense gradient is the grow score
        assert (dense, masked) == (reads, not reads), step


class DoubleOpt(ManualNet):
    """Manual optimization with two optimizers: the first layer's gradient accumulates across the other's step."""

    def training_step(self, batch, batch_idx):
        first, rest = self.optimizers()
        rest.zero_grad()
        self.manual_backward(self.loss(batch))  # into the first layer's gradient too, kept (not zeroed)
        rest.step()
        if batch_idx % 2 == 1:  # the first layer steps every other batch, on two batches' gradients
            first.step()
            first.zero_grad()

    def configure_optimizers(self):
        others = [*self.hidden.parameters(), *self.out.parameters()]
        return torch.optim.SGD(self.inp.parameters(), lr=0.1), torch.optim.SGD(others, lr=0.1)


def test_an_update_never_grows_from_a_gradient_with_masked_contributions_it_waits_for_a_dense_one():
    # The first layer's gradient sums a batch whose step did not read it (masked as it accumulated) and one
    # whose step does: no dense gradient. Its update waits for the next step, on either kernels alike.
    rigl_s, rigl_d = assert_same_training(DoubleOpt, steps=24)
    assert rigl_s.sparse.deferred_steps == rigl_d.sparse.deferred_steps > 0


class RollbackAndCheck(Rollback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if trainer.global_step == 10:  # right after the load: masked already, before any other hook
            rigl = next(c for c in trainer.callbacks if isinstance(c, RigLCallback))
            opt = trainer.optimizers[0]
            self.after_load = [
                (
                    bool(pl_module.get_parameter(n)[~m].eq(0).all()),
                    bool(opt.state[pl_module.get_parameter(n)]["momentum_buffer"][~m].eq(0).all()),
                )
                for n, m in rigl.masks.items()
            ]
            self.snapshot_nonzero = any(self.saved[0][n][~m].ne(0).any() for n, m in rigl.masks.items())


def test_a_rollback_mid_run_keeps_the_current_masks_and_masks_the_loaded_weights_and_state():
    pl.seed_everything(0, verbose=False)
    rigl = RigLCallback(0.8, delta_t=3, t_end=100, alpha=0.5, seed=1, kernels="dense")
    check = RollbackAndCheck()
    make_trainer([rigl, check], max_steps=11, precision="64-true").fit(Net(), make_loader(seed=3))
    assert check.snapshot_nonzero  # the snapshot holds weights where the current masks are inactive
    assert check.after_load == [(True, True)] * 3


class WriteInPlace(Callback):
    """Writes every masked weight in place (no_grad copy_) after step 5; checks them at the next batch start."""

    def __init__(self) -> None:
        self.checked = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 5:
            with torch.no_grad():
                for p in (pl_module.inp.weight, pl_module.hidden.weight, pl_module.out.weight):
                    p.copy_(torch.randn_like(p))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # listed after RigLCallback
        if trainer.global_step == 5:
            rigl = next(c for c in trainer.callbacks if isinstance(c, RigLCallback))
            self.checked = all(pl_module.get_parameter(n)[~m].eq(0).all() for n, m in rigl.masks.items())


def test_weights_written_in_place_between_steps_are_masked_before_the_next_forward():
    pl.seed_everything(0, verbose=False)
    rigl = RigLCallback(0.8, delta_t=3, t_end=100, seed=1, kernels="dense")
    write = WriteInPlace()
    make_trainer([rigl, write], max_steps=7).fit(Net(), make_loader(seed=3))
    assert write.checked is True


def test_second_derivatives_through_sparse_kernels_equal_dense_ones():
    from lightning_rigl.core.kernels.sparse_linear import SparseStructure, sparse_linear

    g = torch.Generator().manual_seed(0)
    mask = torch.rand(6, 5, generator=g) < 0.4
    weight = (torch.randn(6, 5, generator=g, dtype=torch.float64) * mask).requires_grad_(True)
    bias = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.randn(7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    structure = SparseStructure.from_mask(mask)

    def penalty(linear):
        out = torch.tanh(linear(x))
        (grad_x,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
        return grad_x.square().sum() + out.sum()

    dense = torch.autograd.grad(penalty(lambda v: nn.functional.linear(v, weight, bias)), (weight, bias, x))
    for reads in (True, False):  # an update step's dense weight gradient, or an ordinary step's
        sparse = torch.autograd.grad(
            penalty(lambda v, reads=reads: sparse_linear(v, weight, bias, structure, dense_gradient=reads)),
            (weight, bias, x),
        )
        # An ordinary step's weight gradient is kept at active positions only (the masked gradient): equal there.
        keep = torch.ones_like(mask) if reads else mask
        torch.testing.assert_close(sparse[0] * keep, dense[0] * keep, rtol=1e-12, atol=1e-12)
        for s, d in zip(sparse[1:], dense[1:], strict=True):
            torch.testing.assert_close(s, d, rtol=1e-12, atol=1e-12)


def test_a_restored_sparse_choice_the_run_cannot_serve_computes_dense_with_a_warning(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    pl.seed_everything(0, verbose=False)
    rigl = RigLCallback(0.8, delta_t=3, t_end=100, seed=1, kernels="sparse")
    saver = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    make_trainer([rigl, saver], max_steps=4, enable_checkpointing=True).fit(Net(), make_loader(seed=3))
    assert set(rigl.kernel_choices.values()) == {"sparse"}
    resumed = RigLCallback(0.8, delta_t=3, t_end=100, seed=1, kernels="sparse")
    with pytest.warns(UserWarning, match=r"cannot serve \['inp.weight', 'hidden.weight', 'out.weight'\]"):
        make_trainer([resumed], max_steps=6, precision="bf16-true").fit(
            Net(), make_loader(seed=3), ckpt_path=tmp_path / "last.ckpt"
        )
    assert set(resumed.kernel_choices.values()) == {"dense"}


def test_hooks_belong_to_the_fit_and_to_the_latest_run_on_a_model():
    from lightning_rigl.core import SparseTraining

    model = nn.Sequential(nn.Linear(8, 8))
    first = SparseTraining.from_model(model, 0.5, seed=0)
    second = SparseTraining.from_model(model, 0.5, seed=1)  # the latest run masks the gradients
    model(torch.randn(4, 8)).sum().backward()
    assert model[0].weight.grad[~second.masks["0.weight"]].eq(0).all()
    assert model[0].weight.grad[~first.masks["0.weight"] & second.masks["0.weight"]].ne(0).all()
    second.remove_hooks()
    model[0].weight.grad = None
    model(torch.randn(4, 8)).sum().backward()
    assert model[0].weight.grad.ne(0).all()  # no run's hooks left: the plain gradient

    rigl, net = RigLCallback(0.8, seed=1), Net()
    make_trainer([rigl], max_steps=2).fit(net, make_loader(seed=3))
    net.zero_grad()
    net.loss(next(iter(make_loader(seed=3)))).backward()  # after the fit: the user's own code, untouched
    assert net.hidden.weight.grad.ne(0).float().mean() > 0.5


def clip_bucket_then_allreduce(state, bucket):
    """A DDP communication hook that reads the gradients: scales each bucket to norm <= 0.05, then all-reduces."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    buffer = bucket.buffer()
    buffer.mul_(min(1.0, 0.05 / (float(buffer.norm()) + 1e-12)))
    return allreduce_hook(state, bucket)


def comm_hook_fits() -> list:
    """Run on each of 2 ranks: a DDP fit whose communication hook reads the gradients, on either kernels.

    Returns the rank's masks and weights after each fit, sparse kernels' first.
    """
    from lightning.pytorch.strategies import DDPStrategy

    runs = []
    for kernels in ("sparse", "dense"):
        pl.seed_everything(0, verbose=False)
        rigl = RigLCallback(0.8, delta_t=3, t_end=100, alpha=0.5, seed=1, kernels=kernels)
        strategy = DDPStrategy(ddp_comm_hook=clip_bucket_then_allreduce)
        model = Net()
        trainer = make_trainer([rigl], max_steps=8, precision="64-true", devices=2, strategy=strategy)
        trainer.fit(model, make_loader(seed=3))
        runs.append((rigl.masks, model.state_dict()))
    return runs


def test_a_ddp_communication_hook_sees_the_same_gradients_on_either_kernels(two_ranks):
    for (masks_s, weights_s), (masks_d, weights_d) in two_ranks(comm_hook_fits):
        assert masks_d and all(torch.equal(masks_s[name], mask) for name, mask in masks_d.items())
        for name, value in weights_d.items():
            torch.testing.assert_close(weights_s[name], value, rtol=1e-10, atol=1e-12)
