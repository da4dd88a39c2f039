"""Full distillation under torchrun (2 processes, gloo on CPU) against a single-process run with the
same global batch: same losses, same weights, checkpoints that resume across modes."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from nas.cli.main import main
from nas.testing import tiny_model, write_kjv_corpus, write_tiny_teacher

STEPS = 6


def settings(root, out):
    return [
        *("distill", str(root / "teacher"), str(root / "student"), str(out)),
        *("--data", str(root / "corpus.jsonl"), "--seq-len", "32", "--cache-dir", str(root / "cache")),
        *("--batch-size", "4", "--steps", str(STEPS), "--eval-every", "3", "--checkpoint-every", "3"),
        *("--eval-sequences", "8", "--log-every", "1", "--lr", "3e-3", "--min-lr", "3e-4", "--device", "cpu"),
    ]


def torchrun(root, out, *extra):
    """`nas distill ... --nproc-per-node 2` in a fresh process: it re-runs itself under torchrun."""
    env = os.environ | {"OMP_NUM_THREADS": "1"}  # 2 workers on a small shared machine
    cmd = [sys.executable, "-m", "nas.cli", *settings(root, out), "--nproc-per-node", "2", *extra]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(out, expected, atol=1e-4):
    """Same steps logged, same losses and val losses (tolerance: float summation order), same weights."""
    got, want = metrics(out), metrics(expected)
    assert [m["step"] for m in got] == [m["step"] for m in want]
    for a, b in zip(got, want, strict=True):
        for key in ("loss", "kl", "val_loss", "val_kl", "tokens"):
            assert (a[key] is None) == (b[key] is None) and abs((a[key] or 0) - (b[key] or 0)) < atol, key
    final, reference = (
        load_file(out / "model" / "model.safetensors"),
        load_file(expected / "model" / "model.safetensors"),
    )
    assert sorted(final) == sorted(reference)
    for name, tensor in reference.items():
        assert torch.allclose(final[name], tensor, atol=atol), name


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """A tiny teacher and student (tied embeddings) on real text, and the single-process run."""
    root = tmp_path_factory.mktemp("parallel")
    write_tiny_teacher(root / "teacher")
    write_kjv_corpus(root / "corpus.jsonl", limit=3000)
    tiny_model("llama", seed=1, vocab_size=320, num_layers=2, tie_word_embeddings=True).save_pretrained(
        root / "student"
    )
    assert main(settings(root, root / "one")) == 0
    return root


@pytest.mark.slow
def test_torchrun_ddp_matches_a_single_process_run(single):
    torchrun(single, single / "ddp")
    assert_same_run(single / "ddp", single / "one")
    checkpoints = sorted(p.name for p in (single / "ddp" / "checkpoints").iterdir())
    assert checkpoints == ["step-0000003", "step-0000006"]  # written once, by rank 0, nothing left over
    assert metrics(single / "ddp")[-1]["tokens"] == STEPS * 4 * 32  # the global batch, not per rank


@pytest.mark.slow
def test_torchrun_fsdp_resumes_a_single_process_checkpoint(single):
    """FSDP2 (sharded student and teacher layers) picks up the single-process checkpoint at step 3 and
    ends where the uninterrupted single-process run ended."""
    cut = single / "cut"
    shutil.copytree(single / "one", cut)
    shutil.rmtree(cut / "checkpoints" / "step-0000006")
    shutil.rmtree(cut / "model")
    done = torchrun(single, cut, "--fsdp")
    assert "resumed from" in done.stderr and "step 3" in done.stderr
    assert_same_run(cut, single / "one")


def test_nproc_per_node_must_be_positive(tmp_path, capsys):
    assert main([*settings(tmp_path, tmp_path / "bad"), "--nproc-per-node", "0"]) == 2
    assert "--nproc-per-node must be >= 1" in capsys.readouterr().err
