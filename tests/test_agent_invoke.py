"""Invoking functions on a real agent: every example over MQTT 5 and 3.1.1, from clients that are
not ours (mosquitto_rr, mosquitto_pub/sub), and over HTTPS; each answer checked against ONNX
Runtime's own outputs for the same model."""

from __future__ import annotations

import asyncio
import json
import ssl
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import numpy as np
import pytest
from agent_support import (
    NODE,
    WAIT,
    Device,
    Device311,
    assert_same_outputs,
    build_bundle,
    fid,
    new_root,
    ort_run,
    running_agent,
)
from conftest import Broker, Fleet, make_fleet

from fnmesh.certs.identity import Role
from fnmesh.certs.tls import client_context
from fnmesh.functions.examples.models import EXAMPLE_NAMES, build_example
from fnmesh.functions.messages import (
    Encoding,
    ErrorCode,
    ErrorReply,
    Response,
    decode_reply,
    encode_request,
)

ENCODINGS = (Encoding.MSGPACK, Encoding.JSON)


def sample(name: str, n: int = 4, seed: int = 3) -> dict[str, np.ndarray]:
    return build_example(name).sample_inputs(n, seed)


def assert_encoding(payload: bytes, encoding: Encoding) -> None:
    """The payload really is in ``encoding`` (not only labelled so)."""
    if encoding is Encoding.JSON:
        assert isinstance(json.loads(payload), dict)
    else:
        assert payload[:1] != b"{"
        assert isinstance(msgpack.unpackb(payload, raw=False), dict)


