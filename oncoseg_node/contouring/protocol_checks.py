"""Warnings about a valid protocols file: what it asks for that the node cannot do.

A file can be valid and still surprise its owners: a structure that no
configured engine contours is absent from every structure set, a short
pattern such as ``hn`` matches inside words ("Thorax 3mm Schnitt"), and of
two protocols with the same priority that both match a series one is chosen
by file order alone. None of these stops the node; ``check-config`` and
``protocols explain`` print them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from itertools import combinations

from oncoseg_node.contouring.protocols import MatchRules, Protocol, ProtocolSet, Structure

# A pattern alternative this short without a word boundary or anchor is
# taken as a word, but matches inside longer ones.
SHORT_WORD = 3


def absent_structures(protocol: Protocol, can_contour: Callable[[Structure], bool]
                      ) -> list[Structure]:
    """The protocol's structures that no configured engine can contour."""
    return [s for s in protocol.structures if not can_contour(s)]


def absence_warnings(protocols: ProtocolSet, can_contour: Callable[[Structure], bool]
                     ) -> list[str]:
    """One line per protocol that lists structures which will always be absent."""
    lines = []
    for protocol in protocols.protocols:
        missing = absent_structures(protocol, can_contour)
        if missing:
            lines.append(f"protocols.{protocol.name}: no configured engine contours "
                         f"{len(missing)} of its {len(protocol.structures)} structures, "
                         "they will be absent: "
                         + ", ".join(f"{s.name} ({s.engine})" for s in missing))
    return lines


def _words(pattern: str) -> list[str]:
    """The literal words in a pattern's text, escapes such as ``\\b`` left out."""
    return re.findall(r"[A-Za-z&]+", re.sub(r"\\.", " ", pattern))


def unbounded_words(pattern: re.Pattern[str]) -> list[str]:
    """Short words of ``pattern`` that it also finds inside a longer word.

    Tried on the word itself between letters (``qzhnqz``): a bounded
    (``\\bhn\\b``) or anchored alternative does not match there.
    """
    return [w for w in dict.fromkeys(_words(pattern.pattern))
            if len(w) <= SHORT_WORD and pattern.search(f"qz{w}qz")
            and not pattern.search("qzqz")]


def _samples(rules: MatchRules, other: MatchRules, keyword: str) -> list[str]:
    """Candidate values for ``keyword``: empty, each word of both patterns, pairs of them."""
    words: list[str] = []
    for r in (rules, other):
        if keyword in r.attributes:
            words.extend(_words(r.attributes[keyword].pattern))
    pairs = [f"{a} {b}" for a, b in combinations(words, 2)]
    return ["", *words, *pairs]


def can_both_match(a: MatchRules, b: MatchRules) -> bool:
    """Whether some series plausibly matches both rule sets.

    Decided by trying values built from the patterns' own words on each
    attribute both constrain (``thorax abdomen`` for a thorax and an abdomen
    rule); disjoint calling-AE lists or slice thickness ranges rule it out.
    """
    if a.calling_aets and b.calling_aets and not set(a.calling_aets) & set(b.calling_aets):
        return False
    if a.slice_thickness_mm and b.slice_thickness_mm:
        lo = max(a.slice_thickness_mm[0], b.slice_thickness_mm[0])
        hi = min(a.slice_thickness_mm[1], b.slice_thickness_mm[1])
        if lo > hi:
            return False
    for keyword in set(a.attributes) & set(b.attributes):
        pa, pb = a.attributes[keyword], b.attributes[keyword]
        if not any(pa.search(v) and pb.search(v) for v in _samples(a, b, keyword)):
            return False
    return True


def match_warnings(protocols: ProtocolSet) -> list[str]:
    """Unbounded short words in patterns, and ties between protocols that can both match."""
    lines = []
    for protocol in protocols.protocols:
        for keyword, pattern in protocol.match.attributes.items():
            for word in unbounded_words(pattern):
                lines.append(f"protocols.{protocol.name}.match.attributes.{keyword}: "
                             f"{word!r} is not bounded (write \\b{word}\\b): it also "
                             "matches inside longer words")
    for a, b in combinations(protocols.protocols, 2):
        if a.priority == b.priority and can_both_match(a.match, b.match):
            lines.append(f"protocols.{b.name}: same priority ({b.priority}) as "
                         f"{a.name!r} and a series can match both; {a.name!r} wins by "
                         "file order alone: give them different priorities")
    return lines
