"""Tasks as data (issue 16): spec parsing, the file formats, hub rows, few-shot sampling, the user errors
as the command line reports them, the metrics and scorers, and the generation collator.

Every test writes its own small files under ``tmp_path``; nothing here needs the shared data folder.
"""

from __future__ import annotations

import csv
import json
import string
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from tinytext import build_text_setup

from layermerge.cli import main
from layermerge.data import sources
from layermerge.data.collate import IGNORE_INDEX, GenerationCollator, prompt_ids
from layermerge.data.sampling import sample_few_shot
from layermerge.data.sources import ImageData, load_split
from layermerge.data.tasks import GENERATION_METRICS, LABEL_METRICS, Task, get_task, parse_task_list, task_from_file
from layermerge.errors import DataError
from layermerge.eval import scorers
from layermerge.eval.metrics import METRIC_PARTS, task_score
from layermerge.eval.scorers import check_scorer, exact_match, normalise_answer, numeric_match, score_answers

NAMES = ["negative", "positive"]
# (text, label id): commas, quotes and a tab, so the CSV/TSV quoting is exercised.
REVIEWS = [("a good film", 1), ("dull, slow", 0), ('she said "wow"', 1), ("poor\tscript", 0), ("fine acting", 1)]


# --------------------------------------------------------------------------- helpers
def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_delimited(path: Path, header: list[str], rows: list[list], delimiter: str = ",") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_spec(path: Path, **spec) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path


def reviews_spec(**changes) -> dict:
    """A valid two-class text spec (files relative to wherever it is read from), with changes."""
    return {"name": "reviews", "files": {"train": "train.jsonl"}, "text": "text", "labels": NAMES, **changes}


def write_png(path: Path, array: np.ndarray) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def run_cli(capsys, *argv: str) -> str:
    """Run ``layermerge`` expecting a user error: status 2 and exactly one line on stderr; that line."""
    capsys.readouterr()
    code = main(list(argv))
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("layermerge: error: ")
    return lines[0]


@pytest.fixture(scope="module")
def text_setup(tmp_path_factory):
    """A tiny BERT base with its tokenizer, experts sst2/rte and their local GLUE data (built once)."""
    return build_text_setup(tmp_path_factory.mktemp("text-setup"))


@pytest.fixture
def clean_caches():
    """Loaded splits are cached per task; hub loads are monkeypatched here, so start and end empty."""
    sources._load_hub.cache_clear()
    yield
    sources._load_hub.cache_clear()


# --------------------------------------------------------------------------- 1. spec parsing
def test_spec_file_resolves_files_against_its_own_folder(tmp_path, monkeypatch):
    """Relative files start at the spec's folder, not the working folder; the name defaults to the stem."""
    write_jsonl(tmp_path / "data" / "train.jsonl", [{"text": "good", "label": "positive"}])
    spec = write_spec(tmp_path / "specs" / "movie-reviews.yaml", files={"train": "../data/train.jsonl"},
                      text="text", labels=NAMES)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    task = get_task(str(spec))
    assert task.name == "movie-reviews"
    assert Path(task.directory) == (tmp_path / "specs").resolve()
    assert load_split(task, "train").rows == [{"text": "good", "label": 1}]
    assert task == task_from_file(spec)
    # Relative to a folder other than the working one, and inside a task list.
    assert get_task("movie-reviews.yaml", relative_to=tmp_path / "specs") == task
    assert [t.name for t in parse_task_list("sst2, movie-reviews.yaml", relative_to=tmp_path / "specs")] == \
        ["sst2", "movie-reviews"]


def test_a_folder_holding_task_yaml_is_a_task_named_after_the_folder(tmp_path):
    folder = tmp_path / "pets-v2"
    write_jsonl(folder / "train.jsonl", [{"text": "cat", "label": 0}])
    write_spec(folder / "task.yaml", files={"train": "train.jsonl"}, text="text", labels=["cat", "dog"])
    task = get_task(str(folder))
    assert task.name == "pets-v2" and len(load_split(task)) == 1
    # An explicit name wins over the file's stem or folder.
    write_spec(folder / "task.yaml", name="pets", files={"train": "train.jsonl"}, text="text", labels=["cat", "dog"])
    assert get_task(str(folder)).name == "pets"


