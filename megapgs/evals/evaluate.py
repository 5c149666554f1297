"""Evaluate a CLIP on held-out shards in clip_benchmark's webdataset layout: zero-shot top-1/top-5
and image <-> text retrieval recall@1/5/10, the same numbers in training and in tools/evaluate.py.

    <root>/classnames.txt, <root>/zeroshot_classification_templates.txt, <root>/test/*.tar
    (each sample: an image, `.cls` its class index, `.txt` its caption)

Images go through the towers unmasked. Under ZeRO-3 every rank runs the same batches (forward
gathers parameters collectively); the numbers are identical on all ranks.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

from megapgs.data.eval_data import EvalBatch, iter_eval_batches
from megapgs.evals.retrieval import recall_at_k
from megapgs.evals.zeroshot import class_embeddings, read_classnames_and_templates, topk_correct

log = logging.getLogger(__name__)


def eval_shards(root: Path) -> list[str]:
    shards = sorted(str(p) for p in (Path(root) / "test").glob("*.tar"))
    if not shards:
        raise FileNotFoundError(f"no test/*.tar shards under {root} (clip_benchmark's webdataset layout)")
    return shards


def evaluate(model, root: Path, tokenizer, *, image_size: int, batch_size: int, device: torch.device,
             zeroshot: bool = True, retrieval: bool = True, max_samples: int | None = None) -> dict[str, float]:
    """Metrics of held-out shards in clip_benchmark's webdataset layout under `root`: see
    `evaluate_batches`. Class names and templates come from the same root."""
    classnames, templates = read_classnames_and_templates(root) if zeroshot else (None, None)
    batches = iter_eval_batches(eval_shards(root), image_size=image_size, batch_size=batch_size)
    return evaluate_batches(model, batches, tokenizer, device=device, classnames=classnames, templates=templates,
                            retrieval=retrieval, max_samples=max_samples, source=root)


@torch.no_grad()
def evaluate_batches(model, batches: Iterable[EvalBatch], tokenizer, *, device: torch.device,
                     classnames: Sequence[str] | None, templates: Sequence[str] | None, retrieval: bool,
                     max_samples: int | None = None, source: object = "the evaluation data") -> dict[str, float]:
    """Metrics as {name: value}: zeroshot_top1/top5 (percent; when class names are given),
    image_to_text_R@k and text_to_image_R@k (percent; when `retrieval`), eval_samples and
    eval_seconds. `model` has encode_image(images) and encode_text(tokens, lengths), returning
    unit-norm embeddings; `batches` yields (images, labels, captions, keys)."""
    started = time.perf_counter()
    was_training = model.training
    model.eval()
    dtype = next(model.parameters()).dtype

    def encode_text(captions: list[str]) -> torch.Tensor:
        tokens, lengths = tokenizer(captions)
        return model.encode_text(tokens.to(device), lengths)

    classes = class_embeddings(encode_text, classnames, templates) if classnames is not None else None
    correct = {1: 0, 5: 0}
    image_parts, text_parts, seen = [], [], 0
    for images, labels, captions, _ in batches:
        if max_samples is not None and seen >= max_samples:
            break
        if max_samples is not None:
            keep = max_samples - seen
            images, labels, captions = images[:keep], labels[:keep], captions[:keep]
        image_emb = model.encode_image(images.to(device, dtype))
        seen += image_emb.shape[0]
        if classes is not None:
            for k, hits in topk_correct(image_emb, classes, labels).items():
                correct[k] += hits
        if retrieval:
            image_parts.append(image_emb.float().cpu())
            text_parts.append(encode_text(list(captions)).float().cpu())
    if seen == 0:
        raise RuntimeError(f"no evaluation samples could be read from {source}")
    metrics: dict[str, float] = {"eval_samples": float(seen)}
    if classes is not None:
        metrics["zeroshot_top1"] = 100.0 * correct[1] / seen
        metrics["zeroshot_top5"] = 100.0 * correct[5] / seen
    if retrieval:
        recalls = recall_at_k(F.normalize(torch.cat(image_parts), dim=1), F.normalize(torch.cat(text_parts), dim=1))
        metrics.update({name: 100.0 * value for name, value in recalls.items()})
    metrics["eval_seconds"] = time.perf_counter() - started
    model.train(was_training)
    return metrics
