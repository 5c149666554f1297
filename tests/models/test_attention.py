"""Every attention back-end available here computes the reference's function: forward and gradients."""
import logging
import warnings

import pytest
import torch

from megapgs.models.attention import BACKENDS, attention, resolve_backend, unavailable_reason
from megapgs.models.blocks import Block
from megapgs.packed import Packed

CPU = torch.device("cpu")
LAYOUTS = {
    "ragged": [5, 1, 17, 9, 33],          # includes a single-token sequence
    "one full": [33],                     # max_seqlen = the whole length
    "uniform": [12, 12, 12],              # the plain-batch fast path of sdpa_padded
    "single tokens": [1, 1, 1],
}
FORWARD_BACKENDS = [b for b in BACKENDS if b != "reference" and unavailable_reason(b, CPU, torch.float32, False) is None]
BACKWARD_BACKENDS = [b for b in BACKENDS if b != "reference" and unavailable_reason(b, CPU, torch.float32, True) is None]


def rel_err(actual, expected):
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def _qkv(lengths, heads=3, head_dim=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    packed = Packed.from_lengths(lengths)
    return [torch.randn(packed.total_tokens, heads, head_dim, generator=gen) for _ in range(3)], packed


def test_cpu_has_the_backends_the_issue_names():
    assert {"sdpa_padded", "flex"} <= set(FORWARD_BACKENDS) and "sdpa_padded" in BACKWARD_BACKENDS


@pytest.mark.parametrize("backend", FORWARD_BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("causal", [False, True])
def test_forward_matches_reference(backend, layout, causal):
    (q, k, v), packed = _qkv(LAYOUTS[layout])
    expected = attention(q, k, v, packed, causal, "reference")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FlexAttention's eager-mode notice on CPU
        actual = attention(q, k, v, packed, causal, backend)
    assert actual.shape == expected.shape
    assert rel_err(actual, expected) <= 1e-5


def test_reference_never_mixes_sequences():
    (q, k, v), packed = _qkv([4, 6])
    out = attention(q, k, v, packed, False, "reference")
    v2 = v.clone()
    v2[4:] += 100.0  # change only the second sequence's values
    out2 = attention(q, k, v2, packed, False, "reference")
    torch.testing.assert_close(out[:4], out2[:4], rtol=0, atol=0)
    # and a one-token sequence attends to itself alone
    (q, k, v), packed = _qkv([1, 5])
    torch.testing.assert_close(attention(q, k, v, packed, False, "reference")[0], v[0])


@pytest.mark.parametrize("backend", BACKWARD_BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("causal", [False, True])
def test_block_forward_and_gradients_match_reference(backend, layout, causal):
    """A whole block (parameter and input gradients), fp32 on CPU: rel. error <= 1e-5."""
    torch.manual_seed(0)
    block = Block(width=24, heads=3, mlp_width=96)
    packed = Packed.from_lengths(LAYOUTS[layout])
    x = torch.randn(packed.total_tokens, 24)
    grads = {}
    for name in ("reference", backend):
        block.zero_grad()
        x_in = x.clone().requires_grad_()
        out = block(x_in, packed, causal, name)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads[name] = (out.detach(), x_in.grad, {n: p.grad.clone() for n, p in block.named_parameters()})
    ref_out, ref_dx, ref_dp = grads["reference"]
    out, dx, dp = grads[backend]
    assert rel_err(out, ref_out) <= 1e-5
    assert rel_err(dx, ref_dx) <= 1e-5
    for name in ref_dp:
        assert rel_err(dp[name], ref_dp[name]) <= 1e-5, name


def test_auto_on_cpu_is_sdpa_padded():
    assert resolve_backend("auto", CPU, torch.float32) == "sdpa_padded"


@pytest.mark.parametrize("requested", ["torch_varlen", "flash_attn", "xformers"])
def test_missing_backend_falls_back_with_one_line(requested, caplog):
    with caplog.at_level(logging.WARNING):
        chosen = resolve_backend(requested, CPU, torch.float32)
    assert chosen == "sdpa_padded"
    lines = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(lines) == 1 and requested in lines[0].getMessage()


def test_flex_is_kept_for_inference_but_not_for_training_on_cpu():
    assert resolve_backend("flex", CPU, torch.float32, training=False) == "flex"
    assert resolve_backend("flex", CPU, torch.float32, training=True) == "sdpa_padded"


def test_unknown_backend_is_an_error():
    with pytest.raises(ValueError, match="unknown attention back-end"):
        resolve_backend("flash3", CPU, torch.float32)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["torch_varlen", "flash_attn", "xformers", "flex", "sdpa_padded"])
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_backends_bf16(backend, causal):
    cuda = torch.device("cuda")
    if unavailable_reason(backend, cuda, torch.bfloat16, True):
        pytest.skip(unavailable_reason(backend, cuda, torch.bfloat16, True))
    torch.manual_seed(0)
    block = Block(width=128, heads=2, mlp_width=512).to(cuda)
    packed = Packed.from_lengths([130, 1, 129, 77, 257], device=cuda)
    x = torch.randn(packed.total_tokens, 128, device=cuda)
    results = {}
    for name, dtype in (("reference", torch.float32), (backend, torch.bfloat16)):
        block.zero_grad()
        x_in = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            out = block(x_in, packed, causal, name)
        out.float().square().mean().backward()
        results[name] = (out.float(), x_in.grad, [p.grad for p in block.parameters()])
    (ref, ref_dx, ref_dp), (out, dx, dp) = results["reference"], results[backend]
    assert rel_err(out, ref) <= 2e-2 and rel_err(dx, ref_dx) <= 2e-2
    assert all(rel_err(a, b) <= 2e-2 for a, b in zip(dp, ref_dp))


def test_flex_is_refused_not_replaced_for_cuda_training():
    with pytest.raises(ValueError, match="refused for CUDA training"):
        resolve_backend("flex", torch.device("cuda"), torch.bfloat16, training=True)
