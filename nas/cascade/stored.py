"""Where a cascade keeps its record (the chain as planned and every finished stage): `<out_dir>/cascade.json`
and the user attribute `cascade` of the cascade's own Optuna study. Runs of older nas stored it under other
names; they are read here, after the current ones, and moved to the current ones when the run resumes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import optuna

CASCADE_FILE = "cascade.json"
CASCADE_ATTR = "cascade"
# the names every cascade run stored up to commit 229d8a6 (nas 0.1.0), from before the chain had its own
# name, nas.cascade, and was called a "family": read after the current names, renamed when such a run resumes
OLD_CASCADE_FILE = "family.json"
OLD_CASCADE_ATTR = "family"


def record_from_attrs(attrs: dict[str, Any]) -> dict[str, Any] | None:
    """The cascade record among a study's user attributes (the current name first), None if none."""
    return attrs.get(CASCADE_ATTR) or attrs.get(OLD_CASCADE_ATTR)


def store_record(study: optuna.Study, record: dict[str, Any]) -> None:
    """Keep `record` on the cascade's study under the current name; an older run's attribute is cleared
    (Optuna cannot delete one; None reads as unset), so the study holds one record."""
    study.set_user_attr(CASCADE_ATTR, record)
    if study.user_attrs.get(OLD_CASCADE_ATTR) is not None:
        study.set_user_attr(OLD_CASCADE_ATTR, None)


def migrate_record_file(root: Path) -> None:
    """An older run's record file renamed to the current name (atomically: one rename), unless the
    current one is there already (then the older one is stale and removed)."""
    old, new = root / OLD_CASCADE_FILE, root / CASCADE_FILE
    if not old.is_file():
        return
    if new.is_file():
        old.unlink()
    else:
        os.replace(old, new)


def remove_record_file(root: Path) -> None:
    """`--restart`: the record file under either name."""
    for name in (CASCADE_FILE, OLD_CASCADE_FILE):
        (root / name).unlink(missing_ok=True)
