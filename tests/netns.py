"""Test LANs made of Linux network namespaces: one bridge, N hosts, nothing on the host's own links.

A :class:`Lan` builds, inside namespaces that only it creates and names with a random
suffix::

    fnm-br-SFX   a bridge (multicast snooping off, so mDNS floods like on a dumb switch)
    fnm-a-SFX    host "a": lo up, one veth "a-SFX" whose peer is a port of the bridge
    fnm-b-SFX    ...

Every link is created directly inside its namespace (``ip link add ... netns``), so no
interface ever appears in the host's namespace, and the interface names are unique: a
command that ran outside its namespace by mistake would fail instead of touching, say,
the host's ``eth0``. Addresses are assigned inside the namespaces only:

- ``ipv4``: 10.241.X.(i+1)/24, X random per LAN, plus a 224.0.0.0/4 route on the veth
  so multicast senders that do not pick an interface (mdns-scan) reach the bridge;
- ``ipv4ll``: 169.254.X.(i+1)/16 (what an IPv4 link-local autoconfigurator would pick),
  the same multicast route, no other IPv4 address: a host with "no address configured";
- ``ipv6ll``: no IPv4 address at all, only the fe80:: address the kernel derives for the
  veth (duplicate address detection is turned off so it is usable at once).

Leaving the ``with`` block, even through an exception, kills whatever still runs in the
namespaces (they are ours, created here) and deletes them, which removes the veths and
the bridge with them.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import os
import random
import secrets
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from typing import Any, Literal, TypeVar

T = TypeVar("T")

Addressing = Literal["ipv4", "ipv4ll", "ipv6ll"]

#: Namespace names start with this, so a leftover is easy to recognise (``ip netns list``).
PREFIX = "fnm"


class NetnsError(RuntimeError):
    """A namespace, link or address could not be set up (the command and its stderr say why)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Host:
    """One test host: its namespace, its veth, its bridge port and its address."""

    name: str
    netns: str
    dev: str
    port: str
    ipv4: str | None
    #: Set once the link is up for ``ipv6ll`` (the kernel picks it).
    ipv6_link_local: str | None = None

    @property
    def address(self) -> str:
        """The address other hosts reach this one at (IPv4, else IPv6 link-local with scope)."""
        if self.ipv4 is not None:
            return self.ipv4
        assert self.ipv6_link_local is not None
        return f"{self.ipv6_link_local}%{self.dev}"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = ["ip", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=False)
    if check and proc.returncode != 0:
        raise NetnsError(f"{' '.join(cmd)}: {proc.stderr.strip() or proc.returncode}")
    return proc


_AVAILABLE: tuple[bool, str] | None = None


def available() -> tuple[bool, str]:
    """Whether namespaces, veths and bridges can be built here, and why not when they cannot.

    Tries once per process with a throwaway namespace holding a bridge and a veth pair.
    """
    global _AVAILABLE
    if _AVAILABLE is not None:
        return _AVAILABLE
    if os.geteuid() != 0:
        _AVAILABLE = (False, "network namespaces need root (run the suite as root)")
        return _AVAILABLE
    if shutil.which("ip") is None:
        _AVAILABLE = (False, "iproute2 ('ip') is not installed")
        return _AVAILABLE
    ns = f"{PREFIX}-probe-{secrets.token_hex(3)}"
    try:
        _ip("netns", "add", ns)
        try:
            _ip("-n", ns, "link", "add", "probe-br", "type", "bridge")
            _ip("-n", ns, "link", "add", "probe-a", "type", "veth", "peer", "name", "probe-b")
            _ip("-n", ns, "link", "set", "probe-b", "master", "probe-br")
        finally:
            _ip("netns", "del", ns, check=False)
    except (NetnsError, OSError, subprocess.SubprocessError) as e:
        _AVAILABLE = (False, f"the kernel refuses a namespace, bridge or veth: {e}")
        return _AVAILABLE
    _AVAILABLE = (True, "")
    return _AVAILABLE


