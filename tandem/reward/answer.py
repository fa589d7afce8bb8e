"""What gets graded: the answer a reader would take from a response, as text.

Pure functions over strings, no sympy: `answer_of` picks the last complete ``\\boxed{}`` (or,
with ``boxed_or_number``, the last number when nothing is boxed).
"""

import re

# Tokens that matter for brace matching. "\\" (a LaTeX line break) is consumed first so
# that "\\{" reads as a line break and a group brace; "\{" and "\}" are literal braces.
_BRACE_TOKENS = re.compile(r"\\\\|\\[{}]|\\boxed\s*\{|\{|\}")


def last_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}`` in `text`, or None if there is none.

    Braces are matched, so ``\\boxed{\\frac{1}{2}}`` gives ``\\frac{1}{2}``; escaped braces
    (``\\{1,2\\}``) are content, not grouping. "Last" means the box that closes last, so for
    ``\\boxed{\\boxed{3}}`` the outer box wins. An unterminated box (a response cut off at the
    token limit) is skipped. The space-delimited ``\\boxed 5`` form is not recognised.
    One pass over the text: linear even for 100 kB or thousands of nested braces.
    """
    if not isinstance(text, str):
        raise TypeError(f"last_boxed expects a str, got {type(text).__name__}")
    open_groups: list[int] = []  # per open brace: where its box content starts, or -1
    last: tuple[int, int] | None = None
    for token in _BRACE_TOKENS.finditer(text):
        piece = token.group()
        if piece.startswith("\\boxed"):
            open_groups.append(token.end())
        elif piece == "{":
            open_groups.append(-1)
        elif piece == "}" and open_groups:
            start = open_groups.pop()
            if start >= 0:
                last = (start, token.start())
        # "\\", "\{", "\}" and a stray "}" do not open or close a group
    return None if last is None else text[last[0] : last[1]]


_LAST_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")


def last_number(text: str) -> str | None:
    """The last number written in `text` (thousands commas dropped), or None."""
    found = _LAST_NUMBER.findall(text)
    return found[-1].replace(",", "") if found else None


def answer_of(response: str, answer_from: str) -> str | None:
    """What gets graded: the last \\boxed{} (`boxed`, the paper), or with `boxed_or_number`
    the last number when nothing is boxed (small models that never box, e.g. the CPU demo)."""
    box = last_boxed(response)
    if answer_from == "boxed":
        return box
    elif answer_from == "boxed_or_number":
        return box if box is not None and box.strip() else last_number(response)
    else:
        raise ValueError(f"unknown reward.answer_from: {answer_from!r}")

