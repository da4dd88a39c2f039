"""KD step throughput and loss memory: nas's fused chunked KL vs the plain full-logits kl_div.

    python -m benchmarks.kd_throughput            # CPU default: < 3 minutes on 2 cores
    python -m benchmarks.kd_throughput --device cuda --hidden-size 1024 --num-layers 8 ...

Both variants train the same student (random init, same seed) against the same teacher on the same
random token batches for the same steps with the same AdamW; the first `--warmup` steps are not timed.
One training step is: student body forward, teacher body forward (no grad), the loss on the final
hidden states (this is where the variants differ), backward, optimizer step.

- fused: `nas.train.kd.kd_loss`, the LM heads applied `--chunk-tokens` rows at a time with analytic gradients;
- plain: `s = lm_head(h)`, `t = teacher_head(h_t)` over all tokens, then
  `kl_div(log_softmax(s), log_softmax(t), log_target=True)` and autograd.

Tokens/s is over the whole step: tokens per step / the median time of the timed steps (the median, so a
burst of another process on a shared machine does not decide the ratio). "Loss memory" is the peak memory of the loss's forward + backward
alone, above what was resident just before it (models, optimizer state, the bodies' activations):
- CUDA: `torch.cuda.max_memory_allocated()` minus `memory_allocated()` at the start of the loss.
- CPU: tracemalloc does not see torch's allocations, so each variant runs in a fresh subprocess and,
  before every loss, the kernel's peak-RSS counter is reset (`/proc/self/clear_refs` = 5); the loss
  memory is `VmHWM - VmRSS` (the high-water mark minus the resident size when the loss started), the
  max over the steps. The loss's big tensors (>= 64 MiB at the defaults) are above glibc's mmap
  threshold (at most 32 MiB), so they are returned to the kernel when freed and RSS tracks them; forcing
  every allocation >= 1 MiB through mmap (`MALLOC_MMAP_THRESHOLD_=1048576`) gave the same MiB figures,
  but it slows both variants by page faults, so it is not used for the timings. Where clear_refs is
  not available, the whole process's `ru_maxrss` minus the RSS before the first step is reported
  instead (an upper bound that also counts the bodies' activations; the output says which was used).
MFU (CUDA only) uses flops/token = 2 * N_teacher + 6 * N_student and the GPU's dense bf16 peak.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from benchmarks import _smoke as smoke  # noqa: E402  # --smoke
from nas.device import PEAK_BF16_TFLOPS  # noqa: E402,F401 (the datasheet peaks; gpu_acceptance reads them here)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--vocab-size", type=int, default=32768)
    p.add_argument("--hidden-size", type=int, default=128, help="teacher; the student has half")
    p.add_argument("--num-layers", type=int, default=4, help="teacher; the student has half")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--chunk-tokens", type=int, default=1024)
    p.add_argument("--steps", type=int, default=6, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant")
    p.add_argument("--variant", choices=["fused", "plain"], help=argparse.SUPPRESS)
    return smoke.parse(p, argv, vocab_size=512, hidden_size=32, num_layers=2, batch_size=1, seq_len=32,
                       chunk_tokens=32, steps=1, warmup=1)


def build(args, device):
    """The teacher, the smaller student (half width and depth) and the batches, all seeded."""
    from nas.testing import tiny_model

    h, layers = args.hidden_size, args.num_layers
    sizes = dict(vocab_size=args.vocab_size, head_dim=32, max_position_embeddings=max(512, args.seq_len))
    teacher = tiny_model(
        "llama", seed=0, hidden_size=h, ffn_hidden_size=3 * h, num_layers=layers,
        num_attention_heads=h // 32, num_query_groups=max(1, h // 64), **sizes,
    )  # fmt: skip
    student = tiny_model(
        "llama", seed=1, hidden_size=h // 2, ffn_hidden_size=3 * h // 2, num_layers=max(1, layers // 2),
        num_attention_heads=max(1, h // 64), num_query_groups=1, **sizes,
    )  # fmt: skip
    if device.type == "cuda":
        teacher = teacher.to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    batches = [
        torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len), generator=g)
        for _ in range(args.warmup + args.steps)
    ]
    return teacher.to(device), student.to(device).train(), batches


def plain_loss(hidden, weight, teacher_hidden, teacher_weight):
    s = F.linear(hidden, weight).flatten(0, 1)
    with torch.no_grad():
        t = F.linear(teacher_hidden, teacher_weight).flatten(0, 1)
    kl = F.kl_div(
        F.log_softmax(s.float(), -1), F.log_softmax(t.float(), -1), log_target=True, reduction="sum"
    )
    return kl / len(s)


def fused_loss(chunk_tokens):
    from nas.train.kd import kd_loss

    def loss(hidden, weight, teacher_hidden, teacher_weight):
        return kd_loss(hidden, weight, teacher_hidden, teacher_weight, chunk_tokens=chunk_tokens).loss

    return loss


class Meter:
    """Peak memory of a region above its start (see the module docstring for how, per device)."""

    def __init__(self, device):
        self.device, self.peak = device, 0
        self.clear_refs = device.type == "cpu" and _try_clear_refs()
        self.method = "cuda max_memory_allocated" if device.type == "cuda" else "VmHWM - VmRSS per loss"
        if device.type == "cpu" and not self.clear_refs:
            self.method, self.base = (
                "ru_maxrss - RSS before the first step (upper bound)",
                _status_kb("VmRSS"),
            )

    def start(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.mark = torch.cuda.memory_allocated()
        elif self.clear_refs:
            _try_clear_refs()
            self.mark = _status_kb("VmRSS") * 1024

    def stop(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = max(self.peak, torch.cuda.max_memory_allocated() - self.mark)
        elif self.clear_refs:
            self.peak = max(self.peak, _status_kb("VmHWM") * 1024 - self.mark)
        else:
            self.peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self.base) * 1024


def _try_clear_refs() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def run_variant(args) -> dict:
    """Train with one loss variant; returns tokens/s, loss peak bytes, the method, params."""
    from nas.device import autocast_for

    device = torch.device(args.device)
    teacher, student, batches = build(args, device)
    loss_fn = fused_loss(args.chunk_tokens) if args.variant == "fused" else plain_loss
    optimizer = torch.optim.AdamW(
        student.parameters(), lr=1e-4, **({"fused": True} if device.type == "cuda" else {})
    )
    meter, losses, times = Meter(device), [], []
    for batch in batches:
        _sync(device)
        t0 = time.perf_counter()
        ids = batch.to(device)
        with autocast_for(device):
            hidden = student.model(input_ids=ids, use_cache=False).last_hidden_state
            with torch.no_grad():
                teacher_hidden = teacher.model(input_ids=ids, use_cache=False).last_hidden_state
            h = hidden.detach().requires_grad_()  # split here so the loss's memory can be measured alone
            meter.start()
            loss = loss_fn(h, student.lm_head.weight, teacher_hidden, teacher.lm_head.weight)
        loss.backward()
        meter.stop()
        hidden.backward(h.grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        times.append(time.perf_counter() - t0)
    seconds = statistics.median(times[args.warmup :])  # robust to other processes' bursts
    n_teacher = sum(p.numel() for p in teacher.parameters())
    n_student = sum(p.numel() for p in student.parameters())
    tokens = args.batch_size * args.seq_len
    return {"tokens_per_s": tokens / seconds, "loss_peak_bytes": meter.peak, "method": meter.method,
            "n_teacher": n_teacher, "n_student": n_student, "losses": losses}  # fmt: skip


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def in_subprocess(variant: str, argv: list[str]) -> dict:
    """Run one variant in a fresh interpreter, so allocator caches of the other cannot hide its memory."""
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--variant", variant]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def report(args, fused: dict, plain: dict) -> None:
    gib = 2**30
    print(f"device {args.device}, vocab {args.vocab_size}, {args.batch_size}x{args.seq_len} tokens/step, "
          f"chunk {args.chunk_tokens}, {args.steps} timed steps after {args.warmup} warmup")  # fmt: skip
    print(f"teacher {fused['n_teacher'] / 1e6:.2f}M params, student {fused['n_student'] / 1e6:.2f}M params")
    print(f"loss memory measured as: {fused['method']}")
    print(f"{'variant':<8}{'tokens/s':>12}{'loss peak MiB':>16}{'final loss':>12}")
    for name, r in (("plain", plain), ("fused", fused)):
        print(
            f"{name:<8}{r['tokens_per_s']:>12,.0f}{r['loss_peak_bytes'] / 2**20:>16,.1f}{r['losses'][-1]:>12.5f}"
        )
    speed = fused["tokens_per_s"] / plain["tokens_per_s"]
    memory = fused["loss_peak_bytes"] / max(plain["loss_peak_bytes"], 1)
    print(f"tokens/s ratio (fused / plain): {speed:.2f}x   (goal >= 1.0x)")
    print(
        f"loss peak memory ratio (fused / plain): {memory:.2f}x   (goal <= 0.5x; plain {plain['loss_peak_bytes'] / gib:.2f} GiB)"
    )
    if args.device.startswith("cuda"):
        flops_per_token = 2 * fused["n_teacher"] + 6 * fused["n_student"]
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
        for variant, r in (("plain", plain), ("fused", fused)):
            achieved = r["tokens_per_s"] * flops_per_token / 1e12
            mfu = f", MFU {achieved / peak:.1%} of {peak:.0f} TFLOP/s bf16" if peak else ""
            print(f"{variant}: {achieved:.1f} TFLOP/s (2*N_teacher + 6*N_student per token){mfu} on {name}")


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    argv = sys.argv[1:]
    plain = in_subprocess("plain", argv)
    fused = in_subprocess("fused", argv)
    report(args, fused, plain)


if __name__ == "__main__":
    main()
