"""Write a movie-review task in a user's own format: JSONL with fields 'review' and 'sentiment'.

The reviews are SST-2's (read from the local data folder, $LAYERMERGE_DATA or ../shared/data), with
their labels written as names, as users' own files usually have them: 2,000 seeded training rows and
the whole test split. Run from anywhere; the files go to data/ beside this script.
"""

import json
import random
from pathlib import Path

from layermerge.data import find_data_dir

HERE = Path(__file__).resolve().parent
NAMES = ("negative", "positive")


def convert(split: str, limit: int | None) -> int:
    root = find_data_dir()
    if root is None:
        raise SystemExit("no local data folder: set LAYERMERGE_DATA to the folder holding glue/sst2/")
    rows = [json.loads(line) for line in (root / "glue" / "sst2" / f"{split}.jsonl").read_text().splitlines()]
    if limit is not None:
        rows = random.Random(0).sample(rows, limit)
    out = HERE / "data" / f"{split}.jsonl"
    out.parent.mkdir(exist_ok=True)
    out.write_text("".join(json.dumps({"review": r["sentence"], "sentiment": NAMES[r["label"]]}) + "\n"
                           for r in rows))
    return len(rows)


if __name__ == "__main__":
    print(f"data/train.jsonl: {convert('train', 2000)} rows; data/test.jsonl: {convert('test', None)} rows")
