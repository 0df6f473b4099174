"""Benchmark tracks: ``layermerge bench glue8-minilm`` / ``vision5-effnet`` (see docs/BENCHMARKS.md)."""

from layermerge.bench.tracks import BUILTIN_TRACKS, TrackConfig, load_track

__all__ = ["BUILTIN_TRACKS", "TrackConfig", "load_track"]