def test_inline_mapping_resolves_files_relative_to_the_given_folder(tmp_path):
    write_jsonl(tmp_path / "cfg" / "train.jsonl", [{"text": "fine", "label": 1}, {"text": "bad", "label": 0}])
    task = get_task(reviews_spec(), relative_to=tmp_path / "cfg")
    assert task.kind == "text-classification" and task.num_labels == 2 and task.label_names == tuple(NAMES)
    assert load_split(task).labels.tolist() == [1, 0]
    # A spec's own relative directory starts at the folder too.
    moved = get_task(reviews_spec(directory="cfg"), relative_to=tmp_path)
    assert Path(moved.directory) == (tmp_path / "cfg").resolve()
    assert load_split(moved).labels.tolist() == [1, 0]


INVALID_SPECS = {
    "classification without labels": ({"labels": None}, "lists its class names in 'labels'"),
    "generation without completion": ({"type": "generation", "text": None, "labels": None, "prompt": "q"},
                                      "names its 'prompt' and 'completion' fields"),
    "unknown metric": ({"metric": "bleu"}, "unknown metric 'bleu'"),
    "unknown split key": ({"files": {"dev": "dev.jsonl"}}, "unknown split(s) ['dev']"),
    "unsafe name": ({"name": "../x"}, "task name '../x' is not allowed"),
    "labels on a regression task": ({"type": "regression"}, "'labels' is for classification tasks"),
    "generation metric on classification": ({"metric": "exact_match"},
                                            "metric 'exact_match' scores generated text"),
    "unknown field": ({"colour": "red"}, "colour: Extra inputs are not permitted"),
    "no input field": ({"text": None}, "name the input"),
}


@pytest.mark.parametrize("case", list(INVALID_SPECS))
def test_invalid_specs_are_one_line_data_errors(case, tmp_path):
    changes, fragment = INVALID_SPECS[case]
    spec = {k: v for k, v in reviews_spec(**changes).items() if v is not None}
    with pytest.raises(DataError) as caught:
        get_task(spec, relative_to=tmp_path)
    message = str(caught.value)
    assert fragment in message and "\n" not in message
    # The same spec in a file: the error names the file.
    path = write_spec(tmp_path / "bad.yaml", **spec)
    with pytest.raises(DataError, match="bad.yaml: ") as caught:
        get_task(str(path))
    assert fragment in str(caught.value) and "\n" not in str(caught.value)


def test_builtin_names_and_aliases_resolve_and_are_builtin(tmp_path):
    assert get_task("SST-2").name == "sst2"
    assert get_task("sts-b").name == "stsb" and get_task("Fashion-MNIST").name == "fashion_mnist"
    for name in ("sst2", "stsb", "mnist", "cifar10"):
        assert get_task(name).is_builtin
    write_jsonl(tmp_path / "train.jsonl", [{"text": "fine", "label": 1}])
    assert not get_task(reviews_spec(), relative_to=tmp_path).is_builtin
    # A user's task that borrows a built-in name is still not the built-in one.
    assert not get_task(reviews_spec(name="sst2"), relative_to=tmp_path).is_builtin


def test_record_round_trips_to_an_equal_task(tmp_path):
    user = get_task({"name": "scores", "type": "regression", "files": {"train": "s.csv", "test": "t.csv"},
                     "text": ["a", "b"], "label": "score", "range": [0, 5], "metric": "spearman"},
                    relative_to=tmp_path)
    hub = get_task({"name": "hubbed", "hub": {"path": "me/reviews", "name": "en", "splits": {"test": "validation"}},
                    "text": "text", "labels": 3, "image_size": None}, relative_to=tmp_path)
    generation = get_task({"name": "sums", "type": "generation", "files": {"train": "g.jsonl"}, "prompt": "q",
                           "completion": "a", "metric": "numeric_match", "chat_template": False,
                           "max_new_tokens": 8}, relative_to=tmp_path)
    builtins = [get_task(name) for name in ("sst2", "stsb", "mnli", "gtsrb")]
    for task in (user, hub, generation, *builtins):
        record = json.loads(json.dumps(task.record()))         # as written into a JSON record
        again = get_task(record)
        assert again == task and hash(again) == hash(task)
        assert again.is_builtin == task.is_builtin
    assert user.record()["range"] == [0.0, 5.0] and "max_new_tokens" not in user.record()


