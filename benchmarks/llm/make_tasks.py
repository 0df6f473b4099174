"""Write reasoning-gym generation tasks as layermerge task specs (JSONL files + task.yaml + a scorer).

Each task gets ``train.jsonl`` and ``test.jsonl`` from different generator seeds (questions that
appear in both are dropped from train, so the splits are disjoint), each row holding the prompt, the
reference answer and the generator's entry (for its scorer); ``task.yaml`` names the scorer
``rg_score:score``, which calls reasoning-gym's own ``score_answer`` on the row's entry.

    .venv/bin/python benchmarks/llm/make_tasks.py --out /tmp/llm_tasks --tasks spell_backward,chain_sum \\
        --train 512 --test 200
"""

import argparse
import json
from pathlib import Path

SCORER = '''"""Score an answer with reasoning-gym's own scorer for the row's generator (0..1)."""

import json
from functools import cache

import reasoning_gym


@cache
def _dataset(name: str):
    return reasoning_gym.create_dataset(name, size=1, seed=0)


def score(answer: str, example: dict) -> float:
    entry = json.loads(example["entry"])
    return float(_dataset(example["generator"]).score_answer(answer, entry))
'''
INSTRUCTION = "\n\nGive only the final answer."


def rows(generator: str, size: int, seed: int) -> list[dict]:
    import reasoning_gym

    dataset = reasoning_gym.create_dataset(generator, size=size, seed=seed)
    out = []
    for entry in dataset:
        record = {"question": entry["question"], "answer": entry["answer"], "metadata": entry.get("metadata", {})}
        out.append({"prompt": entry["question"].strip() + INSTRUCTION, "answer": str(entry["answer"]),
                    "generator": generator, "entry": json.dumps(record, default=str)})
    return out


def write_task(out: Path, generator: str, train: int, test: int, max_new_tokens: int) -> Path:
    folder = out / generator
    folder.mkdir(parents=True, exist_ok=True)
    test_rows = rows(generator, test, seed=2)
    seen = {row["prompt"] for row in test_rows}
    train_rows = [row for row in rows(generator, train + test, seed=1) if row["prompt"] not in seen][:train]
    for split, data in (("train", train_rows), ("test", test_rows)):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in data))
    (folder / "rg_score.py").write_text(SCORER)
    (folder / "task.yaml").write_text(
        f"name: {generator.replace('_', '-')}\ntype: generation\nfiles: {{train: train.jsonl, test: test.jsonl}}\n"
        f"prompt: prompt\ncompletion: answer\nmetric: rg_score:score\nmax_new_tokens: {max_new_tokens}\n")
    return folder / "task.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--tasks", required=True, help="comma-separated reasoning-gym generators")
    parser.add_argument("--train", type=int, default=512)
    parser.add_argument("--test", type=int, default=200)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()
    for generator in args.tasks.split(","):
        print(write_task(Path(args.out), generator.strip(), args.train, args.test, args.max_new_tokens))


if __name__ == "__main__":
    main()
