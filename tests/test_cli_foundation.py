"""The `fnmesh certs`, `fnmesh bundle` and `fnmesh bench bundle` verbs, end to end."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result
from onnx import TensorProto, helper, numpy_helper

from fnmesh.certs.home import Config, Home
from fnmesh.certs.lookup import identity_by_cn
from fnmesh.certs.trust import TrustStore
from fnmesh.coordinator.cli.main import cli
from fnmesh.functions.bundle import Bundle

FNMESH = Path(sys.executable).with_name("fnmesh")


def tiny_model() -> bytes:
    rng = np.random.default_rng(1)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["xw"]),
            helper.make_node("Add", ["xw", "B"], ["y"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [
            numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "W"),
            numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "B"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


class Fnmesh:
    """Runs `fnmesh ...` in-process against one home folder."""

    def __init__(self, home: Path):
        self.home = home
        self.runner = CliRunner()

    def __call__(self, *args: str | Path, ok: bool = True, home: bool = True) -> Result:
        argv = [str(a) for a in args]
        if home:
            argv += ["--home", str(self.home)]
        r = self.runner.invoke(cli, argv, catch_exceptions=True)
        if ok:
            assert r.exit_code == 0, f"fnmesh {' '.join(argv)}: {r.output}{r.stderr}{r.exception!r}"
        return r

    def json(self, *args: str | Path) -> object:
        return json.loads(self(*args, "--json").stdout)


def assert_refused(r: Result, *words: str) -> str:
    """Exit 1 with one line on stderr naming the reason, and no traceback."""
    assert r.exit_code == 1, (r.exit_code, r.output, r.exception)
    assert isinstance(r.exception, SystemExit), repr(r.exception)
    err = r.stderr.strip()
    assert err.startswith("error:"), err
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in r.output + r.stderr
    for w in words:
        assert w in err, err
    return err


@pytest.fixture
def mesh(tmp_path: Path) -> Fnmesh:
    return Fnmesh(tmp_path / "home")


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    p = tmp_path / "tiny.onnx"
    p.write_bytes(tiny_model())
    return p


def test_certs_bundle_workflow(mesh: Fnmesh, model_file: Path, tmp_path: Path) -> None:
    made = mesh.json("certs", "init")
    assert made == {
        "home": str(mesh.home.resolve()),
        "coordinator": "coordinator.main",
        "broker": "broker.main",
        "operator": "operator.admin",
    }
    assert Home(mesh.home).load_config() == Config()
    alice = mesh.json("certs", "issue", "publisher", "alice", "--namespace", "examples")
    assert isinstance(alice, dict) and alice["cn"] == "publisher.alice"
    assert Path(alice["key"]).stat().st_mode & 0o777 == 0o600
    mesh("certs", "issue", "node", "lyon-1")
    listed = mesh.json("certs", "list")
    assert isinstance(listed, list)
    assert {r["cn"] for r in listed} >= {"publisher.alice", "node.lyon-1", "coordinator.main"}

    fnb = tmp_path / "tiny.fnb"
    built = mesh.json(
        "bundle", "build", model_file, "--name", "examples/tiny", "--version", "1.2.3",
        "--publisher", "alice", "--recipient", "lyon-1", "--max-batch", "16", "-o", fnb,
    )  # fmt: skip
    assert isinstance(built, dict)
    assert built["recipients"] == ["coordinator.main", "node.lyon-1"]
    assert fnb.exists() and built["size"] == fnb.stat().st_size

    info = json.loads(mesh("bundle", "inspect", fnb, "--json", home=False).stdout)
    assert info["name"] == "examples/tiny" and info["version"] == "1.2.3"
    assert info["inputs"] == [{"name": "x", "dtype": "float32", "shape": ["N", 4]}]
    assert info["outputs"] == [{"name": "y", "dtype": "float32", "shape": ["N", 3]}]
    assert info["recipients"] == ["coordinator.main", "node.lyon-1"]
    assert info["publisher"] == "publisher.alice" and info["limits"]["max_batch"] == 16

    ok = mesh.json("bundle", "verify", fnb)
    assert ok == {
        "ok": True,
        "name": "examples/tiny",
        "version": "1.2.3",
        "publisher": "publisher.alice",
        "decrypted": False,
    }
    as_node = mesh.json("bundle", "verify", fnb, "--as", "node.lyon-1")
    assert isinstance(as_node, dict) and as_node["decrypted"] is True
    text = mesh("bundle", "verify", fnb, "--as", "node.lyon-1").stdout
    assert "ok: examples/tiny@1.2.3 signed by publisher.alice and decrypts" in text

    # A tampered copy: one byte of the ciphertext.
    data = bytearray(fnb.read_bytes())
    data[-5] ^= 0x01
    bad = tmp_path / "tampered.fnb"
    bad.write_bytes(bytes(data))
    assert_refused(mesh("bundle", "verify", bad, ok=False), "digest")
    # Not a bundle at all.
    junk = tmp_path / "junk.fnb"
    junk.write_bytes(b"hello")
    assert_refused(mesh("bundle", "verify", junk, ok=False), "not an fnmesh bundle")

    # Re-wrap for a node that was not a recipient.
    mesh("certs", "issue", "node", "paris-1")
    assert_refused(mesh("bundle", "verify", fnb, "--as", "node.paris-1", ok=False), "node.paris-1")
    rewrapped = tmp_path / "paris.fnb"
    mesh("bundle", "rewrap", fnb, "--for", "paris-1", "-o", rewrapped)
    again = mesh.json("bundle", "verify", rewrapped, "--as", "node.paris-1")
    assert isinstance(again, dict) and again["decrypted"] is True
    paris = identity_by_cn(Home(mesh.home), "node.paris-1")
    assert paris.enc_key is not None
    trust = TrustStore.from_home(Home(mesh.home))
    assert Bundle.read(rewrapped).open(trust, paris.cn, paris.enc_key) == tiny_model()
    assert sorted(Bundle.read(rewrapped).wrapped) == [
        "coordinator.main",
        "node.lyon-1",
        "node.paris-1",
    ]

    # Revoking the publisher: every bundle it signed is refused, re-wrapping too.
    revoked = mesh.json("certs", "revoke", "publisher.alice")
    assert isinstance(revoked, list) and [r["cn"] for r in revoked] == ["publisher.alice"]
    assert_refused(mesh("bundle", "verify", fnb, ok=False), "revoked", "publisher.alice")
    assert_refused(mesh("bundle", "verify", rewrapped, ok=False), "revoked")
    assert_refused(
        mesh("bundle", "rewrap", fnb, "--for", "lyon-1", "-o", tmp_path / "x.fnb", ok=False),
        "revoked",
    )
    assert not (tmp_path / "x.fnb").exists()


def test_inspect_table(mesh: Fnmesh, model_file: Path, tmp_path: Path) -> None:
    mesh("certs", "init")
    mesh("certs", "issue", "publisher", "alice", "--namespace", "examples")
    fnb = tmp_path / "t.fnb"
    mesh(
        "bundle", "build", model_file, "--name", "examples/tiny", "--version", "1.0.0",
        "--publisher", "alice", "-o", fnb,
    )  # fmt: skip
    r = mesh("bundle", "inspect", fnb, home=False, ok=False)
    assert r.exit_code == 0, repr(r.exception)
    assert "examples/tiny@1.0.0" in r.stdout and "coordinator.main" in r.stdout


def test_build_outside_namespace_refused(mesh: Fnmesh, model_file: Path, tmp_path: Path) -> None:
    mesh("certs", "init")
    mesh("certs", "issue", "publisher", "alice", "--namespace", "examples")
    out = tmp_path / "x.fnb"
    r = mesh(
        "bundle", "build", model_file, "--name", "other/tiny", "--version", "1.0.0",
        "--publisher", "alice", "-o", out, ok=False,
    )  # fmt: skip
    assert_refused(r, "namespace")
    assert not out.exists()


def test_build_for_unknown_or_revoked_recipient_refused(
    mesh: Fnmesh, model_file: Path, tmp_path: Path
) -> None:
    mesh("certs", "init")
    mesh("certs", "issue", "publisher", "alice", "--namespace", "examples")
    mesh("certs", "issue", "node", "lyon-1")
    args = (
        "bundle", "build", model_file, "--name", "examples/tiny", "--version", "1.0.0",
        "--publisher", "alice", "-o", tmp_path / "x.fnb",
    )  # fmt: skip
    assert_refused(mesh(*args, "--recipient", "nowhere", ok=False), "node.nowhere")
    mesh("certs", "revoke", "node.lyon-1")
    assert_refused(mesh(*args, "--recipient", "lyon-1", ok=False), "revoked")
    assert not (tmp_path / "x.fnb").exists()


def test_issue_twice_and_bad_input_refused(mesh: Fnmesh) -> None:
    mesh("certs", "init")
    mesh("certs", "issue", "device", "meter-1")
    assert_refused(mesh("certs", "issue", "device", "meter-1", ok=False), "already has a live")
    assert_refused(mesh("certs", "issue", "publisher", "bob", ok=False), "namespace")
    assert_refused(mesh("certs", "issue", "device", "Bad Name", ok=False), "name")
    assert_refused(mesh("certs", "revoke", "nobody", ok=False), "no live certificate")
    assert_refused(mesh("certs", "init", ok=False), "already has a fleet CA")
    # The coordinator identity is made by init only.
    r = mesh("certs", "issue", "coordinator", "two", ok=False)
    assert r.exit_code == 2


def test_home_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FNMESH_HOME", str(tmp_path / "env-home"))
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    mesh = Fnmesh(tmp_path / "unused")
    r = mesh("certs", "init", "--json", home=False)
    assert json.loads(r.stdout)["home"] == str((tmp_path / "env-home").resolve())
    assert (tmp_path / "env-home" / "ca" / "ca.pem").exists()
    monkeypatch.delenv("FNMESH_HOME")
    r = mesh("certs", "init", "--json", home=False)
    assert json.loads(r.stdout)["home"] == str((tmp_path / "user" / ".fnmesh").resolve())
    assert (tmp_path / "user" / ".fnmesh" / "fnmesh.toml").exists()


def test_verify_tampered_bundle_as_a_process(
    mesh: Fnmesh, model_file: Path, tmp_path: Path
) -> None:
    """The real console script: exit status 1 and one line on stderr, no traceback."""
    mesh("certs", "init")
    mesh("certs", "issue", "publisher", "alice", "--namespace", "examples")
    fnb = tmp_path / "t.fnb"
    mesh(
        "bundle", "build", model_file, "--name", "examples/tiny", "--version", "1.0.0",
        "--publisher", "alice", "-o", fnb,
    )  # fmt: skip
    data = bytearray(fnb.read_bytes())
    data[20] ^= 0x01  # inside the signed manifest
    fnb.write_bytes(bytes(data))
    env = {**os.environ, "COLUMNS": "80", "NO_COLOR": "1"}
    r = subprocess.run(
        [str(FNMESH), "bundle", "verify", str(fnb), "--home", str(mesh.home)],
        capture_output=True, text=True, timeout=60, env=env, check=False,
    )  # fmt: skip
    assert r.returncode == 1, r.stdout + r.stderr
    err = r.stderr.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1, err
    assert "Traceback" not in r.stderr


def test_bench_bundle_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The benchmark makes a throw-away fleet in a temporary folder: keep it in tmp_path.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    r = CliRunner().invoke(cli, ["bench", "bundle", "--size-mb", "0.2", "--repeat", "1", "--json"])
    assert r.exit_code == 0, (r.output, r.exception)
    rows = json.loads(r.stdout)
    assert len(rows) == 1
    row = rows[0]
    assert 150_000 < row["size"] < 250_000
    for k in ("build_MBps", "verify_MBps", "decrypt_MBps", "verify_decrypt_MBps", "baseline_MBps"):
        assert row[k] > 0
    assert row["ratio"] > 0


def test_bench_stopped_with_sigterm_stops_what_it_started() -> None:
    """A benchmark's broker, agent and echo responder do not outlive it."""
    import psutil

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fnmesh.coordinator.cli.main", "bench", "invoke", "-n", "200"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
    children: list[psutil.Process] = []
    try:
        me = psutil.Process(proc.pid)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            children = me.children(recursive=True)
            names = " ".join(" ".join(c.cmdline()) for c in children)
            if "mosquitto" in names and " agent " in names and "bench.echo" in names:
                break
            time.sleep(0.05)  # polling for processes to appear, not papering over a race
        else:
            pytest.fail(f"the benchmark never started its processes: {children}")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) != 0
        _, alive = psutil.wait_procs(children, timeout=15)
        assert not alive, f"left running: {[' '.join(c.cmdline()) for c in alive]}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for c in children:  # what a failed run left behind
            with contextlib.suppress(psutil.NoSuchProcess):
                c.kill()
