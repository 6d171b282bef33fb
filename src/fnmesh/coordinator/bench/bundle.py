"""``fnmesh bench bundle``: build, verify and decrypt throughput against raw crypto."""

from __future__ import annotations

import hashlib
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from onnx import TensorProto, helper, numpy_helper

from fnmesh.certs.ca import init_home
from fnmesh.certs.home import Home
from fnmesh.certs.identity import Role
from fnmesh.certs.trust import TrustStore
from fnmesh.functions import bundle as fnb
from fnmesh.functions.seal import aad_for


def sized_model(size_bytes: int, seed: int = 0) -> bytes:
    """An ONNX MatMul whose weight makes the model about ``size_bytes`` long."""
    cols = 256
    rows = max(1, size_bytes // (4 * cols))
    w = np.random.default_rng(seed).standard_normal((rows, cols), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "sized",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", rows])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", cols])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def _best(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


@dataclass(frozen=True, slots=True)
class BundleBench:
    size: int
    build_mbs: float
    verify_mbs: float
    decrypt_mbs: float
    verify_decrypt_mbs: float
    baseline_mbs: float

    @property
    def ratio(self) -> float:
        return self.verify_decrypt_mbs / self.baseline_mbs


def run(sizes: list[int], repeat: int = 5) -> list[BundleBench]:
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        home = Home(Path(tmp))
        ca, made = init_home(home)
        pub = ca.issue(Role.PUBLISHER, "bench", namespace="bench")
        coord = made["coordinator"]
        assert coord.enc_key is not None and coord.info.x25519 is not None
        trust = TrustStore.from_home(home)
        for size in sizes:
            model = sized_model(size)

            def do_build() -> bytes:
                return fnb.build(
                    model,
                    name="bench/sized",
                    version="1.0.0",
                    publisher=pub,
                    recipients={coord.cn: coord.info.x25519},  # type: ignore[dict-item]
                ).to_bytes()

            data = do_build()
            b = fnb.Bundle.parse(data)
            dk = b.data_key(coord.cn, coord.enc_key)
            ct = bytes(b.ciphertext)
            nonce = bytes.fromhex(b.manifest.digests.nonce)
            aad = aad_for(b.manifest.name, b.manifest.version)

            def baseline() -> None:
                hashlib.sha256(ct).digest()
                AESGCM(dk).decrypt(nonce, ct, aad)

            def verify() -> None:
                fnb.Bundle.parse(data).verify(trust)

            def decrypt() -> None:
                bb = fnb.Bundle.parse(data)
                bb.decrypt(bb.data_key(coord.cn, coord.enc_key))  # type: ignore[arg-type]

            def verify_decrypt() -> None:
                fnb.Bundle.parse(data).open(trust, coord.cn, coord.enc_key, check_graph=False)  # type: ignore[arg-type]

            n = len(model) / 1e6
            out.append(
                BundleBench(
                    size=len(model),
                    build_mbs=n / _best(do_build, max(1, repeat // 2)),
                    verify_mbs=n / _best(verify, repeat),
                    decrypt_mbs=n / _best(decrypt, repeat),
                    verify_decrypt_mbs=n / _best(verify_decrypt, repeat),
                    baseline_mbs=n / _best(baseline, repeat),
                )
            )
    return out


__all__ = ["BundleBench", "run", "sized_model"]
