"""Evaluate a CLIP on held-out shards in clip_benchmark's webdataset layout: zero-shot top-1/top-5
and image <-> text retrieval recall@1/5/10, the same numbers in training and in tools/evaluate.py.

    <root>/classnames.txt, <root>/zeroshot_classification_templates.txt, <root>/test/*.tar
    (each sample: an image, `.cls` its class index, `.txt` its caption)

Images go through the towers unmasked. Several ranks share the work: each embeds its block of the
set's batches (`megapgs/data/eval_data.py`) and its block of the class prompts, the hit counts are
summed and the embeddings gathered in the set's order, so every rank ends with the numbers one
rank computes alone. Under ZeRO-3 a forward gathers parameters collectively, so every rank runs
the same number of forwards: a rank whose block ended runs one-sample forwards until all have.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

from megapgs.data.eval_data import EvalBatch, eval_units, iter_unit_batches, rank_units
from megapgs.data.faults import SkipCounter
from megapgs.dist import DistInfo, all_gather_varlen, all_reduce_sum, in_lockstep
from megapgs.evals.retrieval import recall_at_k
from megapgs.evals.zeroshot import class_embeddings, read_classnames_and_templates, topk_correct

log = logging.getLogger(__name__)


def eval_shards(root: Path) -> list[str]:
    shards = sorted(str(p) for p in (Path(root) / "test").glob("*.tar"))
    if not shards:
        raise FileNotFoundError(f"no test/*.tar shards under {root} (clip_benchmark's webdataset layout)")
    return shards


def one_rank(device: torch.device) -> DistInfo:
    return DistInfo(rank=0, world_size=1, local_rank=0, device=device)


def evaluate(model, root: Path, tokenizer, *, image_size: int, batch_size: int, device: torch.device,
             zeroshot: bool = True, retrieval: bool = True, max_samples: int | None = None,
             dist: DistInfo | None = None, workers: int = 0) -> dict[str, float]:
    """Metrics of held-out shards in clip_benchmark's webdataset layout under `root`, shared by the
    ranks of `dist` (see `evaluate_batches`). Class names and templates come from the same root."""
    dist = dist or one_rank(device)
    classnames, templates = read_classnames_and_templates(root) if zeroshot else (None, None)
    units = rank_units(eval_units(eval_shards(root), batch_size, max_samples), dist.rank, dist.world_size)
    skips = SkipCounter()
    batches = iter_unit_batches(units, image_size=image_size, workers=workers, skips=skips)
    metrics = evaluate_batches(model, batches, tokenizer, device=device, classnames=classnames,
                               templates=templates, retrieval=retrieval, source=root, dist=dist,
                               image_size=image_size, prompt_batch_size=batch_size)
    skipped = int(all_reduce_sum(torch.tensor([skips.total]), dist).cpu()[0])
    if skipped:
        metrics["eval_skipped"] = float(skipped)
    return metrics


@torch.no_grad()
def evaluate_batches(model, batches: Iterable[EvalBatch | None], tokenizer, *, device: torch.device,
                     classnames: Sequence[str] | None, templates: Sequence[str] | None, retrieval: bool,
                     max_samples: int | None = None, source: object = "the evaluation data",
                     dist: DistInfo | None = None, image_size: int | None = None,
                     prompt_batch_size: int = 512) -> dict[str, float]:
    """Metrics as {name: value}: zeroshot_top1/top5 (percent; when class names are given),
    image_to_text_R@k and text_to_image_R@k (percent; when `retrieval`: each line of a sample's
    caption is one of its captions, as in clip_benchmark's retrieval sets), eval_samples and
    eval_seconds. `model` has encode_image(images) and encode_text(tokens, lengths), returning
    unit-norm embeddings; `batches` yields this rank's (images, labels, captions, keys) in the set's
    order, or None for a batch with no readable sample. `max_samples` cuts one rank's stream (shared
    sets are cut before they are dealt: `eval_units`); several ranks need `image_size`."""
    started = time.perf_counter()
    dist = dist or one_rank(device)
    if dist.world_size > 1 and (image_size is None or max_samples is not None):
        raise ValueError("evaluation shared by ranks needs image_size, and takes max_samples through eval_units")
    was_training = model.training
    model.eval()
    dtype = next(model.parameters()).dtype

    def encode_text(captions: list[str]) -> torch.Tensor:
        tokens, lengths = tokenizer(captions)
        return model.encode_text(tokens.to(device), lengths)

    def idle_forward() -> int:
        """A one-sample forward (this rank's part ended; the others' ZeRO-3 gathers need it): the width."""
        width = model.encode_image(torch.zeros(1, 3, image_size, image_size, device=device, dtype=dtype)).shape[1]
        if retrieval:
            encode_text([""])
        return width

    classes = None
    if classnames is not None:
        classes = class_embeddings(encode_text, classnames, templates, dist, prompt_batch_size)
    correct = torch.zeros(3, dtype=torch.int64)  # top-1 hits, top-5 hits, images
    image_parts, text_parts, text_owner = [], [], []  # owner: the image (this rank's count) of each caption
    width = classes.shape[1] if classes is not None else None
    for batch in in_lockstep(batches, dist):
        if max_samples is not None and int(correct[2]) >= max_samples:
            break  # one rank (checked above): stop reading
        if batch is None:
            if dist.world_size > 1:
                width = idle_forward()
            continue
        images, labels, captions, _ = batch
        if max_samples is not None:
            keep = max_samples - int(correct[2])
            images, labels, captions = images[:keep], labels[:keep], captions[:keep]
        image_emb = model.encode_image(images.to(device, dtype))
        width = image_emb.shape[1]
        correct[2] += image_emb.shape[0]
        if classes is not None:
            hits = topk_correct(image_emb, classes, labels)
            correct[0] += hits[1]
            correct[1] += hits[5]
        if retrieval:
            lines = [[line for line in caption.splitlines() if line.strip()] for caption in captions]
            text_owner += [int(correct[2]) - len(lines) + i for i, own in enumerate(lines) for _ in own]
            image_parts.append(image_emb.float())
            if any(lines):
                text_parts.append(encode_text([line for own in lines for line in own]).float())
            elif dist.world_size > 1:
                encode_text([""])  # the other ranks embed captions here: their ZeRO-3 gathers need this one
    correct = all_reduce_sum(correct, dist).cpu()
    seen = int(correct[2])
    if seen == 0:
        raise RuntimeError(f"no evaluation samples could be read from {source}")
    metrics: dict[str, float] = {"eval_samples": float(seen)}
    if classes is not None:
        metrics["zeroshot_top1"] = 100.0 * int(correct[0]) / seen
        metrics["zeroshot_top5"] = 100.0 * int(correct[1]) / seen
    if retrieval:
        images = all_gather_varlen(_rows(image_parts, width, device), dist).cpu()
        texts = all_gather_varlen(_rows(text_parts, width, device), dist).cpu()
        per_rank = all_gather_varlen(torch.tensor([sum(p.shape[0] for p in image_parts)]), dist).cpu()
        offset = int(per_rank[:dist.rank].sum())  # this rank's first image in the gathered order
        owner = all_gather_varlen(torch.tensor(text_owner, dtype=torch.int64) + offset, dist).cpu()
        recalls = recall_at_k(F.normalize(images, dim=1), F.normalize(texts, dim=1), owner)
        metrics.update({name: 100.0 * value for name, value in recalls.items()})
    metrics["eval_seconds"] = time.perf_counter() - started
    model.train(was_training)
    return metrics


def _rows(parts: list[torch.Tensor], width: int, device) -> torch.Tensor:
    return torch.cat(parts) if parts else torch.zeros(0, width, device=device)

