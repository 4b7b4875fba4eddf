"""The API contract (documents/design/api_contract.md) states the code's signatures, defaults and columns.

These checks read the contract's reference sections and compare them with the code, so that a parameter
added, renamed or given another default, or a writeback column added, fails here until the contract says
so too. The same holds for the constants it quotes with their values, the module names it gives, the error
table, and the keys it lists of the model's records, the saved files, ``result.metadata`` and ``evaluate``'s output
(read from one two-epoch, one-network model of synthetic cells).
"""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

import atlasmtl
import atlasmtl.datasets
import atlasmtl.distributed
import atlasmtl.pl
import atlasmtl.report
from atlasmtl.calls import COLUMNS, mode_fields
from atlasmtl.model import TrainedModel
from atlasmtl.result import PredictionResult

CONTRACT = Path(__file__).resolve().parents[1] / "documents" / "design" / "api_contract.md"
TEXT = CONTRACT.read_text(encoding="utf-8")


def _signature_in_contract(call: str) -> dict[str, object]:
    """Parameter → default (``inspect.Parameter.empty`` for none) of the fullest ``call(...)`` the contract writes
    in backticks (the one with most parameters: the signature, not an example call), parsed as Python
    (``**kwargs`` is skipped; the names after ``*`` are in :data:`KEYWORD_ONLY` ``[call]``)."""
    best = None
    for match in re.finditer(r"`(?:[\w.]+\.)?" + re.escape(call) + r"\(([^`]*?)\)(?: ->[^`]*)?`", TEXT):
        try:
            tree = ast.parse(f"def f({' '.join(match.group(1).split())}): pass").body[0].args
        except SyntaxError:  # an example call such as to_csv("x.parquet")
            continue
        if best is None or len(tree.args) + len(tree.kwonlyargs) > len(best.args) + len(best.kwonlyargs):
            best = tree
    assert best is not None, f"the contract writes no `{call}(...)` signature"
    names = [a.arg for a in best.posonlyargs + best.args]
    defaults = [inspect.Parameter.empty] * (len(names) - len(best.defaults)) + [
        ast.literal_eval(d) for d in best.defaults]
    out = dict(zip(names, defaults))
    for arg, default in zip(best.kwonlyargs, best.kw_defaults):
        out[arg.arg] = inspect.Parameter.empty if default is None else ast.literal_eval(default)
    KEYWORD_ONLY[call] = {arg.arg for arg in best.kwonlyargs}
    return out


#: call → the parameters the contract's signature writes after ``*`` (filled by :func:`_signature_in_contract`).
KEYWORD_ONLY: dict[str, set[str]] = {}


