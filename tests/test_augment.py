import math

import pytest
import torch

from mhpfl.datasets import Split
from mhpfl.datasets.augment import augment


def test_augment_is_seeded_shape_preserving_and_draws_from_the_image():
    x = torch.arange(4 * 3 * 32 * 32, dtype=torch.float32).reshape(4, 3, 32, 32) + 1.0
    a = augment(x, torch.Generator().manual_seed(0))
    b = augment(x, torch.Generator().manual_seed(0))
    c = augment(x, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    for i in range(4):  # every pixel is from the sample itself, zero padding, or erased (0)
        values = set(x[i].flatten().tolist()) | {0.0}
        assert set(a[i].flatten().tolist()) <= values


def test_crop_is_a_shift_and_flip_mirrors():
    x = torch.randn(64, 1, 8, 8)
    out = augment(x, torch.Generator().manual_seed(3), pad=2, erase_p=0.0)
    for i in range(64):  # some shift in [-2, 2]^2, possibly mirrored, with zeros from the padding
        padded = torch.nn.functional.pad(x[i], (2, 2, 2, 2))
        cands = [padded[:, dy:dy + 8, dx:dx + 8] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(out[i], c) or torch.equal(out[i], c.flip(2)) for c in cands)


def test_erasing_blanks_a_rectangle_of_the_given_scale():
    x = torch.ones(200, 1, 32, 32)
    out = augment(x, torch.Generator().manual_seed(0), pad=0, erase_p=1.0)
    frac = (out == 0).float().mean(dim=(1, 2, 3))
    assert frac.min() >= 0.02 and frac.max() <= 0.25  # scale 0.04-0.2 of the area, up to rounding


def _one_step_at_a_time(x, g, pad=4, erase_p=0.5, scale=(0.04, 0.2), ratio=(0.5, 2.0)):
    """The augmentation's definition, one operation after another on one batch, eight draws of
    B numbers from `g` in this order: crop row, crop column, flip, erase area, erase ratio,
    erase row, erase column, erase or not."""
    b, c, h, w = x.shape

    def rand(n):
        return torch.rand(n, generator=g, device=g.device).to(x.device)

    xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    oy, ox = (rand(b) * (2 * pad + 1)).long(), (rand(b) * (2 * pad + 1)).long()
    out = torch.stack([xp[i, :, oy[i]:oy[i] + h, ox[i]:ox[i] + w] for i in range(b)])
    flip = rand(b) < 0.5
    out = torch.where(flip[:, None, None, None], out.flip(3), out)
    area = h * w * (scale[0] + rand(b) * (scale[1] - scale[0]))
    ar = torch.exp(math.log(ratio[0]) + rand(b) * (math.log(ratio[1]) - math.log(ratio[0])))
    eh = torch.sqrt(area * ar).round().long().clamp(1, h)
    ew = torch.sqrt(area / ar).round().long().clamp(1, w)
    y0, x0 = (rand(b) * (h - eh + 1).float()).long(), (rand(b) * (w - ew + 1).float()).long()
    erase = rand(b) < erase_p
    for i in range(b):
        if erase[i]:
            out[i, :, y0[i]:y0[i] + eh[i], x0[i]:x0[i] + ew[i]] = 0.0
    return out


@pytest.mark.parametrize("shape,kw", [((64, 3, 32, 32), {}), ((37, 1, 8, 8), {"pad": 2}),
                                      ((50, 3, 32, 32), {"pad": 0, "erase_p": 1.0}),
                                      ((20, 3, 12, 20), {"erase_p": 0.0})])
@pytest.mark.parametrize("channels_last", [False, True])
def test_augment_is_its_definition_bit_for_bit(shape, kw, channels_last):
    """One gather from the padded batch gives the pixels cropping, flipping and erasing one after
    another give (the same draws from the generator), in the models' channels-last layout."""
    x = torch.randn(*shape)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    for seed in range(5):
        out = augment(x, torch.Generator().manual_seed(seed), **kw)
        assert torch.equal(out, _one_step_at_a_time(x, torch.Generator().manual_seed(seed), **kw))
        assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("n,batch,chunk", [(200, 32, 4096), (200, 32, 64), (130, 64, 100), (10, 64, 4096)])
@pytest.mark.parametrize("shuffle", [True, False])
def test_an_epoch_augmented_at_once_is_batch_after_batch(n, batch, chunk, shuffle, monkeypatch):
    """Split.batches augments an epoch's batches a chunk at a time (the shuffle folded into the
    gather): the batches, labels and the generator's next draws are those of shuffling, then
    augmenting each batch in turn, over two epochs."""
    import mhpfl.datasets.augment as aug

    monkeypatch.setattr(aug, "CHUNK", chunk)
    x = torch.randn(n, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (n,))
    split = Split(x, y, augment=True)
    g_ref, g = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    for _ in range(2):
        order = torch.randperm(n, generator=g_ref) if shuffle else torch.arange(n)
        ref = [(_one_step_at_a_time(x[idx], g_ref), y[idx]) for idx in order.split(batch)]
        got = list(split.batches(batch, g, shuffle=shuffle))
        assert len(got) == len(ref)
        assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(got, ref))
    assert torch.equal(torch.rand(3, generator=g), torch.rand(3, generator=g_ref))
