"""Hugging Face hub ids (``org/name[@revision]``) as inputs. (Stub: filled in by issue 17.)"""

from __future__ import annotations

from pathlib import Path


def looks_like_hub_id(text: str) -> bool:
    return False


def resolve_hub_id(text: str, role: str | None = None) -> Path:
    raise NotImplementedError
