"""Table-driven replacements for the slow parts of paho-mqtt's ``Properties``.

paho 2.x rebuilds its property tables in every ``Properties.__init__`` and
finds a property by scanning every name with ``str.replace`` on each
attribute set, pack and unpack: about 25 us of CPU for each MQTT 5 message
in and out, more than the agent's own work per request. These replacements
compute the tables once and look names up in dictionaries; behaviour (what is
accepted, what is refused, the bytes packed) is unchanged, which
``tests/test_mqtt_speedups.py`` checks against paho's own methods.

The same goes for ``MQTTMessageInfo``: paho gives every publish its own
``threading.Condition`` for ``wait_for_publish``, which the agent never calls
(it awaits acknowledgements on the loop); here the condition is made only
when someone waits.

Applied once, on import of :mod:`fnmesh.agent.mqtt`.
"""

from __future__ import annotations

import threading
from typing import Any

from paho.mqtt import client as _client
from paho.mqtt import properties as _p
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes

_Original = _p.Properties
_TEMPLATE = _Original(PacketTypes.PUBLISH)
_TYPES: list[str] = _TEMPLATE.types
_NAMES: dict[str, int] = _TEMPLATE.names
_PROPS: dict[int, tuple[int, list[int]]] = _TEMPLATE.properties
#: compressed name ("ContentType") -> identifier
_IDENT: dict[str, int] = {n.replace(" ", ""): i for n, i in _NAMES.items()}
#: identifier -> spaced name ("Content Type"), last one wins as in paho's scan
_NAME_OF: dict[int, str] = {}
for _n, _i in _NAMES.items():
    _NAME_OF[_i] = _n
#: (compressed name, identifier) in paho's declaration order
_ORDER: tuple[tuple[str, int], ...] = tuple((n.replace(" ", ""), i) for n, i in _NAMES.items())
_PRIVATE = frozenset(("packetType", "types", "names", "properties"))
_MULTIPLE = frozenset((11, 38))

_orig_setattr = _Original.__setattr__
#: paho's own methods, kept for the equivalence tests.
ORIGINALS: dict[str, Any] = {
    name: getattr(_Original, name)
    for name in (
        "__init__",
        "getIdentFromName",
        "getNameFromIdent",
        "allowsMultiple",
        "__setattr__",
        "pack",
        "clear",
        "isEmpty",
        "unpack",
    )
}


def _init(self: Any, packetType: int) -> None:
    d = self.__dict__
    d["packetType"] = packetType
    d["types"] = _TYPES
    d["names"] = _NAMES
    d["properties"] = _PROPS


def _get_ident(self: Any, compressedName: str) -> int:
    return _IDENT.get(compressedName, -1)


def _get_name(self: Any, identifier: int) -> str | None:
    return _NAME_OF.get(identifier)


def _allows_multiple(self: Any, compressedName: str) -> bool:
    return _IDENT.get(compressedName, -1) in _MULTIPLE


def _setattr(self: Any, name: str, value: Any) -> None:
    compressed = name.replace(" ", "")
    ident = _IDENT.get(compressed)
    # Fast path for the common, simple properties; everything else keeps paho's checks.
    if (
        ident in (2, 3, 8, 9, 17)
        and compressed not in _PRIVATE
        and self.packetType in _PROPS[ident][1]
    ):
        object.__setattr__(self, compressed, value)
        return
    _orig_setattr(self, name, value)  # type: ignore[no-untyped-call]


def _pack(self: Any) -> bytes:
    buffer = b""
    d = self.__dict__
    for compressed, ident in _ORDER:
        if compressed in d:
            attr_type = _PROPS[ident][0]
            value = d[compressed]
            if ident in _MULTIPLE:
                for prop in value:
                    buffer += self.writeProperty(ident, attr_type, prop)
            else:
                buffer += self.writeProperty(ident, attr_type, value)
    return bytes(_p.VariableByteIntegers.encode(len(buffer))) + buffer


def _clear(self: Any) -> None:
    d = self.__dict__
    for compressed, _ in _ORDER:
        d.pop(compressed, None)


def _is_empty(self: Any) -> bool:
    d = self.__dict__
    return not any(compressed in d for compressed, _ in _ORDER)


_Info = _client.MQTTMessageInfo
_info_wait = _Info.wait_for_publish
_info_is_published = _Info.is_published
_info_lock = threading.Lock()


def _info_init(self: Any, mid: int) -> None:
    self.mid = mid
    self._published = False
    self._condition = None  # made by the first waiter (_with_condition)
    self.rc = MQTTErrorCode.MQTT_ERR_SUCCESS
    self._iterpos = 0


def _with_condition(self: Any) -> None:
    if self._condition is None:
        with _info_lock:
            if self._condition is None:
                self._condition = threading.Condition()


def _info_set_as_published(self: Any) -> None:
    # Set first, then look for a waiter: one that made its condition after this
    # read sees _published already True and does not wait.
    self._published = True
    cond = self._condition
    if cond is not None:
        with cond:
            cond.notify_all()


def _info_wait_for_publish(self: Any, timeout: float | None = None) -> None:
    _with_condition(self)
    _info_wait(self, timeout)


def _info_is_published_(self: Any) -> bool:
    _with_condition(self)
    return bool(_info_is_published(self))


def apply() -> None:
    """Install the replacements (idempotent)."""
    if getattr(_Original, "_fnmesh_fast", False):
        return
    _Original.__init__ = _init  # type: ignore[method-assign]
    _Original.getIdentFromName = _get_ident  # type: ignore[method-assign]
    _Original.getNameFromIdent = _get_name  # type: ignore[method-assign]
    _Original.allowsMultiple = _allows_multiple  # type: ignore[method-assign]
    _Original.__setattr__ = _setattr  # type: ignore[method-assign]
    _Original.pack = _pack  # type: ignore[method-assign]
    _Original.clear = _clear  # type: ignore[method-assign]
    _Original.isEmpty = _is_empty  # type: ignore[method-assign]
    _Info.__init__ = _info_init  # type: ignore[method-assign]
    _Info._set_as_published = _info_set_as_published  # type: ignore[method-assign]
    _Info.wait_for_publish = _info_wait_for_publish  # type: ignore[method-assign]
    _Info.is_published = _info_is_published_  # type: ignore[method-assign]
    _Original._fnmesh_fast = True  # type: ignore[attr-defined]
