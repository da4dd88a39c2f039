"""Loads kjv_cloze.jsonl (next to this file) for lm-eval's `custom_dataset`, with no network and no
datasets cache: the items are few and small."""

import json
from pathlib import Path


def kjv_cloze_dataset(**kwargs):
    """{"test": Dataset} of the cloze items; lm-eval passes the task metadata as kwargs (unused)."""
    import datasets

    path = Path(__file__).with_name("kjv_cloze.jsonl")
    with path.open(encoding="utf-8") as f:
        items = [json.loads(line) for line in f]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(items)})
