import open_clip
import pytest

from megapgs.models.archs import ARCHS, get_arch

NAMED = [name for name, spec in ARCHS.items() if spec.openclip_name]


@pytest.mark.parametrize("name", NAMED)
def test_named_archs_match_openclip(name):
    """Our hyper-parameters are OpenCLIP's, so checkpoints convert by renaming keys."""
    spec, oc = get_arch(name), open_clip.get_model_config(name)
    vision, text = oc["vision_cfg"], oc["text_cfg"]
    assert spec.embed_dim == oc["embed_dim"]
    assert (spec.vision.image_size, spec.vision.patch_size) == (vision["image_size"], vision["patch_size"])
    assert (spec.vision.width, spec.vision.layers) == (vision["width"], vision["layers"])
    assert spec.vision.head_width == vision.get("head_width", 64)
    assert spec.vision.mlp_ratio == vision.get("mlp_ratio", 4.0)
    assert (spec.text.context_length, spec.text.vocab_size) == (text["context_length"], text["vocab_size"])
    assert (spec.text.width, spec.text.heads, spec.text.layers) == (text["width"], text["heads"], text["layers"])
    assert spec.text.mlp_ratio == text.get("mlp_ratio", 4.0)


def test_paper_shapes():
    l14 = get_arch("ViT-L-14").vision
    assert (l14.grid, l14.num_patches, l14.heads) == (16, 256, 16)
    assert get_arch("tiny-28").vision.num_patches == 49


def test_unknown_arch():
    with pytest.raises(KeyError, match="known: ViT-B-32"):
        get_arch("ViT-X")
