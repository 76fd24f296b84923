"""nanopiti/pictures.py: model tensors back to bytes, and the grids training and sampling save."""

import numpy as np
import torch
from PIL import Image

from nanopiti.data import _to_unit
from nanopiti.pictures import as_rgb, condition_picture, quantize, save_grid, to_uint8


def test_to_uint8_inverts_the_data_path_byte_for_byte():
    pictures = np.random.default_rng(0).integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
    x = torch.from_numpy(np.stack([_to_unit(p) for p in pictures]))
    assert np.array_equal(to_uint8(x), pictures)


def test_to_uint8_clamps_out_of_range_values():
    x = torch.tensor([-3.0, -1.0, 0.0, 1.0, 3.0]).view(1, 1, 1, 5)
    assert to_uint8(x).ravel().tolist() == [0, 0, 128, 255, 255]


def test_quantize_is_a_round_trip_through_8_bits():
    x = torch.linspace(-1.2, 1.2, 1001).view(1, 1, 1, -1)
    levels = to_uint8(x).astype(np.float32).reshape(-1)
    assert torch.equal(quantize(x).reshape(-1), torch.from_numpy(levels / 127.5 - 1))
    assert torch.equal(quantize(quantize(x)), quantize(x))


def test_as_rgb_shows_the_first_three_channels_or_gray():
    depth_normal = torch.arange(6.0).view(1, 6, 1, 1)
    assert as_rgb(depth_normal).ravel().tolist() == [0.0, 1.0, 2.0]
    sketch = torch.full((1, 1, 2, 2), 0.5)
    assert as_rgb(sketch).shape == (1, 3, 2, 2) and bool((as_rgb(sketch) == 0.5).all())


def test_condition_picture_keeps_labels_with_nearest_neighbour():
    labels = torch.tensor([[-1.0, 1.0], [1.0, -1.0]]).expand(3, 2, 2)
    picture = condition_picture(labels, 4)
    assert picture.shape == (4, 4, 3) and set(np.unique(picture)) == {0, 255}
    assert (picture[:2, :2] == 0).all() and (picture[:2, 2:] == 255).all()


def test_save_grid_lays_out_rows_and_columns(tmp_path):
    rng = np.random.default_rng(1)
    small = rng.integers(0, 256, (3, 4, 4, 3), dtype=np.uint8)   # three examples at 4x4
    large = rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)   # and at 8x8
    columns = [torch.from_numpy(np.stack([_to_unit(p) for p in pics])) for pics in (small, large)]
    save_grid(columns, tmp_path / "grid.png")
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert grid.shape == (3 * 8, 8 + 2 + 8, 3)  # cells at the largest size, a 2-pixel white gap
    assert (grid[:, 8:10] == 255).all()
    for i in range(3):
        row = grid[8 * i:8 * (i + 1)]
        assert np.array_equal(row[:, :8], small[i].repeat(2, axis=0).repeat(2, axis=1))
        assert np.array_equal(row[:, 10:], large[i])
