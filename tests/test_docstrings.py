"""The public API is documented as the project's standard asks: numpydoc docstrings and type hints.

Every public callable is walked: the names in ``__all__`` of :mod:`atlasmtl` and of its public modules, the
public functions of :mod:`atlasmtl.datasets` (which has no ``__all__``), and the public methods and properties
of every class they export (inherited ones too, where atlasmtl defines them). For each, its docstring must
describe every parameter under ``Parameters`` (or ``Other Parameters``), name no parameter the signature
lacks, and have a ``Returns`` (or ``Yields``) section when it returns something; every parameter and the
return value must carry a type hint. A class's constructor parameters are described in the class docstring,
under ``Parameters`` or ``Attributes``. Properties need a docstring and a return hint (numpydoc documents
them as attributes, without sections).

The numpydoc sections are parsed simply: a header line followed by a line of dashes; parameter lines are
the lines at the section's own indentation, ``name`` or ``name : type``, and ``a, b : type`` describes both.
No model is trained and nothing is drawn.
"""

from __future__ import annotations

import inspect
import re
import types
from typing import Any, Callable, Iterator

import atlasmtl
import atlasmtl.datasets
import atlasmtl.distributed
import atlasmtl.exceptions
import atlasmtl.metrics
import atlasmtl.pl
import atlasmtl.report
import atlasmtl.result

#: Modules whose ``__all__`` is the public API.
MODULES = [atlasmtl, atlasmtl.pl, atlasmtl.report, atlasmtl.metrics, atlasmtl.result, atlasmtl.distributed,
           atlasmtl.exceptions]
#: Parameters never described: the instance or class, and variadic ones (a hint is still required).
UNDESCRIBED = ("self", "cls")
PARAMETER_SECTIONS = ("Parameters", "Other Parameters")
RETURN_SECTIONS = ("Returns", "Yields")


# ---------------------------------------------------------------------------- numpydoc, simply
def sections(doc: str | None) -> dict[str, list[str]]:
    """Section title → its lines (indentation kept, relative to the docstring's), for a numpydoc docstring."""
    lines = inspect.cleandoc(doc or "").splitlines()
    out: dict[str, list[str]] = {}
    current: list[str] | None = None
    i = 0
    while i < len(lines):
        title = lines[i].strip()
        if title and i + 1 < len(lines) and re.fullmatch(r"-{3,}", lines[i + 1].strip()):
            current = out.setdefault(title, [])
            i += 2
            continue
        if current is not None:
            current.append(lines[i])
        i += 1
    return out


def described_names(lines: list[str]) -> set[str]:
    """Names a Parameters-like section describes: ``name``, ``name : type`` or ``a, b : type`` lines at the
    section's indentation (``*args`` / ``**kwargs`` as ``args`` / ``kwargs``)."""
    body = [line for line in lines if line.strip()]
    if not body:
        return set()
    indent = min(len(line) - len(line.lstrip()) for line in body)
    names: set[str] = set()
    for line in body:
        if len(line) - len(line.lstrip()) != indent:
            continue
        head = line.strip().split(" : ", 1)[0].rstrip(":").strip()
        names.update(part.strip().lstrip("*") for part in head.split(",") if part.strip())
    return names


# ---------------------------------------------------------------------------- the public callables
def _own(obj: Any) -> bool:
    """Defined in atlasmtl (not a name re-exported from numpy, torch, the standard library ...)."""
    return (getattr(obj, "__module__", None) or "").split(".")[0] == "atlasmtl"


def public_callables() -> Iterator[tuple[str, str, Any]]:
    """``(qualified name, kind, object)`` for every public function, method, property and class."""
    seen: set[int] = set()
    classes: list[tuple[str, type]] = []
    for module in MODULES:
        for name in module.__all__:
            obj = getattr(module, name)
            if isinstance(obj, types.ModuleType) or not callable(obj) or not _own(obj):
                continue
            where = f"{module.__name__}.{name}"
            if inspect.isclass(obj):
                classes.append((where, obj))
            elif id(obj) not in seen:
                seen.add(id(obj))
                yield where, "function", obj
    for name, obj in vars(atlasmtl.datasets).items():
        if not name.startswith("_") and inspect.isfunction(obj) and obj.__module__ == atlasmtl.datasets.__name__:
            yield f"atlasmtl.datasets.{name}", "function", obj
    done: set[tuple[int, str]] = set()
    for where, cls in classes:
        if issubclass(cls, BaseException):
            continue  # the exceptions add no methods; their messages are their documentation
        if id(cls) not in seen:
            seen.add(id(cls))
            yield where, "class", cls
        for klass in cls.__mro__:
            if not _own(klass):
                continue
            for attr, raw in vars(klass).items():
                if attr.startswith("_") or (id(cls), attr) in done:
                    continue
                done.add((id(cls), attr))
                if isinstance(raw, property):
                    yield f"{where}.{attr}", "property", raw.fget
                elif isinstance(raw, (classmethod, staticmethod)):
                    yield f"{where}.{attr}", "method", raw.__func__
                elif inspect.isfunction(raw):
                    yield f"{where}.{attr}", "method", raw


