"""The fault tables together (`tests/cli/test_faults_<command>.py`): every sub-command has cases, each case
lives in its command's module, and no case name is used twice."""

import importlib
from collections import Counter
from pathlib import Path

# module -> the sub-commands whose cases it holds
MODULES = {
    "importance": {"importance"},
    "prune": {"prune"},
    "distill": {"distill", "correct"},
    "eval": {"eval"},
    "report": {"report"},
    "study": {"space", "search", "run", "worker"},
    "demo": {"demo"},
}


def test_the_table_covers_every_sub_command():
    found = sorted(
        p.stem.removeprefix("test_faults_") for p in Path(__file__).parent.glob("test_faults_*.py")
    )
    assert found == sorted(MODULES)
    cases = []
    for name, commands in MODULES.items():
        table = importlib.import_module(f"tests.cli.test_faults_{name}").CASES
        assert {c[1] for c in table} == commands, name
        cases += table
    counts = Counter(c[1] for c in cases)
    assert set(counts) == {"importance", "prune", "space", "search", "run", "worker", "report", "distill",
                           "correct", "eval", "demo"}  # fmt: skip
    assert len(cases) >= 60 and len({c[0] for c in cases}) == len(cases)
