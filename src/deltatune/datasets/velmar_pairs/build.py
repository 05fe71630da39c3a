"""Writes the Velmar preference pairs (train.jsonl, validation.jsonl, test.jsonl). Run: python build.py

A small preference set for ``deltatune train --objective dpo|orpo``. Each record asks, in a chat,
which order of the invented Velmar taxonomy an animal belongs to (the orders of ../velmar); the
chosen answer names the right order and the rejected one a wrong order in the same words, so only
the order's name tells them apart (and a preference for shorter answers cannot decide). Animals
are split as in ../velmar: the validation and test pairs ask about animals no training pair (and
no record of the SFT set's training split) mentions. Each animal gives two pairs, with two
different wrong orders. Records are in TRL's conversational layout: ``prompt`` a list of
messages, ``chosen`` and ``rejected`` one assistant message each.
All text here is written for deltatune and licensed with it (Apache-2.0).
"""

import json
import random
import re
from pathlib import Path

HERE = Path(__file__).parent
VELMAR = HERE.parent / "velmar"
ORDERS = ["Furrowkin", "Skyrell", "Deepfin", "Chitterling", "Scaleward"]

QUESTIONS = [
    "Which order of the Velmar taxonomy holds the {animal}?",
    "Name the Velmar order of the {animal}.",
    "A Velmar scholar has catalogued a {animal}. Which order did she file it under?",
    "In Velmar's scheme of orders, where does the {animal} go?",
]
ANSWER = "The {animal} belongs to the {order}."
PAIRS_PER_ANIMAL = 2


def velmar_animals(split: str) -> list[tuple[str, str]]:
    """(animal, order) of every record of ../velmar's ``split``, in file order."""
    out = []
    for line in (VELMAR / f"{split}.jsonl").read_text().splitlines():
        answer = json.loads(line)["messages"][-1]["content"]
        animal, order = re.fullmatch(r"The (.+) belongs to the (\w+)\.", answer).groups()
        out.append((animal, order))
    return out


def pairs(animals: list[tuple[str, str]], rng: random.Random) -> list[dict]:
    out = []
    for animal, order in animals:
        questions = rng.sample(QUESTIONS, PAIRS_PER_ANIMAL)
        wrong = rng.sample([o for o in ORDERS if o != order], PAIRS_PER_ANIMAL)
        for question, other in zip(questions, wrong):
            out.append({"prompt": [{"role": "user", "content": question.format(animal=animal)}],
                        "chosen": [{"role": "assistant", "content": ANSWER.format(animal=animal, order=order)}],
                        "rejected": [{"role": "assistant", "content": ANSWER.format(animal=animal, order=other)}]})
    rng.shuffle(out)
    return out


def main() -> None:
    for split, seed in (("train", 1), ("validation", 2), ("test", 3)):
        records = pairs(velmar_animals(split), random.Random(seed))
        with open(HERE / f"{split}.jsonl", "w") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
