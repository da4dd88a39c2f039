"""The layering: imports run one way (the import-linter contract in pyproject.toml), and the light commands
(`import nas`, `nas space`, `nas report`) load no training code."""

import json
import re
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from nas.model.arch import Arch
from nas.model.size import count_params
from nas.testing import tiny_config

ROOT = Path(__file__).resolve().parents[1]
TRAINING = ("nas.train", "nas.search.trial", "nas.pipeline", "nas.prune.cut")


def loaded_nas_modules(code: str) -> list[str]:
    """The nas modules a fresh interpreter has loaded after running `code`."""
    probe = (
        code + "\nimport sys, json\nprint(json.dumps(sorted(m for m in sys.modules if m.startswith('nas'))))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def training_modules(modules: list[str]) -> list[str]:
    return [m for m in modules if m.startswith(TRAINING)]


@pytest.mark.slow
def test_import_contract_holds():
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint)], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "2 kept, 0 broken" in result.stdout


@pytest.mark.slow
def test_import_nas_loads_no_training_code():
    modules = loaded_nas_modules("import nas")
    assert "nas" in modules
    assert training_modules(modules) == []


@pytest.mark.slow
def test_nas_space_loads_no_training_code(tmp_path):
    tiny_config("llama", vocab_size=320).save_pretrained(tmp_path / "teacher")
    modules = loaded_nas_modules(
        f"from nas.cli.main import main\nassert main(['space', {str(tmp_path / 'teacher')!r}, '--budget', '60%']) == 0"
    )
    assert "nas.prune.space" in modules
    assert training_modules(modules) == []


@pytest.mark.slow
def test_nas_report_loads_no_training_code(tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="s", storage=storage)
    teacher = Arch.from_hf_config(tiny_config("llama"))
    for value, layers in ((3.0, 4), (3.5, 3)):  # two finished trials, recorded as nas records them
        arch = teacher.replace(num_layers=layers)
        trial = study.ask()
        trial.set_user_attr("arch", arch.to_dict())
        trial.set_user_attr("label", arch.describe())
        trial.set_user_attr("params", count_params(arch))
        study.tell(trial, value)
    out = tmp_path / "r.html"
    modules = loaded_nas_modules(
        "from nas.cli.main import main\n"
        f"assert main(['report', '--study', 's', '--storage', {storage!r}, '--out', {str(out)!r}]) == 0"
    )
    assert out.stat().st_size > 0
    assert "nas.report.html" in modules
    assert training_modules(modules) == []


@pytest.mark.parametrize("package", ["nas", "benchmarks"])
def test_no_import_cycle_top_level_inside_functions_or_for_type_hints(package):
    import grimp  # import-linter's graph: every import statement, function-level ones too

    # `if TYPE_CHECKING:` imports count too: a module that needs another's types only to name them is still
    # tied to it, and a cycle there is a cycle in the design
    graph = grimp.build_graph(package, exclude_type_checking_imports=False)
    cycles = [
        (a, b)
        for a in sorted(graph.modules)
        for b in graph.find_modules_directly_imported_by(a)
        if graph.chain_exists(importer=b, imported=a)
    ]
    assert cycles == []


def test_no_two_modules_of_nas_share_a_file_name():
    names: dict[str, list[str]] = {}
    for path in (ROOT / "nas").rglob("*.py"):
        if path.name not in ("__init__.py", "__main__.py"):
            names.setdefault(path.name, []).append(path.relative_to(ROOT).as_posix())
    assert {name: paths for name, paths in names.items() if len(paths) > 1} == {}


# where `horizon_steps` (the horizon in steps) may be named: the search, which owns the horizon
# (`nas.search.horizon_plan`; the study record keeps the field), and the settings' conversion of older
# studies' step fields to tokens on load
HORIZON_STEPS_OWNERS = ("nas/search/", "nas/settings/legacy.py")


def test_only_the_search_computes_a_horizon():
    named = sorted(
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / "nas").rglob("*.py")
        if "horizon_steps" in path.read_text() and not path.relative_to(ROOT).as_posix().startswith(HORIZON_STEPS_OWNERS)
    )
    assert named == [], "read the horizon from nas.search.horizon_plan (SearchContext.horizon), not in steps"


def module_map() -> dict[str, str]:
    """The README's module map: each entry's folder or file (`nas/search/`, `nas/io.py`) -> its text."""
    text = (ROOT / "README.md").read_text()
    block = text[text.index("nas/cli/ ") : ]
    block = block[: block.index("```")]
    entries: dict[str, str] = {}
    key = ""
    for line in block.splitlines():
        if line.startswith("nas/"):
            for path in re.findall(r"nas/[a-z_/]+(?:\.py|/)", line):
                key = path
                entries[key] = entries.get(key, "") + line
        elif key:
            entries[key] += " " + line
    return entries


def test_the_readme_module_map_names_every_module():
    entries = module_map()
    missing = []
    for path in sorted((ROOT / "nas").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if path.name in ("__init__.py", "__main__.py") or "/tasks/" in rel:  # tasks/: lm-eval task files
            continue
        folder, _, name = rel.rpartition("/")
        if folder == "nas":
            found = rel in entries
        else:
            found = re.search(rf"\b{path.stem}\b", entries.get(folder + "/", "")) is not None
        if not found:
            missing.append(rel)
    assert missing == [], "add these to the module map in README.md (Development)"
    folders = {p.parent.relative_to(ROOT).as_posix() + "/" for p in (ROOT / "nas").glob("*/__init__.py")}
    assert folders <= set(entries), folders - set(entries)
