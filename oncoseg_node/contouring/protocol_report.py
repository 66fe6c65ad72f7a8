"""``protocols list`` and ``protocols explain`` as lines of text, for physicists at a terminal.

``list`` shows each protocol in the order the node tries them (highest
priority first) with its match rules and structures; ``explain`` reads one
CT header of a folder and says, protocol by protocol, why it matches this
series or not, and which one the node would choose. Both add the warnings of
:mod:`protocol_checks` (structures no configured engine draws, loose
patterns, ties) and of :mod:`colors` (structures of one protocol drawn in
colours too close to tell apart).
"""

from __future__ import annotations

from pathlib import Path

from oncoseg_node.config import Config
from oncoseg_node.contouring.colors import color_warnings
from oncoseg_node.contouring.engines.registry import contourable
from oncoseg_node.contouring.folder import series_paths
from oncoseg_node.contouring.protocol_checks import absence_warnings, match_warnings
from oncoseg_node.contouring.protocols import ProtocolSet
from oncoseg_node.contouring.volume import read_ct_slices


def protocol_lines(protocols: ProtocolSet) -> list[str]:
    """Every protocol with its rules and structures, highest priority first."""
    lines = [f"{protocols.source} (version {protocols.version}, fallback: "
             f"{protocols.fallback or 'skip'})"]
    for protocol in sorted(protocols.protocols, key=lambda p: -p.priority):
        rules = [f"{k} ~ /{v.pattern}/" for k, v in protocol.match.attributes.items()]
        if protocol.match.calling_aets:
            rules.append(f"calling AE in {list(protocol.match.calling_aets)}")
        if protocol.match.slice_thickness_mm:
            rules.append(f"slice thickness in {list(protocol.match.slice_thickness_mm)} mm")
        lines.append(f"\n{protocol.name} (priority {protocol.priority}): "
                     f"{'; '.join(rules) or 'matches every series'}")
        for s in protocol.structures:
            side = f" {s.laterality}" if s.laterality else ""
            lines.append(f"  {s.name:<16} {s.interpreted_type:<9} {s.engine:<9} "
                         f"rgb{s.color}{side}  {', '.join(s.concepts)}".rstrip())
    return lines


def warning_lines(config: Config, protocols: ProtocolSet, only: str | None = None) -> list[str]:
    """What a valid protocols file asks for that this node cannot do (``only``: one protocol)."""
    about_protocols = absence_warnings(protocols, contourable(config.engine)) + \
        color_warnings(protocols)
    if only is not None:
        about_protocols = [line for line in about_protocols
                           if line.startswith(f"protocols.{only}:")]
    return [f"warning: {line}" for line in match_warnings(protocols) + about_protocols]


def explain_lines(config: Config, protocols: ProtocolSet, series_dir: Path,
                  calling_ae: str | None = None, series_uid: str | None = None) -> list[str]:
    """Why each protocol matches the folder's CT series or not, and the one chosen."""
    header = read_ct_slices(series_paths(series_dir, series_uid)[:1])[0]
    chosen = protocols.match(header, calling_ae)
    lines = []
    for protocol in sorted(protocols.protocols, key=lambda p: -p.priority):
        reasons = protocol.match.explain(header, calling_ae)
        verdict = "matches" if not reasons else "does not match: " + "; ".join(reasons)
        lines.append(f"{protocol.name} (priority {protocol.priority}) {verdict}")
    lines += warning_lines(config, protocols, chosen.name if chosen else None)
    if chosen is None:
        lines.append("=> no protocol: the series would be skipped")
    else:
        lines.append(f"=> {chosen.name}: {', '.join(s.name for s in chosen.structures)}")
    return lines
