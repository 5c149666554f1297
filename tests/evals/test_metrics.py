import torch
import torch.nn.functional as F

from megapgs.evals.retrieval import recall_at_k
from megapgs.evals.zeroshot import class_embeddings, topk_correct


def test_class_embeddings_average_templates_and_renormalise():
    table = {"a photo of a cat.": [1.0, 0.0], "a picture of a cat.": [0.0, 1.0],
             "a photo of a dog.": [-1.0, 0.0], "a picture of a dog.": [-1.0, 0.0]}
    classes = class_embeddings(lambda texts: torch.tensor([table[t] for t in texts]), ["cat", "dog"],
                               ["a photo of a {c}.", "a picture of a {c}."])
    torch.testing.assert_close(classes, torch.tensor([[2**-0.5, 2**-0.5], [-1.0, 0.0]]))


def test_topk_counts():
    classes = torch.eye(3)
    images = torch.tensor([[1.0, 0.5, 0.0], [0.0, 0.2, 1.0], [0.9, 1.0, 0.0]])
    assert topk_correct(images, classes, torch.tensor([0, 1, 0]), ks=(1, 2)) == {1: 1, 2: 3}


def test_recall_at_k_against_a_brute_force_ranking():
    gen = torch.Generator().manual_seed(0)
    images = F.normalize(torch.randn(50, 8, generator=gen), dim=1)
    texts = F.normalize(images + 0.8 * torch.randn(50, 8, generator=gen), dim=1)
    ours = recall_at_k(images, texts, ks=(1, 5), chunk=7)
    scores = images @ texts.t()
    for name, mat in (("image_to_text", scores), ("text_to_image", scores.t())):
        order = mat.argsort(dim=1, descending=True)
        position = (order == torch.arange(50)[:, None]).float().argmax(dim=1)
        for k in (1, 5):
            assert ours[f"{name}_R@{k}"] == int((position < k).sum()) / 50
    assert 0 < ours["image_to_text_R@1"] < 1


def test_recall_with_several_captions_per_image_against_a_brute_force_ranking():
    """clip_benchmark's counting: an image is a hit at k when any of its captions is in its top k."""
    gen = torch.Generator().manual_seed(1)
    owner = torch.tensor([0, 0, 1, 2, 2, 2, 4, 5, 5, 6, 7, 8, 9, 9, 10, 11])  # image 3 has no caption
    images = F.normalize(torch.randn(12, 8, generator=gen), dim=1)
    texts = F.normalize(images[owner] + 0.9 * torch.randn(len(owner), 8, generator=gen), dim=1)
    ours = recall_at_k(images, texts, owner, ks=(1, 3), chunk=5)
    scores = images @ texts.t()                                                 # (images, texts)
    for k in (1, 3):
        top_texts = scores.topk(k, dim=1).indices
        image_hits = sum(bool((owner[top_texts[i]] == i).any()) for i in range(12))
        assert ours[f"image_to_text_R@{k}"] == image_hits / 12
        top_images = scores.t().topk(k, dim=1).indices
        text_hits = sum(bool((top_images[m] == owner[m]).any()) for m in range(len(owner)))
        assert ours[f"text_to_image_R@{k}"] == text_hits / len(owner)
    assert 0 < ours["image_to_text_R@1"] < ours["image_to_text_R@3"] < 1
