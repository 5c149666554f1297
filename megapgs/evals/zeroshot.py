"""Zero-shot classification: class embeddings from names x templates, accuracy of the nearest.

The recipe is CLIP's and clip_benchmark's: for each class, embed every template filled with the
class name, average the unit-norm embeddings, renormalise; an image's prediction is the class
with the highest cosine similarity. The prompts go through the text tower in batches, shared by
the ranks.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from megapgs.dist import DistInfo, all_gather_varlen, in_lockstep

EncodeText = Callable[[list[str]], torch.Tensor]  # captions -> (N, E) unit-norm embeddings


def class_embeddings(encode_text: EncodeText, classnames: Sequence[str], templates: Sequence[str],
                     dist: DistInfo | None = None, batch_size: int = 512) -> torch.Tensor:
    """(C, E) unit-norm zero-shot classifier, CLIP's recipe: each class's embeddings of every template
    averaged and renormalised. The C x T prompts go through the text tower in batches, each rank
    embedding its block of them."""
    if not classnames or not templates:
        raise ValueError("zero-shot classification needs class names and templates")
    dist = dist or DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    prompts = [template.replace("{c}", name) for name in classnames for template in templates]
    chunks = [prompts[i:i + batch_size] for i in range(0, len(prompts), batch_size)]
    mine = chunks[dist.rank * len(chunks) // dist.world_size:(dist.rank + 1) * len(chunks) // dist.world_size]
    rows, width, device = [], 0, "cpu"
    for chunk in in_lockstep(mine, dist):
        embedded = encode_text(chunk if chunk is not None else [""])  # [""]: the others' ZeRO-3 gathers need it
        width, device = embedded.shape[1], embedded.device
        if chunk is not None:
            rows.append(embedded.float())
    embedded = all_gather_varlen(torch.cat(rows) if rows else torch.zeros(0, width, device=device), dist)
    per_class = embedded.view(len(classnames), len(templates), -1)
    return F.normalize(per_class.mean(dim=1), dim=1)


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
    for name in ("classnames.txt", "zeroshot_classification_templates.txt"):
        if not (root / name).is_file():
            raise FileNotFoundError(f"{root} has no {name}, which zero-shot classification needs (a retrieval "
                                    "set has none: evaluate it for retrieval alone)")
    names = [line.strip() for line in (root / "classnames.txt").read_text().splitlines() if line.strip()]
    templates = [line.strip() for line in (root / "zeroshot_classification_templates.txt").read_text().splitlines()
                 if line.strip()]
    return names, templates
