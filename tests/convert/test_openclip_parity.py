"""Issue 7, acceptance 1: megapgs -> OpenCLIP gives the same embeddings; OpenCLIP -> megapgs ->
OpenCLIP returns the state dict bit for bit. Issue 16: for OpenCLIP's other configs (ViT-S-16) and a
model-config JSON of megapgs's own too."""
import json

import pytest
import torch

from megapgs.convert.openclip import build_openclip_model, from_openclip, openclip_model_cfg, to_openclip
from megapgs.models.archs import get_arch
from megapgs.models.clip import CLIP
from megapgs.models.text import eot_lengths


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def captions(lengths: list[int], context: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    tokens = torch.zeros(len(lengths), context, dtype=torch.int64)
    for row, length in enumerate(lengths):
        tokens[row, :length - 1] = torch.randint(1, 49406, (length - 1,), generator=gen)
        tokens[row, length - 1] = 49407  # EOT, the highest id
    return tokens


# A model-config JSON with numbers no named arch has: odd widths, mlp_ratio 3, 3 heads, 24-token captions.
CUSTOM = {"embed_dim": 40, "vision_cfg": {"image_size": 48, "patch_size": 12, "width": 96, "layers": 3,
                                          "head_width": 32, "mlp_ratio": 3.0},
          "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 72, "heads": 3, "layers": 2}}


@pytest.fixture(scope="module")
def custom_json(tmp_path_factory):
    path = tmp_path_factory.mktemp("arch") / "custom.json"
    path.write_text(json.dumps(CUSTOM))
    return str(path)


def spec_of(arch, custom_json):
    return get_arch(custom_json if arch == "custom JSON" else arch)


@pytest.mark.parametrize("arch", ["tiny-28", "ViT-B-16", "ViT-L-14", "ViT-S-16", "custom JSON"])
def test_converted_model_gives_our_embeddings(arch, custom_json):
    spec = spec_of(arch, custom_json)
    torch.manual_seed(0)
    ours = CLIP(spec).eval()
    theirs = build_openclip_model(spec).eval()
    theirs.load_state_dict(to_openclip(ours.state_dict(), theirs.state_dict()))
    size, context = spec.vision.image_size, spec.text.context_length
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    tokens = captions([3, context], context)
    with torch.no_grad():
        ours_out = ours(images, tokens, eot_lengths(tokens))
        assert rel_err(theirs.encode_image(images, normalize=True), ours_out.image) <= 1e-5
        assert rel_err(theirs.encode_text(tokens, normalize=True), ours_out.text) <= 1e-5
        assert float(theirs.logit_scale.exp()) == pytest.approx(float(ours_out.logit_scale))


@pytest.mark.parametrize("arch, siglip", [("tiny-28", False), ("ViT-B-16", False), ("tiny-28", True),
                                          ("ViT-B-16", True), ("ViT-S-16", False), ("custom JSON", True)])
def test_openclip_round_trip_is_bit_exact(arch, siglip, custom_json):
    spec = spec_of(arch, custom_json)
    torch.manual_seed(1)
    original = build_openclip_model(spec, logit_bias=siglip).state_dict()
    if siglip:
        original["logit_bias"] = torch.tensor(-7.25)  # a trained value, not the initial one
    ours = CLIP(spec, init_logit_bias=0.0 if siglip else None).state_dict()
    assert ("logit_bias" in original) == siglip
    back = to_openclip(from_openclip(original, ours), original)
    assert back.keys() == original.keys()
    for key, value in original.items():
        assert back[key].shape == value.shape and torch.equal(back[key], value), key


def test_custom_config_matches_the_named_one():
    """Our ArchSpec of ViT-B-16 written as OpenCLIP config builds OpenCLIP's ViT-B-16 shapes."""
    import open_clip

    spec = get_arch("ViT-B-16")
    named = build_openclip_model(spec).state_dict()
    custom = open_clip.model.CLIP(**openclip_model_cfg(spec)).state_dict()
    assert {k: v.shape for k, v in named.items()} == {k: v.shape for k, v in custom.items()}