# --------------------------------------------------------------------------- 2. formats
def test_jsonl_csv_tsv_and_parquet_give_the_same_rows_and_labels(tmp_path):
    """Labels as names (JSONL, TSV), as id strings (CSV) and as integers (Parquet) all map to the same ids."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    texts, ids = [t for t, _ in REVIEWS], [i for _, i in REVIEWS]
    write_jsonl(tmp_path / "d.jsonl", [{"text": t, "label": NAMES[i]} for t, i in REVIEWS])
    write_delimited(tmp_path / "d.csv", ["text", "label"], [[t, str(i)] for t, i in REVIEWS])
    write_delimited(tmp_path / "d.tsv", ["label", "text"], [[NAMES[i], t] for t, i in REVIEWS], "\t")
    pq.write_table(pa.table({"text": texts, "label": ids}), tmp_path / "d.parquet")
    write_jsonl(tmp_path / "ids.jsonl", [{"text": t, "label": i} for t, i in REVIEWS])
    loaded = {}
    for name in ("d.jsonl", "d.csv", "d.tsv", "d.parquet", "ids.jsonl"):
        task = get_task(reviews_spec(name=name.replace(".", "-"), files={"train": name}), relative_to=tmp_path)
        data = load_split(task, "train")
        loaded[name] = ([row["text"] for row in data.rows], data.labels)
    for name, (rows, labels) in loaded.items():
        assert rows == texts, name
        assert labels.dtype == np.int64 and labels.tolist() == ids, name


def test_regression_csv_gives_float_labels(tmp_path):
    write_delimited(tmp_path / "scores.csv", ["first", "second", "score"],
                    [["a cat", "a dog", "0.5"], ["a car", "a bus", "3"], ["x", "y", "4.75"]])
    task = get_task({"name": "similarity", "type": "regression", "files": {"train": "scores.csv"},
                     "text": ["first", "second"], "label": "score", "range": [0, 5]}, relative_to=tmp_path)
    data = load_split(task)
    assert task.model_num_labels == 1 and task.score_metric == "pearson_spearman"
    assert data.labels.dtype == np.float32 and data.labels.tolist() == [0.5, 3.0, 4.75]
    assert data[1] == {"first": "a car", "second": "a bus", "score": 3.0}
    # Outside the declared range is an error naming the range.
    write_delimited(tmp_path / "high.csv", ["first", "second", "score"], [["a", "b", "7"]])
    high = get_task({**task.record(), "name": "similarity-high", "files": {"train": "high.csv"}})
    with pytest.raises(DataError, match=r"high.csv:2: label 7.0 is outside the task's range \[0.0, 5.0\]"):
        load_split(high)


def pet_images(folder: Path) -> dict[str, list[np.ndarray]]:
    """Two RGB 4×4 PNGs each in ``cat/`` and ``dog/`` (distinct seeded pixels); class -> arrays in file order."""
    rng = np.random.default_rng(0)
    images = {}
    for name in ("cat", "dog"):
        images[name] = [rng.integers(0, 256, (4, 4, 3), dtype=np.uint8) for _ in range(2)]
        for i, array in enumerate(images[name]):
            write_png(folder / name / f"{i}.png", array)
    return images


def test_image_folder_and_jsonl_image_paths_give_the_same_arrays(tmp_path):
    """Class ids follow the spec's label order (dog first here), not the folders' alphabetical order."""
    images = pet_images(tmp_path / "data" / "pets")
    folder_task = get_task({"name": "pets", "format": "image_folder", "files": {"train": "data/pets"},
                            "labels": ["dog", "cat"]}, relative_to=tmp_path)
    data = load_split(folder_task)
    assert isinstance(data, ImageData) and folder_task.kind == "image-classification"
    assert data.images.dtype == np.uint8 and data.images.shape == (4, 4, 4, 3)
    assert data.labels.tolist() == [0, 0, 1, 1]
    np.testing.assert_array_equal(data.images, np.stack(images["dog"] + images["cat"]))
    # Paths in a JSONL file are relative to that file (data/), not to the spec.
    rows = [{"picture": f"pets/{name}/{i}.png", "label": name} for name in ("dog", "cat") for i in range(2)]
    write_jsonl(tmp_path / "data" / "pets.jsonl", rows)
    rows_task = get_task({"name": "pets-rows", "files": {"train": "data/pets.jsonl"}, "image": "picture",
                          "labels": ["dog", "cat"]}, relative_to=tmp_path)
    from_rows = load_split(rows_task)
    assert isinstance(from_rows, ImageData)
    np.testing.assert_array_equal(from_rows.images, data.images)
    np.testing.assert_array_equal(from_rows.labels, data.labels)
    assert from_rows[2]["label"] == 1 and from_rows[2]["image"].shape == (4, 4, 3)


def test_images_of_different_sizes_need_image_size(tmp_path):
    pet_images(tmp_path / "pets")
    write_png(tmp_path / "pets" / "dog" / "big.png", np.full((6, 5, 3), 200, dtype=np.uint8))
    spec = {"name": "pets", "format": "image_folder", "files": {"train": "pets"}, "labels": ["cat", "dog"]}
    with pytest.raises(DataError, match="images differ in size") as caught:
        load_split(get_task(spec, relative_to=tmp_path))
    assert "image_size" in str(caught.value) and "\n" not in str(caught.value)
    data = load_split(get_task({**spec, "image_size": 8}, relative_to=tmp_path))
    assert data.images.shape == (5, 8, 8, 3) and data.images.dtype == np.uint8
    # The uniform 200-valued image stays uniform after resizing.
    assert (data.images[data.labels == 1][-1] == 200).all()


def test_image_folder_with_format_auto_loads_or_says_to_set_image_folder(tmp_path):
    pet_images(tmp_path / "pets")
    spec = {"name": "pets", "files": {"train": "pets"}, "labels": ["cat", "dog"]}
    try:
        data = load_split(get_task(spec, relative_to=tmp_path))
    except DataError as exc:
        assert "image_folder" in str(exc)
    else:
        assert isinstance(data, ImageData) and len(data) == 4


def test_image_folder_reload_sees_a_new_image(tmp_path):
    pet_images(tmp_path / "pets")
    task = get_task({"name": "pets", "format": "image_folder", "files": {"train": "pets"},
                     "labels": ["cat", "dog"]}, relative_to=tmp_path)
    assert len(load_split(task)) == 4
    write_png(tmp_path / "pets" / "cat" / "new.png", np.zeros((4, 4, 3), dtype=np.uint8))
    assert len(load_split(task)) == 5


def test_hub_rows_go_through_the_same_checks_as_file_rows(tmp_path, monkeypatch, clean_caches):
    """A stand-in ``datasets`` module (the real one may be absent, and the Hub is offline here)."""
    import sys
    import types

    datasets = types.ModuleType("datasets")
    monkeypatch.setitem(sys.modules, "datasets", datasets)
    rows = [{"text": "fine", "label": "positive"}, {"sentence": "bad", "label": 0}]
    calls = []

    def fake_load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        return [dict(row) for row in rows]

    datasets.load_dataset = fake_load_dataset
    hub_task = get_task(reviews_spec(files={}, hub={"path": "me/reviews", "splits": {"test": "validation"}}),
                        relative_to=tmp_path)
    assert hub_task.splits == ("test",)
    with pytest.raises(DataError) as from_hub:
        load_split(hub_task, "test")
    assert calls == [("me/reviews", None, "validation")]
    write_jsonl(tmp_path / "test.jsonl", rows)
    with pytest.raises(DataError) as from_file:
        load_split(get_task(reviews_spec(files={"test": "test.jsonl"}), relative_to=tmp_path), "test")
    hub_message, file_message = str(from_hub.value), str(from_file.value)
    assert hub_message.startswith("hf:me/reviews:validation row 2: ")
    assert file_message.startswith(f"{tmp_path / 'test.jsonl'}:2: ")
    assert hub_message.split(": ", 1)[1] == file_message.split(": ", 1)[1]
    assert "no field 'text'" in hub_message and "the row has fields: sentence, label" in hub_message
    # Good rows load, with label names mapped to ids.
    rows[1] = {"text": "bad", "label": 0}
    sources._load_hub.cache_clear()
    assert load_split(hub_task, "test").labels.tolist() == [1, 0]


def test_hub_split_missing_from_the_spec_is_named(tmp_path):
    task = get_task(reviews_spec(files={}, hub={"path": "me/reviews", "splits": {"train": "train"}}),
                    relative_to=tmp_path)
    with pytest.raises(DataError, match=r"has no test split \(its spec gives: train\)"):
        load_split(task, "test")


# --------------------------------------------------------------------------- 3. generation rows, few-shot
def generation_task(folder: Path, rows: list[dict], name: str = "sums", **changes) -> Task:
    write_jsonl(folder / "train.jsonl", rows)
    return get_task({"name": name, "type": "generation", "files": {"train": "train.jsonl"}, "prompt": "question",
                     "completion": "answer", **changes}, relative_to=folder)


def test_generation_split_loads_prompts_and_completions(tmp_path):
    rows = [{"question": "1+1=", "answer": "2", "id": 0}, {"question": "How many?", "answer": 12, "id": 1}]
    task = generation_task(tmp_path, rows)
    data = load_split(task)
    assert task.kind == "text-generation" and task.score_metric == "exact_match"
    assert data.rows == rows                       # untouched, extra fields kept
    assert data.labels.tolist() == ["2", "12"]     # references as text
    bad = generation_task(tmp_path / "bad", [{"question": "q", "answer": ["a", "b"]}], name="bad")
    with pytest.raises(DataError, match=r"train.jsonl:1: field 'answer' holds list, not text"):
        load_split(bad)


def test_few_shot_of_a_generation_task_is_uniform_and_seeded(tmp_path):
    """8 'yes' and 2 'no' completions: a uniform draw picks each row equally often, whereas a draw
    balanced by completion would pick the two 'no' rows every time."""
    rows = [{"question": f"q{i}", "answer": "no" if i in (3, 7) else "yes"} for i in range(10)]
    task = generation_task(tmp_path, rows)
    first, again, other = (sample_few_shot(task, 4, seed=s) for s in (5, 5, 6))
    assert first.split == "train" and len(first) == 4
    assert first.rows == again.rows and first.rows != other.rows
    positions = [rows.index(row) for row in first.rows]
    assert positions == sorted(positions)           # in train-file order
    counts = Counter(row["question"] for seed in range(400) for row in sample_few_shot(task, 4, seed=seed).rows)
    assert len(counts) == 10
    assert all(110 <= n <= 210 for n in counts.values()), counts      # expected 160 each, sd ≈ 10
    with pytest.raises(DataError, match="asked for 11 examples of sums but its train split has only 10"):
        sample_few_shot(task, 11)


# --------------------------------------------------------------------------- 4. user errors through the CLI
def cli_spec(folder: Path, name: str, rows: list[dict] | None = None, data_file: str = "data.jsonl",
             **spec) -> str:
    """A spec file ``folder/name.yaml`` (the reviews task unless changed) and, if given, its rows."""
    if rows is not None:
        write_jsonl(folder / data_file, rows)
    fields = {"files": {"test": data_file}, "text": "text", "labels": NAMES, **spec}
    return str(write_spec(folder / f"{name}.yaml", **{k: v for k, v in fields.items() if v is not None}))


def test_cli_missing_data_file_names_the_path(text_setup, tmp_path, capsys):
    base = text_setup[0]
    spec = cli_spec(tmp_path, "reviews", data_file="nothere.jsonl")
    line = run_cli(capsys, "eval", str(base), "--task", spec, "--quiet")
    assert f"not found: {tmp_path / 'nothere.jsonl'}" in line and "test split" in line


def test_cli_missing_split_says_which_splits_the_spec_has(text_setup, tmp_path, capsys):
    base = text_setup[0]
    spec = cli_spec(tmp_path, "reviews", [{"text": "good", "label": 1}], files={"train": "data.jsonl"})
    line = run_cli(capsys, "eval", str(base), "--task", spec, "--quiet")
    assert "task 'reviews' has no test split (its spec gives: train)" in line
    line = run_cli(capsys, "eval", str(base), "--task", spec, "--split", "validation", "--quiet")
    assert "has no validation split (its spec gives: train)" in line


def test_cli_field_absent_from_records_names_it_and_the_fields_present(text_setup, tmp_path, capsys):
    base = text_setup[0]
    rows = [{"text": "good", "label": 1}, {"sentence": "bad", "label": 0, "id": 7}]
    spec = cli_spec(tmp_path, "reviews", rows, files={"train": "data.jsonl"})
    line = run_cli(capsys, "finetune", str(base), "--task", spec, "--cache-dir", str(tmp_path / "cache"), "--quiet")
    assert f"{tmp_path / 'data.jsonl'}:2: no field 'text'" in line
    assert "the row has fields: sentence, label, id" in line
    assert not (tmp_path / "cache").exists()            # checked before any training or writing


def test_cli_label_outside_the_declared_names(text_setup, tmp_path, capsys):
    base = text_setup[0]
    spec = cli_spec(tmp_path, "reviews", [{"text": "good", "label": "positive"}, {"text": "meh", "label": "mixed"}])
    line = run_cli(capsys, "eval", str(base), "--task", spec, "--quiet")
    assert "data.jsonl:2: label 'mixed' is not one of the declared labels ['negative', 'positive']" in line


def test_cli_non_numeric_regression_label(text_setup, tmp_path, capsys):
    base = text_setup[0]
    write_delimited(tmp_path / "scores.csv", ["text", "score"], [["good", "4.5"], ["bad", "n/a"]])
    spec = cli_spec(tmp_path, "scores", type="regression", labels=None, label="score",
                    files={"test": "scores.csv"})
    line = run_cli(capsys, "eval", str(base), "--task", spec, "--quiet")
    assert "scores.csv:3: label 'n/a' is not a number (task 'scores' is a regression)" in line


@pytest.mark.parametrize("content", ["", "text,label\n"], ids=["empty-file", "header-only"])
def test_cli_empty_split(text_setup, tmp_path, capsys, content):
    base = text_setup[0]
    (tmp_path / "empty.csv").write_text(content)
    spec = cli_spec(tmp_path, "reviews", files={"test": "empty.csv"})
    line = run_cli(capsys, "eval", str(base), "--task", spec, "--quiet")
    assert f"{tmp_path / 'empty.csv'} holds no examples for task 'reviews' (split test)" in line


def test_cli_fewer_examples_than_shots_says_how_many(text_setup, tmp_path, capsys):
    """A data-driven merge whose config names a spec with 3 training rows but asks for 4 shots."""
    base, experts, data_dir = text_setup
    rows = [{"text": "good", "label": 1}, {"text": "bad", "label": 0}, {"text": "ok", "label": 1}]
    cli_spec(tmp_path, "few", rows, files={"train": "data.jsonl"})
    config = {"base": str(base), "experts": {k: str(v) for k, v in experts.items()}, "method": "prodistill",
              "params": {"epochs": 1, "batch_size": 4, "lr": 0.05},
              "data": {"shots": 4, "max_length": 16, "batch_size": 2, "data_dir": str(data_dir),
                       "tasks": {"sst2": "few.yaml"}},
              "engine": {"device": "cpu"}}
    path = write_spec(tmp_path / "merge.yaml", **config)
    line = run_cli(capsys, "merge", str(path), "--output", str(tmp_path / "out"), "--quiet")
    assert "asked for 4 examples of few but its train split has only 3" in line
    assert not (tmp_path / "out").exists()
    # The sampler says the same directly.
    with pytest.raises(DataError, match="has only 3; ask for 3 or fewer"):
        sample_few_shot(str(tmp_path / "few.yaml"), 5)


def test_cli_scorer_that_cannot_be_imported_is_named(text_setup, tmp_path, capsys):
    base = text_setup[0]
    spec = cli_spec(tmp_path, "sums", [{"q": "1+1", "a": "2"}], type="generation", text=None, labels=None,
                    prompt="q", completion="a", metric="nosuchmodule:score")
    line = run_cli(capsys, "eval", str(base), "--task", spec, "--quiet")
    assert "cannot import the scorer 'nosuchmodule:score' of task 'sums'" in line
    assert "No module named 'nosuchmodule'" in line


def scorer_task(folder: Path, module: str, body: str, name: str = "sums") -> Task:
    (folder / f"{module}.py").parent.mkdir(parents=True, exist_ok=True)
    (folder / f"{module}.py").write_text(body)
    rows = [{"question": "1+1", "answer": "2"}, {"question": "2+2", "answer": "4"}]
    return generation_task(folder, rows, name=name, metric=f"{module}:score")


def test_scorer_module_beside_the_spec_is_found_and_used(tmp_path):
    module = "layermerge_test_length_scorer"
    body = "def score(answer, example):\n    return float(answer.strip() == str(example['answer']))\n"
    try:
        task = scorer_task(tmp_path, module, body)
        check_scorer(task)
        assert str(tmp_path.resolve()) not in sys.path              # the spec's folder is not left on the path
        rows = load_split(task).rows
        assert score_answers(task, ["2", "5"], rows) == (50.0, {"score": 50.0})
        assert score_answers(task, [" 2 ", "4"], rows)[0] == 100.0
        (tmp_path / "layermerge_test_broken_scorer.py").write_text("def score(answer, example):\n    return 3\n")
        broken = get_task({**task.record(), "metric": "layermerge_test_broken_scorer:score", "name": "broken"})
        with pytest.raises(DataError, match=r"returned 3.0; a scorer returns a number in \[0, 1\]"):
            score_answers(broken, ["2", "4"], rows)
        with pytest.raises(DataError, match=f"{module}.py has no function 'nothere'"):
            check_scorer(get_task({**task.record(), "metric": f"{module}:nothere"}))
    finally:
        sys.modules.pop(module, None)
        sys.modules.pop("layermerge_test_broken_scorer", None)


def test_scorer_modules_of_the_same_name_in_two_spec_folders_stay_apart(tmp_path):
    module = "layermerge_test_shared_scorer"
    try:
        always = scorer_task(tmp_path / "a", module, "def score(answer, example):\n    return 1.0\n", name="a")
        never = scorer_task(tmp_path / "b", module, "def score(answer, example):\n    return 0.0\n", name="b")
        assert score_answers(always, ["x", "y"], load_split(always).rows)[0] == 100.0
        assert score_answers(never, ["x", "y"], load_split(never).rows)[0] == 0.0
    finally:
        sys.modules.pop(module, None)


def test_csv_with_a_byte_order_mark_reads_like_one_without(tmp_path):
    (tmp_path / "train.csv").write_bytes("text,label\r\ngood,1\r\nbad,0\r\n".encode("utf-8-sig"))
    task = get_task(reviews_spec(files={"train": "train.csv"}), relative_to=tmp_path)
    assert load_split(task).rows == [{"text": "good", "label": 1}, {"text": "bad", "label": 0}]


def test_csv_row_with_fewer_values_than_the_header_says_so(tmp_path):
    (tmp_path / "train.csv").write_text("text,label\ngood,1\nbad\n")
    task = get_task(reviews_spec(files={"train": "train.csv"}), relative_to=tmp_path)
    with pytest.raises(DataError, match=r"train.csv:3: .*(fewer values|2 columns)"):
        load_split(task)


# --------------------------------------------------------------------------- 5. metrics and scorers
def test_label_metrics_agree_with_scikit_learn_and_scipy():
    sk = pytest.importorskip("sklearn.metrics")
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for _ in range(10):
        labels, predictions = rng.integers(0, 3, 40), rng.integers(0, 3, 40)
        score, parts = task_score("macro_f1", predictions, labels)
        assert score == pytest.approx(100 * sk.f1_score(labels, predictions, average="macro"))
        assert parts == {"macro_f1": score}
        binary_labels, binary_predictions = labels % 2, predictions % 2
        assert task_score("f1", binary_predictions, binary_labels)[0] == \
            pytest.approx(100 * sk.f1_score(binary_labels, binary_predictions))
        assert task_score("matthews", predictions, labels)[0] == \
            pytest.approx(100 * sk.matthews_corrcoef(labels, predictions))
        x = np.round(rng.normal(size=30), 1)               # rounded: ties for Spearman's ranks
        y = np.round(x + rng.normal(size=30), 1)
        assert task_score("pearson", x, y)[0] == pytest.approx(100 * stats.pearsonr(x, y)[0])
        assert task_score("spearman", x, y)[0] == pytest.approx(100 * stats.spearmanr(x, y)[0])
    # A class only predicted still counts in macro-F1, as in scikit-learn.
    assert task_score("macro_f1", [0, 2, 1, 1], [0, 0, 1, 1])[0] == \
        pytest.approx(100 * sk.f1_score([0, 0, 1, 1], [0, 2, 1, 1], average="macro"))


def test_answer_normalisation_and_exact_match():
    assert normalise_answer("  The  Eiffel\tTower. ") == "the eiffel tower"
    assert normalise_answer("“Paris!”") == "paris"
    assert exact_match("PARIS.", "paris") == 1.0
    assert exact_match('  "Paris"  ', "Paris") == 1.0
    assert exact_match("New   York", "new york") == 1.0
    assert exact_match("Paris, France", "Paris France") == 0.0      # inner punctuation is kept
    assert exact_match("Paris", "Pariss") == 0.0


def test_numeric_match():
    assert numeric_match("The answer is 1,234.", "1234") == 1.0
    assert numeric_match("3 apples plus 9 is 12", "12") == 1.0      # the last number counts
    assert numeric_match("12", "13") == 0.0
    assert numeric_match("I do not know.", "4") == 0.0
    assert numeric_match("0.5", ".5") == 1.0 and numeric_match("-3", "3") == 0.0


def test_metric_names_match_across_modules():
    assert set(scorers.ANSWER_METRICS) == set(GENERATION_METRICS)
    assert set(METRIC_PARTS) == set(LABEL_METRICS)
    assert not set(GENERATION_METRICS) & set(LABEL_METRICS)


# --------------------------------------------------------------------------- 6. the generation collator
TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")
CHARS = sorted(set(string.ascii_letters + string.digits + string.punctuation + " "))
VOCAB = {token: i for i, token in enumerate(["<pad>", "<eos>", "<unk>", *CHARS])}
PAD, EOS = VOCAB["<pad>"], VOCAB["<eos>"]


def char_tokenizer(chat_template: str | None = None):
    """A character-level fast tokenizer: one token per character, specials <pad>, <eos>, <unk>."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", pad_token="<pad>",
                                        unk_token="<unk>")
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def ids(text: str) -> list[int]:
    return [VOCAB[c] for c in text]


