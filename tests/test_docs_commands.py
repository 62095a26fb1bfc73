"""Every command the README and docs/*.md show is exercised by a test, and every `hptransfer` command among
them parses with today's command line.

Commands are the lines of fenced (```) and indented code blocks whose first word (after `VAR=value`
assignments) is a program below; `\\` continuations are joined and trailing `# comments` dropped.
- Each must match an entry of :data:`COVERAGE`, whose tests run that command (or, for a launcher that
  cannot run here, the launch it makes: `srun`, `sbatch`, pdsh) at toy size. A command nobody covers fails
  here, so the docs cannot show a command that no test runs; an entry naming a test that does not exist
  fails too.
- Each `hptransfer ...` line is parsed by the real argument parser of its subcommand (optional parts in
  `[...]` dropped, the first of `a|b` alternatives taken, `...` dropped), so a renamed or removed option
  in the docs fails here.
"""
from __future__ import annotations

import ast
import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PROGRAMS = {"hptransfer", "python", "python3", "deepspeed", "torchrun", "srun", "sbatch", "make", "bash", "pip",
            "nsys", ".venv/bin/python", ".venv/bin/hptransfer"}

# regex (matched against the whole command) -> the tests that run it; "file.py::name" names a test function
COVERAGE: list[tuple[str, list[str]]] = []


def _code_lines(text: str):
    """(line number, line) of the code blocks of a markdown text: fenced, and indented by 4 after a blank line."""
    fenced, indented, prev_blank = False, False, True
    for n, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            yield n, line
            continue
        if line.startswith("    ") and (prev_blank or indented) and not line.lstrip().startswith(("- ", "* ", "|")):
            indented = True
            yield n, line[4:]
        elif line.strip():
            indented = False
        prev_blank = not line.strip()


def documented_commands() -> list[tuple[str, int, str]]:
    """(doc file, line, command) of every command line in the README and docs."""
    out = []
    for doc in DOCS:
        pending, start = "", 0
        for n, line in _code_lines(doc.read_text()):
            text = line.rstrip()
            if pending:
                text = pending + " " + text.strip()
            else:
                start = n
            if text.endswith("\\"):
                pending = text[:-1].rstrip()
                continue
            pending = ""
            command = re.sub(r"\s+#\s.*$", "", text).strip()
            words = command.split()
            while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
                words = words[1:]
            if words and words[0] in PROGRAMS:
                out.append((str(doc.relative_to(REPO)), start, command))
    return out


def _test_exists(ref: str) -> bool:
    path, _, name = ref.partition("::")
    file = REPO / path
    if not file.is_file():
        return False
    if not name:
        return True
    return any(isinstance(node, ast.FunctionDef) and node.name == name for node in ast.walk(ast.parse(file.read_text())))


def test_every_documented_command_is_covered_by_a_test():
    commands = documented_commands()
    assert len(commands) > 40, f"found only {len(commands)} commands: is the parsing broken?"
    uncovered = [f"{doc}:{line}: {cmd}" for doc, line, cmd in commands
                 if not any(re.search(pattern, cmd) for pattern, _ in COVERAGE)]
    assert not uncovered, "commands in the docs that no COVERAGE entry maps to a test:\n" + "\n".join(uncovered)


def test_coverage_names_existing_tests_and_every_entry_is_used():
    commands = [cmd for _, _, cmd in documented_commands()]
    for pattern, refs in COVERAGE:
        assert refs, f"{pattern!r} names no test"
        missing = [r for r in refs if not _test_exists(r)]
        assert not missing, f"{pattern!r}: no such test {missing}"
        assert any(re.search(pattern, c) for c in commands), f"{pattern!r} matches no documented command (stale entry)"


def _concrete(command: str) -> list[str]:
    """The command's words with optional parts dropped, alternatives reduced to their first, ellipses gone."""
    text = command
    while True:  # innermost brackets first: [--a [--b]]
        reduced = re.sub(r"\s*\[[^\[\]]*\]", "", text)
        if reduced == text:
            break
        text = reduced
    text = text.replace("...", " ")
    words = shlex.split(text)
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
        words = words[1:]
    return [w.split("|")[0] if "|" in w and not w.startswith(("'", '"')) else w for w in words]


def _hptransfer_commands() -> list[tuple[str, int, list[str]]]:
    out = []
    for doc, line, cmd in documented_commands():
        words = _concrete(cmd)
        if words and words[0] in ("hptransfer", ".venv/bin/hptransfer"):
            out.append((doc, line, words[1:]))
        elif words[:3] == ["python", "-m", "hptransfer"] or words[:3] == ["python3", "-m", "hptransfer"]:
            out.append((doc, line, words[3:]))
    return out


@pytest.mark.parametrize("where,argv", [(f"{d}:{n}", a) for d, n, a in _hptransfer_commands()],
                         ids=[f"{d}:{n}" for d, n, _ in _hptransfer_commands()])
def test_documented_hptransfer_command_parses(where, argv):
    import argparse

    from hptransfer import cli

    if not argv or argv[0] in ("--help", "-h"):
        return
    parser = cli.build_parser(argv[0])
    try:
        args = cli.parse_args_with_overrides(parser, argv)
    except SystemExit as e:
        pytest.fail(f"{where}: `hptransfer {' '.join(argv)}` does not parse (exit {e.code})")
    if argv[0] == "data":  # `data` parses its subcommand's own options in run(): parse them here too
        from hptransfer.data import cli as data_cli

        add, _ = data_cli._functions(args.subcommand)
        sub = argparse.ArgumentParser(prog=f"hptransfer data {args.subcommand}")
        add(sub)
        try:
            sub.parse_args(args.rest)
        except SystemExit as e:
            pytest.fail(f"{where}: `hptransfer {' '.join(argv)}` does not parse (exit {e.code})")
