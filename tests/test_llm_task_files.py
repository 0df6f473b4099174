"""benchmarks/llm/make_tasks.py: the LLM track's task files, and a selection split kept apart from them."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

FOLDER = Path(__file__).resolve().parent.parent / "benchmarks" / "llm"


@pytest.fixture(scope="module")
def make_tasks():
    sys.path.insert(0, str(FOLDER))
    try:
        spec = importlib.util.spec_from_file_location("make_tasks_under_test", FOLDER / "make_tasks.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(FOLDER))


def prompts(path: Path) -> set[str]:
    return {json.loads(line)["prompt"] for line in path.read_text().splitlines() if line.strip()}


def test_validation_split_is_disjoint_from_train_and_test_and_readable(make_tasks, tmp_path):
    from layermerge.data.tasks import get_task

    track = tmp_path / "track"
    make_tasks.write_task(track, "python_output:steps=1", train=40, test=15, max_new_tokens=32)
    spec = make_tasks.write_validation(tmp_path / "validation", "python_output:steps=1", 15, 32, track)

    validation = prompts(spec.parent / "validation.jsonl")
    assert len(validation) == 15
    assert not validation & prompts(track / "python_output" / "train.jsonl")
    assert not validation & prompts(track / "python_output" / "test.jsonl")
    task = get_task(str(spec))
    assert task.name == "python-output" and set(task.files) == {"validation"}
    # the track's own spec is untouched, so the experts' cache keys stay as they were
    assert "validation" not in (track / "python_output" / "task.yaml").read_text()


def test_validation_split_needs_the_track_files(make_tasks, tmp_path):
    with pytest.raises(SystemExit, match="missing"):
        make_tasks.write_validation(tmp_path / "validation", "python_output", 5, 32, tmp_path / "nowhere")
