"""count_flops, the paper's training-FLOPs accounting and active counts (torch-only core)."""

import warnings

import pytest
import torch
from torch import nn

from lightning_rigl.core.flops.count import FlopsCount, LayerFlops, count_active, count_flops, training_flops_per_sample
from tests.helpers import Attention, FusedLinear


def _mlp():
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.LayerNorm(32), nn.Linear(32, 4))


def _zero_out(weight, fraction):
    """Zero the first `fraction` of a weight's entries; return how many stay non-zero."""
    with torch.no_grad():
        flat = weight.view(-1)
        flat[: int(fraction * flat.numel())] = 0.0
    return int(torch.count_nonzero(weight))


def test_mlp_forward_flops_by_hand():
    # A multiply-add counts 2 FLOPs (FlopCounterMode); biases, ReLU and LayerNorm are not counted.
    count = count_flops(_mlp(), torch.randn(8, 16))
    assert count.per_layer == {
        "0.weight": LayerFlops(2 * 16 * 32, 1.0),
        "2.weight": LayerFlops(2 * 32 * 32, 1.0),
        "4.weight": LayerFlops(2 * 32 * 4, 1.0),
    }
    assert count.dense == count.sparse == 2 * (16 * 32 + 32 * 32 + 32 * 4)
    assert count.other == 0.0


def test_flops_are_per_sample_whatever_the_batch():
    model = _mlp()
    assert count_flops(model, torch.randn(1, 16)).dense == count_flops(model, torch.randn(64, 16)).dense


def test_zeros_in_the_weights_scale_their_layer():
    model = _mlp()
    active = [_zero_out(model[0].weight, 0.75), _zero_out(model[2].weight, 0.5), _zero_out(model[4].weight, 0.0)]
    count = count_flops(model, torch.randn(4, 16))
    assert count.per_layer["0.weight"].density == 0.25
    assert count.sparse == pytest.approx(2 * sum(active))  # an MLP's sparse FLOPs: 2 per active weight
    assert count.dense == 2 * (16 * 32 + 32 * 32 + 32 * 4)


def test_sparsity_argument_overrides_the_zeros_of_the_weights_it_names():
    model = _mlp()
    _zero_out(model[2].weight, 0.5)
    count = count_flops(model, torch.randn(4, 16), sparsity={"0.weight": 0.9})
    assert count.per_layer["0.weight"].density == pytest.approx(0.1)
    assert count.per_layer["2.weight"].density == 0.5  # not named: its actual zeros count
    assert count.sparse == pytest.approx(2 * (0.1 * 16 * 32 + 0.5 * 32 * 32 + 32 * 4))


def test_conv_flops_by_hand():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2))
    count = count_flops(model, torch.randn(2, 3, 8, 8), sparsity={"0.weight": 0.5})
    dense = 2 * (4 * 6 * 6) * (3 * 3 * 3)  # 2 x output elements x kernel volume x input channels
    assert (count.dense, count.sparse) == (dense, dense / 2)


def test_attention_projections_scale_and_attention_scores_stay_dense():
    attention = nn.MultiheadAttention(8, num_heads=2, batch_first=True)
    x = torch.randn(3, 5, 8)  # 5 tokens
    count = count_flops(attention, (x, x, x), sparsity={"in_proj_weight": 0.5, "out_proj.weight": 0.75})
    tokens = 5
    assert count.per_layer["in_proj_weight"] == LayerFlops(2 * tokens * 8 * 24, 0.5)
    assert count.per_layer["out_proj.weight"] == LayerFlops(2 * tokens * 8 * 8, 0.25)
    assert count.other == 2 * 2 * tokens * tokens * 8  # Q K^T and A V, dense whatever the masks
    assert count.sparse == 0.5 * 2 * tokens * 8 * 24 + 0.25 * 2 * tokens * 8 * 8 + count.other


def test_attention_is_counted_in_eval_mode_too():
    # In eval mode without gradients nn.MultiheadAttention takes a fused path FlopCounterMode cannot see.
    attention = nn.MultiheadAttention(8, num_heads=2, batch_first=True).eval()
    x = torch.randn(3, 5, 8)
    with torch.no_grad():
        assert count_flops(attention, (x, x, x)).dense == count_flops(attention.train(), (x, x, x)).dense > 0
    assert torch.backends.mha.get_fastpath_enabled()


def test_cpu_scaled_dot_product_attention_counts_its_two_matmuls():
    tokens, dim = 10, 16
    count = count_flops(Attention(dim), torch.randn(4, tokens, dim))
    attention = 2 * (2 * tokens * tokens * dim)  # Q K^T and A V over all heads, 2 FLOPs a multiply-add
    assert count.other == 2 * attention  # F.scaled_dot_product_attention and the MultiheadAttention
    assert count.per_layer["qkv.weight"].dense == 2 * tokens * dim * 3 * dim
    assert count.per_layer["mha.in_proj_weight"].dense == 2 * tokens * dim * 3 * dim
    assert count.per_layer["mha.out_proj.weight"].dense == 2 * tokens * dim * dim