def tensors_from_json(obj: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Outputs of a JSON answer, read without fnmesh's own decoder."""
    return {
        name: np.asarray(t["data"], dtype=t["dtype"]).reshape(t["shape"]) for name, t in obj.items()
    }


# -- MQTT 5 --------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ENCODINGS, ids=str)
@pytest.mark.parametrize("example", EXAMPLE_NAMES)
async def test_mqtt5_answer_equals_onnx_runtime(
    fleet: Fleet, broker: Broker, example: str, encoding: Encoding
) -> None:
    root = new_root()
    inputs = sample(example)
    want = ort_run(example, inputs)
    async with (
        running_agent(fleet, broker, root, [build_bundle(fleet, example)]),
        Device(fleet, broker, root) as dev,
    ):
        rid = f"req-{uuid.uuid4().hex[:8]}"
        topic, corr = await dev.send(example, inputs, encoding=encoding, id=rid)
        assert topic is not None and corr is not None
        r = await dev.mail.get(topic)
        assert r.correlation == corr
        assert r.content_type == encoding.content_type
        assert_encoding(r.payload, encoding)
        ans = r.ok()
        assert ans.id == rid
        assert ans.version == "1.0.0"
        assert ans.node == NODE
        assert not ans.timing.spilled
        assert_same_outputs(ans.outputs, want, f"{example} {encoding}")

        # No id in the request: the answer's id is the CorrelationData in hex.
        one = {k: v[:1] for k, v in inputs.items()}
        topic, corr = await dev.send(example, one, encoding=encoding)
        assert topic is not None and corr is not None
        r = await dev.mail.get(topic)
        assert r.correlation == corr
        assert r.ok().id == corr.hex()
        assert_same_outputs(r.ok().outputs, ort_run(example, one), f"{example} row 0")


@pytest.mark.parametrize("qos", [0, 1])
async def test_answer_uses_the_request_qos(fleet: Fleet, broker: Broker, qos: int) -> None:
    root = new_root()
    inputs = sample("cancer", 2)
    async with (
        running_agent(fleet, broker, root, [build_bundle(fleet, "cancer")]),
        Device(fleet, broker, root) as dev,
    ):
        r = await dev.call("cancer", inputs, qos=qos, id="q")
        # The device subscribed at QoS 1, so what arrives is the QoS the agent published at.
        assert r.qos == qos
        assert_same_outputs(r.ok().outputs, ort_run("cancer", inputs), f"qos {qos}")


@pytest.mark.parametrize("encoding", ENCODINGS, ids=str)
async def test_encoding_is_sniffed_without_content_type(
    fleet: Fleet, broker: Broker, encoding: Encoding
) -> None:
    root = new_root()
    inputs = sample("cancer")
    async with (
        running_agent(fleet, broker, root, [build_bundle(fleet, "cancer")]),
        Device(fleet, broker, root) as dev,
    ):
        r = await dev.call("cancer", inputs, encoding=encoding, content_type=None, id="sniff")
        assert r.content_type == encoding.content_type
        assert_encoding(r.payload, encoding)
        assert r.ok().id == "sniff"
        assert_same_outputs(r.ok().outputs, ort_run("cancer", inputs), str(encoding))


# -- MQTT 3.1.1 --------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ENCODINGS, ids=str)
@pytest.mark.parametrize("example", EXAMPLE_NAMES)
async def test_mqtt311_answer_equals_onnx_runtime(
    fleet: Fleet, broker: Broker, example: str, encoding: Encoding
) -> None:
    root = new_root()
    inputs = sample(example, 3, seed=9)
    async with (
        running_agent(fleet, broker, root, [build_bundle(fleet, example)]),
        Device311(fleet, broker, root) as dev,
    ):
        rid = f"old-{uuid.uuid4().hex[:8]}"
        r = await dev.call(example, inputs, encoding=encoding, id=rid)
        assert r.topic.startswith(f"{root}/replies/old-meter/")
        assert_encoding(r.payload, encoding)
        assert r.ok().id == rid
        assert r.ok().version == "1.0.0"
        assert_same_outputs(r.ok().outputs, ort_run(example, inputs), f"{example} {encoding}")

        # Neither an id nor CorrelationData: the answer still comes, with an empty id.
        r = await dev.call(example, {k: v[1:2] for k, v in inputs.items()}, encoding=encoding)
        assert r.ok().id == ""
        assert r.ok().version == "1.0.0"


# -- clients that are not ours -------------------------------------------------------------------


def tls_args(fleet: Fleet, broker: Broker, device: str) -> list[str]:
    d = fleet.home.identity_dir(fleet.device(device).cn)
    return [
        *("-h", "127.0.0.1", "-p", str(broker.tls_port)),
        *(
            "--cafile",
            str(d / "ca.pem"),
            "--cert",
            str(d / "cert.pem"),
            "--key",
            str(d / "key.pem"),
        ),
    ]


async def run_tool(*cmd: str, timeout: float = WAIT + 5) -> bytes:
    proc = await asyncio.create_subprocess_exec(
        *cmd,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, f"{cmd[0]} exited {proc.returncode}: {err.decode()[-1000:]}"
    return out


@pytest.mark.parametrize("example", EXAMPLE_NAMES)
async def test_mosquitto_rr_gets_onnx_runtime_answer(
    fleet: Fleet, broker: Broker, example: str
) -> None:
    root = new_root()
    inputs = sample(example, 2, seed=5)
    payload = encode_request(inputs, Encoding.JSON, id="from-rr")
    async with running_agent(fleet, broker, root, [build_bundle(fleet, example)]):
        out = await run_tool(
            "mosquitto_rr",
            *tls_args(fleet, broker, "rr-1"),
            *("-V", "5", "-q", "1", "-W", str(int(WAIT))),
            *("-t", f"{root}/nodes/{NODE}/invoke/{fid(example)}"),
            *("-e", f"{root}/replies/rr-1/{uuid.uuid4().hex[:8]}"),
            *("-m", payload.decode()),
        )
    body = json.loads(out)
    assert body["id"] == "from-rr"
    assert body["version"] == "1.0.0"
    assert_same_outputs(tensors_from_json(body["outputs"]), ort_run(example, inputs), example)


@pytest.mark.parametrize("example", EXAMPLE_NAMES)
async def test_mosquitto_pub_sub_with_reply_to_gets_onnx_runtime_answer(
    fleet: Fleet, broker: Broker, example: str
) -> None:
    root = new_root()
    inputs = sample(example, 2, seed=6)
    reply_to = f"{root}/replies/sensor-9/{uuid.uuid4().hex[:8]}"
    payload = encode_request(inputs, Encoding.JSON, id="from-pub", reply_to=reply_to)
    async with running_agent(fleet, broker, root, [build_bundle(fleet, example)]):
        # stdbuf: line-buffered, so the SUBACK line reaches us as it happens.
        sub = await asyncio.create_subprocess_exec(
            "stdbuf",
            "-oL",
            "mosquitto_sub",
            *tls_args(fleet, broker, "sensor-9"),
            *("-V", "311", "-q", "1", "-C", "1", "-W", str(int(WAIT)), "-d", "-t", reply_to),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            assert sub.stdout is not None
            seen: list[bytes] = []
            # -d prints the SUBACK: only then can the request not outrun the subscription.
            while not any(b"SUBACK" in line for line in seen):
                async with asyncio.timeout(WAIT):
                    line = await sub.stdout.readline()
                assert line, f"mosquitto_sub ended before subscribing: {b''.join(seen)!r}"
                seen.append(line)
            await run_tool(
                "mosquitto_pub",
                *tls_args(fleet, broker, "sensor-9"),
                *("-V", "311", "-q", "1", "-t", f"{root}/nodes/{NODE}/invoke/{fid(example)}"),
                *("-m", payload.decode()),
            )
            async with asyncio.timeout(WAIT + 5):
                rest, _ = await sub.communicate()
        finally:
            if sub.returncode is None:
                sub.kill()
                await sub.wait()
    assert sub.returncode == 0
    answers = [line for line in rest.splitlines() if line.startswith(b"{")]
    assert len(answers) == 1, rest.decode(errors="replace")
    body = json.loads(answers[0])
    assert body["id"] == "from-pub"
    assert body["version"] == "1.0.0"
    assert_same_outputs(tensors_from_json(body["outputs"]), ort_run(example, inputs), example)


# -- HTTPS ---------------------------------------------------------------------------------------

WEB = "web-1"


def web_node(fleet: Fleet) -> None:
    """A node whose certificate names 127.0.0.1, so clients can check the host name."""
    if WEB not in fleet.nodes:
        fleet.nodes[WEB] = fleet.ca.issue(Role.NODE, WEB, sans=["127.0.0.1", "localhost"])


def session(ctx: ssl.SSLContext) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx))


async def post(
    s: aiohttp.ClientSession, port: int, function: str, body: bytes, content_type: str
) -> tuple[int, str, bytes]:
    async with s.post(
        f"https://127.0.0.1:{port}/v1/functions/{fid(function)}/invoke",
        data=body,
        headers={"Content-Type": content_type},
    ) as resp:
        return resp.status, resp.content_type, await resp.read()


@pytest.mark.parametrize("encoding", ENCODINGS, ids=str)
async def test_http_invoke_equals_onnx_runtime(
    fleet: Fleet, broker: Broker, encoding: Encoding
) -> None:
    web_node(fleet)
    root = new_root()
    inputs = sample("digits", 5)
    bundles = [build_bundle(fleet, "digits", nodes=[WEB])]
    ctx = client_context(fleet.device("browser"), fleet.home.ca_cert)
    async with running_agent(fleet, broker, root, bundles, node=WEB) as agent, session(ctx) as s:
        body = encode_request(inputs, encoding, id="over-https")
        status, ctype, payload = await post(
            s, agent.http_port, "digits", body, encoding.content_type
        )
        assert status == 200, payload
        assert ctype == encoding.content_type
        assert_encoding(payload, encoding)
        ans = decode_reply(payload, ctype)
        assert isinstance(ans, Response), ans
        assert ans.id == "over-https"
        assert ans.version == "1.0.0"
        assert_same_outputs(ans.outputs, ort_run("digits", inputs), "https")


async def test_http_errors_have_their_status_and_a_json_error(fleet: Fleet, broker: Broker) -> None:
    web_node(fleet)
    root = new_root()
    model = build_example("digits").onnx_bytes
    bundles = [
        build_bundle(fleet, "digits", nodes=[WEB]),
        build_bundle(fleet, model, name="examples/small", nodes=[WEB], max_payload=4096),
    ]
    ctx = client_context(fleet.device("browser"), fleet.home.ca_cert)
    image = sample("digits", 1)["image"]
    json_ct = Encoding.JSON.content_type
    async with running_agent(fleet, broker, root, bundles, node=WEB) as agent, session(ctx) as s:
        port = agent.http_port

        body = encode_request({"image": image}, Encoding.JSON, id="nf")
        status, ctype, payload = await post(s, port, "nope", body, json_ct)
        err = json.loads(payload)
        assert (status, ctype, err["error"]["code"], err["id"]) == (404, json_ct, "not_found", "nf")
        assert "examples/nope" in err["error"]["message"]

        body = encode_request({"image": image[:, :60].copy()}, Encoding.JSON, id="bad")
        status, ctype, payload = await post(s, port, "digits", body, json_ct)
        err = json.loads(payload)
        assert (status, ctype, err["error"]["code"]) == (400, json_ct, "bad_request")
        assert "'image'" in err["error"]["message"]
        assert "float32[N, 64]" in err["error"]["message"]

        big = {"image": np.tile(image, (40, 1))}  # ~10 kB over a 4096-byte limit
        body = encode_request(big, Encoding.MSGPACK, id="big")
        assert len(body) > 4096
        status, ctype, payload = await post(s, port, "small", body, Encoding.MSGPACK.content_type)
        err = json.loads(payload)
        assert (status, err["error"]["code"]) == (400, "bad_request")
        assert "4096" in err["error"]["message"]

        # Still serving after all that.
        body = encode_request({"image": image}, Encoding.JSON, id="after")
        status, _, payload = await post(s, port, "small", body, json_ct)
        assert status == 200
        ok = decode_reply(payload, json_ct)
        assert isinstance(ok, Response), ok
        assert_same_outputs(ok.outputs, ort_run("digits", {"image": image}), "after")

        async with s.get(f"https://127.0.0.1:{port}/metrics") as resp:
            text = await resp.text()
        assert resp.status == 200
        assert 'fnmesh_agent_answers_total{code="ok",function="examples/small"} 1.0' in text
        assert 'fnmesh_agent_answers_total{code="bad_request",function="examples/digits"} 1.0' in (
            text
        )
        async with s.get(f"https://127.0.0.1:{port}/healthz") as resp:
            health = await resp.json()
        assert health == {"ok": True, "functions": ["examples/digits", "examples/small"]}


async def test_http_client_without_certificate_refused(fleet: Fleet, broker: Broker) -> None:
    web_node(fleet)
    root = new_root()
    bundles = [build_bundle(fleet, "digits", nodes=[WEB])]
    body = encode_request(sample("digits", 1), Encoding.JSON)
    async with running_agent(fleet, broker, root, bundles, node=WEB) as agent:
        async with session(client_context(None, fleet.home.ca_cert)) as s:
            with pytest.raises((aiohttp.ClientError, ssl.SSLError)):
                await post(s, agent.http_port, "digits", body, Encoding.JSON.content_type)
        assert agent.metrics.render().count(b'code="ok"') == 0


async def test_http_client_certificate_from_another_ca_refused(
    fleet: Fleet, broker: Broker, tmp_path: Path
) -> None:
    web_node(fleet)
    root = new_root()
    impostor = make_fleet(tmp_path / "impostor").device("browser")
    bundles = [build_bundle(fleet, "digits", nodes=[WEB])]
    body = encode_request(sample("digits", 1), Encoding.JSON)
    async with running_agent(fleet, broker, root, bundles, node=WEB) as agent:
        # Trusts our CA for the server, but presents a certificate our CA never issued.
        async with session(client_context(impostor, fleet.home.ca_cert)) as s:
            with pytest.raises((aiohttp.ClientError, ssl.SSLError)):
                await post(s, agent.http_port, "digits", body, Encoding.JSON.content_type)
        # The genuine device, same request, is answered: the refusal was about the certificate.
        async with session(client_context(fleet.device("browser"), fleet.home.ca_cert)) as s:
            status, _, payload = await post(
                s, agent.http_port, "digits", body, Encoding.JSON.content_type
            )
        assert status == 200, payload


async def test_http_invoke_error_code_for_expired_deadline(fleet: Fleet, broker: Broker) -> None:
    web_node(fleet)
    root = new_root()
    bundles = [build_bundle(fleet, "digits", nodes=[WEB])]
    ctx = client_context(fleet.device("browser"), fleet.home.ca_cert)
    body = encode_request(sample("digits", 1), Encoding.JSON, id="late", deadline_ms=0)
    async with running_agent(fleet, broker, root, bundles, node=WEB) as agent, session(ctx) as s:
        status, _, payload = await post(s, agent.http_port, "digits", body, "application/json")
    err = decode_reply(payload)
    assert isinstance(err, ErrorReply), err
    assert status == ErrorCode.TIMEOUT.http_status == 504
    assert err.code == ErrorCode.TIMEOUT
    assert err.id == "late"
