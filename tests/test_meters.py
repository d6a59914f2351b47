import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mhpfl.engine import FlopMeter, forward_flops, message_bytes
from mhpfl.models import CNN_SPECS, build_model


def test_message_bytes_are_numel_times_element_size():
    msg = {"a": torch.zeros(3, 4), "b": torch.zeros(5, dtype=torch.int64), "c": torch.zeros(2, dtype=torch.float16)}
    assert message_bytes(msg) == 3 * 4 * 4 + 5 * 8 + 2 * 2
    assert message_bytes({}) == 0


@pytest.mark.parametrize("arch", CNN_SPECS)
@pytest.mark.parametrize("shape,c", [((1, 28, 28), 10), ((3, 32, 32), 100)])
def test_fvcore_equals_half_of_torch_flop_counter(arch, shape, c):
    m = build_model(arch, shape, c)
    with FlopCounterMode(display=False) as fc:
        m(torch.zeros(1, *shape))
    assert forward_flops(m, shape) * 2 == fc.get_total_flops()


def test_meter_charges_forward_and_backward_only_while_counting():
    m = build_model("cnn5", (1, 28, 28), 10)
    meter = FlopMeter()
    meter.track(m, (1, 28, 28), "cnn5")
    per = meter.per_sample["cnn5"]
    x = torch.zeros(4, 1, 28, 28)
    m(x)
    assert meter.total == 0  # not counting (e.g. evaluation)
    with meter.count():
        m(x)  # with autograd: forward + backward (2x forward)
        assert meter.total == 3 * 4 * per
        with torch.no_grad():
            m(x)  # inference only
        assert meter.total == 3 * 4 * per + 4 * per
