import torch

from sqdf.digits.data import load_digits_split, pixels_to_unit, unit_to_pixels01


def test_split_is_fixed_stratified_and_scaled():
    train, held = load_digits_split()
    assert train.images.shape == (1347, 1, 8, 8) and held.images.shape == (450, 1, 8, 8)
    assert float(train.images.min()) == -1.0 and float(train.images.max()) == 1.0
    counts = torch.bincount(held.labels, minlength=10)
    totals = counts + torch.bincount(train.labels, minlength=10)
    assert bool(((counts - 0.25 * totals).abs() <= 1).all())  # stratified: a quarter of each class held out
    again, _ = load_digits_split.__wrapped__()
    assert torch.equal(again.images, train.images)
    assert held.of_class(3).shape[0] == int(counts[3])


def test_pixel_maps_are_inverse_on_the_range():
    v = torch.arange(17, dtype=torch.float32)
    assert torch.allclose(unit_to_pixels01(pixels_to_unit(v)), v / 16)
