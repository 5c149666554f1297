"""The packed towers compute what the plain ones do, and what OpenCLIP computes with the same weights."""
import open_clip
import pytest
import torch

from megapgs.config import ModelConfig
from megapgs.convert.openclip import to_openclip
from megapgs.models.archs import TextSpec, get_arch
from megapgs.models.clip import CLIP, build_model
from megapgs.packed import Packed
from megapgs.models.text import TextTower, eot_lengths

SOT, EOT = 49406, 49407


def captions(lengths, context, seed=0):
    """Token ids as OpenCLIP's tokenizer lays them out: SOT, words, EOT, zeros."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(len(lengths), context, dtype=torch.long)
    for row, length in enumerate(lengths):
        tokens[row, 0] = SOT
        tokens[row, 1:length - 1] = torch.randint(1, 49000, (length - 2,), generator=gen)
        tokens[row, length - 1] = EOT
    return tokens


def rel_err(actual, expected):
    return ((actual - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("backend", ["sdpa_padded", "reference"])
def test_packed_text_equals_padded_text_for_lengths_2_to_77(backend):
    torch.manual_seed(0)
    tower = TextTower(TextSpec(context_length=77, width=32, heads=2, layers=2), embed_dim=16).eval()
    tower.transformer.backend = backend
    tokens = captions(range(2, 78), 77)
    lengths = eot_lengths(tokens)
    assert lengths.tolist() == list(range(2, 78))
    with torch.no_grad():
        padded, packed = tower(tokens), tower(tokens, lengths)
    assert (padded - packed).abs().max().item() <= 1e-6 * padded.abs().max().item()


def _tiny(backend="sdpa_padded"):
    torch.manual_seed(0)
    model = CLIP(get_arch("tiny-28")).eval()
    model.set_attention(backend)
    return model


def test_packed_vit_with_every_token_equals_the_plain_batch():
    """Each image's tokens in a shuffled order (CLS first), packed with a ragged neighbour: same
    CLS output as the plain (B, L+1, D) batch, so no token leaks across sequences."""
    model = _tiny()
    images = torch.randn(3, 3, 28, 28)

    def keep_all_shuffled_plus_a_short_extra(images_BCHW, cls_D, tokens_BLD):
        B, L, D = tokens_BLD.shape
        rows = []
        for i in range(B):
            order = torch.randperm(L, generator=torch.Generator().manual_seed(i))
            rows += [cls_D[None], tokens_BLD[i, order]]
        rows += [cls_D[None], tokens_BLD[0, :7]]  # a 4th, shorter sequence
        return torch.cat(rows), Packed.from_lengths([L + 1] * B + [8])

    with torch.no_grad():
        plain = model.visual(images)
        packed = model.visual(images, keep_all_shuffled_plus_a_short_extra)
    assert packed.shape == (4, 64)
    assert rel_err(packed[:3], plain) <= 1e-5
    with torch.no_grad():  # the short sequence is what its 7 tokens give on their own
        alone = model.visual(images[:1], lambda im, c, t: (torch.cat([c[None], t[0, :7]]), Packed.from_lengths([8])))
    assert rel_err(packed[3:], alone) <= 1e-5


@pytest.mark.parametrize("arch", ["tiny-28", "tiny-32"])
def test_same_embeddings_as_openclip_with_the_same_weights(arch):
    spec = get_arch(arch)
    torch.manual_seed(0)
    model = CLIP(spec).eval()
    oc = open_clip.model.CLIP(
        embed_dim=spec.embed_dim,
        vision_cfg=dict(image_size=spec.vision.image_size, patch_size=spec.vision.patch_size,
                        width=spec.vision.width, layers=spec.vision.layers, head_width=spec.vision.head_width),
        text_cfg=dict(context_length=spec.text.context_length, vocab_size=spec.text.vocab_size,
                      width=spec.text.width, heads=spec.text.heads, layers=spec.text.layers)).eval()
    oc.load_state_dict(to_openclip(model.state_dict(), oc.state_dict()))
    images = torch.randn(5, 3, spec.vision.image_size, spec.vision.image_size)
    tokens = captions([2, 5, 16, 9, 3], spec.text.context_length)
    with torch.no_grad():
        ours_img, ours_txt, scale, _ = model(images, tokens, eot_lengths(tokens))
        assert rel_err(ours_img, oc.encode_image(images, normalize=True)) <= 1e-5
        assert rel_err(ours_txt, oc.encode_text(tokens, normalize=True)) <= 1e-5
        assert rel_err(model.encode_text(tokens), ours_txt) <= 1e-5  # unpacked text path too
    assert scale.item() == pytest.approx(1 / 0.07)


def test_logit_scale_is_clamped_at_100():
    model = _tiny()
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    scale = model(torch.randn(2, 3, 28, 28), captions([4, 6], 16)).logit_scale
    assert scale.item() == 100.0


def test_grad_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = _tiny().train()
        model.set_grad_checkpointing(checkpointing)
        tokens = captions([3, 8, 16], 16)
        img, txt, scale, _ = model(torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(1)), tokens,
                                eot_lengths(tokens))
        (scale * img @ txt.T).logsumexp(-1).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7)


def test_wrong_image_size_is_a_clear_error():
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 3, 28, 28\)"):
        _tiny().visual(torch.randn(2, 3, 32, 32))


def test_build_model_resolves_the_backend_once():
    model = build_model(ModelConfig(arch="tiny-32", attention="flash_attn", grad_checkpointing=True))
    assert model.visual.transformer.backend == model.text.transformer.backend == "sdpa_padded"
    assert model.visual.transformer.grad_checkpointing and model.text.transformer.grad_checkpointing
