"""A code-reading task: short Python programs (one or more list or string operations, then a print) and
the exact output they print, in the style of CRUXEval-O. Programs come from a seeded generator; each
answer is what running the program prints, so the reference is correct by construction."""

import contextlib
import io
import random

WORDS = ["apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "green", "house", "night", "bread",
         "chair", "ocean", "light", "mango", "paper", "robot", "sugar", "table", "water"]

LIST_STEPS = [
    "x = sorted(x)", "x = x[::-1]", "x = x[1:]", "x = x[:-1]", "x = [v * 2 for v in x]",
    "x = [v + 1 for v in x]", "x = [v for v in x if v % 2 == 0]", "x = x + x[:1]", "x.append({k})",
    "x.insert(0, {k})", "x = x[::2]", "x = [v % 3 for v in x]",
]
STRING_STEPS = [
    "s = s[::-1]", "s = s.upper()", "s = s[:3]", "s = s[1:]", "s = s + s[0]", "s = s.replace('{c}', '*')",
    "s = s * 2", "s = s[::2]", "s = '-'.join(s)", "s = s.capitalize()",
]


def program(rng: random.Random, steps: int = 1) -> str:
    """``steps`` operations on a list of small numbers or on a word, then ``print``."""
    if rng.random() < 0.5:
        values = [rng.randrange(1, 10) for _ in range(rng.randrange(3, 6))]
        chosen = [step.format(k=rng.randrange(1, 10)) for step in rng.sample(LIST_STEPS, steps)]
        return "\n".join([f"x = {values}", *chosen, "print(x)"])
    word = rng.choice(WORDS)
    chosen = [step.format(c=rng.choice(word)) for step in rng.sample(STRING_STEPS, steps)]
    return "\n".join([f"s = {word!r}", *chosen, "print(s)"])


def output_of(source: str) -> str:
    """What the generated program prints (it only touches its own literals)."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(source, "<generated>", "exec"), {"__builtins__": {"sorted": sorted, "print": print}})
    return printed.getvalue().strip()


def rows(size: int, seed: int, steps: int = 1) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(size):
        source = program(rng, steps)
        question = f"What does this Python program print?\n\n```python\n{source}\n```"
        out.append({"question": question, "answer": output_of(source)})
    return out
