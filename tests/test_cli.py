"""The command line: `methods`, config errors (one line, exit 2, no traceback), --quiet, --version."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml
from conftest import tree_hashes

import layermerge
from layermerge.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def bert(family_models):
    base, experts = family_models["bert"]
    return base, dict(list(experts.items())[:2])


def write_config(folder, **values) -> str:
    path = folder / "merge.yaml"
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return str(path)


def valid_config(bert, **overrides) -> dict:
    base, experts = bert
    config = {"base": str(base), "experts": {k: str(v) for k, v in experts.items()},
              "method": "task_arithmetic"}
    config.update(overrides)
    return config


def run_error(capsys, argv) -> str:
    """Run the CLI in-process, expect exit 2, and return its single stderr line."""
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("layermerge: error: ") and captured.err.count("\n") == 1, captured.err
    assert "Traceback" not in captured.err
    return captured.err


# --------------------------------------------------------------------------- methods
def test_methods_lists_every_method_with_parameters(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    methods = layermerge.available_methods()
    assert methods
    for name, info in methods.items():
        assert f"{name}  [" in out and info.summary in out
        for row in info.parameters():
            assert f"    {row['name']}: {row['type']} = {row['default']!r}" in out, (name, row["name"])


def test_methods_json_and_single_method(capsys):
    assert main(["methods", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert set(listed) == set(layermerge.available_methods())
    assert [p["name"] for p in listed["task_arithmetic"]["parameters"]] == ["scaling"]
    assert main(["methods", "task_arithmetic"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("task_arithmetic") and "average  [" not in out
    err = run_error(capsys, ["methods", "no_such_method"])
    assert "unknown method 'no_such_method'" in err and "task_arithmetic" in err


# --------------------------------------------------------------------------- config validation
def test_unknown_config_key(bert, tmp_path, capsys):
    config = write_config(tmp_path, **valid_config(bert), methd="ties")
    err = run_error(capsys, ["merge", config, "--output", str(tmp_path / "out")])
    assert "unknown key 'methd'" in err and config in err
    assert "allowed keys: base, experts, method, params" in err
    assert not (tmp_path / "out").exists()


def test_unknown_method_lists_the_allowed_ones(bert, tmp_path, capsys):
    config = write_config(tmp_path, **valid_config(bert, method="tyes"))
    err = run_error(capsys, ["merge", config, "--output", str(tmp_path / "out")])
    assert "key 'method'" in err and "unknown method 'tyes'" in err
    for name in layermerge.available_methods():
        assert name in err


def test_wrong_parameter_type(bert, tmp_path, capsys):
    config = write_config(tmp_path, **valid_config(bert, params={"scaling": "lots"}))
    err = run_error(capsys, ["merge", config, "--output", str(tmp_path / "out")])
    assert "method 'task_arithmetic'" in err and "parameter 'scaling'" in err and "'lots'" in err


def test_unknown_parameter_names_the_allowed_ones(bert, tmp_path, capsys):
    config = write_config(tmp_path, **valid_config(bert, params={"scale": 0.3}))
    err = run_error(capsys, ["merge", config, "--output", str(tmp_path / "out")])
    assert "unknown parameter 'scale' (allowed: scaling)" in err


@pytest.mark.parametrize("override, expected", [
    ({"vocab_policy": "rows"}, ["key 'vocab_policy'", "'error'", "'base_rows'"]),
    ({"dtype": "float8"}, ["key 'dtype'", "'float32'", "'bfloat16'", "'float16'"]),
    ({"experts": {}}, ["key 'experts'", "at least one expert"]),
    ({"experts": ["a", "b"]}, ["key 'experts'", "dictionary"]),
])
def test_wrong_values_name_the_key_and_allowed_values(bert, tmp_path, capsys, override, expected):
    config = write_config(tmp_path, **valid_config(bert, **override))
    err = run_error(capsys, ["merge", config, "--output", str(tmp_path / "out")])
    for text in expected:
        assert text in err


def test_missing_key_and_malformed_files(bert, tmp_path, capsys):
    config = valid_config(bert)
    del config["experts"]
    err = run_error(capsys, ["merge", write_config(tmp_path, **config), "-o", str(tmp_path / "o")])
    assert "missing required key 'experts'" in err
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    assert "must be a YAML mapping" in run_error(capsys, ["merge", str(tmp_path / "list.yaml"), "-o", "x"])
    (tmp_path / "bad.yaml").write_text("method: ties\nbase: [unclosed\n")
    err = run_error(capsys, ["merge", str(tmp_path / "bad.yaml"), "-o", "x"])
    assert "bad.yaml is not valid YAML at line 3" in err
    assert "config file not found" in run_error(capsys, ["merge", str(tmp_path / "none.yaml"), "-o", "x"])


def test_no_output_folder(bert, tmp_path, capsys):
    config = write_config(tmp_path, **valid_config(bert))
    assert "no output folder; pass --output" in run_error(capsys, ["merge", config])


def test_missing_checkpoint_is_a_one_line_error(bert, tmp_path, capsys):
    config = write_config(tmp_path, **valid_config(bert, base=str(tmp_path / "nowhere")))
    err = run_error(capsys, ["merge", config, "-o", str(tmp_path / "out")])
    assert f"base model not found: {tmp_path / 'nowhere'}" in err


# --------------------------------------------------------------------------- merging from the CLI
def test_relative_paths_are_relative_to_the_config(bert, tmp_path, capsys, monkeypatch):
    base, experts = bert
    config = valid_config(bert)
    config["base"] = os.path.relpath(base, tmp_path)
    config["experts"] = {k: os.path.relpath(v, tmp_path) for k, v in experts.items()}
    config["output"] = "merged"
    path = write_config(tmp_path, **config)
    monkeypatch.chdir(tmp_path.parent)
    assert main(["merge", path]) == 0
    assert f"merged 2 experts with task_arithmetic -> {tmp_path / 'merged'}" in capsys.readouterr().out
    assert (tmp_path / "merged" / "model.safetensors").is_file()


def test_existing_output_needs_overwrite(bert, tmp_path, capsys):
    config = write_config(tmp_path, **valid_config(bert))
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    err = run_error(capsys, ["merge", config, "-o", str(out), "-q"])
    assert "already exists" in err and "--overwrite" in err
    assert main(["merge", config, "-o", str(out), "-q", "--overwrite"]) == 0
    assert not (out / "old.txt").exists() and (out / "model.safetensors").is_file()


def test_output_inside_an_input_is_refused(bert, tmp_path, capsys):
    base, _ = bert
    before = tree_hashes([base])
    config = write_config(tmp_path, **valid_config(bert))
    err = run_error(capsys, ["merge", config, "-o", str(base / "merged")])
    assert "overlaps the input" in err
    assert tree_hashes([base]) == before


# --------------------------------------------------------------------------- as a real process
def run_process(*args, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "layermerge", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=120)


def test_process_error_has_no_traceback(bert, tmp_path):
    config = write_config(tmp_path, **valid_config(bert, method="tyes"))
    result = run_process("merge", config, "--output", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("layermerge: error: ") and result.stderr.count("\n") == 1
    assert result.stdout == ""


def test_quiet_prints_nothing(bert, tmp_path, capfd):
    """Checked at the file-descriptor level, so progress bars and library logs would be seen too."""
    before = tree_hashes(list(bert[1].values()) + [bert[0]])
    config = write_config(tmp_path, **valid_config(bert, method="ties"))
    capfd.readouterr()
    assert main(["merge", config, "--output", str(tmp_path / "out"), "--quiet"]) == 0
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""
    assert (tmp_path / "out" / "README.md").is_file()
    assert tree_hashes(list(bert[1].values()) + [bert[0]]) == before


def test_version(tmp_path):
    result = run_process("--version", cwd=tmp_path)
    assert result.returncode == 0
    assert result.stdout.strip() == f"layermerge {layermerge.__version__}"


def test_help_lists_the_subcommands(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for command in ("merge", "methods", "inspect"):
        assert command in out
