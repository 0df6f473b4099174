"""benchmarks/rows_table.py: a results JSON's rows as one markdown table, best normalised first."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "rows_table.py"


def stat(mean, std=0.0, n=1):
    return {"mean": mean, "std": std, "n": n}


RESULTS = {"rows": [
    {"row": "task_arithmetic", "study": "main", "needs_data": False, "seeds": [None],
     "normalised": stat(53.6), "wall_s": stat(8.3), "peak_rss_mib": stat(776.0),
     "time_vs_task_arithmetic": stat(1.0), "rss_vs_task_arithmetic": stat(1.0)},
    {"row": "regmean", "study": "main", "needs_data": True, "seeds": [0, 1, 2],
     "normalised": stat(59.7, 0.9, 3), "wall_s": stat(47.7, 3.2, 3), "peak_rss_mib": stat(893.0, 8.0, 3),
     "time_vs_task_arithmetic": stat(12.13, 0.81, 3), "rss_vs_task_arithmetic": stat(1.15, 0.01, 3)},
    {"row": "shots=4", "study": "shots", "needs_data": True, "seeds": [0],
     "normalised": stat(40.0), "wall_s": None, "peak_rss_mib": None},
    {"row": "a+b: ties", "study": "pairs", "normalised": stat(70.0)},
    {"row": "a+b: pleas (align=none)", "study": "pairs", "normalised": stat(80.0)},
    {"row": "c+d: ties", "study": "pairs", "normalised": stat(60.0)},
    {"row": "c+d: pleas (align=none)", "study": "pairs", "normalised": stat(90.0, 1.5, 3)},
    {"row": "a+b: nuslerp", "study": "pairs", "normalised": stat(99.0)},
]}


def run(tmp_path, *args):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(RESULTS))
    return subprocess.run([sys.executable, str(SCRIPT), str(path), *args], capture_output=True, text=True)


def test_rows_best_first_with_cost_and_seeds(tmp_path):
    done = run(tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[0].startswith("| method | kind | normalised")
    assert lines[2] == ("| regmean | data-driven | 59.7 ± 0.9 | 47.7 ± 3.2 | 893 ± 8 | 12.13 ± 0.81 | 1.15 ± 0.01 "
                        "| 0, 1, 2 |")
    assert lines[3] == "| task_arithmetic | data-free | 53.6 | 8.3 | 776 | 1.00 | 1.00 | — |"
    assert len(lines) == 4                      # the ablation row is another study


def test_chosen_rows_and_studies(tmp_path):
    assert run(tmp_path, "--rows", "task_arithmetic").stdout.count("\n") == 3
    ablation = run(tmp_path, "--study", "shots").stdout
    assert "| shots=4 | data-driven | 40.0 | — | — | — | — | 0 |" in ablation
    missing = run(tmp_path, "--rows", "ties")
    assert missing.returncode != 0 and "no main row named ties" in missing.stderr


def test_pairwise_rows_pivot_methods_down_pairs_across(tmp_path):
    done = run(tmp_path, "--study", "pairs", "--pairs")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[0] == "| method | a+b | c+d | mean |"
    assert lines[2] == "| pleas (align=none) | 80.0 | 90.0 ± 1.5 | 85.0 |"
    assert lines[3] == "| ties | 70.0 | 60.0 | 65.0 |"
    assert lines[4] == "| nuslerp | 99.0 | — | — |"          # a method missing a pair has no mean, and sorts last
    assert run(tmp_path, "--study", "shots", "--pairs").returncode != 0
