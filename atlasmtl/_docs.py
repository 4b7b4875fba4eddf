"""Shared parameter descriptions filled into docstrings (as scanpy's ``plotting/_docs.py``)."""

from __future__ import annotations

from typing import Any, Mapping


def fill_docs(func: Any, docs: Mapping[str, str]) -> Any:
    """``func`` with each ``{key}`` of its docstring replaced by ``docs[key]`` (a docstring stripped by
    ``python -OO`` is left as it is)."""
    if func.__doc__:
        for key, text in docs.items():
            func.__doc__ = func.__doc__.replace("{" + key + "}", text)
    return func
