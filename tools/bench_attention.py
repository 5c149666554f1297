"""Time attention back-ends on packed ragged batches: forward + backward, median of N runs.

    python tools/bench_attention.py                       # CUDA if present: ViT-L/14 shapes, bf16
    python tools/bench_attention.py --device cpu --preset tiny

Two timings per back-end: the attention call alone, and a whole image tower (all blocks) on the
same packed tokens. Prints one line per back-end and the ratio to sdpa_padded (the padded path).
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from megapgs.models.archs import get_arch  # noqa: E402
from megapgs.models.attention import BACKENDS, attention, refused_backend_reason, unavailable_reason  # noqa: E402
from megapgs.models.blocks import Transformer  # noqa: E402
from megapgs.packed import Packed  # noqa: E402
from megapgs.perf.timers import device_label, median_ms  # noqa: E402

PRESETS = {  # arch, batch, (low, high) kept patches per image (+ CLS)
    "vitl": ("ViT-L-14", 128, (100, 158)),  # PGS-0.5 keeps k_i <= 128 of 256; ~129 tokens with CLS
    "tiny": ("tiny-28", 128, (5, 34)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", choices=PRESETS, default=None, help="default: vitl on CUDA, tiny on CPU")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    device = torch.device(args.device)
    preset = args.preset or ("vitl" if device.type == "cuda" else "tiny")
    arch, batch, (low, high) = PRESETS[preset]
    spec = get_arch(arch).vision
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator().manual_seed(args.seed)
    lengths = (torch.randint(low, high + 1, (batch,), generator=gen) + 1).tolist()  # + CLS
    packed = Packed.from_lengths(lengths, device=device)
    head_dim = spec.width // spec.heads
    qkv = [torch.randn(packed.total_tokens, spec.heads, head_dim, device=device, dtype=dtype, requires_grad=True)
           for _ in range(3)]
    tower = Transformer(spec.width, spec.layers, spec.heads, spec.mlp_width, causal=False).to(device, dtype)
    x = torch.randn(packed.total_tokens, spec.width, device=device, dtype=dtype, requires_grad=True)
    print(f"# {device_label(device)}, {dtype}, "
          f"{arch} shapes: B={batch}, tokens per image {min(lengths)}..{max(lengths)} "
          f"(mean {sum(lengths) / batch:.1f}), T={packed.total_tokens}, H={spec.heads}, Dh={head_dim}, "
          f"{spec.layers} blocks; median of {args.repeats}")
    results = {}
    for name in BACKENDS:
        if name == "reference" and device.type == "cuda":
            continue  # a Python loop over sequences: not a contender
        reason = unavailable_reason(name, device, dtype, training=True) or refused_backend_reason(name, device, True)
        if reason:
            print(f"{name:>12}: skipped ({reason})")
            continue

        def attn_step():
            out = attention(*qkv, packed, False, name)
            out.float().square().mean().backward()

        def tower_step():
            tower.backend = name
            tower(x, packed).float().square().mean().backward()

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            results[name] = (median_ms(attn_step, device, args.repeats), median_ms(tower_step, device, args.repeats))
    base = results.get("sdpa_padded")
    for name, (attn_ms, tower_ms) in results.items():
        ratio = f"  (x{base[0] / attn_ms:.2f} / x{base[1] / tower_ms:.2f} vs sdpa_padded)" if base else ""
        print(f"{name:>12}: attention fwd+bwd {attn_ms:9.2f} ms   tower fwd+bwd {tower_ms:9.2f} ms{ratio}")


if __name__ == "__main__":
    main()
