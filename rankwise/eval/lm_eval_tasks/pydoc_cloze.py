"""``pydoc_cloze``: 80 four-way sentence completions from the standard library's pydoc topics, offline.

Each item is a sentence from the last 40 % of the pydoc topics text (the part rankwise evaluates on; calibration
reads the start): the first half of its words is the context, its true second half one choice, and the second halves
of three other such sentences the distractors. The items are built once, seeded, and shipped as
``pydoc_cloze.jsonl`` (the topics text changes between Python versions; the shipped file keeps the task the same on
every one): ``python -m rankwise.eval.lm_eval_tasks.pydoc_cloze`` rebuilds it. lm-eval imports this file by its path
(``custom_dataset: !function pydoc_cloze.load`` in ``pydoc_cloze.yaml``) and calls :func:`load`.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

ITEMS = 80
SEED = 0
DATA = Path(__file__).with_name("pydoc_cloze.jsonl")


def load(**_metadata: Any) -> Any:
    """The shipped items as a ``datasets.DatasetDict`` with one split, ``test`` (in memory: nothing is cached).
    lm-eval passes the task's metadata as keyword arguments; they are not needed."""
    import datasets

    with DATA.open(encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def sentences(text: str) -> list[str]:
    """Sentences of 12 to 28 words without markup or code characters."""
    flat = re.sub(r"\s+", " ", text)
    found = re.split(r"(?<=[.!?])\s+(?=[A-Z])", flat)
    return [s for s in found if 12 <= len(s.split()) <= 28 and not re.search(r"[`*=<>{}\[\]|\\#~^$]", s)]


def build_rows(text: str) -> list[dict[str, Any]]:
    """``ITEMS`` items ``{"context", "choices", "label"}`` from the last 40 % of ``text``, seeded by ``SEED``."""
    tail = sentences(text[int(len(text) * 0.6):])
    rng = random.Random(SEED)
    picked = rng.sample(tail, ITEMS * 4)
    rows = []
    for k in range(ITEMS):
        halves = []
        for s in picked[4 * k:4 * k + 4]:
            words = s.split()
            halves.append((" ".join(words[:len(words) // 2]), " ".join(words[len(words) // 2:])))
        context, truth = halves[0]
        choices = [truth] + [h[1] for h in halves[1:]]
        rng.shuffle(choices)
        rows.append({"context": context, "choices": choices, "label": choices.index(truth)})
    return rows


def main() -> None:
    from rankwise.calibrate.text import default_text

    rows = build_rows(default_text())
    DATA.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} items to {DATA}")


if __name__ == "__main__":
    main()
