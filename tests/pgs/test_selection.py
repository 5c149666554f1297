"""PGS steps 1-6: invariants of the selection and the packed stream, determinism, and one test
per fault of the reference implementation (docs/PGS.md)."""
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import chisquare

from megapgs.config import PGSConfig
from megapgs.data.photos import PHOTOS, photo_batch
from megapgs.models.archs import get_arch
from megapgs.packed import Packed
from megapgs.models.vit import VisionTower
from megapgs.pgs.keep import keep_bounds
from megapgs.pgs.keyed_random import SampleKeyedDraws
from megapgs.pgs.pack import PatchMasker, pack_tokens
from megapgs.pgs.selection import (_SOBEL_X, Selection, draw_candidates, edge_scores, embed_weight, num_candidates,
                                   pgs_generator, random_selection, select_patches)

PATCH, SIZE = 4, 28          # the tiny-28 grid: 7 x 7 = 49 patches
L = (SIZE // PATCH) ** 2


def textured_batch(batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose halves differ: left half smooth gradients (similar patches), right noise."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, SIZE, SIZE, generator=gen)
    ramp = torch.linspace(-1, 1, SIZE)
    smooth = ramp[None, None, :, None] * torch.rand(batch, 3, 1, 1, generator=gen) * 3
    split = torch.randint(0, SIZE + 1, (batch, 1, 1, 1), generator=gen)  # how much of each is smooth
    cols = torch.arange(SIZE)[None, None, None, :]
    images = torch.where(cols < split, smooth.expand_as(images), images)
    tokens = torch.randn(batch, L, 16, generator=gen)
    return images, tokens


CONFIGS = {
    "paper": PGSConfig(),
    "reference-policy": PGSConfig(candidate_policy="reference"),
    "ot-reference": PGSConfig(ot="reference"),
    "no-ot": PGSConfig(use_ot=False),
    "no-edges": PGSConfig(use_edges=False, min_mask_ratio=0.5),
    "unpacked": PGSConfig(pack=False),
    "low-threshold": PGSConfig(sim_threshold=0.1, min_keep_ratio=0.3),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_selection_and_packing_invariants(name):
    cfg = CONFIGS[name]
    images, tokens = textured_batch(16)
    selection = select_patches(images, tokens, PATCH, cfg, 0.4, pgs_generator(0, 7, 0))
    k_min, k_max = keep_bounds(L, cfg.min_mask_ratio, cfg.min_keep_ratio)
    counts = selection.counts
    assert ((k_min <= counts) & (counts <= k_max)).all()
    assert selection.kept_idx.shape == (16, k_max)
    for i, k in enumerate(counts.tolist()):
        row = selection.kept_idx[i]
        assert (row[:k] < L).all() and (row[k:] == L).all()              # k_i real indices, then sentinels
        assert torch.equal(row[:k], row[:k].unique())                    # sorted, none kept twice
    lengths = counts + 1
    expected_cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).to(torch.int32)
    assert torch.equal(selection.packed.cu_seqlens, expected_cu)
    assert selection.packed.max_seqlen == int(lengths.max())
    assert selection.packed.total_tokens == int(lengths.sum())
    if not cfg.pack:
        assert (counts == counts[0]).all()

    cls = torch.full((tokens.shape[2],), 1e3)                             # unmistakable CLS
    stream = pack_tokens(cls, tokens, selection)
    assert stream.shape == (int(lengths.sum()), tokens.shape[2])
    for i, k in enumerate(counts.tolist()):
        start = int(selection.packed.cu_seqlens[i])
        assert torch.equal(stream[start], cls)                           # CLS first in every segment
        assert torch.equal(stream[start + 1:start + 1 + k], tokens[i, selection.kept_idx[i, :k]])


def test_unpacked_is_the_batch_minimum_of_the_packed_draw():
    images, tokens = textured_batch(16)
    packed = select_patches(images, tokens, PATCH, PGSConfig(), 0.0, pgs_generator(1, 2, 3))
    uniform = select_patches(images, tokens, PATCH, PGSConfig(pack=False), 0.0, pgs_generator(1, 2, 3))
    assert packed.counts.unique().numel() > 1, "the test batch should give ragged k_i"
    assert (uniform.counts == packed.counts.min()).all()
    assert uniform.packed.is_uniform and uniform.packed.max_seqlen == int(packed.counts.min()) + 1
    # the same random order, cut shorter: each image's uniform set is a subset of its own set
    assert (uniform.kept_mask() <= packed.kept_mask()).all()


def test_same_seed_step_rank_gives_the_same_selection_and_others_do_not():
    images, tokens = textured_batch(8)
    cfg = PGSConfig()

    def draw(seed, step, rank):
        return select_patches(images, tokens, PATCH, cfg, 0.5, pgs_generator(seed, step, rank)).kept_idx

    assert torch.equal(draw(0, 10, 0), draw(0, 10, 0))
    assert not torch.equal(draw(0, 10, 0), draw(0, 10, 1))
    assert not torch.equal(draw(0, 10, 0), draw(0, 11, 0))
    assert not torch.equal(draw(0, 10, 0), draw(1, 10, 0))


def test_random_masking_keeps_k_max_everywhere_without_a_sync():
    cfg = PGSConfig(masking="random", min_mask_ratio=0.5)
    selection = random_selection(32, L, cfg, pgs_generator(0, 0, 0), "cpu")
    k_max = keep_bounds(L, 0.5, cfg.min_keep_ratio)[1]
    assert (selection.counts == k_max).all() and selection.packed.is_uniform
    assert selection.kept_mask().sum(1).eq(k_max).all()


def test_each_image_keeps_its_own_count():
    """Reference fault: every image truncated to the batch minimum. A flat image loses most
    patches to similarity, a noisy one keeps k_max; packing keeps both counts."""
    gen = torch.Generator().manual_seed(0)
    ramp = torch.linspace(-1, 1, SIZE).view(1, 1, SIZE).expand(3, SIZE, SIZE)
    images = torch.stack([ramp + 0.01 * torch.randn(3, SIZE, SIZE, generator=gen), torch.randn(3, SIZE, SIZE, generator=gen)])
    selection = select_patches(images, torch.randn(2, L, 8, generator=gen), PATCH, PGSConfig(), 0.0,
                               pgs_generator(0, 0, 0))
    k_min, k_max = keep_bounds(L, 0.3, 0.1)
    assert selection.counts.tolist() == [k_min, k_max]
    assert selection.packed.total_tokens == k_min + k_max + 2


# ---- step 1: edges on the image's pixels, not on a grid of standardised patch means ----

def square_image(size: int = 56, patch: int = 8) -> torch.Tensor:
    """A bright square on a dark background: its outline runs through the ring of 8 patches
    around the centre patch of the 7 x 7 grid, which lies wholly inside the square."""
    image = torch.zeros(1, 3, size, size)
    image[:, :, 2 * patch + 3:5 * patch - 3, 2 * patch + 3:5 * patch - 3] = 1.0
    return image


def outline_patches() -> torch.Tensor:
    outline = torch.zeros(7, 7, dtype=torch.bool)
    outline[2:5, 2:5] = True
    outline[3, 3] = False
    return outline


def test_edge_map_lights_up_the_outline_only():
    """Reference fault: its Sobel runs on per-patch means taken after standardising each patch,
    so its map is rounding noise. Ours: high on the patches the square's outline crosses, zero
    on flat ones (background and the square's inside are equally flat)."""
    scores = edge_scores(square_image(), 8).view(7, 7)
    outline = outline_patches()
    assert scores[outline].min() > 0.5
    assert scores[~outline].max() < 1e-6
    assert scores.max() == pytest.approx(1.0, abs=1e-5)


def test_paper_candidates_are_the_flattest_patches():
    """With beta = 1e6 the paper policy never picks an edge patch while a flat one is left;
    the reference policy (the released code in effect) draws candidates uniformly."""
    image = square_image().expand(64, -1, -1, -1)
    outline = outline_patches()
    cfg = PGSConfig(candidate_ratio=0.5)                                  # 25 of the 41 flat patches
    paper = draw_candidates(image, cfg, 8, 49, pgs_generator(0, 0, 0))
    assert not outline.flatten()[paper].any()
    reference = draw_candidates(image, cfg.model_copy(update={"candidate_policy": "reference"}), 8, 49,
                                pgs_generator(0, 0, 0))
    share = outline.flatten()[reference].float().mean()
    assert abs(float(share) - 8 / 49) < 0.05                              # as often as outline cells exist


# ---- step 5: no positional bias in the random fill (2 000+ draws) ----

def kept_cell_counts(masks_NL: torch.Tensor) -> torch.Tensor:
    return masks_NL.sum(dim=0).double()


def assert_uniform_over_the_grid(counts_L: torch.Tensor, grid: int) -> None:
    rows = torch.arange(grid).repeat_interleave(grid).double()
    cols = torch.arange(grid).repeat(grid).double()
    total = counts_L.sum()
    centre = (grid - 1) / 2
    assert abs(float((counts_L * rows).sum() / total) - centre) < 0.1
    assert abs(float((counts_L * cols).sum() / total) - centre) < 0.1
    assert chisquare(counts_L.numpy()).pvalue > 0.01


@pytest.mark.parametrize("policy,source", [("paper", "rank"), ("reference", "rank"), ("paper", "sample")])
def test_no_positional_bias_when_nothing_is_similar(policy, source):
    """Flat images have no similar patches and no edges (PGS.md step 5), so only the random
    draws decide: 2 048 images x 34 kept patches must cover the 7 x 7 grid uniformly, with the
    per-rank generator and with the per-sample keyed draws."""
    images = torch.zeros(256, 3, SIZE, SIZE)
    tokens = torch.randn(256, L, 8, generator=torch.Generator().manual_seed(0))
    cfg = PGSConfig(candidate_policy=policy)
    masks = []
    for step in range(8):
        draws = pgs_generator(0, step, 0) if source == "rank" else SampleKeyedDraws(0, step, 0)
        selection = select_patches(images, tokens, PATCH, cfg, 0.0, draws)
        assert (selection.counts == keep_bounds(L, 0.3, 0.1)[1]).all()      # only candidates masked
        masks.append(selection.kept_mask())
    assert_uniform_over_the_grid(kept_cell_counts(torch.cat(masks)), 7)


def test_the_bias_check_catches_a_tie_sorted_fill():
    """The check above can fail: the reference's fill (sort a score that is 0 for every
    eligible patch and keep the first k) fails it."""
    k_max = keep_bounds(L, 0.3, 0.1)[1]
    zeros = torch.zeros(2048, L)
    order = torch.sort(zeros, dim=1, stable=True).indices[:, :k_max]
    masks = torch.zeros(2048, L, dtype=torch.bool).scatter_(1, order, True)
    with pytest.raises(AssertionError):
        assert_uniform_over_the_grid(kept_cell_counts(masks), 7)


# ---- what the edges buy on real photos ----

def sobel_energy(images_BCHW: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, L) unnormalised mean Sobel magnitude per patch, written out independently of ours."""
    grey = images_BCHW.mean(1, keepdim=True)
    kernels = torch.stack([_SOBEL_X, _SOBEL_X.t()])[:, None]
    grads = F.conv2d(F.pad(grey, (1, 1, 1, 1), mode="replicate"), kernels)
    return F.avg_pool2d(grads.norm(dim=1, keepdim=True), patch).flatten(1)


def test_pgs_keeps_more_edge_energy_than_random_masking_on_every_photo():
    images = photo_batch(224)                                             # ViT-L/14 grid: 16 x 16
    energy = sobel_energy(images, 14)
    tokens = torch.randn(len(PHOTOS), 256, 8)
    shares, random_shares = [], []
    for step in range(5):
        selection = select_patches(images, tokens, 14, PGSConfig(), 0.0, pgs_generator(0, step, 0))
        shares.append((energy * selection.kept_mask()).sum(1) / energy.sum(1))
        random_shares.append(selection.counts / 256)                      # E[share] of k_i random patches
    pgs, random = torch.stack(shares).mean(0), torch.stack(random_shares).mean(0)
    assert (pgs > random).all(), dict(zip(PHOTOS, zip(pgs.tolist(), random.tolist())))


# ---- no mask, no leakage: the packed tower sees each image alone ----

def test_packed_images_do_not_see_each_other():
    """Reference fault: its dense mask is repeated head-major and added as 0/1, so it masks
    nothing. Ours has no mask: image 0's embedding is the same whatever image 1 is, and equal
    to running image 0 alone with the same kept patches."""
    torch.manual_seed(0)
    tower = VisionTower(get_arch("tiny-28").vision, 32).eval()
    first, second, other = textured_batch(3)[0].split(1)
    cfg = PGSConfig()

    def embed(images):
        masker = PatchMasker(cfg, PATCH, 0.5, pgs_generator(0, 0, 0))
        return tower(images, keep=masker), masker.selection

    def alone(image, selection):
        k = int(selection.counts[0])
        only_first = Selection(selection.kept_idx[:1], selection.counts[:1], Packed.from_lengths([k + 1]), L, {})
        return tower(image, keep=lambda _, cls, tokens: (pack_tokens(cls, tokens, only_first), only_first.packed))

    with torch.no_grad():
        pair, selection = embed(torch.cat([first, second]))
        pair_other, selection_other = embed(torch.cat([first, other]))
        single = alone(first, selection)
    assert torch.equal(selection.kept_idx[0], selection_other.kept_idx[0])
    assert selection.packed.num_seqs == 2
    torch.testing.assert_close(pair[0], pair_other[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(pair[0], single[0], rtol=1e-6, atol=1e-6)


def test_gradients_reach_the_kept_tokens_only():
    torch.manual_seed(0)
    images, tokens = textured_batch(4)
    tokens.requires_grad_(True)
    cls = torch.randn(16, requires_grad=True)
    selection = select_patches(images, tokens, PATCH, PGSConfig(), 0.0, pgs_generator(0, 0, 0))
    pack_tokens(cls, tokens, selection).sum().backward()
    touched = tokens.grad.abs().sum(2) > 0
    assert torch.equal(touched, selection.kept_mask())
    assert torch.equal(cls.grad, torch.full((16,), 4.0))


# ---- the similarity weight follows training progress, not epoch / 32 ----

def test_embed_weight_follows_the_configured_progress():
    assert embed_weight("progress", 0.25) == 0.25
    assert embed_weight("progress", 1.7) == 1.0
    assert embed_weight("pixels", 0.9) == 0.0 and embed_weight("tokens", 0.0) == 1.0
    images, tokens = textured_batch(2)
    selection = select_patches(images, tokens, PATCH, PGSConfig(), 0.6, pgs_generator(0, 0, 0))
    assert float(selection.stats["embed_weight"]) == pytest.approx(0.6)


def test_token_similarity_masks_duplicate_tokens_at_full_weight():
    """w = 1: pixels are ignored. Tokens are one-hot (pairwise similarity 0), except that patch 0
    and every odd patch share one token: when the single candidate is one of those 25 copies,
    all copies are masked and exactly the 24 others are kept; otherwise only it is masked."""
    images = torch.randn(1, 3, SIZE, SIZE)
    tokens = torch.eye(L)[None].clone()
    copies = torch.zeros(L, dtype=torch.bool)
    copies[0] = copies[1::2] = True
    tokens[0, copies] = tokens[0, 0].clone()
    cfg = PGSConfig(embed_sim_schedule="tokens", use_ot=False, candidate_policy="reference",
                    candidate_ratio=0.02)                                 # one candidate
    outcomes = set()
    for step in range(20):
        selection = select_patches(images, tokens, PATCH, cfg, 0.0, pgs_generator(0, step, 0))
        count = int(selection.counts[0])
        if count == 24:
            assert torch.equal(selection.kept_mask()[0], ~copies)
        else:
            assert count == keep_bounds(L, 0.3, 0.1)[1]
        outcomes.add(count)
    assert outcomes == {24, 34}


def test_candidate_count_and_bad_shapes():
    assert num_candidates(0.05, 256) == 13 and num_candidates(0.05, 49) == 2 and num_candidates(0.001, 49) == 1
    with pytest.raises(ValueError, match="multiple of the patch size"):
        select_patches(torch.zeros(1, 3, 30, 30), torch.zeros(1, 49, 8), PATCH, PGSConfig(), 0.0,
                       pgs_generator(0, 0, 0))
    with pytest.raises(ValueError, match="do not match"):
        select_patches(torch.zeros(2, 3, 28, 28), torch.zeros(2, 48, 8), PATCH, PGSConfig(), 0.0,
                       pgs_generator(0, 0, 0))
    with pytest.raises(ValueError, match=">= 0"):
        pgs_generator(0, -1, 0)
