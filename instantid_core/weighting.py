"""Prompt weights in the syntax the InstantID demo reads (the Automatic1111 convention):

    (word:1.3)   weight 1.3             (word)   weight 1.1           [word]   weight 1 / 1.1
    nesting multiplies: ((word)) is 1.21, ((word:1.5)) is 1.65;  \\( \\) \\[ \\] \\\\ are the literal characters.

A bracket without its partner is read literally ("a (smiling man" keeps its "("), and so is a number after the
colon that is not a plain decimal ("(word:1e3)" is "word:1e3" at 1.1): a prompt never fails to parse. Weight 1.0 is
neutral: "(word:1.0)" is the prompt "word".

Written here rather than taken from a library: compel (which encodes the weighted fragments, see `text`) has its own
syntax (`(word)1.3`, `word++`) and reads "(word:1.3)" as the text "word:1 . 3".
"""

from __future__ import annotations

import re

UP = 1.1  # (word)
DOWN = 1 / 1.1  # [word]
_ESCAPABLE = "()[]\\"
_NUMBER = re.compile(r"\d+(?:\.\d*)?|\.\d+")
_PARTNER = {")": "(", "]": "["}


def parse_weighted_prompt(text: str) -> list[tuple[str, float]]:
    """Split a prompt into (text, weight) fragments; consecutive characters of equal weight form one fragment.

    >>> parse_weighted_prompt("a (red:1.3) cat")
    [('a ', 1.0), ('red', 1.3), (' cat', 1.0)]
    >>> parse_weighted_prompt("a (red cat")
    [('a (red cat', 1.0)]
    """
    # 1. characters, each a literal or a bracket (escaped brackets are literals)
    chars: list[str] = []
    is_bracket: list[bool] = []
    i = 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in _ESCAPABLE:
            chars.append(text[i + 1])
            is_bracket.append(False)
            i += 2
            continue
        chars.append(text[i])
        is_bracket.append(text[i] in "()[]")
        i += 1

    # 2. pairs: a closing bracket closes the innermost open bracket if that one is its partner; else it is literal
    stack: list[int] = []
    pairs: list[tuple[int, int]] = []
    for index, char in enumerate(chars):
        if not is_bracket[index]:
            continue
        if char in "([":
            stack.append(index)
        elif stack and chars[stack[-1]] == _PARTNER[char]:
            pairs.append((stack.pop(), index))
        else:
            is_bracket[index] = False
    for index in stack:  # opened, never closed
        is_bracket[index] = False

    # 3. weights: every pair multiplies the characters inside it; "(text:number)" drops its ":number"
    weights = [1.0] * len(chars)
    keep = [not flag for flag in is_bracket]
    for start, end in pairs:
        if not is_bracket[start] or not is_bracket[end]:
            continue
        multiplier = DOWN if chars[start] == "[" else UP
        if chars[start] == "(":
            colon = _explicit_weight(chars, is_bracket, start, end)
            if colon is not None:
                multiplier = float("".join(chars[colon + 1:end]))
                for index in range(colon, end):
                    keep[index] = False
        for index in range(start + 1, end):
            weights[index] *= multiplier

    fragments: list[tuple[str, float]] = []
    for char, weight, kept in zip(chars, weights, keep, strict=True):
        if not kept:
            continue
        if fragments and fragments[-1][1] == weight:
            fragments[-1] = (fragments[-1][0] + char, weight)
        else:
            fragments.append((char, weight))
    return fragments


def _explicit_weight(chars: list[str], is_bracket: list[bool], start: int, end: int) -> int | None:
    """Index of the colon of a ":number" just before `end`, if the pair (start, end) ends with one."""
    index = end - 1
    while index > start and not is_bracket[index] and chars[index] in "0123456789.":
        index -= 1
    if index <= start or chars[index] != ":" or is_bracket[index]:
        return None
    return index if _NUMBER.fullmatch("".join(chars[index + 1:end])) else None


def plain_text(fragments: list[tuple[str, float]]) -> str:
    """The prompt without its weight syntax."""
    return "".join(text for text, _ in fragments)


def is_weighted(fragments: list[tuple[str, float]]) -> bool:
    return any(weight != 1.0 for _, weight in fragments)