def _signature_in_code(func) -> dict[str, object]:
    return {name: p.default for name, p in inspect.signature(func).parameters.items()
            if name not in ("self", "cls") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


#: Figure options every plot takes after its own arguments; the Plots section states them once.
PLOT_OPTIONS = {"ax", "figsize", "show", "save"}

SIGNATURES = [
    ("build_model", atlasmtl.build_model),
    ("predict", atlasmtl.predict),
    ("model.save", TrainedModel.save),
    ("to_adata", PredictionResult.to_adata),
    ("to_dataframe", PredictionResult.to_dataframe),
    ("to_csv", PredictionResult.to_csv),
    ("write_h5ad", PredictionResult.write_h5ad),
    ("write_report", atlasmtl.report.write_report),
    ("result_from_predictions", atlasmtl.report.result_from_predictions),
    ("PredictionResult.from_predictions", PredictionResult.from_predictions),
    ("pbmc68k_reference_query", atlasmtl.datasets.pbmc68k_reference_query),
    ("init_from_env", atlasmtl.distributed.init_from_env),
    ("shard_slice", atlasmtl.distributed.shard_slice),
    ("save_figure", atlasmtl.pl.save_figure),
    ("truth_by_level", atlasmtl.pl.truth_by_level),
    ("calibration_bins", atlasmtl.pl.calibration_bins),
] + [(name, getattr(atlasmtl.pl, name)) for name in
     ("composition", "confidence", "rates", "embedding", "training_history", "confusion", "f1_scores", "reliability")]


@pytest.mark.parametrize("call, func", SIGNATURES, ids=[s[0] for s in SIGNATURES])
def test_contract_signatures_name_the_codes_parameters_and_defaults(call, func):
    documented = _signature_in_contract(call)
    code = _signature_in_code(func)
    if call in {"composition", "confidence", "rates", "embedding", "training_history", "confusion", "f1_scores",
                "reliability"}:
        code = {k: v for k, v in code.items() if k not in PLOT_OPTIONS}
    assert list(documented) == list(code), f"{call}: contract {list(documented)} vs code {list(code)}"
    for name, default in code.items():
        assert documented[name] == default, f"{call}({name}=...): contract {documented[name]!r}, code {default!r}"
    # a keyword-only parameter written as positional (or the reverse) is a call that fails as documented
    keyword_only = {name for name, p in inspect.signature(func).parameters.items()
                    if p.kind == p.KEYWORD_ONLY and name in code}
    assert KEYWORD_ONLY[call] == keyword_only, \
        f"{call}: keyword-only (after *) in the contract {sorted(KEYWORD_ONLY[call])}, in the code {sorted(keyword_only)}"


def _table(heading: str) -> dict[str, str]:
    """First column → second column of the first table after ``heading``."""
    section = TEXT[TEXT.index(heading):]
    rows = {}
    for line in section.splitlines()[1:]:
        if rows and not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) >= 2 and not set(cells[0]) <= set("-: "):
            rows[cells[0]] = cells[1]
    return rows


def test_build_model_table_lists_every_parameter_with_its_default():
    table = _table("## Training: `build_model`")
    documented = {}
    for key, default in table.items():
        for name, value in zip(re.findall(r"`(\w+)`", key), default.split(" / ")):
            documented[name] = value.strip()
    code = _signature_in_code(atlasmtl.build_model)
    assert set(documented) == set(code), f"only in the table: {set(documented) - set(code)}; " \
                                         f"only in the code: {set(code) - set(documented)}"
    for name, default in code.items():
        text = documented[name].strip("`")
        if default is inspect.Parameter.empty:
            assert text == "—", name
        else:
            assert ast.literal_eval(text) == default, f"{name}: table {text}, code {default!r}"


def test_evaluate_block_lists_every_parameter_with_its_default():
    block = TEXT[TEXT.index("ev = atlasmtl.evaluate("):]
    block = block[:block.index("\n)\n")]
    code = _signature_in_code(atlasmtl.evaluate)
    names = re.findall(r"^\s+(\w+)(?:=|,)", block, flags=re.M)
    names += [n for n in re.findall(r"(\w+)=", block.splitlines()[-1]) if n not in names]
    assert [n for n in names if n in code] == list(code) and set(names) >= set(code)
    for name, value in re.findall(r"(\w+)=([^,\s]+)", block):
        if name in code and code[name] is not inspect.Parameter.empty:
            assert ast.literal_eval(value) == code[name], f"evaluate({name}=...)"


def test_writeback_table_lists_every_column_by_mode():
    table = _table("Writeback columns per level")
    for mode in ("minimal", "standard", "full"):
        new = [COLUMNS[f].template.format(level="<level>") for f in mode_fields(mode)]
        earlier = {"standard": "minimal", "full": "standard"}.get(mode)
        if earlier:
            new = [c for c in new if c not in {COLUMNS[f].template.format(level="<level>")
                                               for f in mode_fields(earlier)}]
        documented = [c for c in re.findall(r"`([\w<>]+)`", table[f"`{mode}`"]) if "<level>" in c]
        assert documented == new, f"{mode}: contract {documented}, code {new}"


def test_distributed_helpers_are_all_named():
    section = TEXT[TEXT.index("### Distributed training"):TEXT.index("### Input transform and shift training")]
    for name in atlasmtl.distributed.__all__:
        assert f"`{name}" in section, f"atlasmtl.distributed.{name} is not in the contract's Distributed training"


