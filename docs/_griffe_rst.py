"""Griffe extension: render the reStructuredText habits of sslseg's docstrings as Markdown.

sslseg's docstrings are Google style, but use two reST idioms that Markdown shows literally:
cross-reference roles (:func:`sslseg.ops.edt`) and literal blocks introduced by ``::`` (the loss
formulas of the methods). This rewrites them before mkdocstrings parses the docstring: a role
becomes inline code (``~a.b.c`` keeps the last name, as Sphinx does), a ``::`` block becomes a
fenced code block. A bullet list right after a paragraph line gets the blank line Markdown needs.
The source files stay as they are.
"""

from __future__ import annotations

import re
import textwrap
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:func|class|mod|meth|attr|data|exc|obj|const):`(~?)([^`]+)`")


def _role(match: re.Match[str]) -> str:
    tilde, target = match.groups()
    return f"`{target.rsplit('.', 1)[-1] if tilde else target}`"


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _literal_blocks(text: str) -> str:
    """Turn ``para::`` + blank line + indented block into ``para:`` + a fenced block."""
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.rstrip().endswith("::"):
            out.append(line)
            i += 1
            continue
        base = _indent(line)
        j = i + 1
        while j < len(lines) and not lines[j].strip():
            j += 1
        k = j
        while k < len(lines) and (not lines[k].strip() or _indent(lines[k]) > base):
            k += 1
        while k > j and not lines[k - 1].strip():  # trailing blank lines stay outside the block
            k -= 1
        if k == j:  # "::" with no indented block after it: leave the text alone
            out.append(line)
            i += 1
            continue
        head = line.rstrip()[:-2].rstrip()
        if head.strip():
            out.append(head + ":")
        # The fence sits at the paragraph's indent (deeper, Markdown would read an indented code
        # block); the block keeps its own relative indentation inside it.
        pad = " " * base
        block = textwrap.indent(textwrap.dedent("\n".join(lines[j:k])), pad, lambda _: True).split("\n")
        out += ["", pad + "```text", *block, pad + "```", ""]
        i = k
    return "\n".join(out)


_BULLET = re.compile(r"^\s*(?:[*-]|\d+\.) ")


def _list_breaks(text: str) -> str:
    """Put a blank line before a list that follows a paragraph line (Markdown needs one)."""
    out: list[str] = []
    in_list = in_fence = False
    for line in text.split("\n"):
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
        elif not in_fence and not line.strip():
            in_list = False
        elif not in_fence and _BULLET.match(line):
            if not in_list and out and out[-1].strip():
                out.append("")
            in_list = True
        out.append(line)
    return "\n".join(out)


class RstToMarkdown(griffe.Extension):
    """Rewrite every docstring once, when griffe creates its object."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _list_breaks(_literal_blocks(_ROLE.sub(_role, obj.docstring.value)))
