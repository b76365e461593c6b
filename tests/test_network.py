"""TransUNet shapes, parameter counts, presets and TorchScript."""

import pytest
import torch

from custom.networks import PRESETS, TransUNet, transunet_from_preset


def n_params(m):
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("size", [64, 96, 128])
@pytest.mark.parametrize("classes", [1, 3, 7])
def test_segmentation_shapes(size, classes):
    m = transunet_from_preset("tiny", img_size=size, out_channels=classes).eval()
    with torch.no_grad():
        y = m(torch.rand(2, 1, size, size))
    assert y.shape == (2, classes, size, size)
    assert torch.isfinite(y).all()


def test_reconstruction_head_has_one_channel():
    m = transunet_from_preset("tiny", img_size=64, head="reconstruction", out_channels=5).eval()
    with torch.no_grad():
        assert m(torch.rand(1, 1, 64, 64)).shape == (1, 1, 64, 64)


def test_other_input_sizes_and_rgb():
    m = transunet_from_preset("tiny", img_size=64).eval()
    with torch.no_grad():
        assert m(torch.rand(1, 1, 80, 112)).shape == (1, 1, 80, 112)  # interpolated position embeddings
        assert TransUNet(**PRESETS["tiny"], img_size=64, in_channels=3)(torch.rand(1, 3, 64, 64)).shape[1] == 1


@pytest.mark.parametrize(
    "preset,classes,expected",
    [("retina", 1, 22_201_169), ("vit_b", 1, 105_275_921), ("retina", 3, 22_201_169 - 145 + 435),
     ("retina", 7, 22_201_169 - 145 + 1_015)],
)
def test_parameter_counts_match_reference(preset, classes, expected):
    assert n_params(transunet_from_preset(preset, out_channels=classes)) == expected


def test_bad_arguments():
    with pytest.raises(ValueError, match="multiple of 16"):
        TransUNet(img_size=100)
    with pytest.raises(ValueError, match="head"):
        TransUNet(head="classification")
    with pytest.raises(ValueError, match="preset"):
        transunet_from_preset("resnet")


def test_torchscript_script_and_trace_match_eager(tmp_path):
    m = transunet_from_preset("tiny", img_size=64, out_channels=3).eval()
    x = torch.rand(2, 1, 64, 64)
    scripted = torch.jit.script(m)
    path = tmp_path / "model.ts"
    torch.jit.save(scripted, str(path))
    loaded = torch.jit.load(str(path))
    with torch.no_grad():
        ref = m(x)
        assert torch.allclose(loaded(x), ref, atol=1e-5)
        assert torch.allclose(torch.jit.trace(m, x)(x), ref, atol=1e-5)


def test_gradients_reach_every_parameter():
    m = transunet_from_preset("tiny", img_size=64)
    m(torch.rand(2, 1, 64, 64)).mean().backward()
    assert all(p.grad is not None for p in m.parameters())


def test_token_grid_is_the_row_major_reshape():
    from custom.networks import TokenGrid

    grid = TokenGrid()
    x = torch.rand(2, 5, 3, 4)
    tokens = grid.to_tokens(x)
    assert torch.equal(tokens, x.flatten(2).transpose(1, 2))
    assert torch.equal(grid.to_map(tokens, (3, 4)), x)
    pos = torch.rand(1, 16, 5)
    assert grid.resample(pos, (4, 4)) is pos and grid.resample(pos, (2, 6)).shape == (1, 12, 5)
    with pytest.raises(ValueError, match="square grid"):
        grid.resample(torch.rand(1, 15, 5), (2, 2))