def test_counting_changes_nothing_in_the_model():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5))
    model[2].eval()
    count_flops(model, torch.randn(8, 4))
    assert model.training and model[1].training and not model[2].training
    assert model[1].num_batches_tracked == 0 and torch.equal(model[1].running_mean, torch.zeros(4))


def test_dict_input_and_explicit_batch_size():
    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 2)

        def forward(self, tokens):
            return self.proj(tokens)

    tokens = torch.randn(5, 3, 8)  # (sequence, batch, features): dim 0 is not the batch
    count = count_flops(Seq(), {"tokens": tokens}, batch_size=3)
    assert count.dense == 5 * 2 * 8 * 2


def test_a_weight_used_twice_counts_twice():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4, bias=False)

        def forward(self, x):
            return self.fc(self.fc(x))

    assert count_flops(Twice(), torch.randn(2, 4)).per_layer["fc.weight"].dense == 2 * 2 * 4 * 4


@pytest.mark.parametrize(("layer", "gates"), [(nn.LSTM, 4), (nn.GRU, 3), (nn.RNN, 1)])
def test_recurrent_layers_count_every_step_per_weight(layer, gates):
    # On CPU nn.LSTM runs one oneDNN kernel that FlopCounterMode cannot see into (it counted 0).
    steps, inputs, hidden = 5, 6, 8
    model = layer(inputs, hidden, num_layers=2, bidirectional=True, batch_first=True)
    flags = (torch.backends.mkldnn.enabled, torch.backends.cudnn.enabled)
    count = count_flops(model, torch.randn(3, steps, inputs), sparsity={"weight_hh_l1_reverse": 0.75})
    per_step = {  # a multiply-add per weight and time step, for each sample
        "weight_ih_l0": 2 * gates * hidden * inputs,
        "weight_hh_l0": 2 * gates * hidden * hidden,
        "weight_ih_l1": 2 * gates * hidden * 2 * hidden,  # layer 1 reads both directions' outputs
        "weight_hh_l1": 2 * gates * hidden * hidden,
    }
    expected = {name + direction: steps * flops for name, flops in per_step.items() for direction in ("", "_reverse")}
    assert {name: layer.dense for name, layer in count.per_layer.items()} == expected
    assert count.dense == sum(expected.values())
    assert count.sparse == count.dense - 0.75 * expected["weight_hh_l1_reverse"]
    assert count.uncounted == ()
    assert (torch.backends.mkldnn.enabled, torch.backends.cudnn.enabled) == flags  # restored


@pytest.mark.skipif(not torch.cuda.is_available(), reason="cuDNN's recurrent kernels need a GPU")
@pytest.mark.parametrize("layer", [nn.LSTM, nn.GRU, nn.RNN])
def test_recurrent_layers_on_cuda_count_as_on_cpu(layer):
    # On CUDA every recurrent layer runs one cuDNN kernel (aten._cudnn_rnn), without a FLOP formula.
    model = layer(6, 8, num_layers=2, batch_first=True)
    x = torch.randn(3, 5, 6)
    on_cpu = count_flops(model, x)
    on_cuda = count_flops(model.cuda(), x.cuda())
    assert (on_cuda.per_layer, on_cuda.uncounted) == (on_cpu.per_layer, ())


def test_a_matrix_vector_product_with_a_weight_is_counted():
    class MatVec(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(3, 4))

        def forward(self, x):
            return torch.mv(self.weight, x) + torch.addmv(x[:3], self.weight, x)

    count = count_flops(MatVec(), torch.randn(4), batch_size=1)
    assert count.per_layer == {"weight": LayerFlops(2 * 2 * 4 * 3, 1.0)}


def _record_uncounted_warnings(model, example):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        count = count_flops(model, example)
    return count, [str(w.message) for w in caught if "No FLOP formula" in str(w.message)]


def test_an_operation_on_a_weight_without_a_formula_warns_once_naming_its_module():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 8)
            self.fused = FusedLinear(8, 8)

        def forward(self, x):
            return self.fused(self.fused(self.fc(x)))  # the operator runs twice

    count, messages = _record_uncounted_warnings(Block(), torch.randn(3, 4))
    assert count.uncounted == ("rigl_tests.unformulated_matmul in `fused` (FusedLinear)",)
    assert len(messages) == 1
    assert messages[0].startswith("No FLOP formula for rigl_tests.unformulated_matmul in `fused` (FusedLinear): ")
    assert count.dense == 2 * 4 * 8  # the fused layer's FLOPs are what is missing


