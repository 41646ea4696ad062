"""Generate data/dpo_data.jsonl: short preference pairs in the seed's format, deterministically.

Each row is ``{"chose": prompt + chosen, "rejected": prompt + rejected}``. The chosen answer is correct and
helpful; the rejected one is wrong or evasive. Prompts end with a space and the two answers start with
different words, so the implicit prompt (the common prefix cut back to whitespace) is exactly the
question. Everything is generated from a fixed seed: running this script rewrites the file byte for byte.

    python data/make_dpo_data.py
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

SEED = 1234
OUTPUT = Path(__file__).resolve().parent / "dpo_data.jsonl"

EVASIVE = [
    "I am not sure about that.",
    "I cannot help with that.",
    "Maybe ask someone else.",
    "That is not something I know.",
    "Hard to say, really.",
]

CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Portugal", "Lisbon"), ("Japan", "Tokyo"), ("China", "Beijing"), ("India", "New Delhi"),
    ("Canada", "Ottawa"), ("Australia", "Canberra"), ("Brazil", "Brasilia"), ("Argentina", "Buenos Aires"),
    ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Norway", "Oslo"), ("Sweden", "Stockholm"),
    ("Finland", "Helsinki"), ("Denmark", "Copenhagen"), ("Poland", "Warsaw"), ("Greece", "Athens"),
    ("Turkey", "Ankara"), ("Russia", "Moscow"), ("Mexico", "Mexico City"), ("Peru", "Lima"),
    ("Chile", "Santiago"), ("Ireland", "Dublin"), ("Austria", "Vienna"), ("Hungary", "Budapest"),
    ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"), ("Morocco", "Rabat"), ("Nigeria", "Abuja"),
    ("Cuba", "Havana"), ("Iceland", "Reykjavik"), ("Belgium", "Brussels"), ("Switzerland", "Bern"),
]  # fmt: skip

UNITS = [  # (from, to, factor)
    ("kilometers", "meters", 1000), ("meters", "centimeters", 100), ("kilograms", "grams", 1000),
    ("hours", "minutes", 60), ("minutes", "seconds", 60), ("days", "hours", 24), ("feet", "inches", 12),
    ("liters", "milliliters", 1000), ("weeks", "days", 7), ("yards", "feet", 3),
]  # fmt: skip

WORDS = [
    "apple", "garden", "window", "river", "planet", "yellow", "kitchen", "pencil", "market", "bridge",
    "forest", "summer", "letter", "number", "silver", "animal", "button", "candle", "doctor", "engine",
    "family", "island", "jacket", "ladder", "mirror", "orange", "pocket", "rabbit", "school", "ticket",
]  # fmt: skip

FACTS = [  # (question, right answer, wrong answer)
    ("How many legs does a spider have?", "Eight legs.", "Six legs."),
    ("How many legs does an insect have?", "Six legs.", "Eight legs."),
    ("How many legs does a dog have?", "Four legs.", "Three legs."),
    ("How many legs does a bird have?", "Two legs.", "Four legs."),
    ("How many days are in a week?", "Seven days.", "Five days."),
    ("How many months are in a year?", "Twelve months.", "Ten months."),
    ("How many hours are in a day?", "Twenty-four hours.", "Twelve hours."),
    ("How many minutes are in an hour?", "Sixty minutes.", "One hundred minutes."),
    ("What color do you get by mixing blue and yellow?", "Green.", "Purple."),
    ("What color do you get by mixing red and white?", "Pink.", "Brown."),
    ("What color do you get by mixing red and blue?", "Purple.", "Orange."),
    ("What is the opposite of hot?", "Cold.", "Warm."),
    ("What is the opposite of up?", "Down.", "Left."),
    ("What is the opposite of early?", "Late.", "Soon."),
    ("What is the opposite of open?", "Closed.", "Wide."),
    ("Which is larger, 7 or 12?", "12 is larger.", "7 is larger."),
    ("Which is larger, 45 or 39?", "45 is larger.", "39 is larger."),
    ("At what temperature does water freeze in Celsius?", "Zero degrees.", "Ten degrees."),
    (
        "At what temperature does water boil in Celsius at sea level?",
        "One hundred degrees.",
        "Eighty degrees.",
    ),
    ("Which planet is closest to the Sun?", "Mercury.", "Mars."),
    ("Which planet do we live on?", "Earth.", "Venus."),
    ("How many sides does a triangle have?", "Three sides.", "Four sides."),
    ("How many sides does a square have?", "Four sides.", "Five sides."),
    ("How many sides does a hexagon have?", "Six sides.", "Eight sides."),
    ("What is the first letter of the English alphabet?", "A is the first letter.", "Z is the first letter."),
    ("What is the last letter of the English alphabet?", "Z is the last letter.", "Y is the last letter."),
    ("What do bees make?", "Honey.", "Milk."),
    ("What gas do plants take in from the air?", "Carbon dioxide.", "Helium."),
    ("What is frozen water called?", "Ice.", "Steam."),
    ("How many continents are there?", "Seven continents.", "Nine continents."),
]


def _implicit_prompt(first: str, second: str) -> str:
    """Same rule as hf_dpo.data: common prefix cut back to its last whitespace."""
    common = os.path.commonprefix([first, second])
    for i in range(len(common) - 1, -1, -1):
        if common[i].isspace():
            return common[: i + 1]
    return ""


def _reject(rng: random.Random, wrong: str) -> str:
    """Half the rejected answers are wrong, half evasive."""
    return wrong if rng.random() < 0.5 else rng.choice(EVASIVE)


def arithmetic(rng: random.Random) -> list[tuple[str, str, str]]:
    rows = []
    for op, name, fn in (
        ("+", "plus", lambda a, b: a + b),
        ("-", "minus", lambda a, b: a - b),
        ("*", "times", lambda a, b: a * b),
    ):
        for _ in range(30):
            a, b = (
                (rng.randint(2, 12), rng.randint(2, 12))
                if op == "*"
                else (rng.randint(10, 99), rng.randint(1, 9))
            )
            right = fn(a, b)
            wrong = right + rng.choice([-10, -2, -1, 1, 2, 10])
            rows.append(
                (
                    f"Question: What is {a} {name} {b}? Answer: ",
                    f"{right}, because {a} {op} {b} = {right}.",
                    _reject(rng, f"{wrong}, because {a} {op} {b} = {wrong}."),
                )
            )
    return rows


def capitals(rng: random.Random) -> list[tuple[str, str, str]]:
    rows = []
    for country, city in CAPITALS:
        other = rng.choice([c for _, c in CAPITALS if c.split()[0] != city.split()[0]])
        rows.append(
            (
                f"Question: What is the capital of {country}? Answer: ",
                f"{city} is the capital of {country}.",
                _reject(rng, f"{other} is the capital of {country}."),
            )
        )
    return rows


def conversions(rng: random.Random) -> list[tuple[str, str, str]]:
    rows = []
    for source, target, factor in UNITS:
        for _ in range(4):
            n = rng.randint(2, 20)
            right, wrong = n * factor, n * factor + rng.choice([1, 10, factor])
            rows.append(
                (
                    f"Question: How many {target} are in {n} {source}? Answer: ",
                    f"{right} {target}, since 1 is {factor}.",
                    _reject(rng, f"{wrong} {target}, since 1 is {factor}."),
                )
            )
    return rows


def spelling(rng: random.Random) -> list[tuple[str, str, str]]:
    rows = []
    for word in WORDS:
        letters = list(word)
        i = rng.randrange(len(letters) - 1)
        while letters[i] == letters[i + 1]:
            i = rng.randrange(len(letters) - 1)
        letters[i], letters[i + 1] = letters[i + 1], letters[i]
        rows.append(
            (
                f"Question: How do you spell the word {word}? Answer: ",
                "-".join(word),
                _reject(rng, "-".join(letters)),
            )
        )
    return rows


def facts(rng: random.Random) -> list[tuple[str, str, str]]:
    return [(f"Question: {q} Answer: ", right, _reject(rng, wrong)) for q, right, wrong in FACTS]


def build_rows(seed: int = SEED) -> list[dict[str, str]]:
    rng = random.Random(seed)
    triples = arithmetic(rng) + capitals(rng) + conversions(rng) + spelling(rng) + facts(rng)
    rng.shuffle(triples)
    rows = []
    for prompt, chosen, rejected in triples:
        row = {"chose": prompt + chosen, "rejected": prompt + rejected}
        # the loader must recover exactly this prompt, and the pair must be a real preference
        assert _implicit_prompt(row["chose"], row["rejected"]) == prompt, row
        assert chosen != rejected and len(row["chose"]) < 200 and len(row["rejected"]) < 200, row
        rows.append(row)
    return rows


def main() -> None:
    rows = build_rows()
    with OUTPUT.open("w", encoding="utf-8", newline="\n") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} rows to {OUTPUT}")


if __name__ == "__main__":
    main()