def _reference_sections() -> str:
    """The reference text: ``build_model``'s signature, table and notes up to its first dated evidence section, and
    every section from *Artifacts* on (the evidence sections are a historical record, quoting earlier values)."""
    start = TEXT.index("## Training: `build_model`")
    return TEXT[start:TEXT.index("\n### ", start)] + TEXT[TEXT.index("\n## Artifacts"):]


_NUMBER = r"(−?\d[\d,]*(?:\.\d+)?%?)"
_CONSTANT = r"`(?:atlasmtl\.)?((?:[a-z_]+\.)?[A-Z][A-Z0-9_]+)"
#: How the reference sections quote a constant's value: `mod.NAME = 0.25`, `mod.NAME` = 5, `mod.NAME` (20,000),
#: (`NAME`, 8), "fewer than 3 labelled cells (`mod.NAME`)" and "[10, 1200] (`mod.NAME`)".
_QUOTES = [
    (_CONSTANT + r" = " + _NUMBER + "`", False),
    (_CONSTANT + r"`\s+=\s+" + _NUMBER, False),
    (_CONSTANT + r"`,?\s+\(" + _NUMBER + r"\)", False),
    (r"\(" + _CONSTANT + r"`,\s+" + _NUMBER + r"\)", False),
    (r"(?<![\w.,–-])" + _NUMBER + r"(?:\s+[A-Za-z-]+){0,4}\s+\(" + _CONSTANT + "`[,)]", True),
    (r"\[" + _NUMBER + r",\s+" + _NUMBER + r"\]\s+\(" + _CONSTANT + "`[,)]", True),
]


def _number(text: str) -> float:
    value = float(text.replace(",", "").replace("−", "-").rstrip("%"))
    return value / 100 if text.endswith("%") else value


def _constant(name: str) -> object:
    """The value of ``mod.NAME`` (``atlasmtl.mod``), or of a bare ``NAME`` in whichever modules define it (all equal)."""
    import importlib
    import pkgutil

    if "." in name:
        module, attr = name.rsplit(".", 1)
        return getattr(importlib.import_module(f"atlasmtl.{module}"), attr)
    values = []
    for info in pkgutil.iter_modules(atlasmtl.__path__):
        module = importlib.import_module(f"atlasmtl.{info.name}")
        if name in vars(module):
            values.append(vars(module)[name])
    assert values, f"no atlasmtl module defines {name}"
    assert all(v == values[0] for v in values), f"{name} differs between modules: {values}"
    return values[0]


def test_constants_quoted_with_a_value_have_that_value():
    text = _reference_sections()
    quoted = []
    for pattern, value_first in _QUOTES:
        for match in re.finditer(pattern, text):
            *numbers, name = match.groups() if value_first else match.groups()[::-1]
            quoted.append((name, [_number(n) for n in numbers], match.group(0)))
    assert len(quoted) >= 30, f"the patterns found only {len(quoted)} quoted constants; has the contract's style changed?"
    for name, numbers, where in quoted:
        value = _constant(name)
        if len(numbers) == 2:  # a range: the constant is the pair
            assert tuple(value) == pytest.approx(tuple(numbers)), f"{where!r}: code {name} = {value!r}"
        elif isinstance(value, (tuple, list, frozenset, set)):  # "natural, 2 and 10 (`inputs.LOG_BASES`)"
            assert any(v == pytest.approx(numbers[0]) for v in value), f"{where!r}: code {name} = {value!r}"
        else:
            assert value == pytest.approx(numbers[0]), f"{where!r}: code {name} = {value!r}"


def test_module_names_the_reference_sections_give_exist():
    """Every ``mod.name`` the reference sections write in backticks, for an atlasmtl module ``mod``, is there
    (``model``, ``result`` and ``report`` also name variables, so only with ``atlasmtl.`` before them)."""
    import importlib
    import pkgutil

    modules = {info.name for info in pkgutil.iter_modules(atlasmtl.__path__)}
    named = set()
    for span in re.findall(r"`([^`\n]+)`", _reference_sections()):
        for prefix, module, attrs in re.findall(r"(?<![\w.])(atlasmtl\.)?([a-z_]+)\.([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)", span):
            if module in modules and (prefix or module not in {"model", "result", "report"}):
                named.add(f"{module}.{attrs}")
    assert len(named) >= 40, f"found only {len(named)} names; has the contract's style changed?"
    for name in sorted(named):
        module, *attrs = name.split(".")
        obj = importlib.import_module(f"atlasmtl.{module}")
        for i, attr in enumerate(attrs):
            if hasattr(obj, "__path__") and not hasattr(obj, attr):  # a package's submodule not imported yet
                obj = importlib.import_module(f"{obj.__name__}.{attr}")
            else:
                assert hasattr(obj, attr), f"the contract names atlasmtl.{name}, which does not exist"
                obj = getattr(obj, attr)