def problems(where: str, kind: str, obj: Callable) -> list[str]:
    """What the docstring or the hints of one public callable lack, in words naming it."""
    found: list[str] = []
    doc = inspect.getdoc(obj) if kind != "class" else obj.__doc__
    if not (doc or "").strip():
        return [f"{where}: no docstring"]
    if kind == "property":
        if inspect.signature(obj).return_annotation is inspect.Signature.empty:
            found.append(f"{where}: no return type hint")
        return found
    parts = sections(doc)
    if kind == "class":
        init = obj.__init__
        if not _own(init) or init is object.__init__:
            return found
        described = described_names(parts.get("Parameters", []) + parts.get("Attributes", []))
        signature = inspect.signature(init)
    else:
        described = set().union(*(described_names(parts.get(s, [])) for s in PARAMETER_SECTIONS))
        signature = inspect.signature(obj)
    names = []
    for name, p in signature.parameters.items():
        if name in UNDESCRIBED:
            continue
        names.append(name)
        if p.annotation is inspect.Parameter.empty:
            found.append(f"{where}: parameter {name!r} has no type hint")
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if name not in described:
            found.append(f"{where}: parameter {name!r} is not described under Parameters")
    if kind == "class":
        return found
    stale = sorted(described - set(names))
    if stale:
        found.append(f"{where}: Parameters describes {stale}, which the signature lacks")
    returns = signature.return_annotation
    if returns is inspect.Signature.empty:
        found.append(f"{where}: no return type hint")
    elif returns not in (None, "None") and not any(s in parts for s in RETURN_SECTIONS):
        found.append(f"{where}: returns {returns} but has no Returns section")
    return found


PUBLIC = list(public_callables())


def test_the_walk_finds_the_public_api():
    names = {where for where, _, _ in PUBLIC}
    for expected in ("atlasmtl.predict", "atlasmtl.build_model", "atlasmtl.pl.umap", "atlasmtl.metrics.aurc",
                     "atlasmtl.report.render_report", "atlasmtl.distributed.all_reduce_sum",
                     "atlasmtl.result.column_names", "atlasmtl.datasets.pbmc68k_reference_query",
                     "atlasmtl.TrainedModel.save", "atlasmtl.TrainedModel.genes",
                     "atlasmtl.PredictionResult.to_adata", "atlasmtl.PredictionResult.labels"):
        assert expected in names, expected


def test_the_parser_reads_numpydoc_parameter_lines():
    doc = """Summary.

    Parameters
    ----------
    a, b : int
        Both.
    c
        Described on the next line : not a parameter.
    **kwargs
        Passed on.

    Returns
    -------
    int
        The sum.
    """
    parts = sections(doc)
    assert set(parts) == {"Parameters", "Returns"}
    assert described_names(parts["Parameters"]) == {"a", "b", "c", "kwargs"}


def test_the_check_names_each_gap():
    def toy(a, b: int, *args: Any, **kwargs) -> int:  # noqa: ANN001, ANN003 - the gaps under test
        """Summary.

        Parameters
        ----------
        b
            Described.
        gone
            Not a parameter any more.
        """
        return b

    assert problems("toy", "function", toy) == [
        "toy: parameter 'a' has no type hint",
        "toy: parameter 'a' is not described under Parameters",
        "toy: parameter 'kwargs' has no type hint",
        "toy: Parameters describes ['gone'], which the signature lacks",
        "toy: returns int but has no Returns section",
    ]


def test_every_public_callable_has_numpydoc_sections_and_type_hints():
    found = [line for where, kind, obj in PUBLIC for line in problems(where, kind, obj)]
    assert not found, f"{len(found)} gap(s) in the public API's docstrings or hints:\n" + "\n".join(found)
