"""Positional embeddings resized to another patch grid (train.init_from at another image size) are
OpenCLIP's resize_pos_embed: the CLS row kept, the grid interpolated bicubically."""
import pytest
import torch
from open_clip.model import resize_pos_embed

from megapgs.models.vit import resize_positional_embedding


class _Visual:  # what resize_pos_embed reads of an OpenCLIP model: visual.grid_size
    def __init__(self, grid):
        self.visual = type("V", (), {"grid_size": (grid, grid)})()


@pytest.mark.parametrize("old, new", [(7, 14), (14, 7), (16, 24), (7, 9)])
def test_resize_is_openclips(old, new):
    pos = torch.randn(1 + old * old, 40, generator=torch.Generator().manual_seed(old * new))
    theirs = {"visual.positional_embedding": pos.clone()}
    resize_pos_embed(theirs, _Visual(new))
    ours = resize_positional_embedding(pos, new)
    assert ours.shape == (1 + new * new, 40) and torch.equal(ours[0], pos[0])
    assert torch.equal(ours, theirs["visual.positional_embedding"])


def test_same_grid_is_unchanged_and_a_bad_shape_is_refused():
    pos = torch.randn(50, 8)
    assert resize_positional_embedding(pos, 7) is pos
    with pytest.raises(ValueError, match="not CLS plus a square grid"):
        resize_positional_embedding(torch.randn(48, 8), 7)


def test_a_smooth_grid_stays_smooth():
    """Interpolation, not reshuffling: a linear ramp over the grid is a linear ramp at the new size."""
    old, new = 7, 14
    ramp_old = torch.linspace(-1, 1, old).repeat(old, 1)  # varies along the row
    pos = torch.cat([torch.zeros(1, 1), ramp_old.reshape(-1, 1)])
    grid = resize_positional_embedding(pos, new)[1:].reshape(new, new)
    assert torch.allclose(grid, grid[:1].expand(new, new))  # each row the same
    assert bool((grid[0, 1:] > grid[0, :-1]).all())  # increasing along the row, as the original