def test_error_table_names_every_exception_with_its_parent():
    """Each exception of :mod:`atlasmtl.exceptions` has a row, and "`EmptyDataError` (`InputError`)" is its base
    ("(also an `OSError`)": a further base)."""
    import builtins

    import atlasmtl.exceptions as exceptions

    named = {}
    for key in _table("| error | raised for |"):
        parent = re.search(r"\((also an? )?`(\w+)`\)", key)
        for name in re.findall(r"`(\w+)`", re.sub(r"\(.*?\)", "", key)):
            named[name] = parent
    classes = [n for n in exceptions.__all__ if n != "AtlasMTLError"]
    assert set(named) == set(classes), f"only in the table: {set(named) - set(classes)}; " \
                                       f"only in the code: {set(classes) - set(named)}"
    for name, parent in named.items():
        cls = getattr(exceptions, name)
        assert issubclass(cls, exceptions.AtlasMTLError), name
        if parent is not None and parent.group(1):
            assert issubclass(cls, getattr(builtins, parent.group(2))), f"{name} is not an {parent.group(2)}"
        elif parent is not None:
            assert cls.__bases__[0] is getattr(exceptions, parent.group(2)), \
                f"{name}: the contract says ({parent.group(2)}), the code's bases are {cls.__bases__}"


# ------------------------------------------------------------------ the keys the reference sections list
def _flat(text: str) -> str:
    """``text`` without its parenthesised asides (nested ones too), so only a list's own items are left."""
    while True:
        shorter = re.sub(r"\([^()]*\)", "", text)
        if shorter == text:
            return text
        text = shorter


def _backticked(text: str) -> set[str]:
    """The names written as `name` (or `name[...]`, as `pairs["<parent> -> <child>"]`) in ``text``."""
    return set(re.findall(r"`(\w+)(?:\[[^`]*\])?`", text)) - {"None"}


def _between(start: str, end: str) -> str:
    section = _reference_sections()
    assert start in section, f"the contract no longer writes {start!r}"
    fragment = section[section.index(start) + len(start):]
    return fragment[:fragment.index(end)]


