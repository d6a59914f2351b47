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


def test_meter_charges_inference_while_counting_and_steps_as_measured():
    m = build_model("cnn5", (1, 28, 28), 10)
    meter = FlopMeter()
    meter.track(m, (1, 28, 28), "cnn5")
    per = meter.per_sample["cnn5"]
    x = torch.zeros(4, 1, 28, 28)
    m(x)
    assert meter.total == 0  # not counting (e.g. evaluation)
    with meter.count(), torch.no_grad():
        m(x)  # inference: one forward pass per sample
    assert meter.total == 4 * per
    with meter.step(("k",)):
        m(x).sum().backward()  # a training step: what autograd runs, not a fixed multiple
    step = meter.step_flops[("k",)]
    assert 2 * 4 * per < step < 3 * 4 * per  # no input gradient for the first layer
    assert meter.total == 4 * per + step
