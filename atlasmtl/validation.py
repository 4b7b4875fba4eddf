"""Parameter checks shared by every public entry point.

:func:`atlasmtl.build_model` and :func:`atlasmtl.predict` check all their
parameters here first, before any data is read, so a bad value is one clear
:class:`~atlasmtl.exceptions.ParameterError` naming the parameter and the fix.
Python and NumPy numbers are both accepted (``np.int64(2)``, ``np.float32(0.7)``)
and returned as plain Python values, so configurations stay plain data.
:func:`option_spelling` writes those parameter names as a command line's options.
"""

from __future__ import annotations

import argparse
import math
import numbers
import re
from typing import Any, Sequence

import numpy as np

from .exceptions import ParameterError

#: Largest accepted seed (torch and NumPy both take it).
MAX_SEED = 2**63 - 1


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})" if not isinstance(value, (int, float, str)) else repr(value)


def as_int(name: str, value: Any, minimum: int = 1, *, allow_none: bool = False, maximum: int | None = None) -> int | None:
    """An integer ``>= minimum`` (Python or NumPy); ``None`` only when ``allow_none``."""
    if value is None and allow_none:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Integral, np.integer)):
        expected = "an integer" + (" or None" if allow_none else "")
        raise ParameterError(f"{name}={_describe(value)} must be {expected} ≥ {minimum}.")
    value = int(value)
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"≥ {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ParameterError(f"{name}={value!r} must be an integer {bound}.")
    return value


def as_float(
    name: str,
    value: Any,
    low: float = -math.inf,
    high: float = math.inf,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """A finite real number in the interval given (Python or NumPy; bool, None, strings and NaN refused)."""
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Real, np.integer, np.floating)):
        raise ParameterError(f"{name}={_describe(value)} must be a number in {interval}.")
    value = float(value)
    inside = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not math.isfinite(value):
        bounded = math.isfinite(low) or math.isfinite(high)
        raise ParameterError(f"{name}={value!r} must be a finite number" + (f" in {interval}." if bounded else "."))
    if not inside:
        raise ParameterError(f"{name}={value!r} must be a number in {interval}.")
    return value


def as_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    """One of ``choices`` (exact string)."""
    if not isinstance(value, str) or value not in choices:
        raise ParameterError(f"{name}={_describe(value)} must be one of {tuple(choices)}.")
    return value


def as_bool(name: str, value: Any, *, allow_none: bool = False) -> bool | None:
    """``True`` / ``False`` (Python or NumPy); ``None`` only when ``allow_none``."""
    if value is None and allow_none:
        return None
    if not isinstance(value, (bool, np.bool_)):
        raise ParameterError(f"{name}={_describe(value)} must be " + ("True, False or None." if allow_none else "True or False."))
    return bool(value)


def as_int_list(name: str, value: Any) -> list[int]:
    """A non-empty sequence of positive integers (e.g. ``hidden_sizes``)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence | np.ndarray):
        raise ParameterError(f"{name}={_describe(value)} must be a non-empty list of positive integers, e.g. [256, 128].")
    items = list(value)
    if not items:
        raise ParameterError(f"{name}={value!r} must be a non-empty list of positive integers, e.g. [256, 128].")
    return [as_int(f"{name}[{i}]", v) for i, v in enumerate(items)]


def as_random_state(value: Any) -> tuple[int | None, int]:
    """``(random_state as given, seed used)``; ``None`` draws a fresh seed from the operating system.

    The seed actually used is recorded with the model, so a run with
    ``random_state=None`` can be repeated.
    """
    if value is None:
        return None, int(np.random.SeedSequence().generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))
    seed = as_int("random_state", value, minimum=0, maximum=MAX_SEED)
    return seed, seed


def option_spelling(text: str, parser: argparse.ArgumentParser | None) -> str:
    """``text`` with each ``name=`` of a Python parameter that ``parser`` takes as ``--name`` written as the option.

    The API's checks name a parameter as Python spells it (``num_epochs=0 must be an integer ≥ 1.``); on the
    command line the same check reads ``--num-epochs 0 must be an integer ≥ 1.``, and an item of a list option
    ``--hidden-sizes (item 1) 0 must be ...``. Names the parser does not take stay as they are.

    Parameters
    ----------
    text
        An error message.
    parser
        The command's own parser (a subcommand's, or a top-level parser whose subcommands are searched);
        ``None`` leaves ``text`` unchanged.

    Returns
    -------
    str
        The message in the command line's spelling.
    """
    if parser is None:
        return text
    options: dict[str, str] = {}
    stack = [parser]
    while stack:
        current = stack.pop()
        for action in current._actions:
            if isinstance(action, argparse._SubParsersAction):
                stack.extend(action.choices.values())
            long = [o for o in action.option_strings if o.startswith("--") and not o.startswith("--no-")]
            if long and action.dest not in options:
                options[action.dest] = long[0]

    def spell(match: re.Match) -> str:
        name, index, flag = match.group(1), match.group(2), match.group(3)
        if name not in options:
            return match.group(0)
        option = options[name]
        if flag is not None:  # use_raw=True -> --use-raw; use_raw=False -> --no-use-raw
            return option if flag == "True" else "--no-" + option[2:]
        item = f" (item {int(index) + 1})" if index is not None else ""
        return option + item + ("" if match.end() == len(text) or text[match.end()].isspace() else " ")

    pattern = r"(?<![\w.-])([a-z][a-z0-9_]*)(?:\[(\d+)\])?=(?!=)(?:(True|False)\b)?"
    return re.sub(pattern, spell, text)
