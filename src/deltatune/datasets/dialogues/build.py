"""Writes a small dialogue-summary set (dialogues.jsonl: source, target). Run: python build.py

Short two-person exchanges and one-sentence summaries, for testing the sequence-to-sequence
summarization path (flan-t5 style) without network access. Written for deltatune and
licensed with it (Apache-2.0).
"""

import json
import random
from pathlib import Path

PEOPLE = ["Ana", "Ben", "Chloe", "Dev", "Elif", "Farid", "Greta", "Hugo", "Ines", "Jonas", "Kemi", "Luca"]
TASKS = [("water the plants", "watering the plants"), ("book a table for dinner", "booking a table for dinner"),
         ("pick up the parcel", "picking up the parcel"), ("call the landlord", "calling the landlord"),
         ("return the library books", "returning the library books"), ("fix the bike", "fixing the bike"),
         ("buy bread", "buying bread"), ("send the report", "sending the report")]
TIMES = ["this evening", "tomorrow morning", "on Friday", "after lunch", "before the weekend", "at six"]


def dialogue(rng: random.Random) -> dict:
    a, b = rng.sample(PEOPLE, 2)
    (task, doing), when = rng.choice(TASKS), rng.choice(TIMES)
    agrees = rng.random() < 0.6
    lines = [f"{a}: Hi {b}, could you {task} {when}?"]
    if agrees:
        lines += [f"{b}: Sure, I can do that {when}.", f"{a}: Thank you, that helps a lot."]
        summary = f"{b} agrees to {task} {when} for {a}."
    else:
        reason = rng.choice(["is away", "has a doctor's appointment", "is working late"])
        lines += [f"{b}: Sorry, I {reason.replace('is ', 'am ').replace('has ', 'have ')} {when}.",
                  f"{a}: No problem, I will manage."]
        summary = f"{b} cannot help {a} with {doing} {when} because {b} {reason}."
    return {"source": "Summarize: " + " ".join(lines), "target": summary}


def main() -> None:
    rng = random.Random(11)
    with open(Path(__file__).parent / "dialogues.jsonl", "w") as f:
        for _ in range(40):
            f.write(json.dumps(dialogue(rng)) + "\n")


if __name__ == "__main__":
    main()
