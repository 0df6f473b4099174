"""Write generation tasks as layermerge task specs (JSONL files + task.yaml + a scorer).

Tasks come from reasoning-gym generators (``name`` or ``name:key=value,key=value`` for the generator's
settings) or from ``python_output`` (this folder's code-reading generator, scored by exact match;
``python_output:steps=2`` chains two operations per program).
Each task gets ``train.jsonl`` and ``test.jsonl`` from different generator seeds (questions that
appear in both are dropped from train, so the splits are disjoint), each row holding the prompt, the
reference answer and the generator's entry (for its scorer); ``task.yaml`` names the scorer
``rg_score:score``, which calls reasoning-gym's own ``score_answer`` on the row's entry.

    .venv/bin/python benchmarks/llm/make_tasks.py --out /tmp/llm_tasks --task spell_backward \\
        --task chain_sum:min_terms=2,max_terms=3,max_digits=2 --task python_output --train 512 --test 200

``--validation-of TRACK_TASKS`` writes a selection split instead: ``validation.jsonl`` from generator
seed 3 without any prompt of the train or test files already under ``TRACK_TASKS/<generator>/``, and
a task spec of the same name that has only that split (kept apart so the track's own specs, hence
its experts' cache keys, stay as they are):

    .venv/bin/python benchmarks/llm/make_tasks.py --out benchmarks/llm/validation \\
        --validation-of benchmarks/tracks/llm-smol --test 200 --task python_output:steps=1 ...
"""

import argparse
import json
import sys
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
sys.path.insert(0, str(Path(__file__).parent))      # python_output.py beside this file
INSTRUCTION = "\n\nGive only the final answer."


def parse_task(text: str) -> tuple[str, dict]:
    """``chain_sum:min_terms=2,max_digits=2`` → ("chain_sum", {"min_terms": 2, "max_digits": 2})."""
    generator, _, settings = text.partition(":")
    config = {}
    for item in filter(None, settings.split(",")):
        key, _, value = item.partition("=")
        config[key.strip()] = json.loads(value) if value.strip()[:1].isdigit() or value.strip() in (
            "true", "false") else value.strip()
    return generator.strip(), config


def rows(generator: str, size: int, seed: int, config: dict | None = None) -> list[dict]:
    if generator == "python_output":
        from python_output import rows as program_rows

        return [{"prompt": row["question"] + INSTRUCTION, "answer": row["answer"], "generator": generator}
                for row in program_rows(size, seed, **(config or {}))]
    import reasoning_gym

    dataset = reasoning_gym.create_dataset(generator, size=size, seed=seed, **(config or {}))
    out = []
    for entry in dataset:
        record = {"question": entry["question"], "answer": entry["answer"], "metadata": entry.get("metadata", {})}
        out.append({"prompt": entry["question"].strip() + INSTRUCTION, "answer": str(entry["answer"]),
                    "generator": generator, "entry": json.dumps(record, default=str)})
    return out


def write_task(out: Path, task: str, train: int, test: int, max_new_tokens: int) -> Path:
    generator, config = parse_task(task)
    test_rows = rows(generator, test, 2, config)
    seen = {row["prompt"] for row in test_rows}
    train_rows = [row for row in rows(generator, train + 4 * test, 1, config) if row["prompt"] not in seen][:train]
    if len(train_rows) < train:
        raise SystemExit(f"{generator}: only {len(train_rows)} training rows differ from the test rows")
    return write_spec(out / generator, task, {"train": train_rows, "test": test_rows}, "train seed 1, test seed 2",
                      max_new_tokens)


def write_spec(folder: Path, task: str, splits: dict[str, list[dict]], origin: str, max_new_tokens: int) -> Path:
    """One JSONL file per split, the scorer where reasoning-gym scores the task, and ``task.yaml``."""
    generator, _ = parse_task(task)
    folder.mkdir(parents=True, exist_ok=True)
    for split, data in splits.items():
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in data))
    if generator == "python_output":
        metric = "exact_match"
    else:
        (folder / "rg_score.py").write_text(SCORER)
        metric = "rg_score:score"
    files = ", ".join(f"{split}: {split}.jsonl" for split in splits)
    (folder / "task.yaml").write_text(
        f"# generator: {task}; {origin} (benchmarks/llm/make_tasks.py)\n"
        f"name: {generator.replace('_', '-')}\ntype: generation\n"
        f"files: {{{files}}}\nprompt: prompt\ncompletion: answer\n"
        f"metric: {metric}\nmax_new_tokens: {max_new_tokens}\n")
    return folder / "task.yaml"


def write_validation(out: Path, task: str, size: int, max_new_tokens: int, track_tasks: Path) -> Path:
    """``validation.jsonl`` (seed 3, disjoint from the track's train and test prompts) and its spec."""
    generator, config = parse_task(task)
    taken = set()
    for split in ("train", "test"):
        path = track_tasks / generator / f"{split}.jsonl"
        if not path.is_file():
            raise SystemExit(f"{path} is missing: --validation-of names the folder that holds the track's tasks")
        taken |= {json.loads(line)["prompt"] for line in path.read_text().splitlines() if line.strip()}
    chosen = [row for row in rows(generator, size + 4 * size, 3, config) if row["prompt"] not in taken][:size]
    if len(chosen) < size:
        raise SystemExit(f"{generator}: only {len(chosen)} validation rows differ from the train and test rows")
    return write_spec(out / generator, task, {"validation": chosen},
                      f"validation seed 3, disjoint from {track_tasks}/{generator}", max_new_tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--task", action="append", required=True,
                        help="a reasoning-gym generator, optionally with settings (name:key=value,...), or "
                             "python_output; repeatable")
    parser.add_argument("--train", type=int, default=512)
    parser.add_argument("--test", type=int, default=200)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--validation-of", type=Path, default=None, metavar="TRACK_TASKS",
                        help="write only a validation split (--test rows, seed 3) disjoint from the tasks "
                             "already in this folder")
    args = parser.parse_args()
    for task in args.task:
        if args.validation_of is not None:
            print(write_validation(Path(args.out), task, args.test, args.max_new_tokens, args.validation_of))
        else:
            print(write_task(Path(args.out), task, args.train, args.test, args.max_new_tokens))


if __name__ == "__main__":
    main()
