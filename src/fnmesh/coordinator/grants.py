"""Who may invoke what: grants to devices and to groups of devices, kept in the store.

``fnmesh grant DEVICE NS/NAME`` lets one device invoke a function;
``fnmesh grant group:NAME NS/NAME`` lets every member of a group invoke it;
``fnmesh grant --member DEVICE group:NAME`` puts a device in a group. The
broker knows nothing of groups: :meth:`Grants.acl_subjects` expands them into
one set of functions per device, and the generated ACL lists each device.

Subjects are stored as a device's CN (``device.meter-17``; the bare name
``meter-17`` is accepted too) or as ``group:NAME``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from fnmesh.certs.identity import Role
from fnmesh.coordinator.errors import InvalidRequestError
from fnmesh.coordinator.store import Store

GROUP_PREFIX = "group:"
_DEVICE_PREFIX = f"{Role.DEVICE.value}."
# fullmatch, not ``$``: ``$`` lets a trailing newline through, and these names end up
# as lines of the broker's ACL file.
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
_FUNCTION = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}/[a-z0-9][a-z0-9_.-]{0,62}")


def device_cn(text: str) -> str:
    """``meter-17`` or ``device.meter-17`` -> ``device.meter-17``; anything else is refused."""
    name = text.removeprefix(_DEVICE_PREFIX)
    if not _NAME.fullmatch(name):
        raise InvalidRequestError(
            f"device {text!r} must be NAME or device.NAME "
            "(1-63 lowercase letters, digits, '-' or '_')"
        )
    return _DEVICE_PREFIX + name


def group_subject(text: str) -> str:
    """``group:NAME`` (or a bare ``NAME``) -> ``group:NAME``."""
    name = text.removeprefix(GROUP_PREFIX)
    if not _NAME.fullmatch(name):
        raise InvalidRequestError(
            f"group {text!r} must be group:NAME (1-63 lowercase letters, digits, '-' or '_')"
        )
    return GROUP_PREFIX + name


def parse_subject(text: str) -> str:
    """A grant's subject as stored: ``group:NAME`` stays a group, anything else is a device."""
    return group_subject(text) if text.startswith(GROUP_PREFIX) else device_cn(text)


def check_function(text: str) -> str:
    """A function id ``ns/name`` exactly (no wildcards, no whitespace)."""
    if not _FUNCTION.fullmatch(text):
        raise InvalidRequestError(
            f"function {text!r} must be 'ns/name' (lowercase letters, digits, '-', '_')"
        )
    return text


class Grants:
    """Grants and group memberships over a :class:`Store`; every change is one transaction."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def grant(self, subject: str, function: str) -> bool:
        """Let a device or ``group:NAME`` invoke ``function``; False if it already could."""
        return await self.store.add_grant(parse_subject(subject), check_function(function))

    async def revoke_grant(self, subject: str, function: str) -> bool:
        """Withdraw one grant; False if there was none."""
        return await self.store.remove_grant(parse_subject(subject), check_function(function))

    async def add_member(self, group: str, device: str) -> bool:
        """Put ``device`` in ``group``; False if it already was."""
        return await self.store.add_member(
            group_subject(group).removeprefix(GROUP_PREFIX), device_cn(device)
        )

    async def add_members(self, group: str, devices: Iterable[str]) -> int:
        """Put many devices in ``group`` in one transaction; returns how many were new."""
        cns = [device_cn(d) for d in devices]
        return await self.store.add_members(group_subject(group).removeprefix(GROUP_PREFIX), cns)

    async def remove_member(self, group: str, device: str) -> bool:
        """Take ``device`` out of ``group``; False if it was not in it."""
        return await self.store.remove_member(
            group_subject(group).removeprefix(GROUP_PREFIX), device_cn(device)
        )

    async def list_grants(self) -> list[tuple[str, str]]:
        """Every (subject, function), sorted."""
        return await self.store.list_grants()

    async def members(self, group: str | None = None) -> list[tuple[str, str]]:
        """Every (group, device CN), or one group's."""
        name = None if group is None else group_subject(group).removeprefix(GROUP_PREFIX)
        return await self.store.list_members(name)

    async def may_invoke(self, device: str, function: str) -> bool:
        """Whether the device (CN) may invoke ``function``, directly or through a group."""
        return await self.store.may_invoke(device_cn(device), function, GROUP_PREFIX)

    async def acl_subjects(self) -> dict[str, set[str]]:
        """Device CN -> every function it may invoke, directly or through a group."""
        return await self.store.grant_map(GROUP_PREFIX)