@pytest.mark.parametrize(
    ("model", "example"),
    [
        (nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2)), torch.randn(3, 4)),
        (
            nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.GroupNorm(2, 4), nn.ConvTranspose2d(4, 2, 3)),
            torch.randn(2, 3, 8, 8),
        ),
        (nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 2), torch.randn(2, 5, 8)),
        (nn.Sequential(nn.Embedding(10, 8), nn.LSTM(8, 8, batch_first=True)), torch.randint(0, 10, (2, 5))),
        (nn.utils.parametrizations.weight_norm(nn.Linear(4, 4)), torch.randn(3, 4)),
        (nn.utils.parametrizations.spectral_norm(nn.Linear(4, 4)), torch.randn(3, 4)),
    ],
    ids=["mlp", "cnn", "transformer", "embedding-lstm", "weight-norm", "spectral-norm"],
)
def test_ordinary_layers_count_without_a_warning(model, example):
    count, messages = _record_uncounted_warnings(model, example)
    assert (count.uncounted, messages) == ((), [])
    assert count.dense > 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sparsity": {"nope.weight": 0.5}}, "'nope.weight', which is no parameter"),
        ({"sparsity": {"0.weight": 1.5}}, r"`sparsity\['0.weight'\]` must be a fraction of zeros in \[0, 1\], got 1.5"),
        ({"batch_size": 0}, "`batch_size` must be None or an int >= 1, got 0"),
    ],
)
def test_count_flops_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        count_flops(_mlp(), torch.randn(2, 16), **kwargs)


def test_with_sparsity_rescales_without_a_forward_pass():
    count = FlopsCount({"a": LayerFlops(100.0, 1.0), "b": LayerFlops(50.0, 1.0)}, other=10.0)
    rescaled = count.with_sparsity({"a": 0.75, "unknown": 0.5})
    assert (rescaled.dense, rescaled.sparse, rescaled.ratio) == (160.0, 85.0, 85.0 / 160.0)
    assert count.sparse == 160.0  # the original is unchanged


@pytest.mark.parametrize(
    ("method", "updating", "expected"),
    [
        ("rigl", True, (3 * 10 * 4 + 2 * 10 + 100) / 5),  # (3 f_S dT + 2 f_S + f_D) / (dT + 1)
        ("rigl", False, 3 * 10),  # after t_end
        ("snfs", True, 2 * 10 + 100),
        ("snfs", False, 2 * 10 + 100),
        ("set", True, 3 * 10),
        ("static", True, 3 * 10),
        (None, True, 3 * 10),  # no RigL: the model's zeros only
    ],
)
def test_training_flops_follow_the_paper(method, updating, expected):
    f_sparse, f_dense, delta_t = 10.0, 100.0, 4
    assert training_flops_per_sample(f_sparse, f_dense, method, delta_t, updating) == pytest.approx(expected)


def test_rigl_training_flops_reproduce_the_paper_ratio():
    # ResNet-50, ERK S=0.8: test FLOPs 0.42x of dense and RigL training FLOPs 0.42x with dT = 100.
    ratio = training_flops_per_sample(0.42, 1.0, "rigl", 100) / training_flops_per_sample(1.0, 1.0)
    assert ratio == pytest.approx(0.42, abs=0.005)


def test_training_flops_reject_unknown_method_and_bad_delta_t():
    with pytest.raises(ValueError, match="`method` must be None or one of"):
        training_flops_per_sample(1.0, 2.0, "dense")
    with pytest.raises(ValueError, match="`delta_t` must be an int >= 1, got 0"):
        training_flops_per_sample(1.0, 2.0, "rigl", 0)


def test_count_active_counts_masked_connections_at_zero_as_active():
    weight = torch.tensor([[0.0, 2.0], [0.0, -1.0]])
    mask = torch.tensor([[True, True], [False, True]])  # position (0, 0) just grown at 0
    assert count_active({"w": weight}) == {"w": 2}
    assert count_active({"w": weight}, {"w": mask}) == {"w": 3}
    assert count_active({"w": weight}, {"other": mask}) == {"w": 2}


def test_a_weight_gathered_for_the_forward_pass_only_is_read_while_it_exists():
    # FSDP2 swaps in a gathered Parameter before a layer's forward and frees its storage after it.
    layer = nn.Linear(4, 4, bias=False)
    gathered = torch.zeros(4, 4)
    gathered[0] = 1.0  # density 0.25

    def gather(module, args):
        module.weight = nn.Parameter(gathered.clone())

    def free(module, args, output):
        module.weight.untyped_storage().resize_(0)

    layer.register_forward_pre_hook(gather)
    layer.register_forward_hook(free)
    assert count_flops(layer, torch.randn(2, 4)).per_layer == {"weight": LayerFlops(2 * 4 * 4, 0.25)}
