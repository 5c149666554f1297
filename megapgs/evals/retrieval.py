"""Image <-> text retrieval recall@k over paired samples (caption i belongs to image i)."""
from __future__ import annotations

from typing import Sequence

import torch


def recall_at_k(image_NE: torch.Tensor, text_NE: torch.Tensor, ks: Sequence[int] = (1, 5, 10),
                chunk: int = 4096) -> dict[str, float]:
    """{'image_to_text_R@k', 'text_to_image_R@k'}: share of queries whose own pair ranks in the
    top k, computed in chunks of queries so memory stays O(chunk x N)."""
    if image_NE.shape != text_NE.shape:
        raise ValueError(f"need paired embeddings, got {tuple(image_NE.shape)} and {tuple(text_NE.shape)}")
    results = {}
    for name, queries, keys in (("image_to_text", image_NE, text_NE), ("text_to_image", text_NE, image_NE)):
        hits = {k: 0 for k in ks}
        for start in range(0, queries.shape[0], chunk):
            scores = queries[start:start + chunk].float() @ keys.float().t()          # (q, N)
            own = scores[torch.arange(scores.shape[0]), torch.arange(start, start + scores.shape[0])]
            rank = (scores > own[:, None]).sum(dim=1)                                 # 0 = best
            for k in ks:
                hits[k] += int((rank < k).sum())
        for k in ks:
            results[f"{name}_R@{k}"] = hits[k] / queries.shape[0]
    return results
