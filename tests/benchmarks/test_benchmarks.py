"""Every benchmark runs at its `--smoke` size (`pytest -k smoke`), so a change that breaks one fails CI.
The numbers a smoke run prints mean nothing; the benchmarks' goals are read from full-size runs.

Each smoke runs as its script's `__main__` in a fresh process forked from a forkserver that has imported
torch, transformers and nas once: isolated from pytest and from each other as a plain `python script.py`
is, without paying the ~4 s of imports per script (measured: the smokes themselves take 0.2-2 s)."""

import json
import multiprocessing
import os
import runpy
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
SCRIPTS = sorted(p.stem for p in BENCHMARKS.glob("*.py") if not p.name.startswith("_") and p.stem != "common")
SMOKED_ELSEWHERE = {"gpu_acceptance"}  # tests/benchmarks/test_gpu_acceptance.py runs its smoke and checks every row
# what the benchmarks import; each import that fails here is only left to the script
PRELOAD = ["torch", "transformers", "transformers.models.llama.modeling_llama", "optuna", "nas.testing",
           "nas.pipeline", "nas.cascade.runner", "nas.demo.run", "nas.plan", "nas.report"]  # fmt: skip
ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def run_script(script: str, argv: list[str], cwd: Path, stdout: Path, stderr: Path) -> None:
    """In the forked child: `python -m benchmarks.<script> argv` in `cwd`, its output (and its children's)
    in the files."""
    for fd, path in ((1, stdout), (2, stderr)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    os.chdir(cwd)
    root = str(BENCHMARKS.parent)  # the scripts' own subprocesses import nas from here
    os.environ.update(ENV, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, root)  # as `python -m` from the repository root has it
    sys.argv = [f"benchmarks/{script}.py", *argv]
    runpy.run_module(f"benchmarks.{script}", run_name="__main__", alter_sys=True)  # an exception or
    # sys.exit(n) sets the exit code


@pytest.fixture(scope="module")
def forkserver():
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    return context


def test_every_benchmark_has_a_smoke_size():
    assert SCRIPTS and all("--smoke" in (BENCHMARKS / f"{s}.py").read_text() for s in SCRIPTS)


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(set(SCRIPTS) - SMOKED_ELSEWHERE))
def test_benchmark_smoke(script, tmp_path, forkserver):
    argv = ["--smoke"] + (["--out", str(tmp_path / "lean")] if script == "lean_optimizers" else [])
    out = run_smoke(forkserver, script, argv, tmp_path)
    assert out.strip()  # it printed its measurements
    if script == "search_quality":  # budgets of 2 candidates and of 1 (fewer than ModelOpt's 10) both summed up
        assert "candidates worse than the best" in out
        assert "the space's one candidate" in out
        assert "over 2 budgets" in out
    if script == "mamba_head_score":  # both scores' taus and every row of the decision table
        assert "ModelOpt (in_proj x)" in out and "nas (out_proj input)" in out
        assert out.count("random (mean of 2)") == 2 and out.count("ablation (oracle)") == 2


def run_smoke(forkserver, script: str, argv: list[str], tmp_path: Path) -> str:
    """`python -m benchmarks.<script> argv` forked from the preloaded server; its stdout (its stderr's end
    in the failure when it exits non-zero or outlasts 9 minutes)."""
    stdout, stderr = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    child = forkserver.Process(target=run_script, args=(script, argv, tmp_path, stdout, stderr))
    child.start()
    child.join(timeout=540)
    if child.exitcode is None:
        child.kill()
        child.join()
    assert child.exitcode == 0, stderr.read_text()[-3000:]
    return stdout.read_text()


@pytest.mark.slow
def test_search_quality_smoke_on_the_wsd_schedule(tmp_path, forkserver):
    """nas, brute force and the ground truth on `search.rung_schedule = "wsd"`, and the output says so."""
    argv = ["--smoke", "--rung-schedule", "wsd", "--budgets", "40%", "--json", str(tmp_path / "figures.json")]
    out = run_smoke(forkserver, "search_quality", argv, tmp_path)
    assert "schedules: trials and rungs wsd" in out
    assert "ground truth one wsd run" in out
    assert "curve.1x" in (tmp_path / "figures.json").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("teacher", ["hybrid", "moe"])
def test_search_quality_smoke_on_a_hybrid_and_a_moe_teacher(tmp_path, forkserver, teacher):
    """The benchmark's other teachers (a Nemotron-H cutting Mamba heads and layer types, a Qwen3-MoE cutting
    experts) train on the same text and go through nas, brute force and the ground truth; the curve over the
    pairs the ground truth resolves is printed and written."""
    argv = ["--smoke", "--teacher", teacher, "--budgets", "50%", "--json", str(tmp_path / "figures.json")]
    out = run_smoke(forkserver, "search_quality", argv, tmp_path)
    model_type = {"hybrid": "nemotron_h", "moe": "qwen3_moe"}[teacher]
    assert f"teacher {teacher} ({model_type})" in out
    assert "pairs the ground truth resolves: screen" in out
    figures = json.loads((tmp_path / "figures.json").read_text())
    assert figures["args"]["teacher"] == teacher
    assert "resolved.1x" in figures["budgets"]["50%"]
    assert figures["budgets"]["50%"]["truth.seeds"] == 2  # the ground truth's noise includes its training run's
    assert "the seeds'" in out
