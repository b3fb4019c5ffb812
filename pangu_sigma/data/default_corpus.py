"""The default two-domain corpus, built offline from the Python standard library.

    python -m pangu_sigma.data.default_corpus --output DIR [--max-bytes N] [--overwrite]

Domain "code": the standard library's .py sources, one .txt per module.
Domain "en": English prose, the docstrings (module, class, function; ast.get_docstring) of
the same modules in source order, one .txt per module that has any.
Test folders and site-packages are left out. Modules are visited in a fixed interleaved
order over the sorted paths (so a small budget still samples the whole library) and
taken whole until the domain's half of --max-bytes is used up (the last one cut at a
line end); the result depends only on the Python installation. Like prepare, it writes into a temporary folder
next to DIR and renames it into place at the end.
"""
import ast
import os
import sys
import sysconfig

from locmoe.errors import ConfigError, OneLineArgumentParser, note_for_interrupt, run_cli, settle_for_exit
from pangu_sigma.data.output_folder import built_in_temp

DEFAULT_MAX_BYTES = 3_000_000
INTERLEAVE = 8  # visit order: paths[0::8], then paths[1::8], ...
EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


def stdlib_sources(stdlib_dir):
    """Relative paths of the standard library's .py files, sorted, tests excluded."""
    paths = []
    for root, dirs, files in os.walk(stdlib_dir):
        dirs[:] = sorted(d for d in dirs if d not in EXCLUDED_DIRS and not d.startswith("."))
        paths.extend(os.path.relpath(os.path.join(root, name), stdlib_dir)
                     for name in sorted(files) if name.endswith(".py"))
    return sorted(paths)


def visit_order(paths):
    """Interleaves the sorted paths so any prefix spreads over the whole library."""
    return [path for start in range(INTERLEAVE) for path in paths[start::INTERLEAVE]]


def module_name(relative_path):
    return relative_path[: -len(".py")].replace(os.sep, ".")


def docstrings(source):
    """Docstrings of the module and of every class and function, in source order."""
    tree = ast.parse(source)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            text = ast.get_docstring(node, clean=True)
            if text:
                found.append((getattr(node, "lineno", 0), text))
    return [text for _, text in sorted(found, key=lambda item: item[0])]


def take_within(budget, documents):
    """Takes (name, text) documents in order, whole, until the UTF-8 budget is used up.

    The document that does not fit is cut after its last full line that fits, and ends the list.
    """
    taken, used = [], 0
    for name, text in documents:
        data = text.encode("utf-8")
        if used + len(data) > budget:
            head = data[: budget - used].decode("utf-8", errors="ignore")
            head = head[: head.rfind("\n") + 1]
            if head:
                taken.append((name, head))
                used += len(head.encode("utf-8"))
            break
        taken.append((name, text))
        used += len(data)
    return taken, used


def build_default_corpus(output_dir, max_bytes=DEFAULT_MAX_BYTES, overwrite=False, stdlib_dir=None, on_commit=None):
    """Writes output_dir/code/*.txt and output_dir/en/*.txt (on_commit: output_folder.built_in_temp's).

    Returns ({domain: (files, bytes)}, {skip reason: modules skipped}).
    """
    if not (isinstance(max_bytes, int) and max_bytes >= 1000):
        raise ConfigError("max_bytes", max_bytes, "an integer >= 1000")
    output_dir = os.path.abspath(output_dir)
    if os.path.lexists(output_dir) and not overwrite:
        raise ConfigError("output", output_dir, "a folder that does not exist yet (pass --overwrite to replace it)")
    if os.path.lexists(output_dir) and not os.path.isdir(output_dir):
        raise ConfigError("output", output_dir, "a folder to replace (it exists but is not a folder)")
    stdlib_dir = stdlib_dir or sysconfig.get_paths()["stdlib"]
    order = visit_order(stdlib_sources(stdlib_dir))
    if not order:
        raise ConfigError("stdlib", stdlib_dir, "a Python standard library folder with .py files")

    skipped = {"not UTF-8": 0, "not Python 3 syntax": 0}

    def sources():
        for path in order:
            with open(os.path.join(stdlib_dir, path), "rb") as handle:
                raw = handle.read()
            try:
                yield module_name(path), raw.decode("utf-8")
            except UnicodeDecodeError:
                skipped["not UTF-8"] += 1

    def prose():
        for name, source in sources():
            try:
                texts = docstrings(source)
            except SyntaxError:
                skipped["not Python 3 syntax"] += 1
                continue
            if texts:
                yield name, "\n\n".join(texts) + "\n"

    code_budget = max_bytes // 2
    chosen = {"code": take_within(code_budget, sources()), "en": take_within(max_bytes - code_budget, prose())}
    with built_in_temp(output_dir, on_commit) as temp_dir:
        for domain, (documents, _) in chosen.items():
            os.mkdir(os.path.join(temp_dir, domain))
            for name, text in documents:
                with open(os.path.join(temp_dir, domain, name + ".txt"), "w", encoding="utf-8", newline="") as handle:
                    handle.write(text)
    sizes = {domain: (len(documents), used) for domain, (documents, used) in chosen.items()}
    return sizes, {reason: count for reason, count in skipped.items() if count}


def main(argv=None):
    parser = OneLineArgumentParser(prog="python -m pangu_sigma.data.default_corpus",
                                   description=__doc__.split("\n")[0])
    parser.add_argument("--output", required=True, help="folder to create (code/ and en/ inside)")
    parser.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES, help="total text size, split across domains")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    args = parser.parse_args(argv)

    def body():
        note_for_interrupt(f"nothing written, {os.path.abspath(args.output)} is as it was")
        sizes, skipped = build_default_corpus(args.output, args.max_bytes, args.overwrite,
                                              on_commit=settle_for_exit)
        summary = ", ".join(f"{domain} {files} files {used / 1e6:.2f} MB" for domain, (files, used) in sizes.items())
        print(f"wrote {os.path.abspath(args.output)}: {summary}")
        for reason, count in skipped.items():
            print(f"skipped {count} stdlib module(s): {reason}", file=sys.stderr)

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
