"""Instruction pairs mined from the corpus: "write this function" → the function.

Why: the I-DLM objective (SPEC §3) trains on prompt ++ response with the loss on the response only,
and a model that serves chat requests must see chat-formatted data. A documented function is a
natural (instruction, answer) pair with a real, reviewed answer: the signature and docstring say
what to write, the body is what a competent author wrote. Pairs from held-out files make an eval set
that never overlaps training files.

For every top-level function and every method of a top-level class that has a docstring, a body
beyond the docstring (not just `pass` / `...` / `raise NotImplementedError`) and at most
`max_lines` lines, the user turn quotes the source from the first decorator through the end of the
docstring (the author's own signature formatting and quoting) and the assistant turn is the whole
function source. Both are dedented by the function's indentation. Order follows the source.
"""

from __future__ import annotations

import ast
import re
import warnings
from typing import Callable, Iterable, Iterator

USER_TEMPLATE = "Write the Python function with this signature and docstring:\n```python\n{header}\n```"
MAX_LINES = 60
_NEWLINE = re.compile(r"\r\n|\r|\n")  # what ast counts as a line break (not str.splitlines's \f, \x1c, ...)


def _is_trivial(stmt: ast.stmt) -> bool:
    """`pass`, `...`, a bare string, or `raise NotImplementedError[(...)]`."""
    if isinstance(stmt, ast.Pass):
        return True
    if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
        return True
    if isinstance(stmt, ast.Raise) and stmt.exc is not None:
        exc = stmt.exc.func if isinstance(stmt.exc, ast.Call) else stmt.exc
        return isinstance(exc, ast.Name) and exc.id == "NotImplementedError"
    return False


def _functions(tree: ast.Module) -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """(qualified name, node) of top-level functions and methods of top-level classes, in source order."""
    funcs = (ast.FunctionDef, ast.AsyncFunctionDef)
    for node in tree.body:
        if isinstance(node, funcs):
            yield node.name, node
        elif isinstance(node, ast.ClassDef):
            for child in node.body:
                if isinstance(child, funcs):
                    yield f"{node.name}.{child.name}", child


def _dedent(lines: list[str], indent: int) -> str:
    """Remove up to `indent` leading spaces/tabs from each line (lines indented less stay as they are)."""
    out = []
    for line in lines:
        n = len(line) - len(line.lstrip(" \t"))
        out.append(line[min(n, indent) :])
    return "\n".join(out)


def mine_source(source: str, path: str = "", max_lines: int = MAX_LINES) -> list[dict]:
    """Instruction pairs {"path", "name", "user", "assistant"} from one file's source ([] if it does not parse)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = ast.parse(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return []
    lines = _NEWLINE.split(source)
    pairs = []
    for name, node in _functions(tree):
        doc = ast.get_docstring(node)
        if not doc or not doc.strip():
            continue
        start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
        end = node.end_lineno or node.lineno
        if end - start + 1 > max_lines or all(_is_trivial(s) for s in node.body[1:]):
            continue
        doc_end = node.body[0].end_lineno or node.body[0].lineno
        indent = node.col_offset  # bytes == chars: indentation is ASCII whitespace
        # the header must end where the docstring does: a body statement sharing its last line is not quoted
        if len(node.body) > 1 and node.body[1].lineno <= doc_end:
            continue
        header = _dedent(lines[start - 1 : doc_end], indent)
        function = _dedent(lines[start - 1 : end], indent)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ast.parse(function)  # the answer must stand alone
        except (SyntaxError, ValueError):
            continue
        pairs.append({"path": path, "name": name, "user": USER_TEMPLATE.format(header=header), "assistant": function})
    return pairs


def to_messages(pair: dict) -> list[dict]:
    """The chat conversation of a pair (for `Tokenizer.encode_chat`)."""
    return [{"role": "user", "content": pair["user"]}, {"role": "assistant", "content": pair["assistant"]}]


def _mine_row(args: tuple[str, str, int]) -> list[dict]:
    return mine_source(*args)


def mine_rows(rows: Iterable[dict], max_lines: int = MAX_LINES, imap: Callable = map) -> Iterator[dict]:
    """Pairs from corpus rows {"path", "text"} in row order; `imap` (an ordered parallel map) spreads the parsing."""
    jobs = ((row["text"], row.get("path", ""), max_lines) for row in rows)
    for pairs in imap(_mine_row, jobs):
        yield from pairs
