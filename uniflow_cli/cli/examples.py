"""Help-text examples: each command module lists its examples once, ``EXAMPLES = [(comment, command), ...]``,
and ``epilog(EXAMPLES)`` renders them; the root help shows the first example of every command.

Typer's rich help joins the lines of a paragraph and turns each blank line into a line break, so every line
here is its own paragraph (comment and command on separate lines, an empty paragraph between examples).
Comments, commands and notes are escaped: ``[train]`` or ``clients/*`` must reach the reader as written.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

Example = tuple[str, str]  # (comment, possibly ""; the command line)

_PARAGRAPH = "\n\n"


# rich.markup.escape's rule, here so that building every command's help at import does not load rich (~30 ms
# on each `uniflow` start): a "[" that opens something tag-like gets a backslash (test_cli checks both agree).
_TAG = re.compile(r"(\\*)(\[[a-z#/@][^[]*?])")


def escape(text: str) -> str:
    """Rich markup treats ``[word]`` as a style tag and drops it; ``\\[`` shows the bracket."""
    text = _TAG.sub(lambda m: f"{m.group(1)}{m.group(1)}\\{m.group(2)}", text)
    return text + "\\" if text.endswith("\\") and not text.endswith("\\\\") else text


def example_lines(example: Example) -> list[str]:
    comment, command = example
    lines = [f"[dim]# {escape(comment)}[/dim]"] if comment else []
    return [*lines, escape(command)]


def epilog(examples: Iterable[Example], notes: Sequence[str] = ()) -> str:
    """The ``Examples`` block of a command's help, then ``notes`` (plain text, one paragraph each)."""
    blocks = [_PARAGRAPH.join(example_lines(e)) for e in examples]
    text = "[bold]Examples[/bold]" + _PARAGRAPH + (_PARAGRAPH * 2).join(blocks)
    for note in notes:
        text += _PARAGRAPH * 2 + escape(note)
    return text