class Lan:
    """A bridge in its own namespace and one namespace per host, joined by veth pairs."""

    def __init__(
        self,
        hosts: Sequence[str] = ("a", "b", "c"),
        *,
        addressing: Addressing = "ipv4",
        link_timeout_s: float = 5.0,
    ) -> None:
        if len(set(hosts)) != len(hosts) or not hosts:
            raise ValueError("host names must be distinct and there must be at least one")
        for h in hosts:
            if not h.isalnum() or len(h) > 4:
                raise ValueError(f"host name {h!r}: up to 4 letters or digits")
        self.addressing: Addressing = addressing
        self.suffix = secrets.token_hex(3)
        self.bridge_ns = f"{PREFIX}-br-{self.suffix}"
        self.bridge = f"br-{self.suffix}"
        self.subnet = random.randrange(1, 255)
        self._names = list(hosts)
        self._link_timeout_s = link_timeout_s
        self.hosts: dict[str, Host] = {}
        self._created: list[str] = []
        self._procs: list[subprocess.Popen[Any]] = []

    # -- building and tearing down ------------------------------------------------------

    def __enter__(self) -> Lan:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _netns_add(self, ns: str) -> None:
        _ip("netns", "add", ns)
        self._created.append(ns)
        _ip("-n", ns, "link", "set", "lo", "up")

    def _sysctl(self, ns: str, *settings: str) -> None:
        for s in settings:
            key, value = s.split("=", 1)
            path = "/proc/sys/" + key.replace(".", "/")
            self._exec_checked(ns, ["sh", "-c", f"echo {value} > {path}"])

    def _exec_checked(self, ns: str, argv: list[str]) -> None:
        proc = subprocess.run(
            ["ip", "netns", "exec", ns, *argv],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
        if proc.returncode != 0:
            raise NetnsError(f"in {ns}: {' '.join(argv)}: {proc.stderr.strip()}")

    def _build(self) -> None:
        br = self.bridge_ns
        self._netns_add(br)
        # The switch has no IP stack of its own to speak with: no MLD reports, no RAs.
        self._sysctl(br, "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1")
        _ip("-n", br, "link", "add", self.bridge, "type", "bridge", "mcast_snooping", "0")
        _ip("-n", br, "link", "set", self.bridge, "up")
        for i, name in enumerate(self._names):
            ns = f"{PREFIX}-{name}-{self.suffix}"
            dev, port = f"{name}-{self.suffix}", f"p{name}-{self.suffix}"
            self._netns_add(ns)
            # Without DAD the fe80:: address is usable as soon as the link is up.
            # keep_addr_on_down: a cut link keeps its fe80:: address, like an unplugged cable.
            self._sysctl(
                ns,
                "net.ipv6.conf.all.accept_dad=0",
                "net.ipv6.conf.default.accept_dad=0",
                "net.ipv6.conf.all.keep_addr_on_down=1",
                "net.ipv6.conf.default.keep_addr_on_down=1",
            )
            _ip("link", "add", dev, "netns", ns, "type", "veth", "peer", "name", port, "netns", br)
            _ip("-n", br, "link", "set", port, "master", self.bridge)
            _ip("-n", br, "link", "set", port, "multicast", "on", "up")
            ipv4: str | None = None
            if self.addressing == "ipv4":
                ipv4 = f"10.241.{self.subnet}.{i + 1}"
                _ip("-n", ns, "addr", "add", f"{ipv4}/24", "dev", dev)
            elif self.addressing == "ipv4ll":
                ipv4 = f"169.254.{self.subnet}.{i + 1}"
                _ip("-n", ns, "addr", "add", f"{ipv4}/16", "dev", dev, "scope", "link")
            _ip("-n", ns, "link", "set", dev, "multicast", "on", "up")
            if ipv4 is not None:
                _ip("-n", ns, "route", "replace", "224.0.0.0/4", "dev", dev)
            self.hosts[name] = Host(name, ns, dev, port, ipv4)
        if self.addressing == "ipv6ll":
            for name, host in self.hosts.items():
                self.hosts[name] = dataclasses.replace(
                    host, ipv6_link_local=self._wait_link_local(host)
                )

    def _wait_link_local(self, host: Host) -> str:
        """The veth's fe80:: address once the kernel has made it usable (polled: external state)."""
        deadline = time.monotonic() + self._link_timeout_s
        while True:
            out = _ip(
                "-n", host.netns, "-o", "-6", "addr", "show", "dev", host.dev, "scope", "link"
            )
            for line in out.stdout.splitlines():
                fields = line.split()
                if "inet6" in fields and "tentative" not in fields:
                    return fields[fields.index("inet6") + 1].split("/")[0]
            if time.monotonic() > deadline:
                raise NetnsError(f"{host.dev} in {host.netns} got no usable fe80:: address")
            time.sleep(0.02)

    def close(self) -> None:
        """Kill what still runs in our namespaces and delete them (idempotent)."""
        for p in self._procs:
            if p.poll() is None:
                p.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=5)
        self._procs.clear()
        for ns in reversed(self._created):
            self._kill_inside(ns)
            _ip("netns", "del", ns, check=False)
        self._created.clear()

    def _kill_inside(self, ns: str) -> None:
        out = _ip("netns", "pids", ns, check=False)
        for pid in out.stdout.split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)

    # -- using it -----------------------------------------------------------------------

    def __getitem__(self, host: str) -> Host:
        return self.hosts[host]

    def argv(self, host: str, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside ``host``'s namespace (for asyncio.create_subprocess_exec)."""
        return ["ip", "netns", "exec", self.hosts[host].netns, *argv]

    def run(
        self, host: str, argv: Sequence[str], *, timeout: float = 30, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside ``host`` and wait for it; output captured as text."""
        return subprocess.run(
            self.argv(host, argv), capture_output=True, text=True, timeout=timeout, check=check
        )

    def popen(self, host: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside ``host``; it is killed when the LAN closes if still running."""
        p = subprocess.Popen(self.argv(host, argv), **kwargs)
        self._procs.append(p)
        return p

    def cut(self, host: str) -> None:
        """Unplug ``host``'s cable: its veth goes down (addresses stay, carrier drops)."""
        h = self.hosts[host]
        _ip("-n", h.netns, "link", "set", "dev", h.dev, "down")

    def restore(self, host: str) -> None:
        """Plug ``host`` back in."""
        h = self.hosts[host]
        _ip("-n", h.netns, "link", "set", "dev", h.dev, "up")
        if h.ipv4 is not None:
            # Taking the link down flushed the routes through it; the kernel re-adds only
            # the connected one.
            _ip("-n", h.netns, "route", "replace", "224.0.0.0/4", "dev", h.dev)

    def leftovers(self) -> list[str]:
        """Namespaces of this LAN that still exist (empty after ``close``)."""
        out = _ip("netns", "list", check=False).stdout
        present = {line.split()[0] for line in out.splitlines() if line.strip()}
        return sorted(n for n in present if n.endswith(self.suffix))


#: clone(2) flag for setns(2): join a network namespace (allowed per thread).
_CLONE_NEWNET = 0x40000000


class NetnsLoop:
    """An asyncio loop on a thread of its own that joined one of our namespaces' network.

    Sockets this loop (and any thread it starts) opens live in that namespace, so the test
    process can call a coordinator or run a delay proxy inside the LAN without a child
    process. Only the thread's network namespace changes: files, PIDs and the rest of the
    process stay on the host.
    """

    def __init__(self, netns: str) -> None:
        self.netns = netns
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def __enter__(self) -> NetnsLoop:
        self._thread = threading.Thread(target=self._run, name=f"netns-{self.netns}", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise NetnsError(f"cannot enter {self.netns}: {self._error}") from self._error
        return self

    def _run(self) -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            with open(f"/run/netns/{self.netns}", "rb") as f:
                if libc.setns(f.fileno(), _CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
            self.loop = asyncio.new_event_loop()
        except BaseException as e:
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        try:
            self.loop.run_forever()
        finally:
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.run_until_complete(self.loop.shutdown_default_executor())
            self.loop.close()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        """Run ``coro`` on the namespace's loop and wait for its result (from any other thread)."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], T], timeout: float = 60) -> T:
        """Call ``fn`` on the namespace's thread (e.g. to start something that opens sockets)."""

        async def wrapped() -> T:
            return fn()

        return self.run(wrapped(), timeout)

    def __exit__(self, *exc: object) -> None:
        if self.loop is not None and self._thread is not None:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)


@contextlib.contextmanager
def lan(hosts: Sequence[str] = ("a", "b", "c"), **kwargs: Any) -> Iterator[Lan]:
    """``with lan(...) as net:`` for readers who prefer a function."""
    with Lan(hosts, **kwargs) as net:
        yield net
