import pytest
import torch

from mhpfl.errors import UserError
from mhpfl.models import REP_DIM, build_model, num_params, zoo_archs

# parameter counts printed in the paper notes (weights + biases)
COUNTS = {
    "cnn1": (2_621_558, 2_666_648, 2_044_758),
    "cnn2": (1_815_142, 1_860_232, 1_526_342),
    "cnn3": (1_320_558, 1_365_648, 1_031_758),
    "cnn4": (1_060_358, 1_105_448, 829_158),
    "cnn5": (670_058, 715_148, 525_258),
}
SHAPES = [((3, 32, 32), 10), ((3, 32, 32), 100), ((1, 28, 28), 10)]


@pytest.mark.parametrize("arch", COUNTS)
def test_parameter_counts(arch):
    assert [num_params(build_model(arch, s, c)) for s, c in SHAPES] == list(COUNTS[arch])


@pytest.mark.parametrize("arch", COUNTS)
@pytest.mark.parametrize("shape,c", SHAPES)
def test_outputs_and_representation(arch, shape, c):
    m = build_model(arch, shape, c)
    x = torch.randn(3, *shape)
    logits, rep = m(x, return_rep=True)
    assert logits.shape == (3, c) and rep.shape == (3, REP_DIM)
    assert torch.equal(m(x), logits)


def test_zoos():
    assert zoo_archs("hetero", 7) == ["cnn1", "cnn2", "cnn3", "cnn4", "cnn5", "cnn1", "cnn2"]
    assert zoo_archs("homo", 3) == ["cnn1"] * 3
    with pytest.raises(UserError):
        zoo_archs("mixed", 3)
