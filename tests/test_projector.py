import pytest
import torch
from torch import nn

from vlmkit.errors import ConfigError, RegistryError
from vlmkit.models.projector import build_projector, projector_names, register_projector


def test_linear_and_identity():
    linear = build_projector("linear", 8, 16)
    assert isinstance(linear, nn.Linear) and linear.in_features == 8 and linear.out_features == 16
    identity = build_projector("identity", 16, 16)
    x = torch.randn(2, 3, 16)
    assert torch.equal(identity(x), x)


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_mlp_gelu_family(depth):
    proj = build_projector(f"mlp{depth}x_gelu", 8, 16)
    linears = [m for m in proj if isinstance(m, nn.Linear)]
    gelus = [m for m in proj if isinstance(m, nn.GELU)]
    assert len(linears) == depth and len(gelus) == depth - 1
    assert (linears[0].in_features, linears[-1].out_features) == (8, 16)
    assert proj(torch.randn(4, 8)).shape == (4, 16)


def test_mlp2x_gelu_is_linear_gelu_linear():
    proj = build_projector("mlp2x_gelu", 8, 16)
    assert [type(m) for m in proj] == [nn.Linear, nn.GELU, nn.Linear]


@pytest.mark.parametrize("name", ["mlp", "MLP2x_gelu", "mlp2x_relu", "mlp0x_gelu", "linear ", "Linear", "mlp2x"])
def test_unknown_names_list_valid_ones(name):
    with pytest.raises(RegistryError) as err:
        build_projector(name, 8, 16)
    message = str(err.value)
    assert repr(name) in message
    assert "linear" in message and "identity" in message and "mlp2x_gelu" in message


def test_identity_needs_equal_sizes():
    with pytest.raises(ConfigError, match="needs equal sizes.*8 dims.*16"):
        build_projector("identity", 8, 16)


def test_register_rejects_duplicates():
    with pytest.raises(RegistryError, match="already registered"):
        register_projector("linear")(lambda i, o: nn.Linear(i, o))
    assert "linear" in projector_names()
