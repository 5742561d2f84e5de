"""A plain PyTorch loop can drive the core (that the core imports no Lightning: test_package_shape)."""

import torch
from torch import nn

from lightning_rigl.core import SparseTraining, UpdateSchedule, num_active
from lightning_rigl.core.state.packing import pack_bits, unpack_bits


def test_plain_pytorch_loop():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    sparse = SparseTraining.from_model(model, 0.9, method="rigl", schedule=UpdateSchedule(delta_t=10, t_end=80), seed=0)
    x = torch.randn(512, 16)
    y = x[:, :4].argmax(dim=1)
    losses = []
    for step in range(100):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        sparse.before_step(step)
        opt.step()
        sparse.after_step([opt])
        losses.append(loss.item())
        for name, param in sparse.params.items():
            mask = sparse.masks[name]
            assert int(mask.sum()) == num_active(mask.numel(), sparse.sparsities[name])
            assert param[~mask].eq(0).all()
    assert sparse.updates == 7
    assert losses[-1] < 0.5 * losses[0]


def test_state_dict_round_trip_is_compact_and_exact():
    model = nn.Sequential(nn.Linear(100, 100), nn.Linear(100, 10))
    sparse = SparseTraining.from_model(model, 0.9, method="snfs", schedule=UpdateSchedule(2, 10))
    state = sparse.state_dict()
    for name, packed in state["masks"].items():
        assert packed.dtype == torch.uint8 and packed.numel() == -(-sparse.params[name].numel() // 8)
    other = SparseTraining(sparse.params, sparse.sparsities, method="snfs", schedule=sparse.schedule, seed=123)
    other.load_state_dict(state)
    assert all(torch.equal(other.masks[n], sparse.masks[n]) for n in sparse.masks)
    assert torch.equal(other.generator.get_state(), sparse.generator.get_state())


def test_pack_bits_round_trip_odd_sizes():
    for numel in (1, 7, 8, 9, 1001):
        mask = torch.rand(numel) > 0.5
        assert torch.equal(unpack_bits(pack_bits(mask), (numel,)), mask)


def test_itop_rate_counts_weights_ever_active():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sparse = SparseTraining.from_model(model, 0.9, method="set", schedule=UpdateSchedule(1, 100, 0.5, "constant"))
    assert sparse.itop_rate == sparse.masks["0.weight"].float().mean().item()
    for step in range(5):
        model(torch.randn(4, 32)).sum().backward()
        sparse.before_step(step)
        opt.step()
        sparse.after_step([opt])
    assert sparse.masks["0.weight"].float().mean().item() < sparse.itop_rate <= 5 * 0.1 + 0.1
