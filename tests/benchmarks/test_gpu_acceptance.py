"""benchmarks/gpu_acceptance.py at smoke size on the CPU: every row runs (CUDA-only figures say "no GPU"),
a failing row is recorded while the others run, the time guard skips rows by name, bad arguments exit 2."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ["-m", "benchmarks.gpu_acceptance"]  # run from the repository root
ROWS = ["demo", "kd_step", "memory_adamw", "memory_8bit", "screen", "parallel", "trial_8b", "trial_qwen35",
        "trial_nemotron", "speed"]  # table order (1 .. 7)  # fmt: skip


def acceptance(tmp_path, *argv):
    out = tmp_path / "acceptance.json"
    env = os.environ | {"OMP_NUM_THREADS": "1"}  # a busy shared CPU: one thread per child
    cmd = [sys.executable, *SCRIPT, "--device", "cpu", "--smoke", "--out", str(out), *argv]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    record = json.loads(out.read_text()) if out.is_file() else None
    return done, record


def rows(record):
    return {r["name"]: r for r in record["rows"]}


@pytest.mark.slow
def test_gpu_acceptance_smoke_runs_every_row_on_cpu(tmp_path):
    # a busy CI machine runs the smoke slower than the GPU run's default limit allows (the guard has its tests)
    done, record = acceptance(tmp_path, "--work", str(tmp_path / "work"), "--time-limit", "1500")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert [r["name"] for r in record["rows"]] == ROWS and not record["skipped"]
    by = rows(record)
    assert {n: r["verdict"] for n, r in by.items()} == {
        "demo": "smoke", "kd_step": "no GPU", "memory_adamw": "no GPU", "memory_8bit": "no GPU",
        "screen": "smoke", "parallel": "no GPU", "trial_8b": "no GPU", "trial_qwen35": "no GPU",
        "trial_nemotron": "no GPU", "speed": "no GPU",
    }  # fmt: skip
    demo = by["demo"]["measured"]
    assert all(demo[k] > 0 for k in ("teacher_val_loss", "winner_val_loss", "scratch_val_loss"))
    assert "KD gain over scratch" in by["demo"]["detail"]  # the demo's closing table
    assert by["kd_step"]["measured"]["tokens_per_s"] > 0
    for name in ("memory_adamw", "memory_8bit"):  # the plan ran, and so did the real trial (on the CPU)
        m = by[name]["measured"]
        assert m["plan_bytes"] == sum(m["plan_breakdown"].values()) > 0 and m["measured_bytes"] is None
    for name, slow in (("trial_8b", None), ("trial_qwen35", "linear_attention"), ("trial_nemotron", "mamba")):
        m = by[name]["measured"]  # the plan ran (or says why not), and a real trial at its settings
        assert (m["plan_bytes"] or 0) > 0 or m["plan_error"]
        assert m["tokens_per_s"] > 0 and m["speed"]["steady_steps"] > 0 and m["measured_bytes"] is None
        assert m["kernel_paths"]["attention"] == "sdpa"
        if slow:
            assert m["kernel_paths"][slow] == "torch reference" and "torch reference" in by[name]["figure"]
    assert by["trial_8b"]["measured"]["speed"]["write_seconds"] > 0  # the 8B trial's bf16 write, timed apart
    variants = by["speed"]["measured"]["rows"]
    assert variants["defaults"]["vs_defaults"] == 1.0 and {"foreach AdamW", "micro-batch 1", "compile"} <= set(variants)
    screen = by["screen"]["measured"]
    assert screen["candidates_per_minute"] > 0 and screen["projected_minutes"] > 0
    assert screen["big_space"] > screen["timed"] and screen["big_minutes_from_measured"] > 0
    table = done.stdout
    assert "no GPU" in table and "KD gain" in table and f"written {tmp_path / 'acceptance.json'}" in table


@pytest.mark.slow
def test_gpu_acceptance_smoke_records_a_failing_row_and_runs_the_next(tmp_path):
    """A real fault: the memory row cannot write its teacher config (a file sits where its folder
    goes), so its child fails; the screen row after it still runs."""
    work = tmp_path / "work"
    (work / "memory_adamw").mkdir(parents=True)
    (work / "memory_adamw" / "tiny-Qwen3-1.7B").write_text("in the way")
    done, record = acceptance(tmp_path, "--work", str(work), "--only", "memory_adamw,screen")
    assert done.returncode == 1  # a row errored; the table and the JSON are there all the same
    by = rows(record)
    assert by["memory_adamw"]["verdict"] == "error" and "Error" in by["memory_adamw"]["error"]
    assert by["screen"]["verdict"] == "smoke" and by["screen"]["measured"]["candidates_per_minute"] > 0
    assert "row 3a (memory_adamw) error:" in done.stdout


@pytest.mark.slow
def test_gpu_acceptance_smoke_stops_a_row_that_runs_past_its_cap(tmp_path):
    """The demo gets 2 s (it needs far more; its imports alone take longer): its process group is killed
    and the row says so; the run still ends with the table and the JSON."""
    done, record = acceptance(tmp_path, "--only", "demo", "--row-cap", "2")
    assert done.returncode == 1
    (demo,) = record["rows"]
    assert demo["verdict"] == "error" and "timed out after 2 s" in demo["error"] and demo["seconds"] < 7
    assert "row 1 (demo) error: timed out after 2 s" in done.stdout


def test_gpu_acceptance_smoke_time_guard_skips_rows_by_name(tmp_path):
    done, record = acceptance(tmp_path, "--time-limit", "1")
    assert done.returncode == 0, done.stderr[-2000:]
    assert record["skipped"] == ["kd_step", "trial_8b", "trial_qwen35", "trial_nemotron", "speed", "memory_adamw",
                                 "memory_8bit", "screen", "demo"]  # fmt: skip
    assert rows(record)["parallel"]["verdict"] == "no GPU"  # decided without a child
    assert "skipped by the time guard: kd_step, trial_8b" in done.stdout


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--device", "cuda"], "no CUDA device"),
        (["--only", "demo,nonsense"], "unknown row(s) nonsense"),
        (["--time-limit", "0"], "--time-limit must be positive"),
        (["--row-cap", "-1"], "--row-cap must be positive"),
    ],
)
def test_gpu_acceptance_smoke_bad_arguments_exit_2(tmp_path, argv, message):
    out = tmp_path / "acceptance.json"
    cmd = [sys.executable, *SCRIPT, "--smoke", "--out", str(out), *argv]
    if "--device" not in argv:
        cmd += ["--device", "cpu"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 2 and message in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not out.exists()
