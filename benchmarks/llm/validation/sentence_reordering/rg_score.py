"""Score an answer with reasoning-gym's own scorer for the row's generator (0..1)."""

import json
from functools import cache

import reasoning_gym


@cache
def _dataset(name: str):
    return reasoning_gym.create_dataset(name, size=1, seed=0)


def score(answer: str, example: dict) -> float:
    entry = json.loads(example["entry"])
    return float(_dataset(example["generator"]).score_answer(answer, entry))
