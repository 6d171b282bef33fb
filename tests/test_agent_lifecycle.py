"""The agent's life: presence (retained status, Last Will, heartbeats), clean and violent ends,
the warm pool's cold starts, and the bundle cache (encrypted at rest, verified on every load,
rollback memory, disk budget)."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from agent_support import (
    NODE,
    WAIT,
    Device,
    Watcher,
    agent_process,
    assert_same_outputs,
    build_bundle,
    metric,
    new_root,
    ort_run,
    poll,
    running_agent,
)
from conftest import SCALE, Broker, Fleet
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from onnx import TensorProto, helper, numpy_helper

from fnmesh.agent.cache import BundleCache, PlainLoader, RollbackError
from fnmesh.agent.errors import AgentError
from fnmesh.agent.executors import NodeLoader, OnnxExecutor
from fnmesh.agent.probe import probe
from fnmesh.certs import keywrap
from fnmesh.certs.errors import KeyWrapError
from fnmesh.certs.identity import Identity
from fnmesh.functions import bundle as fnb
from fnmesh.functions.bundle import Bundle
from fnmesh.functions.errors import BundleError, SignatureError
from fnmesh.functions.examples.models import build_example
from fnmesh.functions.messages import ErrorCode
from fnmesh.functions.seal import aad_for

DIGITS = build_example("digits")


def image(n: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    return DIGITS.sample_inputs(n, seed)


# -- presence -------------------------------------------------------------------------------


async def test_status_is_retained_ready_with_functions_and_versions(
    fleet: Fleet, broker: Broker
) -> None:
    root = new_root()
    served = [build_bundle(fleet, "digits"), build_bundle(fleet, "cancer", version="1.2.0")]
    async with running_agent(fleet, broker, root, served, labels={"region": "eu-west"}) as agent:
        # Joining after the agent said ready: only a retained status can reach us.
        async with Watcher(fleet, broker, root) as w:
            s = await w.wait_for(lambda s: s.get("state") == "ready")
        assert s["functions"] == {"examples/digits": "1.0.0", "examples/cancer": "1.2.0"}
        assert (s["node"], s["cn"]) == (NODE, f"node.{NODE}")
        assert s["labels"] == {"region": "eu-west"}
        assert s["http"] == f"https://127.0.0.1:{agent.http_port}"
        assert s["hardware"]["cores"] >= 1
    # A clean stop leaves "offline" retained.
    async with Watcher(fleet, broker, root) as w:
        s = await w.wait_for(lambda s: True)
    assert s["state"] == "offline"
    assert s["functions"] == {"examples/digits": "1.0.0", "examples/cancer": "1.2.0"}


async def test_heartbeats_carry_load_per_function(fleet: Fleet, broker: Broker) -> None:
    root = new_root()
    served = [build_bundle(fleet, "digits"), build_bundle(fleet, "cancer")]
    async with (
        Watcher(fleet, broker, root) as w,
        running_agent(fleet, broker, root, served, heartbeat_s=0.1),
        Device(fleet, broker, root) as dev,
    ):
        first = await w.wait_for(lambda h: True, heartbeat=True)
        for f in ("examples/digits", "examples/cancer"):
            load = first["functions"][f]
            assert set(load) >= {"in_flight", "queued", "batch_ms", "row_ms"}, load
            assert (load["in_flight"], load["queued"]) == (0, 0)
        assert first["node"] == NODE
        assert sorted(first["loaded"]) == ["examples/cancer@1.0.0", "examples/digits@1.0.0"]
        # After a run the per-function cost estimate is in the heartbeat.
        (await dev.call("digits", image(4))).ok()
        hb = await w.wait_for(
            lambda h: h["functions"]["examples/digits"]["batch_ms"] > 0,
            heartbeat=True,
            since=w.heartbeats.index(first) + 1,
        )
        assert hb["seq"] > first["seq"]
        assert hb["functions"]["examples/cancer"]["batch_ms"] == 0


async def test_sigterm_exits_zero_within_10s_and_says_offline(
    fleet: Fleet, broker: Broker, tmp_path: Path
) -> None:
    root = new_root()
    path = tmp_path / "digits.fnb"
    path.write_bytes(build_bundle(fleet, "digits"))
    async with agent_process(fleet, broker, root, [path]) as ap, Device(fleet, broker, root) as dev:
        ready = ap.watcher.status[-1]
        assert ready["functions"] == {"examples/digits": "1.0.0"}
        x = image(3, seed=8)
        r = await dev.call("digits", x)
        assert_same_outputs(r.ok().outputs, ort_run("digits", x), "subprocess agent")
        mark = len(ap.watcher.status)
        ap.proc.send_signal(signal.SIGTERM)
        assert await ap.wait_exit(10.0) == 0, ap.output()
        s = await ap.watcher.wait_for(lambda s: s.get("state") == "offline", since=mark)
        assert "ts" in s, "a clean stop says offline itself (the Last Will has no ts)"
    # What stays retained is that clean word, not a Last Will fired by a dropped link.
    async with Watcher(fleet, broker, root) as w:
        retained = await w.wait_for(lambda s: True)
    assert retained["state"] == "offline"
    assert retained["functions"] == {"examples/digits": "1.0.0"}, retained


async def test_kill_9_last_will_says_offline(fleet: Fleet, broker: Broker, tmp_path: Path) -> None:
    root = new_root()
    path = tmp_path / "digits.fnb"
    path.write_bytes(build_bundle(fleet, "digits"))
    async with agent_process(fleet, broker, root, [path]) as ap:
        mark = len(ap.watcher.status)
        ap.proc.send_signal(signal.SIGKILL)
        assert await ap.wait_exit(WAIT) == -signal.SIGKILL
        s = await ap.watcher.wait_for(lambda s: s.get("state") == "offline", since=mark, timeout=20)
        assert s == {"node": NODE, "cn": f"node.{NODE}", "state": "offline"}
    async with Watcher(fleet, broker, root) as w:
        retained = await w.wait_for(lambda s: True)
    assert retained["state"] == "offline"


async def test_agent_comes_back_after_broker_restart(fleet: Fleet, broker: Broker) -> None:
    """The agent reconnects by itself, subscribes again and says ready again."""
    root = new_root()
    x = image(2, seed=6)
    async with running_agent(fleet, broker, root, [build_bundle(fleet, "digits")]) as agent:
        before = time.time()
        await asyncio.to_thread(broker.restart)
        async with Watcher(fleet, broker, root) as w:
            await w.wait_for(lambda s: s.get("state") == "ready" and s["ts"] > before)
        assert agent.mqtt.reconnects >= 1
        async with Device(fleet, broker, root) as dev:
            r = await dev.call("digits", x)
        assert_same_outputs(r.ok().outputs, ort_run("digits", x), "after the restart")


# -- no plaintext model on disk, whenever the agent dies ------------------------------------------


def big_model(megabytes: float) -> bytes:
    """y = x @ W with a random float32 W of about ``megabytes``: slow enough to load to be
    caught in the middle, and fresh random bytes each run, so 64 of them identify it."""
    rows = 2048
    cols = max(16, int(megabytes * (1 << 20) / 4 / rows))
    w = np.random.default_rng().standard_normal((rows, cols)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", rows])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", cols])],
        [numpy_helper.from_array(w, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def files_holding(needles: list[bytes], roots: list[Path], limit: int = 256 << 20) -> list[str]:
    """Regular files under ``roots`` whose first ``limit`` bytes hold any of ``needles``."""
    seen: set[tuple[int, int]] = set()
    hits: list[str] = []
    for root in roots:
        for dirpath, _dirs, names in os.walk(root):
            for name in names:
                p = os.path.join(dirpath, name)
                try:
                    st = os.lstat(p)
                    if not stat.S_ISREG(st.st_mode) or st.st_size < 64:
                        continue
                    if (st.st_dev, st.st_ino) in seen:
                        continue
                    seen.add((st.st_dev, st.st_ino))
                    with open(p, "rb") as f:
                        data = f.read(limit)
                except OSError:
                    continue
                if any(n in data for n in needles):
                    hits.append(p)
    return hits


def rchar(pid: int) -> int:
    """Bytes the process has read so far (any file or socket)."""
    with open(f"/proc/{pid}/io") as f:
        return int(f.read().split()[1])


async def test_kill_9_while_loading_leaves_no_plaintext_model_on_disk(
    fleet: Fleet, broker: Broker, tmp_path: Path
) -> None:
    root = new_root()
    model = big_model(40 * SCALE)
    needles = [model[o : o + 64] for o in (len(model) // 7 * k for k in range(1, 7))]
    needles.append(model[-64:])
    assert len(set(needles)) == len(needles)
    nodes = ("vault-0", "vault-1", "vault-2")
    data = build_bundle(fleet, model, name="examples/big", nodes=nodes)
    digest = Bundle.parse(data).digest
    path = tmp_path / "big.fnb"
    path.write_bytes(data)
    child_tmp = tmp_path / "child-tmp"
    child_tmp.mkdir()
    roots = [fleet.home.root, Path("/tmp"), Path("/var/tmp"), Path("/dev/shm")]
    roots += [Path(tempfile.gettempdir()), child_tmp]
    roots = [r for r in dict.fromkeys(roots) if r.exists()]

    # The search finds plaintext where there is some.
    control = tmp_path / "control.bin"
    control.write_bytes(b"\0" * 1000 + needles[3] + b"\0" * 1000)
    assert str(control) in files_holding(needles, roots)
    control.unlink()

    async def kill_when(node: str, moment: str) -> None:
        async with agent_process(
            fleet,
            broker,
            root,
            [path],
            node=node,
            wait_ready=False,
            env={"TMPDIR": str(child_tmp)},
        ) as ap:
            stored = ap.state / "cache" / "bundles"
            final = stored / f"{digest}.fnb"
            if moment == "storing":  # the first byte of the cache appears (usually mid-write)
                await poll(lambda: stored.exists() and any(stored.iterdir()), moment, 30)
            elif moment == "stored":
                await poll(final.exists, moment, 30)
            elif moment == "decrypting":
                # It has read the bundle twice: once from --serve, once back from the cache.
                await poll(lambda: rchar(ap.proc.pid) >= 2 * len(data), moment, 30)
            else:  # fully loaded and serving
                ready = await ap.wait_ready()
                assert ready["functions"] == {"examples/big": "1.0.0"}
            ap.proc.send_signal(signal.SIGKILL)
            assert await ap.wait_exit(WAIT) == -signal.SIGKILL, ap.output()

    moments = [("vault-0", "storing"), ("vault-1", "stored"), ("vault-2", "decrypting")]
    # Last: restart the node first killed mid-store; it recovers, loads, and dies loaded.
    moments.append(("vault-0", "loaded"))
    for node, moment in moments:
        await kill_when(node, moment)
        leaked = files_holding(needles, roots)
        assert not leaked, f"plaintext model bytes on disk after kill -9 while {moment}: {leaked}"

    for node in nodes:
        cached = fleet.home.root / "agent" / node / "cache" / "bundles" / f"{digest}.fnb"
        assert cached.exists(), f"{node} has no cached bundle"
        at_rest = Bundle.parse(cached.read_bytes())
        assert at_rest.digest == digest
        assert set(at_rest.wrapped) == {f"node.{node}"}, "the cache keeps only this node's key"
        assert not any(n in cached.read_bytes() for n in needles)


# -- warm pool ---------------------------------------------------------------------------------


async def test_cold_start_then_warm_then_cold_after_idle_ttl(fleet: Fleet, broker: Broker) -> None:
    root = new_root()
    key = ("examples/digits", "1.0.0")
    x = image(2, seed=3)
    want = ort_run("digits", x)
    async with (
        running_agent(
            fleet, broker, root, [build_bundle(fleet, "digits")], prewarm=False, idle_ttl_s=0.2
        ) as agent,
        Device(fleet, broker, root) as dev,
    ):
        assert not agent.pool.is_warm(key)
        first = (await dev.call("digits", x)).ok()
        assert first.timing.cold_start is True
        assert_same_outputs(first.outputs, want, "cold")
        second = (await dev.call("digits", x)).ok()
        assert second.timing.cold_start is False
        assert_same_outputs(second.outputs, want, "warm")
        # Idle past the TTL: the agent's own sweeper unloads it.
        await poll(lambda: not agent.pool.is_warm(key), "unloaded after the idle TTL", WAIT, 0.02)
        third = (await dev.call("digits", x)).ok()
        assert third.timing.cold_start is True
        assert_same_outputs(third.outputs, want, "cold again")
        assert metric(agent, "fnmesh_agent_cold_starts_total", function="examples/digits") == 2
        assert agent.pool.stats().expirations >= 1


# -- the bundle cache ------------------------------------------------------------------------------


async def test_rollback_refused(fleet: Fleet, broker: Broker) -> None:
    root = new_root()
    v2 = build_bundle(fleet, "digits", version="2.0.0")
    v1 = build_bundle(fleet, "digits", version="1.0.0")
    x = image(2, seed=4)
    async with (
        running_agent(fleet, broker, root, [v2]) as agent,
        Device(fleet, broker, root) as dev,
    ):
        with pytest.raises(RollbackError, match=r"older than 2\.0\.0"):
            await agent.async_serve_bundle(v1)
        r = (await dev.call("digits", x)).ok()
        assert r.version == "2.0.0"
        assert {f: s.manifest.version for f, s in agent.service.slots().items()} == {
            "examples/digits": "2.0.0"
        }
    # Remembered across restarts: a new agent on the same state dir refuses it too.
    async with running_agent(fleet, broker, root) as agent:
        assert agent.cache.highest("examples/digits") == "2.0.0"
        with pytest.raises(RollbackError):
            await agent.async_serve_bundle(v1)
        assert agent.service.slots() == {}
        state = agent.cfg.state
    node = fleet.node(NODE)
    assert node.enc_key is not None
    cache = BundleCache(state / "cache", node.cn, node.enc_key, fleet.trust)
    v1_digest = Bundle.parse(v1).digest
    with pytest.raises(RollbackError):
        cache.open(v1_digest)
    assert cache.open(v1_digest, allow_rollback=True).manifest.version == "1.0.0"


async def test_bundle_without_key_for_this_node_refused(fleet: Fleet, broker: Broker) -> None:
    root = new_root()
    elsewhere = build_bundle(fleet, "digits", nodes=["paris-2"])
    async with running_agent(fleet, broker, root) as agent:
        with pytest.raises(AgentError, match=f"no key for node.{NODE}"):
            await agent.async_serve_bundle(elsewhere)
        assert agent.service.slots() == {}
        assert list((agent.cfg.state / "cache" / "bundles").iterdir()) == []


async def test_key_of_another_node_relabelled_as_ours_refused(fleet: Fleet, broker: Broker) -> None:
    root = new_root()
    b = Bundle.parse(build_bundle(fleet, "digits", nodes=["paris-2"]))
    stolen = {f"node.{NODE}": b.wrapped["node.paris-2"]}
    forged = Bundle.parse(
        fnb.Bundle(
            manifest_bytes=b.manifest_bytes,
            manifest=b.manifest,
            signatures_bytes=b.signatures_bytes,
            keys_bytes=fnb._keys_section(b.suite, stolen),
            wrapped=stolen,
            suite=b.suite,
            keys_mac=b.keys_mac,
            ciphertext=b.ciphertext,
        ).to_bytes()
    )
    assert forged.suite == keywrap.SUITE_NAME
    async with running_agent(fleet, broker, root) as agent:
        with pytest.raises((KeyWrapError, BundleError, AgentError)):
            await agent.async_serve_bundle(forged.to_bytes())
        assert agent.service.slots() == {}
        assert list((agent.cfg.state / "cache" / "bundles").iterdir()) == []


def test_disk_budget_removes_unpinned_least_recently_used(fleet: Fleet, tmp_path: Path) -> None:
    _, cache = node_cache(fleet, tmp_path)
    made = [build_bundle(fleet, "cancer", version=f"1.0.{i}") for i in range(4)]
    a, b, c, d = (Bundle.parse(m).digest for m in made)
    cache.put(made[0])
    # Room for two cached bundles (as stored: reduced to this node's key), not three.
    budget = cache.budget_bytes = int(cache.usage() * 2.5)
    cache.put(made[1])
    assert (cache.has(a), cache.has(b)) == (True, True)
    # a is older, but it is used (opened) after b was stored: b is the least recently used.
    os.utime(cache.path(a), (1000, 1000))
    os.utime(cache.path(b), (2000, 2000))
    cache.open(a)
    cache.put(made[2])
    assert (cache.has(a), cache.has(b), cache.has(c)) == (True, False, True)
    assert cache.usage() <= budget
    # Pinned (being served) survives even when it is the least recently used.
    os.utime(cache.path(a), (1000, 1000))
    os.utime(cache.path(c), (2000, 2000))
    cache.put(made[3], pinned={a})
    assert (cache.has(a), cache.has(c), cache.has(d)) == (True, False, True)
    assert cache.usage() <= budget
    # What is left still opens.
    assert cache.open(d).manifest.version == "1.0.3"


def node_cache(fleet: Fleet, tmp_path: Path) -> tuple[Identity, BundleCache]:
    """The node's identity and a bundle cache of its own under ``tmp_path``."""
    node = fleet.node(NODE)
    assert node.enc_key is not None
    return node, BundleCache(tmp_path / "cache", node.cn, node.enc_key, fleet.trust)


