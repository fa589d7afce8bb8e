"""What gets graded: the answer a reader would take from a response, as text.

Pure functions over strings, no sympy: `answer_of` picks the last outermost complete
``\\boxed{}`` (or, with ``boxed_or_number``, the last number when nothing is boxed).
"""

import re

# Tokens that matter for brace matching. "\\" (a LaTeX line break) is consumed first so
# that "\\{" reads as a line break and a group brace; "\{" and "\}" are literal braces.
# "\fbox" draws the same frame as "\boxed" (and math-verify reads it as one), so it is a box too.
_BRACE_TOKENS = re.compile(r"\\\\|\\[{}]|\\(?:boxed|fbox)\s*\{|\{|\}")


def last_boxed(text: str) -> str | None:
    """The answer in the last outermost complete box of `text`, or None if there is none.

    Braces are matched, so ``\\boxed{\\frac{1}{2}}`` gives ``\\frac{1}{2}``; escaped braces
    (``\\{1,2\\}``) are content, not grouping. ``\\fbox{}`` counts as a box.

    Nested boxes: only a box that sits inside no other box is an answer, and the whole of the
    last one is graded, its inner boxes kept as plain content (the frames dropped). A reader of
    ``\\boxed{garbage \\boxed{\\sqrt{9}}}`` sees the answer "garbage \\sqrt{9}", not 3, so a
    model cannot box many candidates inside one box and be graded on whichever matches;
    ``\\boxed{\\boxed{7}}`` still reads as 7. An unterminated box (a response cut off at the
    token limit) is no answer, nor is anything inside it: the previous outermost box is taken.
    The space-delimited ``\\boxed 5`` form is not recognised.
    One pass over the text: linear even for 100 kB or thousands of nested braces.
    """
    boxes = _outermost_boxes(text)
    return boxes[-1][1] if boxes else None


# A blank line: where one paragraph of a response ends and the next begins.
_BLANK_LINE = re.compile(r"\n[ \t]*\n")


def final_boxes(text: str) -> str | None:
    """The final answer's boxes joined with ", ": every outermost complete box of the paragraph
    that holds the last one (paragraphs end at blank lines), each read as `last_boxed` reads a
    box; None if there is no box.

    For answers a model writes as several boxes, ``\\boxed{(2, 2)} and \\boxed{(6, 2)}``
    against the gold ``(2, 2), (6, 2)``. Hedging gains nothing: extra candidates make the
    joined answer a different set. An intermediate result boxed in the final paragraph is
    joined too, so ``x = \\boxed{2}, so the answer is \\boxed{4}`` grades as "2, 4".
    """
    boxes = _outermost_boxes(text)
    if not boxes:
        return None
    last_start = boxes[-1][0]
    blanks = [m.end() for m in _BLANK_LINE.finditer(text, 0, last_start)]
    paragraph_start = blanks[-1] if blanks else 0
    return ", ".join(box for start, box in boxes if start >= paragraph_start)


def _outermost_boxes(text: str) -> list[tuple[int, str]]:
    """(where the frame starts, the content without inner frames) of each outermost complete
    box, in order."""
    if not isinstance(text, str):
        raise TypeError(f"last_boxed expects a str, got {type(text).__name__}")
    # Per open brace: (where a box's frame starts, where its content starts), or None.
    open_groups: list[tuple[int, int] | None] = []
    open_boxes = 0
    found: list[tuple[int, str]] = []
    frames: list[tuple[int, int]] = []  # inner frames ("\boxed{" and its "}") of the current box
    for token in _BRACE_TOKENS.finditer(text):
        piece = token.group()
        if piece[0] == "\\" and piece[1] in "bf":  # "\boxed{" or "\fbox{"
            if open_boxes == 0:
                frames = []
            open_groups.append((token.start(), token.end()))
            open_boxes += 1
        elif piece == "{":
            open_groups.append(None)
        elif piece == "}" and open_groups:
            box = open_groups.pop()
            if box is None:
                continue
            open_boxes -= 1
            if open_boxes == 0:
                found.append((box[0], _without_frames(text, (box[1], token.start()), frames)))
            else:
                frames.extend([(box[0], box[1]), (token.start(), token.end())])
        # "\\", "\{", "\}" and a stray "}" do not open or close a group
    return found


def _without_frames(text: str, span: tuple[int, int], frames: list[tuple[int, int]]) -> str:
    pieces, at = [], span[0]
    for start, end in sorted(frames):
        pieces.append(text[at:start])
        at = end
    pieces.append(text[at : span[1]])
    return "".join(pieces)


_LAST_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")


def last_number(text: str) -> str | None:
    """The last number written in `text` (thousands commas dropped), or None."""
    found = _LAST_NUMBER.findall(text)
    return found[-1].replace(",", "") if found else None


def answer_of(response: str, answer_from: str, boxes: str = "last") -> str | None:
    """What gets graded: the last \\boxed{} (`boxed`, the paper), or with `boxed_or_number`
    the last number when nothing is boxed (small models that never box, e.g. the CPU demo).
    `boxes`: `last` (the paper: the last box alone) or `final` (`final_boxes`: the boxes of
    the final paragraph, joined)."""
    if boxes == "last":
        box = last_boxed(response)
    elif boxes == "final":
        box = final_boxes(response)
    else:
        raise ValueError(f"unknown reward.boxes: {boxes!r}")
    if answer_from == "boxed":
        return box
    elif answer_from == "boxed_or_number":
        return box if box is not None and box.strip() else last_number(response)
    else:
        raise ValueError(f"unknown reward.answer_from: {answer_from!r}")