def collator_task(tmp_path: Path, **changes) -> Task:
    return get_task({"name": "sums", "type": "generation", "files": {"train": "train.jsonl"}, "prompt": "q",
                     "completion": "a", **changes}, relative_to=tmp_path)


def test_generation_collator_labels_only_the_completion(tmp_path):
    tokenizer = char_tokenizer()
    assert tokenizer.decode(ids("2+2=4")) == "2+2=4"
    rows = [{"q": "2+2=", "a": "4"}, {"q": "What is 1+1?", "a": "two"}]
    batch = GenerationCollator(tokenizer, collator_task(tmp_path), with_labels=True)(rows)
    width = max(len(r["q"]) + len(r["a"]) + 1 for r in rows)
    assert batch["input_ids"].shape == batch["labels"].shape == (2, width)
    for i, row in enumerate(rows):
        prompt, completion = ids(row["q"]), ids(row["a"]) + [EOS]
        n, padding = len(prompt) + len(completion), width - len(prompt) - len(completion)
        assert batch["input_ids"][i].tolist() == prompt + completion + [PAD] * padding
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * padding
        assert batch["labels"][i].tolist() == [IGNORE_INDEX] * len(prompt) + completion + [IGNORE_INDEX] * padding
    # The prompt alone (evaluation, few-shot inputs without completions): nothing to learn.
    alone = GenerationCollator(tokenizer, collator_task(tmp_path), include_completion=False, with_labels=True)(rows)
    assert alone["input_ids"][1].tolist() == ids(rows[1]["q"])
    assert alone["input_ids"][0].tolist() == ids(rows[0]["q"]) + [PAD] * (len(rows[1]["q"]) - len(rows[0]["q"]))
    assert (alone["labels"] == IGNORE_INDEX).all()
    assert "labels" not in GenerationCollator(tokenizer, collator_task(tmp_path))(rows)
    # max_length cuts the end.
    short = GenerationCollator(tokenizer, collator_task(tmp_path), max_length=5, with_labels=True)(rows[:1])
    assert short["input_ids"][0].tolist() == ids("2+2=4")
    assert short["labels"][0].tolist() == [IGNORE_INDEX] * 4 + ids("4")


def test_prompt_ids_use_the_chat_template_unless_the_task_says_not(tmp_path):
    assert all(c in VOCAB for c in "<user><assistant>")
    tokenizer = char_tokenizer(TEMPLATE)
    task = collator_task(tmp_path)
    assert prompt_ids(tokenizer, task, "hi") == ids("<user>hi<assistant>")
    assert prompt_ids(tokenizer, collator_task(tmp_path, chat_template=False), "hi") == ids("hi")
    assert prompt_ids(char_tokenizer(), task, "hi") == ids("hi")          # no template on the tokenizer
    batch = GenerationCollator(tokenizer, task, with_labels=True)([{"q": "1+1=", "a": "2"}])
    prompt = ids("<user>1+1=<assistant>")
    assert batch["input_ids"][0].tolist() == prompt + ids("2") + [EOS]
    assert batch["labels"][0].tolist() == [IGNORE_INDEX] * len(prompt) + ids("2") + [EOS]
