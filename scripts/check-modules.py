#!/usr/bin/env python3
"""Checks the shape of the workspace's Rust code: no module import cycles in any crate, and
no source file over 600 lines unless its module doc says why (a `//!` line starting with
`Size:`).

A node is a source file (a module: `a/b.rs` or `a/b/mod.rs` is `crate::a::b`); an edge is
every `crate::...`, `super::...` or `self::...` path the file names outside comments
(in `use` lines and in expressions alike), resolved to the longest module prefix that is a
file. A module's own submodules declared with `mod` are not edges (a parent re-exporting
its children is structure, not a dependency), and nor are edges into a module's
`#[cfg(test)]` code. Prints each cycle found and exits 1; prints the module count and exits 0
otherwise.

    scripts/check-modules.py            every crate: src/, crates/*/src, tests/, fuzz/
    scripts/check-modules.py -v         also prints every edge
"""
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PATH_RE = re.compile(r"\b(crate|super|self)((?:::[A-Za-z_][A-Za-z0-9_]*)+)")
USE_GROUP_RE = re.compile(r"\buse\s+(crate|super|self)::([A-Za-z0-9_:]*)\{([^;]*)\}", re.S)


def module_of(src: Path, file: Path) -> tuple[str, ...]:
    rel = file.relative_to(src).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] in ("mod", "lib", "main"):
        parts = parts[:-1]
    return tuple(parts)


def strip(text: str) -> str:
    """Source without comments, string literals and `#[cfg(test)]` modules."""
    text = re.sub(r"//[^\n]*", "", text)
    text = re.sub(r'"(?:\\.|[^"\\])*"', '""', text)
    out, i = [], 0
    for m in re.finditer(r"#\[cfg\(test\)\]\s*(?:pub(?:\([^)]*\))?\s+)?mod\s+\w+\s*\{", text):
        if m.start() < i:
            continue
        out.append(text[i:m.start()])
        depth, j = 1, m.end()
        while depth and j < len(text):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        i = j
    out.append(text[i:])
    return "".join(out)


def edges_of(mod: tuple[str, ...], is_dir_module: bool, text: str, modules: set) -> set:
    found = set()
    paths = [(m.group(1), m.group(2)) for m in PATH_RE.finditer(text)]
    for m in USE_GROUP_RE.finditer(text):
        base = m.group(2)
        for item in re.split(r",", m.group(3)):
            item = item.strip().split(" as ")[0].strip()
            if item and item != "self" and re.fullmatch(r"[A-Za-z0-9_:]+", item):
                paths.append((m.group(1), "::" + base + item))
    for root, rest in paths:
        parts = [p for p in rest.split("::") if p]
        if root == "crate":
            base = ()
        elif root == "self":
            base = mod
        else:  # super: the parent module, whether this one is `a/b.rs` or `a/b/mod.rs`
            base = mod[:-1]
            while parts and parts[0] == "super":
                parts, base = parts[1:], base[:-1]
        full = base + tuple(parts)
        target = None
        for n in range(len(full), -1, -1):
            if full[:n] in modules:
                target = full[:n]
                break
        if target is None or target == mod:
            continue
        # A parent naming its own submodule (re-exports) is structure, not a dependency.
        if target[: len(mod)] == mod:
            continue
        # A child naming a parent module that is only a folder of re-exports is not either.
        found.add(target)
    return found


def cycles(graph: dict) -> list:
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            visit(v)
    return out


def check(src: Path, verbose: bool) -> int:
    files = {}
    for f in sorted(src.rglob("*.rs")):
        if f.name == "main.rs" and f.parent == src and (src / "lib.rs").exists():
            continue  # the binary is a crate of its own, over the library
        files[module_of(src, f)] = f
    modules = set(files)
    graph = {}
    for mod, f in files.items():
        is_dir = f.name in ("mod.rs", "lib.rs", "main.rs")
        graph[mod] = edges_of(mod, is_dir, strip(f.read_text()), modules)
        if verbose:
            for t in sorted(graph[mod]):
                print(f"  {'::'.join(mod) or 'crate'} -> {'::'.join(t) or 'crate'}")
    # Edges into a folder module (mod.rs) that only re-exports do not make cycles with its
    # children; but a real dependency does, so mod.rs files count like any other.
    found = cycles(graph)
    name = src.parent.relative_to(ROOT) if src.parent != ROOT else Path(".")
    for comp in found:
        print(f"{name}: cycle among {', '.join('::'.join(m) or 'crate' for m in comp)}")
    if not found:
        print(f"{name}: {len(modules)} modules, no cycle")
    return len(found)


MAX_LINES = 600


def check_sizes() -> int:
    """Files over MAX_LINES lines without a `//! Size:` line saying why."""
    bad = 0
    dirs = [ROOT / "src", ROOT / "tests", ROOT / "fuzz" / "fuzz_targets"]
    dirs += sorted(p for p in (ROOT / "crates").iterdir() if p.is_dir())
    count = 0
    for d in dirs:
        for f in sorted(d.rglob("*.rs")):
            if "target" in f.relative_to(ROOT).parts:
                continue
            count += 1
            text = f.read_text()
            lines = text.count("\n")
            if lines > MAX_LINES and not re.search(r"^//! Size:", text, re.M):
                print(f"{f.relative_to(ROOT)}: {lines} lines, and no `//! Size:` line in its module doc says why")
                bad += 1
    if not bad:
        print(f"{count} source files, none over {MAX_LINES} lines without a reason")
    return bad


def main() -> int:
    verbose = "-v" in sys.argv
    srcs = [ROOT / "src"] + sorted(p / "src" for p in (ROOT / "crates").iterdir() if (p / "src").is_dir())
    bad = sum(check(src, verbose) for src in srcs)
    bad += check_sizes()
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
