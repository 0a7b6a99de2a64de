"""Build ``pydoc_cloze.jsonl``: a small offline multiple-choice task for lm-eval (run once; the output is committed).

Each item is a sentence from the last 40 % of the pydoc topics text (the part rankwise evaluates on; calibration
reads the start): the first half of its words is the context, its true second half one choice, and the second halves
of three other such sentences the distractors. Seeded, so the file is reproducible:
``python tests/lm_eval/make_pydoc_cloze.py``.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from rankwise.calibrate.text import default_text

ITEMS = 80
SEED = 0


def sentences(text: str) -> list[str]:
    flat = re.sub(r"\s+", " ", text)
    found = re.split(r"(?<=[.!?])\s+(?=[A-Z])", flat)
    return [s for s in found if 12 <= len(s.split()) <= 28 and not re.search(r"[`*=<>{}\[\]|\\#~^$]", s)]


def main() -> None:
    text = default_text()
    tail = sentences(text[int(len(text) * 0.6):])
    rng = random.Random(SEED)
    picked = rng.sample(tail, ITEMS * 4)
    rows = []
    for k in range(ITEMS):
        group = picked[4 * k:4 * k + 4]
        halves = []
        for s in group:
            words = s.split()
            halves.append((" ".join(words[:len(words) // 2]), " ".join(words[len(words) // 2:])))
        context, truth = halves[0]
        choices = [truth] + [h[1] for h in halves[1:]]
        rng.shuffle(choices)
        rows.append({"context": context, "choices": choices, "label": choices.index(truth)})
    out = Path(__file__).with_name("pydoc_cloze.jsonl")
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} items to {out}")


if __name__ == "__main__":
    main()
