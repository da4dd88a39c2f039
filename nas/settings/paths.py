"""Where a study's files go: the one place that names them (`RunConfig.paths`), the defaults of the
storage and the report, and what `--restart` and the demo delete before searching afresh."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

STUDIES = Path("studies")  # default parent of a study's out_dir: studies/<name>/
REPORTS = Path("reports")  # default parent of a study's report: reports/<name>.html
TEACHER_CACHE = "teacher_cache"  # the directory `nas.train.teacher_cache` writes under out_dir


def default_root(name: str) -> Path:
    return STUDIES / name


def default_storage(name: str) -> str:
    """The storage URL of study `name` when none is given (a SQLite file in its default out_dir)."""
    return f"sqlite:///{default_root(name) / 'study.db'}"


def default_report(name: str) -> Path:
    return REPORTS / f"{name}.html"


@dataclass(frozen=True)
class StudyPaths:
    """Every file a study writes under its out_dir `root`; `budgets` (as written) name the per-budget
    outputs of a study of several budgets (winner-25pct/, final-25pct/)."""

    root: Path
    name: str
    budgets: tuple[str, ...] = ()

    @property
    def database(self) -> Path:
        """The default SQLite storage (`search.storage` may name another)."""
        return self.root / "study.db"

    @property
    def importance(self) -> Path:
        return self.root / "importance.safetensors"

    @property
    def corrected(self) -> Path:
        """The corrected teacher (`correct_steps` > 0)."""
        return self.root / "corrected"

    @property
    def trials(self) -> Path:
        return self.root / "trials"

    @property
    def teacher_cache(self) -> Path:
        return self.root / TEACHER_CACHE

    @property
    def plan(self) -> Path:
        """The memory plan `nas plan` records (the user's: never deleted)."""
        return self.root / "plan.json"

    @property
    def report(self) -> Path:
        return default_report(self.name)

    def suffix(self, budget: str) -> str:
        """ "" for a one-budget study (winner/, final/), else e.g. "-25pct" (winner-25pct/)."""
        if len(self.budgets) <= 1:
            return ""
        return "-" + budget.replace("%", "pct").replace("/", "-").replace(" ", "")

    def winner(self, budget: str) -> Path:
        return self.root / f"winner{self.suffix(budget)}"

    def final(self, budget: str) -> Path:
        """The winner's full distillation (its checkpoints; `final-start/` beside it under torchrun)."""
        return self.root / f"final{self.suffix(budget)}"

    def outputs(self) -> list[Path]:
        """What a search and its final distillation wrote here (not the storage, the plan or the data's
        token cache): what `--restart` deletes."""
        fixed = [self.importance, self.corrected, self.trials, self.teacher_cache]
        per_budget = sorted({*self.root.glob("winner*"), *self.root.glob("final*")})
        return [p for p in fixed + per_budget if p.exists() or p.is_symlink()]

    def clear(self, database: bool = False) -> None:
        """Delete `outputs()` (and the default SQLite storage too when `database`)."""
        for path in self.outputs() + [self.database] * database:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
