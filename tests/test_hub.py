"""Hugging Face hub ids as inputs (a fake hub cache, offline) and pushing the output to the hub (a fake HfApi)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import huggingface_hub
import pytest
import torch
import yaml
from conftest import build_family
from safetensors.torch import load_file

import layermerge
from layermerge.cli import main
from layermerge.errors import OutputError
from layermerge.io import hub
from layermerge.io.inputs import open_input

pytestmark = pytest.mark.usefixtures("one_torch_thread")

COMMITS = {"base": "a" * 40, "task0": "b" * 40, "task0@v1": "c" * 40, "task1": "d" * 40}


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    base, experts = build_family(tmp_path_factory.mktemp("models"), "bert", n_experts=2)
    return base, experts


@pytest.fixture(autouse=True)
def hub_env(tmp_path, monkeypatch):
    """A hub cache of this test's own, offline, no token, and no token verified yet."""
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(hub, "_verified_tokens", set())
    return cache


def cache_model(cache: Path, repo: str, commit: str, source: Path, ref: str | None = "main") -> Path:
    """huggingface_hub's cache layout: models--org--name/refs/<ref> holds the commit, snapshots/<commit>/ the files."""
    storage = cache / f"models--{repo.replace('/', '--')}"
    snapshot = storage / "snapshots" / commit
    shutil.copytree(source, snapshot)
    if ref is not None:
        (storage / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (storage / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def cached(bert, hub_env):
    base, experts = bert
    return {
        "base": cache_model(hub_env, "org/base", COMMITS["base"], base),
        "task0": cache_model(hub_env, "org/task0", COMMITS["task0"], experts["task0"]),
        "task0@v1": cache_model(hub_env, "org/task0", COMMITS["task0@v1"], experts["task0"], ref="v1"),
        "task1": cache_model(hub_env, "org/task1", COMMITS["task1"], experts["task1"], ref=None),  # by commit only
    }


def one_error_line(capsys, argv) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("layermerge: error: ") and captured.err.count("\n") == 1, captured.err
    return captured.err


def write_config(folder: Path, **values) -> str:
    path = folder / "merge.yaml"
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return str(path)


class FakeHfApi:
    """Records what would be sent to the hub; upload_folder lists the folder's files while they exist."""

    calls: list[tuple] = []

    def __init__(self, token=None, endpoint=None, **kwargs):
        self.token = token

    def whoami(self, token=None, **kwargs):
        FakeHfApi.calls.append(("whoami", token))
        return {"name": "me", "auth": {"accessToken": {"role": "write"}}}

    def create_repo(self, repo_id, **kwargs):
        FakeHfApi.calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        folder = Path(folder_path)
        files = {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
        FakeHfApi.calls.append(("upload_folder", repo_id, folder, files))


@pytest.fixture
def fake_hub(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    FakeHfApi.calls = []
    return FakeHfApi


# --------------------------------------------------------------------------- hub ids
@pytest.mark.parametrize("text, expected", [
    ("org/name", ("org/name", None)),
    ("Qwen/Qwen2.5-0.5B-Instruct", ("Qwen/Qwen2.5-0.5B-Instruct", None)),
    ("user_1/my.model", ("user_1/my.model", None)),
    ("org/name@main", ("org/name", "main")),
    ("org/name@v1.0", ("org/name", "v1.0")),
    ("org/name@" + "f" * 40, ("org/name", "f" * 40)),
    ("org/name@refs/pr/1", ("org/name", "refs/pr/1")),
    ("name", None),                          # no '/'
    ("org/name/extra", None),                # two '/'
    ("org//name", None),
    ("org/", None),
    ("/org/name", None),                     # absolute path
    ("./org/name", None),
    ("../org/name", None),
    ("~/models", None),
    (".cache/model", None),
    ("org/na me", None),
    ("org/name@", None),                     # empty revision
    ("org/name@a@b", None),
    ("org/name@v 1", None),
    ("org--x/name", None),                   # the hub forbids '--' and '..'
    ("org/na..me", None),
    ("org/-name", None),
    ("C:/models", None),
    ("experts/sst2.safetensors", None),      # a weights file: a local path, mistyped
    ("models/expert.bin", None),
    ("org/adapter.gguf", None),
])
def test_hub_id_detection(text, expected):
    assert hub.split_hub_id(text) == expected
    assert hub.looks_like_hub_id(text) is (expected is not None)


def test_an_existing_local_path_wins(tmp_path, bert, monkeypatch):
    shutil.copytree(bert[0], tmp_path / "org" / "name")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(hub, "resolve", lambda *a, **k: pytest.fail("a local folder was resolved on the hub"))
    reader = open_input("org/name", "base model")
    assert reader.path == (tmp_path / "org" / "name").resolve()
    assert getattr(reader, "hub_input", None) is None


def test_resolve_from_the_cache_by_ref_and_by_commit(cached):
    main_ref = hub.resolve("org/task0", "expert 'task0'")
    assert (main_ref.repo, main_ref.revision, main_ref.commit) == ("org/task0", None, COMMITS["task0"])
    assert main_ref.folder == cached["task0"]
    tag = hub.resolve("org/task0@v1")
    assert (tag.revision, tag.commit, tag.folder) == ("v1", COMMITS["task0@v1"], cached["task0@v1"])
    by_commit = hub.resolve_hub_id(f"org/task1@{COMMITS['task1']}")
    assert by_commit == cached["task1"]


def test_online_a_cached_commit_needs_no_network(cached, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    calls = []
    real = huggingface_hub.snapshot_download

    def spy(*args, **kwargs):
        calls.append(kwargs["local_files_only"])
        assert kwargs["local_files_only"], "the network was asked about an immutable, cached commit"
        return real(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", spy)
    assert hub.resolve_hub_id(f"org/task1@{COMMITS['task1']}") == cached["task1"]
    assert calls == [True]


# --------------------------------------------------------------------------- merging hub inputs offline
def test_merge_of_hub_ids_resolves_from_the_cache_and_the_card_shows_ids_and_commits(tmp_path, bert, cached, capsys):
    given = {"task0": "org/task0@v1", "task1": f"org/task1@{COMMITS['task1']}"}
    config = write_config(tmp_path, base="org/base", experts=given, method="task_arithmetic")
    out = tmp_path / "out"
    assert main(["merge", config, "-o", str(out), "-q"]) == 0

    card = (out / "README.md").read_text()
    assert f"- base, `org/base` from the Hugging Face hub at commit `{COMMITS['base']}`" in card
    assert f"- expert task0, `org/task0@v1` from the Hugging Face hub at commit `{COMMITS['task0@v1']}`" in card
    assert f"`{given['task1']}` from the Hugging Face hub at commit `{COMMITS['task1']}`" in card
    assert "model.safetensors` sha256" in card
    record = yaml.safe_load((out / "layermerge.yaml").read_text())
    assert record["base"] == "org/base" and record["experts"] == given      # as written
    assert "push_to_hub" not in record

    # The same merge from the local folders gives the same tensors.
    base, experts = bert
    local = layermerge.merge(base, experts, "task_arithmetic", quiet=True)
    merged = load_file(out / "model.safetensors")
    assert set(merged) == set(local.state_dict)
    for key, tensor in local.state_dict.items():
        torch.testing.assert_close(merged[key], tensor)


def test_an_uncached_hub_id_offline_is_one_line_naming_the_id_and_the_fix(tmp_path, cached, hub_env, capsys):
    config = write_config(tmp_path, base="org/base", experts={"task0": "org/missing@v2"})
    err = one_error_line(capsys, ["merge", config, "-o", str(tmp_path / "out")])
    assert "expert 'task0' 'org/missing@v2'" in err and "org/missing at revision 'v2'" in err
    assert f"not in the Hugging Face hub cache {hub_env}" in err and "HF_HUB_OFFLINE is set" in err
    assert "pass a local model folder instead" in err and "unset HF_HUB_OFFLINE" in err
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- pushing to the hub
def test_push_to_hub_offline_stops_before_any_merge_work(tmp_path, capsys):
    # The base is an uncached hub id: if any merge work began, the error would be about it instead.
    config = write_config(tmp_path, base="org/not-cached", experts={"task0": "org/not-cached-either"})
    out = tmp_path / "out"
    err = one_error_line(capsys, ["merge", config, "-o", str(out), "--push-to-hub", "me/merged"])
    assert "cannot push to the hub repo me/merged: HF_HUB_OFFLINE is set" in err
    assert not out.exists() and not list(tmp_path.glob("*out*"))


def test_push_to_hub_without_a_token_stops_before_any_merge_work(tmp_path, capsys, fake_hub, monkeypatch):
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    config = write_config(tmp_path, base="org/not-cached", experts={"task0": "org/x"}, push_to_hub="me/merged")
    err = one_error_line(capsys, ["merge", config, "-o", str(tmp_path / "out")])
    assert "no Hugging Face token" in err and "hf auth login" in err and "HF_TOKEN" in err
    assert not (tmp_path / "out").exists() and fake_hub.calls == []


def test_push_to_hub_when_the_hub_cannot_be_reached(tmp_path, capsys, fake_hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_fake")

    def refused(self, token=None, **kwargs):
        raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.setattr(FakeHfApi, "whoami", refused)
    config = write_config(tmp_path, base="org/not-cached", experts={"task0": "org/x"})
    err = one_error_line(capsys, ["merge", config, "-o", str(tmp_path / "out"), "--push-to-hub", "me/merged"])
    assert "https://huggingface.co cannot be reached (Name or service not known)" in err.replace("[Errno -2] ", "")

    monkeypatch.setattr(hub, "PREFLIGHT_TIMEOUT_S", 0.05)
    monkeypatch.setattr(FakeHfApi, "whoami", lambda self, token=None, **kw: time.sleep(1))
    with pytest.raises(OutputError, match="cannot be reached .no answer within 0.05 s"):
        hub.check_push_ready("me/merged")
    with pytest.raises(OutputError, match="not a hub repo id"):
        hub.check_push_ready("me/merged@main", token="hf_fake")


def test_cli_push_to_hub_uploads_the_finished_folder(tmp_path, bert, capsys, fake_hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_fake")
    base, experts = bert
    config = write_config(tmp_path, base=str(base), experts={k: str(v) for k, v in experts.items()},
                          push_to_hub="me/merged")
    out = tmp_path / "out"
    assert main(["merge", config, "-o", str(out)]) == 0
    assert "uploaded to https://huggingface.co/me/merged" in capsys.readouterr().out
    kinds = [call[0] for call in fake_hub.calls]
    assert kinds == ["whoami", "create_repo", "upload_folder"]          # the token is checked once
    assert fake_hub.calls[1][2]["exist_ok"] is True and fake_hub.calls[1][2]["private"] is False
    _, repo, folder, files = fake_hub.calls[2]
    assert repo == "me/merged" and folder == out.resolve()
    assert {"README.md", "model.safetensors", "config.json", "layermerge.yaml"} <= set(files)


def test_merged_model_push_to_hub_in_memory_and_from_a_folder(tmp_path, bert, fake_hub, monkeypatch):
    base, experts = bert
    merged = layermerge.merge(base, experts, "ties", quiet=True)
    url = merged.push_to_hub("me/merged", private=True, token="hf_fake")
    assert url == merged.hub_url == "https://huggingface.co/me/merged"
    (_, token), (_, repo, options), (_, _, folder, files) = fake_hub.calls
    assert token == "hf_fake" and repo == "me/merged" and options["private"] is True
    assert not folder.exists()                                       # a temporary folder, removed
    assert "# Merged model (ties)" in files["README.md"].decode() and "model.safetensors" in files

    fake_hub.calls = []
    monkeypatch.setenv("HF_TOKEN", "hf_fake")                       # merge(push_to_hub=) uses the login's token
    on_disk = layermerge.merge(base, experts, "ties", output=tmp_path / "merged", quiet=True,
                               push_to_hub="me/merged")
    assert on_disk.hub_url == "https://huggingface.co/me/merged"
    _, _, folder, files = fake_hub.calls[-1]
    assert folder == (tmp_path / "merged").resolve() and "README.md" in files


def test_an_upload_failure_is_one_line_and_keeps_the_folder(tmp_path, bert, fake_hub, monkeypatch):
    def forbidden(self, *, repo_id, folder_path, **kwargs):
        raise RuntimeError("403 Forbidden: you do not have write access to org/merged")

    monkeypatch.setattr(FakeHfApi, "upload_folder", forbidden)
    base, experts = bert
    merged = layermerge.merge(base, experts, "task_arithmetic", output=tmp_path / "merged", quiet=True)
    with pytest.raises(OutputError, match="403 Forbidden.*upload it later with: hf upload org/merged "):
        merged.push_to_hub("org/merged", token="hf_fake")
    assert (tmp_path / "merged" / "model.safetensors").is_file()
