"""The brief's layout rule: machinery several scripts need lives in a utils/ module with one purpose; a
script never imports another script's names, and test_pipeline imports library modules, not scripts.

A script is a file at the top level, in bench/, test_pipeline/ or data/*/ with an
`if __name__ == "__main__":` block at its top level (what `python FILE` runs). utils/ modules are
libraries even when they also answer `python -m utils.X` (utils/model_under_test.py, the scoring every
test_pipeline script goes through, among them). Every script and every utils module is parsed with ast, imports
inside functions included; tests may import the script they test."""
import ast
import glob
import os

from tests.conftest import REPO

SCRIPT_FOLDERS = ("*.py", "bench/*.py", "test_pipeline/*.py", "data/*/prepare.py")
LIBRARY_FOLDERS = ("utils/*.py", "test_pipeline/*.py")
# Known exceptions; delete an entry when its import goes (test_allowances_are_still_needed says when).
ALLOWED = set()


def parse(path):
    with open(path, encoding="utf-8") as f:
        return ast.parse(f.read(), filename=path)


def has_main_block(tree):
    """An `if __name__ == "__main__":` at the module's top level."""
    for node in tree.body:
        test = getattr(node, "test", None) if isinstance(node, ast.If) else None
        if (isinstance(test, ast.Compare) and isinstance(test.left, ast.Name) and test.left.id == "__name__"
                and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in test.comparators)):
            return True
    return False


def module_name(rel_path):
    return rel_path[:-len(".py")].replace(os.sep, ".").replace("/", ".")


def files(patterns):
    found = {os.path.relpath(p, REPO) for pattern in patterns for p in glob.glob(os.path.join(REPO, pattern))}
    return sorted(found)


def scripts():
    """{module name: path} of every script (see the docstring)."""
    return {module_name(rel): rel for rel in files(SCRIPT_FOLDERS) if has_main_block(parse(os.path.join(REPO, rel)))}


def imported_names(tree):
    """Every module a file imports, and every `package.name` of a `from package import name`: the
    latter is how `from test_pipeline import mia` imports the script test_pipeline/mia.py."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
            yield from (f"{node.module}.{a.name}" for a in node.names)


def script_imports(tree, own_module, script_modules):
    """The scripts a file imports names from (itself excluded)."""
    return sorted({name for name in imported_names(tree) if name in script_modules and name != own_module})


def violations():
    known = scripts()
    found = set()
    for rel in files(SCRIPT_FOLDERS + LIBRARY_FOLDERS):
        for name in script_imports(parse(os.path.join(REPO, rel)), module_name(rel), known):
            found.add((rel, name))
    return found


def test_no_script_or_library_imports_a_script():
    bad = sorted(violations() - ALLOWED)
    assert not bad, ("scripts and utils modules must import library modules, not scripts; move the machinery "
                     "into a utils/ module with one purpose: " + "; ".join(f"{f} imports {m}" for f, m in bad))


def test_allowances_are_still_needed():
    stale = sorted(ALLOWED - violations())
    assert not stale, f"delete these from ALLOWED in tests/test_layout.py, the import is gone: {stale}"


def test_what_counts_as_a_script():
    known = scripts()
    assert {"test_pipeline.leakage_test", "test_pipeline.mia", "test_pipeline.report", "reproduce",
            "bench.utility", "train"} <= set(known)
    pipeline = {f"test_pipeline.{os.path.basename(f)[:-3]}" for f in glob.glob(os.path.join(REPO, "test_pipeline", "*.py"))}
    assert pipeline and pipeline <= set(known)  # test_pipeline holds scripts only; their library is utils/
    assert not any(m.startswith("utils.") for m in known)  # utils/ is the library, CLI entry points or not
    assert has_main_block(ast.parse('if __name__ == "__main__":\n    main()\n'))
    assert not has_main_block(ast.parse('def f():\n    if __name__ == "__main__":\n        main()\n'))


def test_every_import_form_of_a_script_is_caught():
    known = {"test_pipeline.mia", "finetune_dp"}
    for source in ("from test_pipeline.mia import attack_metrics", "from test_pipeline import mia",
                   "import test_pipeline.mia as m", "def f():\n    from test_pipeline import eval, mia\n",
                   "import finetune_dp"):
        assert script_imports(ast.parse(source), "reproduce", known), source
    for source in ("from utils.model_under_test import complete", "from utils.membership import fmt_ci",
                   "from utils import model_under_test"):
        assert not script_imports(ast.parse(source), "reproduce", known), source
    assert not script_imports(ast.parse("from test_pipeline.mia import main"), "test_pipeline.mia", known)
