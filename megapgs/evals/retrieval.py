"""Image <-> text retrieval recall@k, as clip_benchmark counts it: an image may have several
captions; image->text R@k is the share of images with at least one of their captions among the k
texts most similar to them, text->image R@k the share of captions whose image is among the k
images most similar to them."""
from __future__ import annotations

from typing import Sequence

import torch


def recall_at_k(image_NE: torch.Tensor, text_ME: torch.Tensor, text_image_M: torch.Tensor | None = None,
                ks: Sequence[int] = (1, 5, 10), chunk: int = 4096) -> dict[str, float]:
    """{'image_to_text_R@k', 'text_to_image_R@k'}; `text_image_M[m]` is the image caption m belongs
    to (default: caption i belongs to image i). Queries go in chunks, so memory stays O(chunk x N).
    A query's rank is the number of candidates scoring strictly higher than its best own one."""
    if text_image_M is None:
        if image_NE.shape != text_ME.shape:
            raise ValueError(f"need paired embeddings, got {tuple(image_NE.shape)} and {tuple(text_ME.shape)}")
        text_image_M = torch.arange(text_ME.shape[0])
    text_image_M = text_image_M.to(torch.int64).cpu()
    if text_image_M.shape != (text_ME.shape[0],) or (text_image_M.numel() and (
            int(text_image_M.min()) < 0 or int(text_image_M.max()) >= image_NE.shape[0])):
        raise ValueError("text_image_M must name an image, by index, for every caption")
    images, texts = image_NE.float(), text_ME.float()
    results = {}
    # text -> image: the one own image of each caption
    hits = dict.fromkeys(ks, 0)
    for start in range(0, texts.shape[0], chunk):
        scores = texts[start:start + chunk] @ images.t()                                 # (q, N)
        own = scores.gather(1, text_image_M[start:start + chunk, None].to(scores.device))  # (q, 1)
        rank = (scores > own).sum(dim=1)
        for k in ks:
            hits[k] += int((rank < k).sum())
    to_image = {f"text_to_image_R@{k}": hits[k] / max(texts.shape[0], 1) for k in ks}
    # image -> text: the best-scoring of each image's captions
    hits = dict.fromkeys(ks, 0)
    for start in range(0, images.shape[0], chunk):
        scores = images[start:start + chunk] @ texts.t()                                 # (q, M)
        mine = text_image_M[None, :].to(scores.device) == torch.arange(start, start + scores.shape[0],
                                                                       device=scores.device)[:, None]
        best_own = scores.masked_fill(~mine, float("-inf")).amax(dim=1, keepdim=True)  # -inf: no caption
        rank = (scores > best_own).sum(dim=1)
        for k in ks:
            hits[k] += int((mine.any(dim=1) & (rank < k)).sum())
    results.update({f"image_to_text_R@{k}": hits[k] / max(images.shape[0], 1) for k in ks})
    return {**results, **to_image}
