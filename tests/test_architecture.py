"""docs/ARCHITECTURE.md stays true: every module and function it names exists, and no module imports from a
layer below the table's order (every import, those inside functions too)."""
import ast
import os
import re

import pytest

from conftest import REPO

PACKAGE = os.path.join(REPO, "d2v_plugin")
DOC = os.path.join(REPO, "docs", "ARCHITECTURE.md")


def defined_names(path: str) -> set[str]:
    """Top-level functions, classes and assignments of a module, and Class.method names."""
    tree = ast.parse(open(path).read())
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
            if isinstance(node, ast.ClassDef):
                names |= {f"{node.name}.{m.name}" for m in node.body if isinstance(m, (ast.FunctionDef,))}
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


def test_every_module_and_function_the_architecture_page_names_exists():
    text = open(DOC).read()
    spans = re.findall(r"`([^`]+)`", text)
    files = [s for s in spans if re.fullmatch(r"[\w/]+\.py", s)]
    named = [s for s in spans if re.fullmatch(r"[\w/]+\.py:[\w.]+", s)]
    assert len(files) > 20 and len(named) > 40, (len(files), len(named))
    for span in files:
        candidates = [os.path.join(PACKAGE, span), os.path.join(REPO, span)]
        assert any(os.path.isfile(c) for c in candidates), f"{span} named in docs/ARCHITECTURE.md does not exist"
    for span in named:
        path, name = span.split(":")
        full = os.path.join(PACKAGE, path)
        assert os.path.isfile(full), f"{span}: no module {path}"
        assert name in defined_names(full), f"{span}: {path} defines no {name} (renamed? say so in the page)"


def test_a_renamed_function_fails_the_page_check(tmp_path, monkeypatch):
    doc = tmp_path / "ARCHITECTURE.md"
    doc.write_text(open(DOC).read().replace("models/checkpoints.py:read_checkpoint",
                                            "models/checkpoints.py:read_checkpoint_renamed"))
    monkeypatch.setattr(__import__(__name__), "DOC", str(doc))
    with pytest.raises(AssertionError, match="defines no read_checkpoint_renamed"):
        test_every_module_and_function_the_architecture_page_names_exists()


def layers() -> dict:
    """module prefix (relative to the package) -> its layer, from the page's table."""
    text = open(DOC).read()
    table = text[text.index("| layer | modules |"):].split("\n\n")[0]
    out = {}
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in line.split("|")[1:-1]]
        for span in re.findall(r"`([^`]+)`", cells[1]):
            out[span.rstrip("/").removesuffix(".py")] = int(cells[0])
    return out


def module_of(path: str) -> str:
    rel = os.path.relpath(path, PACKAGE)[:-3]
    return rel.replace(os.sep, "/").removesuffix("/__init__")


def layer_of(module: str, table: dict) -> int:
    """The layer of ``data/index`` (its package's), of ``__init__`` (the top), else of the module itself."""
    if module in ("__init__", ""):
        return max(table.values())
    for key in (module, module.split("/")[0]):
        if key in table:
            return table[key]
    raise AssertionError(f"d2v_plugin/{module}.py is in no layer of docs/ARCHITECTURE.md's table")


def imported(path: str) -> set[str]:
    """The plugin's modules a file imports, as d2v_plugin-relative paths (``from d2v_plugin import x`` is x)."""
    out = set()
    for node in ast.walk(ast.parse(open(path).read())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "d2v_plugin":
                names = [f"d2v_plugin.{a.name}" for a in node.names]
            else:
                names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            if name.startswith("d2v_plugin.") or name == "d2v_plugin":
                rel = name.removeprefix("d2v_plugin").lstrip(".").replace(".", "/")
                out.add(rel)
    return out


def test_no_module_imports_from_a_layer_below_it():
    table = layers()
    upward = []
    for root, _, files in os.walk(PACKAGE):
        for f in files:
            if not f.endswith(".py"):
                continue
            path = os.path.join(root, f)
            me = module_of(path)
            mine = layer_of(me, table)
            for other in imported(path):
                if not other or other.split("/")[0] == me.split("/")[0]:
                    continue  # the package itself, or a sibling in one package
                if os.path.isdir(os.path.join(PACKAGE, other)) and not os.path.isfile(os.path.join(PACKAGE, other, "__init__.py")):
                    continue
                if layer_of(other, table) > mine:
                    upward.append(f"d2v_plugin/{me}.py (layer {mine}) imports {other} (layer {layer_of(other, table)})")
    assert upward == [], "\n".join(upward)


def test_the_suites_heaviest_first_order_names_test_files_that_exist():
    """A renamed test file would drop out of the order silently and run last again."""
    from conftest import HEAVY_FIRST

    tests = os.path.dirname(os.path.abspath(__file__))
    assert [name for name in HEAVY_FIRST if not os.path.isfile(os.path.join(tests, name))] == []
    assert len(set(HEAVY_FIRST)) == len(HEAVY_FIRST)