def wait_sealed(cache: BundleCache, digest: str) -> Path:
    """The sealed copy another thread writes after a whole load."""
    sealed = cache.sealed_path(digest)
    deadline = time.monotonic() + WAIT
    while not sealed.exists():
        assert time.monotonic() < deadline, "no sealed copy was written"
        time.sleep(0.01)  # polling for a file from another thread, with a deadline
    return sealed


def test_repeat_load_opens_the_nodes_sealed_copy(fleet: Fleet, tmp_path: Path) -> None:
    """After one whole check, a load opens the node's own sealed copy of the verified model.

    The forged ciphertext is sealed under the bundle's real data key (what another holder of
    that key could make): AES-GCM's tag passes and only the signed plaintext digest catches it.
    """
    node, cache = node_cache(fleet, tmp_path)
    stored = cache.put(build_bundle(fleet, "digits"))
    d = stored.digest
    model = stored.open(fleet.trust, node.cn, node.enc_key)
    given: list[bytes] = []

    def loader(b: bytes, m: object) -> bytes:
        given.append(b)
        return b

    assert (
        cache.load(d, PlainLoader(loader))[1] == model
    )  # checked whole; the sealed copy is written after
    sealed = wait_sealed(cache, d)
    assert model[len(model) // 2 : len(model) // 2 + 64] not in sealed.read_bytes()
    assert cache.usage() >= sealed.stat().st_size + cache.path(d).stat().st_size

    m = stored.manifest
    dk = stored.data_key(node.cn, node.enc_key)
    other = bytearray(model)
    other[len(other) // 2] ^= 1
    fields = {f: getattr(stored, f) for f in stored.__dataclass_fields__}
    nonce, aad = bytes.fromhex(m.digests.nonce), aad_for(m.name, m.version)
    fields["ciphertext"] = memoryview(AESGCM(dk).encrypt(nonce, bytes(other), aad))
    cache.path(d).write_bytes(fnb.Bundle(**fields).to_bytes())
    # The repeat load opens the sealed copy: the forged ciphertext is never decrypted.
    assert cache.load(d, PlainLoader(loader))[1] == model
    # A sealed copy that does not open is dropped, and the bundle is checked whole.
    blob = bytearray(sealed.read_bytes())
    blob[-100] ^= 1
    sealed.write_bytes(bytes(blob))
    loads = len(given)
    with pytest.raises(BundleError, match="plaintext digest"):
        cache.load(d, PlainLoader(loader))
    assert len(given) == loads, "the runtime saw bytes that had not been checked"
    assert not sealed.exists()


def sealed_form(path: Path) -> str:
    """The form a sealed copy's header names (magic, 2-byte length, form)."""
    head = path.read_bytes()[:2048]
    n = int.from_bytes(head[8:10], "big")
    return head[10 : 10 + n].decode()


def test_repeat_load_takes_the_prepared_form_the_first_load_sealed(
    fleet: Fleet, tmp_path: Path
) -> None:
    """With ONNX Runtime's own loader, the sealed copy is its optimised graph for this CPU."""
    node, cache = node_cache(fleet, tmp_path)
    stored = cache.put(build_bundle(fleet, "mlp"))
    model = stored.open(fleet.trust, node.cn, node.enc_key)
    loader = NodeLoader(probe())
    form = loader.form(stored.manifest)
    assert form, "a CPU function on this node has a prepared form"
    _, first = cache.load(stored.digest, loader)
    sealed = wait_sealed(cache, stored.digest)
    assert sealed_form(sealed) == form
    blob = sealed.read_bytes()
    assert model[len(model) // 2 : len(model) // 2 + 64] not in blob
    _, again = cache.load(stored.digest, loader)
    assert isinstance(first, OnnxExecutor) and isinstance(again, OnnxExecutor)
    assert (first.form, again.form) == ("", form)
    x = build_example("mlp").sample_inputs(8, seed=5)
    for a, b in zip(first.run(x).values(), again.run(x).values(), strict=True):
        np.testing.assert_array_equal(a, b)


class FormLoader:
    """A runtime loader whose prepared form the test changes (a runtime upgrade, a new CPU)."""

    def __init__(self, form: str) -> None:
        self.current = form
        self.given: list[str] = []

    def form(self, manifest: object) -> str:
        return self.current

    def __call__(self, model: bytes, manifest: object, form: str) -> tuple[bytes, bytes | None]:
        self.given.append(form)
        return model, None if form else self.current.encode() + model


def test_sealed_copy_of_a_form_this_node_no_longer_loads_is_replaced(
    fleet: Fleet, tmp_path: Path
) -> None:
    _, cache = node_cache(fleet, tmp_path)
    d = cache.put(build_bundle(fleet, "digits")).digest
    loader = FormLoader("runtime 1")
    cache.load(d, loader)
    sealed = wait_sealed(cache, d)
    assert sealed_form(sealed) == "runtime 1"
    assert cache.load(d, loader)[1].startswith(b"runtime 1"), "the prepared form is loaded"
    loader.current = "runtime 2"
    # The copy names another form: dropped, and the bundle checked whole (form "") again.
    assert not cache.load(d, loader)[1].startswith(b"runtime")
    assert loader.given == ["", "runtime 1", ""]
    deadline = time.monotonic() + WAIT
    while not (sealed.exists() and sealed_form(sealed) == "runtime 2"):
        assert time.monotonic() < deadline, "the new form was never sealed"
        time.sleep(0.01)  # polling for a file from another thread, with a deadline
    assert cache.load(d, loader)[1].startswith(b"runtime 2")


def test_sealed_copy_without_its_bundle_is_not_served(fleet: Fleet, tmp_path: Path) -> None:
    _, cache = node_cache(fleet, tmp_path)
    d = cache.put(build_bundle(fleet, "digits")).digest
    cache.load(d, PlainLoader(lambda b, m: b))
    sealed = wait_sealed(cache, d)
    cache.path(d).unlink()
    with pytest.raises(AgentError, match="not in the cache"):
        cache.load(d, PlainLoader(lambda b, m: b))
    cache.cleanup(frozenset())
    assert not sealed.exists()


def test_repeat_load_still_checks_revocation(fleet: Fleet, tmp_path: Path) -> None:
    """A repeat load reuses the signature's verdict only under the same trust store."""
    _, cache = node_cache(fleet, tmp_path)
    stored = cache.put(build_bundle(fleet, "digits"))
    given: list[bytes] = []

    def loader(b: bytes, m: object) -> bytes:
        given.append(b)
        return b

    for _ in range(2):
        cache.load(stored.digest, PlainLoader(loader))
    fleet.ca.revoke(fleet.publisher.cn)
    cache.trust = fleet.trust  # what the agent does when a new revocation list arrives
    with pytest.raises(SignatureError, match="revoked"):
        cache.load(stored.digest, PlainLoader(loader))
    assert len(given) == 2


TAMPERS = {
    "bit_flip_in_ciphertext": (lambda data, other: data[:-1] + bytes([data[-1] ^ 1]), "tampered"),
    # Inside the model's ciphertext, not its tag: a load checks the tag, not a second hash.
    "bit_flip_mid_ciphertext": (
        lambda data, other: data[:-4000] + bytes([data[-4000] ^ 0x40]) + data[-3999:],
        "tampered",
    ),
    "truncated": (lambda data, other: data[:-100], "truncated"),
    "swapped_for_another_bundle": (lambda data, other: other, "holds bundle"),
}


@pytest.mark.parametrize("tamper", list(TAMPERS))
async def test_tampered_cached_bundle_refused_at_load(
    fleet: Fleet, broker: Broker, tamper: str
) -> None:
    root = new_root()
    change, words = TAMPERS[tamper]
    digits, cancer = build_bundle(fleet, "digits"), build_bundle(fleet, "cancer")
    async with (
        running_agent(fleet, broker, root, [digits, cancer], prewarm=False) as agent,
        Device(fleet, broker, root) as dev,
    ):
        slots = agent.service.slots()
        path = agent.cache.path(slots["examples/digits"].digest)
        other = agent.cache.path(slots["examples/cancer"].digest)
        path.write_bytes(change(path.read_bytes(), other.read_bytes()))
        err = (await dev.call("digits", image(), id="t")).error()
        assert err.code is ErrorCode.INTERNAL
        assert "examples/digits@1.0.0" in err.message and words in err.message, err.message
        assert not agent.pool.is_warm(("examples/digits", "1.0.0"))
        # Other functions are still served.
        x = build_example("cancer").sample_inputs(3, seed=2)
        r = await dev.call("cancer", x)
        assert_same_outputs(r.ok().outputs, ort_run("cancer", x), "cancer after the tamper")


async def test_stop_that_lands_with_a_puback_still_stops_the_publisher(
    fleet: Fleet, broker: Broker
) -> None:
    """A task cancelled in the loop pass that also brings its PUBACK is cancelled.

    An agent stops its heartbeat by cancelling it, and a heartbeat spends its life waiting for
    a PUBACK: if the cancellation were swallowed (as ``asyncio.wait_for`` does on Python 3.11
    when the awaited future completes in the same pass) the heartbeat would go on beating and
    the agent's stop would wait for it forever.
    """
    root = new_root()
    async with Device(fleet, broker, root) as dev:
        client = dev.client
        publishing = asyncio.create_task(client.async_publish(f"{root}/probe", b"x", timeout=WAIT))
        await asyncio.sleep(0)  # the task has sent its PUBLISH and waits; no PUBACK can be in yet
        assert len(client._acks) == 1, "the publish is not waiting for its PUBACK"
        (ack,) = client._acks.values()
        ack.set_result(None)  # what the PUBACK does ...
        publishing.cancel()  # ... and the stop, in the same pass
        with pytest.raises(asyncio.CancelledError):
            await publishing


async def test_heartbeat_reports_rtt_and_utilisation(fleet: Fleet, broker: Broker) -> None:
    """Heartbeats carry the node's measured round trip to the broker and its utilisation."""
    root = new_root()
    async with (
        running_agent(fleet, broker, root, heartbeat_s=0.2),
        Watcher(fleet, broker, root) as w,
    ):
        beat = await w.wait_for(
            lambda b: "broker" in b.get("rtt_ms", {}), heartbeat=True, timeout=10
        )
        assert 0 < beat["rtt_ms"]["broker"] < 1000
        assert "cpu_percent" in beat["utilisation"]


async def test_restarting_node_says_saturated_until_its_assignment_is_back(
    fleet: Fleet, broker: Broker
) -> None:
    """Requests a persistent session delivers before the assignment is applied are retryable."""
    root = new_root()
    async with running_agent(fleet, broker, root) as agent, Device(fleet, broker, root) as dev:
        inputs = build_example("digits").sample_inputs(1)
        assert agent.service.starting
        err = (await dev.call("digits", inputs)).error()
        assert err.code == ErrorCode.SATURATED and "starting" in err.message
        agent.service.starting = False
        err = (await dev.call("digits", inputs)).error()
        assert err.code == ErrorCode.NOT_FOUND


async def test_requests_for_a_function_that_just_moved_are_retryable(
    fleet: Fleet, broker: Broker
) -> None:
    """Routed here just before the function moved away: saturated (retry), not not_found."""
    root = new_root()
    async with (
        running_agent(fleet, broker, root, [build_bundle(fleet, "digits")]) as agent,
        Device(fleet, broker, root) as dev,
    ):
        inputs = build_example("digits").sample_inputs(1)
        await agent.service.async_remove("examples/digits")
        err = (await dev.call("digits", inputs)).error()
        assert err.code == ErrorCode.SATURATED and "moved" in err.message
        err = (await dev.call("cancer", inputs)).error()
        assert err.code == ErrorCode.NOT_FOUND, "a function never served here stays not_found"
