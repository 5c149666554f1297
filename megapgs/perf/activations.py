"""Bytes a training step keeps for backward, counted per tensor from what megapgs's towers save.

The pre-LN block (models/blocks.py) on packed (T, D) rows saves, for its backward:

    ln_1: its input x (T, D) and fp32 mean, rstd (T)   in_proj: ln_1's output (T, D)
    attention: see below                               out_proj: the attention output (T, D)
    ln_2: its input x + attn (T, D), mean, rstd        c_fc: ln_2's output (T, D)
    GELU: c_fc's output (T, M)                         c_proj: GELU's output (T, M)

that is a·T·(5D + 2M) + 16·T bytes (a: the compute dtype's bytes; the block's output is the next
block's x). Attention adds what its back-end saves: a varlen kernel (torch_varlen, flash_attn,
xformers) keeps q, k, v as views of the in_proj output (3D a T) and its fp32 log-sum-exp (H T);
there is no T² term. `sdpa_padded` (any device; the CPU's) copies q, k, v into a (segments,
max_len) grid and SDPA (the CPU's flash kernel) keeps them and its output there: 4D a per grid
row, and the log-sum-exp per grid row and head.

With activation checkpointing (`model.grad_checkpointing`, torch.utils.checkpoint per block) a
block keeps only its input (a T D); backward recomputes one block at a time, so one block's full
set is live on top. Backward's working set is the gradients of the block being differentiated:
2 (T, M) + 2 (T, D) through the MLP, or the attention's gradients (its saved set again), whichever
is larger. The image tower also keeps the images (conv1's input) and ln_pre's input.

The logits are fp32 (train/loss.py widens the features): per direction the product, the scaled
logits, log_softmax's output and the gradient: 4 matrices of rows x columns; CLIP's loss has two
directions (image->text, text->image). Without `local_loss` every rank takes the whole square
(N x N, its transpose a view: 6 matrices). SigLIP: product, logits, signs, log-sigmoid, gradient.
"""
from __future__ import annotations

from dataclasses import dataclass

from megapgs.packed import Packed

LN_STATS_BYTES = 2 * 4  # LayerNorm's saved mean and rstd, fp32, per row


@dataclass(frozen=True)
class Stream:
    """The rows one tower's blocks see in a micro-batch."""
    tokens: int        # T: rows of the packed stream (a token budget's padding included)
    segments: int      # sequences (and padding segments) in it
    max_len: int       # the longest sequence: sdpa_padded's grid is segments x max_len

    @property
    def grid_rows(self) -> int:
        return self.segments * self.max_len


@dataclass(frozen=True)
class TowerShape:
    width: int
    mlp_width: int
    heads: int
    layers: int


def attention_saved(shape: TowerShape, stream: Stream, a: int, varlen: bool) -> int:
    D, H = shape.width, shape.heads
    if varlen:
        return a * 3 * D * stream.tokens + 4 * H * stream.tokens
    return a * 4 * D * stream.grid_rows + 4 * H * stream.grid_rows


def block_saved(shape: TowerShape, stream: Stream, a: int, varlen: bool) -> int:
    """What one block keeps for backward when it is not checkpointed."""
    D, M, T = shape.width, shape.mlp_width, stream.tokens
    return a * T * (5 * D + 2 * M) + 2 * LN_STATS_BYTES * T + attention_saved(shape, stream, a, varlen)


def backward_working(shape: TowerShape, stream: Stream, a: int, varlen: bool) -> int:
    """The gradients live while one block is differentiated (beyond the saved activations)."""
    D, M, T = shape.width, shape.mlp_width, stream.tokens
    mlp = a * T * (2 * M + 2 * D)
    attn = attention_saved(shape, stream, a, varlen) + a * T * 4 * D  # grads of q, k, v (and the padded grid)
    return max(mlp, attn)


def tower_activations(shape: TowerShape, stream: Stream, a: int, varlen: bool, checkpointing: bool) -> int:
    """Saved activations of a tower's blocks, plus the recomputed block under checkpointing."""
    per_block = block_saved(shape, stream, a, varlen)
    if checkpointing:
        return shape.layers * a * stream.tokens * shape.width + per_block
    return shape.layers * per_block


def image_stream(batch: int, kept: tuple[int, int], num_patches: int, masking: str, unmasked_steps: bool,
                 static: bool) -> Stream:
    """The image tower's rows at their most: the unmasked steps' B (L + 1) when the run has any,
    else the kept tokens (k_max + 1 each; PGS on CUDA packs into its static budget)."""
    if masking == "none" or unmasked_steps:
        return Stream(batch * (num_patches + 1), batch, num_patches + 1)
    k_min, k_max = kept
    if masking == "pgs" and static:
        total, pads = Packed.budget_for(batch, k_min + 1, k_max + 1)
        return Stream(total, batch + pads, k_max + 1)
    return Stream(batch * (k_max + 1), batch, k_max + 1)


def text_stream(batch: int, context_length: int) -> Stream:
    """Captions packed up to their EOT: at most the context length each."""
    return Stream(batch * context_length, batch, context_length)


def logits_bytes(kind: str, local_loss: bool, rows: int, columns: int) -> int:
    """fp32 logits of the contrastive loss: `rows` of this rank against `columns` of the batch."""
    if kind == "siglip":
        return 5 * rows * columns * 4
    if local_loss or rows == columns:
        return 2 * 4 * rows * columns * 4
    return 6 * columns * columns * 4
