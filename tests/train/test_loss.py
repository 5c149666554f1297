"""The contrastive losses give the global batch's loss and gradient whatever the number of ranks."""
import math
import os
import socket

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
import torch.nn.functional as F

from megapgs.dist import DistInfo, process_group_backend
from megapgs.train.loss import ContrastiveLoss

B, E, WORLD = 4, 8, 2
ONE = DistInfo(0, 1, 0, torch.device("cpu"))


def features(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(WORLD * B, E, generator=gen, dtype=torch.float64), dim=1)
    text = F.normalize(torch.randn(WORLD * B, E, generator=gen, dtype=torch.float64), dim=1)
    return image, text


def one_process(kind: str):
    """Loss and gradients of one process holding the global batch."""
    image, text = (t.clone().requires_grad_(True) for t in features())
    scale = torch.tensor(math.log(10.0), dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-10.0, dtype=torch.float64, requires_grad=True) if kind == "siglip" else None
    result = ContrastiveLoss(kind, False, False, ONE)(image, text, scale.exp(), bias)
    result.objective.backward()
    grads = [image.grad, text.grad, scale.grad] + ([bias.grad] if bias is not None else [])
    return float(result.loss), grads


def _worker(rank: int, port: int, kind: str, local_loss: bool, gather_with_grad: bool, out: dict):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    tdist.init_process_group(process_group_backend(torch.device("cpu")), rank=rank, world_size=WORLD)  # as runs do
    try:
        image, text = features()
        image = image[rank * B:(rank + 1) * B].clone().requires_grad_(True)
        text = text[rank * B:(rank + 1) * B].clone().requires_grad_(True)
        scale = torch.tensor(math.log(10.0), dtype=torch.float64, requires_grad=True)
        bias = torch.tensor(-10.0, dtype=torch.float64, requires_grad=True) if kind == "siglip" else None
        dist = DistInfo(rank, WORLD, rank, torch.device("cpu"))
        result = ContrastiveLoss(kind, local_loss, gather_with_grad, dist)(image, text, scale.exp(), bias)
        result.objective.backward()
        # what DeepSpeed does with parameter gradients: average them over ranks
        shared = [scale.grad.clone()] + ([bias.grad.clone()] if bias is not None else [])
        for grad in shared:
            tdist.all_reduce(grad)
            grad /= WORLD
        # a rank's features belong to its own parameters: averaging makes their gradient 1/W of it
        out[rank] = (float(result.loss), image.grad / WORLD, text.grad / WORLD, shared)
    finally:
        tdist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.multiprocess
@pytest.mark.parametrize("kind,local_loss,gather_with_grad", [
    ("clip", False, False),   # OpenCLIP's default
    ("clip", False, True),
    ("clip", True, True),
    ("siglip", False, False),
])
def test_two_ranks_equal_one_process(kind, local_loss, gather_with_grad):
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        out = manager.dict()
        mp.start_processes(_worker, args=(free_port(), kind, local_loss, gather_with_grad, out), nprocs=WORLD,
                           start_method="spawn")
        results = dict(out)
    loss, grads = one_process(kind)
    image_grad = torch.cat([results[r][1] for r in range(WORLD)]) * WORLD
    text_grad = torch.cat([results[r][2] for r in range(WORLD)]) * WORLD
    for rank in range(WORLD):
        assert results[rank][0] == pytest.approx(loss, rel=1e-12)
        for ours, expected in zip(results[rank][3], grads[2:]):
            torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-12)
    # per-sample feature gradients, as the rank-averaged parameter gradient sees them
    torch.testing.assert_close(image_grad / WORLD, grads[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(text_grad / WORLD, grads[1], rtol=1e-10, atol=1e-12)


def test_one_rank_losses():
    image, text = features()
    scale = torch.tensor(10.0, dtype=torch.float64)
    logits = scale * image @ text.t()
    labels = torch.arange(WORLD * B)
    expected = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
    assert float(ContrastiveLoss("clip", False, False, ONE)(image, text, scale).loss) == pytest.approx(float(expected))
    bias = torch.tensor(-10.0, dtype=torch.float64)
    signs = 2 * torch.eye(WORLD * B, dtype=torch.float64) - 1
    expected_sig = -F.logsigmoid(signs * (logits + bias)).sum() / (WORLD * B)
    assert float(ContrastiveLoss("siglip", False, False, ONE)(image, text, scale, bias).loss) == \
        pytest.approx(float(expected_sig))
    with pytest.raises(ValueError, match="logit_bias"):
        ContrastiveLoss("siglip", False, False, ONE)(image, text, scale)
    with pytest.raises(ValueError, match="gather_with_grad"):
        ContrastiveLoss("clip", True, False, DistInfo(0, 2, 0, torch.device("cpu")))
