"""Zero-shot classification: class embeddings from names x templates, accuracy of the nearest.

The recipe is CLIP's and clip_benchmark's: for each class, embed every template filled with the
class name, average the unit-norm embeddings, renormalise; an image's prediction is the class
with the highest cosine similarity.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

EncodeText = Callable[[list[str]], torch.Tensor]  # captions -> (N, E) unit-norm embeddings


def class_embeddings(encode_text: EncodeText, classnames: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """(C, E) unit-norm: the mean over templates of each class's embeddings, renormalised."""
    if not classnames or not templates:
        raise ValueError("zero-shot classification needs class names and templates")
    rows = []
    for name in classnames:
        texts = [template.replace("{c}", name) for template in templates]
        rows.append(F.normalize(encode_text(texts).float().mean(dim=0), dim=0))
    return torch.stack(rows)


def topk_correct(image_BE: torch.Tensor, classes_CE: torch.Tensor, labels_B: torch.Tensor,
                 ks: Sequence[int] = (1, 5)) -> dict[int, int]:
    """How many of the images have their label among the k most similar classes, per k."""
    scores = image_BE.float() @ classes_CE.t()                                     # (B, C)
    top = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices                # (B, k)
    hits = top == labels_B[:, None].to(top.device)
    return {k: int(hits[:, :k].any(dim=1).sum()) for k in ks}


def read_classnames_and_templates(root) -> tuple[list[str], list[str]]:
    """clip_benchmark's webdataset layout: classnames.txt and zeroshot_classification_templates.txt."""
    from pathlib import Path

    root = Path(root)
    names = [line.strip() for line in (root / "classnames.txt").read_text().splitlines() if line.strip()]
    templates = [line.strip() for line in (root / "zeroshot_classification_templates.txt").read_text().splitlines()
                 if line.strip()]
    return names, templates
