"""What a plugin says about one node: a status code with a reason, and scores kept per plugin.

"This node doesn't fit" is a value, never an exception: a :class:`Status`
carries a code, a reason a person can read, and the name of the plugin that
said it. That is what makes explaining a decision free.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType


class Code(StrEnum):
    """How a filter judged a node, from best to worst."""

    #: The node may hold the function.
    FITS = "fits"
    #: Not now, but it could once other replicas leave the node (capacity).
    UNFIT = "unfit"
    #: Moving other work would not help: wrong region, no GPU, offline, untrusted.
    UNRESOLVABLE = "unfit-unresolvable"
    #: The plugin could not judge the node (malformed node data); never placed.
    ERROR = "error"


_RANK = {Code.FITS: 0, Code.UNFIT: 1, Code.UNRESOLVABLE: 2, Code.ERROR: 3}


@dataclass(frozen=True, slots=True)
class Status:
    """One filter's verdict on one node."""

    code: Code = Code.FITS
    reason: str = ""
    plugin: str = ""

    @property
    def ok(self) -> bool:
        return self.code is Code.FITS

    @classmethod
    def unfit(cls, plugin: str, reason: str) -> Status:
        return cls(Code.UNFIT, reason, plugin)

    @classmethod
    def unresolvable(cls, plugin: str, reason: str) -> Status:
        return cls(Code.UNRESOLVABLE, reason, plugin)

    @classmethod
    def error(cls, plugin: str, reason: str) -> Status:
        return cls(Code.ERROR, reason, plugin)

    def __str__(self) -> str:
        return f"{self.plugin}: {self.reason}" if self.reason else self.code.value


#: The verdict of a filter that has nothing against the node.
FITS = Status()


def worst(statuses: Iterable[Status]) -> Status:
    """The most severe status (the first of equals); :data:`FITS` for none."""
    out = FITS
    for s in statuses:
        if _RANK[s.code] > _RANK[out.code]:
            out = s
    return out


@dataclass(frozen=True, slots=True)
class NodeResult:
    """Everything the plugins said about one node in one decision."""

    node: str
    #: The failing filters' statuses, in profile order; empty when the node fits.
    statuses: tuple[Status, ...] = ()
    #: Score per score plugin, each 0-100 before weighting; empty when the node does not fit.
    scores: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    #: The weighted sum of ``scores``; None when the node does not fit.
    total: float | None = None

    @property
    def fits(self) -> bool:
        return not self.statuses

    @property
    def code(self) -> Code:
        return worst(self.statuses).code

    @property
    def reason(self) -> str:
        return "; ".join(str(s) for s in self.statuses)
