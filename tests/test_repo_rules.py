"""Rules of the repository checked on the source (no MindSpore): no file of locmoe/ or pangu_sigma/ over 500
lines, no import from a lower layer to a higher one (docs/architecture.md), and no citation of a document
outside the repository in code, configs or tests."""
import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# docs/architecture.md, "Who may import whom": a module imports only from its own layer or lower ones.
LAYERS = [("locmoe", 1), ("pangu_sigma.config", 2), ("pangu_sigma.json_io", 2), ("pangu_sigma.model", 2),
          ("pangu_sigma.data", 2), ("pangu_sigma.parallel", 2), ("pangu_sigma.cluster", 3), ("pangu_sigma.build", 3),
          ("pangu_sigma.training", 4), ("pangu_sigma.evaluation", 5), ("pangu_sigma.tools", 6)]


def layer(module):
    if module == "pangu_sigma":  # the package root runs first: it may import only the MoE library (locmoe)
        return 1
    found = [n for prefix, n in LAYERS if module == prefix or module.startswith(prefix + ".")]
    return found[0] if found else None


def sources():
    return sorted(p for package in ("locmoe", "pangu_sigma") for p in (REPO / package).rglob("*.py"))


def test_no_file_over_500_lines():
    long = {str(p.relative_to(REPO)): n for p in sources() if (n := len(p.read_text().splitlines())) > 500}
    assert not long


def test_no_import_from_a_higher_layer():
    upward = []
    for path in sources():
        module = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        own = layer(module)
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            upward += [f"{module} -> {name}" for name in names if (layer(name) or 0) > own]
    assert not upward


def test_nothing_cites_a_document_outside_the_repository():
    outside = re.compile(r"DESIGN(\.md)?\b|/work/shared|\.\./shared")
    files = sources() + sorted((REPO / "configs").glob("*.yaml")) + sorted((REPO / "tests").rglob("*.py")) \
        + sorted((REPO / "run_scripts").iterdir())
    hits = [f"{p.relative_to(REPO)}:{i}" for p in files if p != Path(__file__).resolve() and p.is_file()
            for i, line in enumerate(p.read_text().splitlines(), 1) if outside.search(line)]
    assert not hits
