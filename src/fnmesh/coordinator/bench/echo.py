"""A bare MQTT echo responder: the baseline round trip for invocation benchmarks.

It uses the same MQTT client as the agent, so the difference between its
round trip and an invocation's is the agent's own work.

    python -m fnmesh.coordinator.bench.echo --broker URL --topic T [--home DIR --as CN]
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import paho.mqtt.client as mqtt

from fnmesh.agent.mqtt import MqttClient, properties
from fnmesh.certs.home import Home
from fnmesh.certs.identity import load_identity
from fnmesh.certs.tls import client_context


async def serve(
    broker: str, topic: str, home: str | None, cn: str | None, ready: str | None
) -> None:
    ctx = None
    if home and cn:
        h = Home(__import__("pathlib").Path(home))
        ctx = client_context(load_identity(h.identity_dir(cn)), h.ca_cert)
    client = MqttClient(
        broker, f"echo-{topic.replace('/', '-')}", ssl_context=ctx, persistent=False
    )

    def echo(msg: mqtt.MQTTMessage) -> None:
        p = msg.properties
        rt = getattr(p, "ResponseTopic", None)
        if rt:
            client.publish(
                rt,
                msg.payload,
                msg.qos,
                False,
                properties(correlation=getattr(p, "CorrelationData", None)),
            )

    client.subscribe(topic, echo, qos=1)
    await client.async_start()
    if ready:
        await client.async_publish(ready, b"ready", qos=1, retain=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await client.async_stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--broker", required=True)
    ap.add_argument("--topic", required=True)
    ap.add_argument("--home")
    ap.add_argument("--as", dest="cn")
    ap.add_argument("--ready", help="Retained topic to publish 'ready' on once subscribed.")
    a = ap.parse_args()
    asyncio.run(serve(a.broker, a.topic, a.home, a.cn, a.ready))


if __name__ == "__main__":
    main()
