"""The blocks run under torch.compile with no graph break (fullgraph=True fails on any break)."""
import pytest
import torch

from megapgs.models.blocks import Block
from megapgs.packed import Packed


@pytest.mark.parametrize("causal", [False, True])
def test_block_compiles_without_graph_breaks_and_matches_eager(causal):
    torch._dynamo.reset()
    torch.manual_seed(0)
    block = Block(width=32, heads=2, mlp_width=64)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    for lengths in ([5, 1, 9], [7, 7], [3, 11, 2, 4]):  # ragged, uniform, and a new layout
        packed = Packed.from_lengths(lengths)
        x = torch.randn(packed.total_tokens, 32, requires_grad=True)
        eager_out = block(x, packed, causal, "sdpa_padded")
        (eager_dx,) = torch.autograd.grad(eager_out.square().sum(), x)
        out = compiled(x, packed, causal, "sdpa_padded")
        (dx,) = torch.autograd.grad(out.square().sum(), x)
        torch.testing.assert_close(out, eager_out, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(dx, eager_dx, rtol=1e-5, atol=1e-6)


def test_inductor_compiles_a_tiny_tower_block():
    """The real compiler (inductor, C++ on the CPU) on a block: forward and backward run and match."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    block = Block(width=32, heads=2, mlp_width=64)
    compiled = torch.compile(block, fullgraph=True)
    packed = Packed.from_lengths([5, 1, 9])
    x = torch.randn(packed.total_tokens, 32, requires_grad=True)
    out = compiled(x, packed, False, "sdpa_padded")
    out.sum().backward()
    torch.testing.assert_close(out, block(x, packed, False, "sdpa_padded"), rtol=1e-4, atol=1e-5)
