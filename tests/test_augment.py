import torch

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