def _braced(text: str) -> set[str]:
    """The keys of a ``{a, b: {...}, c}`` the contract writes."""
    inner = re.search(r"\{(.*)\}", text, flags=re.S).group(1)
    while re.search(r"\{[^{}]*\}", inner):
        inner = re.sub(r"\{[^{}]*\}", "", inner)
    return {item.split(":")[0].strip() for item in inner.split(",")}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A one-network model of the synthetic cells (two epochs), saved, and its prediction of other cells."""
    from .synthetic import SYNTHETIC_LEVELS, synthetic_adata

    cells = synthetic_adata(n_obs=360, random_state=0)
    model = atlasmtl.build_model(cells[:240].copy(), SYNTHETIC_LEVELS, coord_targets={"umap": "X_umap"},
                                 ensemble_size=1, num_epochs=2, hidden_sizes=(16,), num_threads=1,
                                 show_progress=False, show_summary=False)
    query = cells[240:].copy()
    result = atlasmtl.predict(model, query, num_threads=1, show_progress=False, show_summary=False)
    folder = tmp_path_factory.mktemp("model")
    model.save(folder / "model.pth")
    return model, result, query, folder


def test_training_records_hold_the_keys_the_contract_lists(tiny):
    model, _, _, _ = tiny
    config = model.train_config
    text = _between("`model.train_config` holds every parameter", "\n\n")
    left_out = _backticked(text[:text.index("plus")])
    listed = _backticked(_flat(text[text.index("plus"):]))
    parameters = set(_signature_in_code(atlasmtl.build_model))
    assert set(config) == (parameters - left_out) | listed, \
        f"only in the contract: {(parameters - left_out) | listed - set(config)}; " \
        f"only in the code: {set(config) - (parameters - left_out) - listed}"
    phases = _backticked(_flat(_between("`phase_seconds`\n(", "), `history`")))
    assert set(config["phase_seconds"]) == phases
    assert set(config["knn_space"]) == _backticked(_between("`knn_space` (", "), `versions`"))
    calibration = config["calibration"]
    assert set(calibration) == _braced(_between('`train_config["calibration"]` = `', "`"))
    levels = _between('`train_config["calibration"]` = `', "`")
    inner = re.search(r"ece_held_out: \{level: \{([^}]*)\}", levels).group(1)
    for record in calibration["ece_held_out"].values():
        assert set(record) == {k.strip() for k in inner.split(",")}
    assert calibration["crossfit"] is not None  # the synthetic reference is small enough to be cross-fitted
    assert set(calibration["crossfit"]) == _braced(_between("`crossfit`: `", "`"))
    detection = _between('`metadata["gene_detection"]`', "from the pseudo-counts")
    assert set(model.metadata["gene_detection"]) == _backticked(detection) - {"genes", "detection_profile"}


def test_saved_files_hold_the_keys_the_contract_lists(tiny):
    import json

    from atlasmtl.artifacts import safe_loads

    _, _, _, folder = tiny
    row = _between("| `foo_manifest.json` | ", "|\n")
    manifest = json.loads((folder / "model_manifest.json").read_text())
    assert set(manifest) == _backticked(_flat(row[:row.index("per file")]))
    roles = _backticked(re.search(r"\(by role: ([^)]*)\)", row).group(1))
    assert set(manifest["files"]) == roles
    for entry in manifest["files"].values():
        assert set(entry) == _backticked(_flat(row[row.index("):"):]))
    reference = safe_loads((folder / "model_reference.pkl").read_bytes(), "reference")
    documented = set(re.findall(r"`(\w+)[`:]", _flat(_between("| `foo_reference.pkl` | ", "|\n"))))
    assert set(reference) <= documented and documented - set(reference) <= {"index"}  # index: above 20,000 cells


def test_prediction_metadata_holds_the_keys_the_contract_lists(tiny):
    _, result, _, _ = tiny
    assert set(result.metadata) == _backticked(_flat(_between("- `result.metadata`:", "\n\n")))
    genes = result.metadata["genes"]
    assert set(genes) == _backticked(_flat(_between('`uns["atlasmtl"]["genes"]` report', "\n\n")))
    assert set(genes["unmeasured"]) == _braced(_between('`metadata["genes"]["unmeasured"]` =', "`;"))
    assert set(result.metadata["query_only"]) == _braced(_between('`result.metadata["query_only"]` = `', "`"))


def test_evaluate_output_holds_the_keys_the_contract_lists(tiny):
    _, result, query, _ = tiny
    levels = result.label_columns
    ev = atlasmtl.evaluate(result, query, novel_labels={levels[-1]: [query.obs[levels[-1]].iloc[0]]},
                           coord_truth={"umap": "X_umap"}, reference_coords={"umap": query.obsm["X_umap"]})
    table = _table("**Output** (JSON-serialisable")
    assert set(ev) == {re.sub(r"\[.*", "", key.strip("`")) for key in table if key.startswith("`")}
    assert set(ev["levels"][levels[-1]]) == _backticked(table["`levels[level]`"])
    assert set(ev["hierarchy"]) == _backticked(_flat(table["`hierarchy`"]))
    assert set(next(iter(ev["hierarchy"]["pairs"].values()))) == _braced(table["`hierarchy`"])
    assert set(ev["novel"]) == _backticked(_flat(table["`novel`"]))
    assert set(ev["novel"]["levels"][levels[-1]]) == _braced(table["`novel`"])
    assert set(ev["coords"]["umap"]) == _backticked(_flat(table["`coords[name]`"]))
