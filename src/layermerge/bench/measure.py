"""Run one ``layermerge`` command and record its wall time and peak resident memory.

    python -m layermerge.bench.measure RESULT.json -- merge CONFIG.yaml --output DIR

The peak is this process's own high-water mark (``VmHWM`` in /proc/self/status), which starts afresh
at exec, so a large parent process does not put a floor under it the way a child's ``ru_maxrss``
can. Where /proc is missing (macOS) it falls back to ``ru_maxrss``.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path


def peak_rss_mib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m layermerge.bench.measure RESULT.json -- COMMAND ARGS...", file=sys.stderr)
        return 2
    from layermerge.cli import main as cli_main

    started = time.perf_counter()
    code = cli_main(argv[2:])
    record = {"exit_code": code, "wall_s": round(time.perf_counter() - started, 2),
              "peak_rss_mib": round(peak_rss_mib(), 1)}
    Path(argv[0]).write_text(json.dumps(record) + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
