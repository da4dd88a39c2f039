"""Every benchmark runs at its `--smoke` size (`pytest -k smoke`), so a change that breaks one fails CI.
The numbers a smoke run prints mean nothing; the benchmarks' goals are read from full-size runs."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(p.stem for p in BENCHMARKS.glob("*.py") if not p.name.startswith("_"))
SMOKED_ELSEWHERE = {"gpu_acceptance"}  # tests/test_gpu_acceptance.py runs its smoke and checks every row


def test_every_benchmark_has_a_smoke_size():
    assert SCRIPTS and all("--smoke" in (BENCHMARKS / f"{s}.py").read_text() for s in SCRIPTS)


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(set(SCRIPTS) - SMOKED_ELSEWHERE))
def test_benchmark_smoke(script, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(BENCHMARKS.parent)}  # fmt: skip
    cmd = [sys.executable, str(BENCHMARKS / f"{script}.py"), "--smoke"]
    if script == "lean_optimizers":
        cmd += ["--out", str(tmp_path / "lean")]
    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=540)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip()  # it printed its measurements
