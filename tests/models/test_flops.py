"""Our FLOP count equals what PyTorch's FlopCounterMode counts on the actual forward pass."""
import torch
from torch.utils.flop_counter import FlopCounterMode

from megapgs.models.archs import get_arch
from megapgs.models.clip import CLIP
from megapgs.packed import Packed
from megapgs.perf.flops import clip_forward_flops, mfu, transformer_flops


def test_vision_count_matches_flop_counter_on_ragged_sequences():
    """The reference back-end runs attention as explicit matmuls per sequence, which FlopCounterMode
    counts (it does not see inside the CPU's fused SDPA): our count from the lengths is exact."""
    spec = get_arch("tiny-28")
    model = CLIP(spec).eval()
    model.set_attention("reference")
    images = torch.randn(3, 3, 28, 28)
    lengths = [50, 11, 30]

    def keep_first(images_BCHW, cls_D, tokens_BLD):
        rows = [torch.cat([cls_D[None], tokens_BLD[i, : n - 1]]) for i, n in enumerate(lengths)]
        return torch.cat(rows), Packed.from_lengths(lengths)

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.visual(images, keep_first)
    ours = clip_forward_flops(spec, lengths, [16] * 3)
    assert ours["vision"] == counter.get_total_flops()


def test_packed_count_scales_with_kept_tokens():
    full = transformer_flops([257] * 8, 1024, 4096, 24, causal=False)
    kept = transformer_flops([180] * 8, 1024, 4096, 24, causal=False)
    assert 0.6 < kept / full < 0.71  # linear part ~ 180/257, attention part ~ (180/257)^2
    causal = transformer_flops([77] * 8, 768, 3072, 12, causal=True)
    assert causal < transformer_flops([77] * 8, 768, 3072, 12, causal=False)


def test_vit_l14_forward_flops_per_image():
    """OpenCLIP's model table gives ViT-L-14 81.08 image GFLOPs, counted by fvcore as one FLOP per
    multiply-add; we count two."""
    spec = get_arch("ViT-L-14")
    per_image = clip_forward_flops(spec, [257], [77])["vision"]
    assert abs(per_image / 2 / 81.08e9 - 1) < 0.01


def test_mfu():
    assert mfu(1e15, 2.0, 1e15) == 0.5 and mfu(1e15, 1.0, None) is None
