"""Offline problem sets: easy arithmetic and one-step stories (demo, tests), and the drill.

The drill (single-digit sums and the 2-9 times table) is the task the CPU replication learns:
SmolLM2-135M-Instruct solves about a quarter of it at the demo's sampling (docs/RESULTS.md),
so most groups of four carry a GRPO signal. The mixed set starts near 0.1, too rare for that.
"""

from __future__ import annotations

import random

_NAMES = ("Tom", "Anna", "Ben", "Maria", "Sam", "Lily", "Omar", "Mei", "Jack", "Nora")
_ITEMS = ("apples", "marbles", "books", "pencils", "stickers", "cookies", "cards", "coins")
# (text, value) of small expressions with parentheses: a, b in 2..20, c in 2..9
_EXPRESSIONS = (
    ("({a} + {b}) * {c}", lambda a, b, c: (a + b) * c),
    ("{a} * {c} + {b}", lambda a, b, c: a * c + b),
    ("{a} + {b} - {c}", lambda a, b, c: a + b - c),
    ("({a} - {c}) * {c}", lambda a, b, c: (a - c) * c),
    ("{a} + {b} * {c}", lambda a, b, c: a + b * c),
)
# (text, value) of one-step stories: a in 2..9, b in 2..30
_STORIES = (
    ("{name} has {b} {item} and buys {a} more. How many {item} does {name} have now?",
     lambda a, b: b + a),
    ("{name} has {a_b} {item} and gives {a} of them to a friend. "
     "How many {item} does {name} have left?", lambda a, b: b),
    ("{name} buys {a} boxes with {b} {item} in each box. How many {item} does {name} buy "
     "in total?", lambda a, b: a * b),
    ("{name} shares {ab} {item} equally among {a} friends. How many {item} does each friend "
     "get?", lambda a, b: b),
)


def generate_arithmetic(n: int, seed: int) -> list[dict[str, str]]:
    """`n` rows {"problem", "answer"} of easy arithmetic and one-step word problems.

    Deterministic given (n, seed); answers are non-negative integers written as strings.
    Easy on purpose: a 135M instruct model must solve some, or the demo's rewards are all 0.
    """
    rng = random.Random(f"tandem.data/arithmetic/{seed}")
    return [_arithmetic_row(rng) for _ in range(n)]


def _arithmetic_row(rng: random.Random) -> dict[str, str]:
    kind = rng.random()
    a, b = rng.randint(2, 60), rng.randint(2, 60)
    if kind < 0.15:
        text, value = f"{a} + {b}", a + b
    elif kind < 0.30:
        a, b = max(a, b), min(a, b)
        text, value = f"{a} - {b}", a - b
    elif kind < 0.45:
        a, b = rng.randint(2, 12), rng.randint(2, 15)
        text, value = f"{a} * {b}", a * b
    elif kind < 0.65:
        while True:  # redraw until non-negative: small models do worse with negatives
            template, evaluate = rng.choice(_EXPRESSIONS)
            a, b, c = rng.randint(2, 20), rng.randint(2, 20), rng.randint(2, 9)
            if evaluate(a, b, c) >= 0:
                break
        text, value = template.format(a=a, b=b, c=c), evaluate(a, b, c)
    else:
        return _word_problem(rng)
    return {"problem": f"What is {text}?", "answer": str(value)}


def _word_problem(rng: random.Random) -> dict[str, str]:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    template, evaluate = rng.choice(_STORIES)
    a, b = rng.randint(2, 9), rng.randint(2, 30)
    problem = template.format(name=name, item=item, a=a, b=b, ab=a * b, a_b=a + b)
    return {"problem": problem, "answer": str(evaluate(a, b))}


def drill_facts() -> list[dict[str, str]]:
    """Every distinct drill problem, in a fixed order: a + b for a, b in 0..9, a * b in 2..9."""
    sums = [(f"{a} + {b}", a + b) for a in range(10) for b in range(10)]
    products = [(f"{a} * {b}", a * b) for a in range(2, 10) for b in range(2, 10)]
    return [{"problem": f"What is {text}?", "answer": str(value)}
            for text, value in sums + products]


def generate_drill(n: int, seed: int) -> list[dict[str, str]]:
    """The first `n` drill facts in a seeded order: distinct rows, so a hold-out never repeats a
    training problem. There are 164; asking for more is an error, not silent repetition."""
    facts = drill_facts()
    if n > len(facts):
        raise ValueError(f"the drill has {len(facts)} distinct problems, not {n}: set "
                         f"data.num_generated <= {len(facts)}")
    random.Random(f"tandem.data/drill/{seed}").shuffle(facts)
    return facts[:n]
