"""Cost of importance scoring vs a plain forward over the same calibration data, side by side.

Builds a Llama teacher of the demo's size (random weights: cost does not depend on them) and times,
on the same N calibration sequences: a plain no-grad forward; the activation pass with every
importance hook (heads, groups, MLP, hidden channels, block BI); and the whole `compute_importance`
(which adds the held-out LM loss with each layer removed, on V validation sequences).

    python -m benchmarks.importance_cost [--samples 256] [--seq-len 128] [--val 32]
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks import _smoke as smoke  # noqa: E402  # --smoke
from nas.evaluate.loss import lm_loss
from nas.prune.activations import activation_scores
from nas.prune.importance import compute_importance
from nas.testing import tiny_model


def timed(fn, repeats: int = 3) -> float:
    """Best of `repeats` wall times (the least disturbed by other work on the machine)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


@torch.no_grad()
def plain_forward(model, calib: torch.Tensor, batch_size: int) -> None:
    for start in range(0, len(calib), batch_size):
        model.model(input_ids=calib[start : start + batch_size], use_cache=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--val", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    args = smoke.parse(parser, samples=8, seq_len=16, val=4, batch_size=4)
    model = tiny_model(
        "llama",
        vocab_size=4096,
        hidden_size=256,
        ffn_hidden_size=768,
        num_layers=8,
        num_attention_heads=8,
        num_query_groups=4,
        head_dim=32,
        tie_word_embeddings=True,
    )
    g = torch.Generator().manual_seed(0)
    calib = torch.randint(0, 4096, (args.samples, args.seq_len), generator=g)
    val = torch.randint(0, 4096, (args.val, args.seq_len), generator=g)
    plain_forward(model, calib[: args.batch_size], args.batch_size)  # warm-up
    plain = timed(lambda: plain_forward(model, calib, args.batch_size))
    hooks = timed(lambda: activation_scores(model, calib, args.batch_size))
    one_val = timed(lambda: lm_loss(model, val, args.batch_size))
    total = timed(lambda: compute_importance(model, calib, val, args.batch_size))
    params = sum(p.numel() for p in model.parameters())
    print(
        f"teacher: {params / 1e6:.1f}M params, 8 layers; {args.samples} x {args.seq_len} calibration tokens"
    )
    print(f"plain forward over calibration:       {plain:6.2f} s")
    print(f"activation pass with importance hooks: {hooks:6.2f} s   ratio {hooks / plain:.2f}x")
    print(
        f"compute_importance (+ layer-drop loss on {args.val} val seqs, {one_val:.2f} s per pass): "
        f"{total:6.2f} s   ratio {total / plain:.2f}x"
    )


if __name__ == "__main__":
    main()
