"""The Triton backend over several REAL Triton servers (the nvidia-pytriton wheel's, CPU instances).

One tiny exported checkpoint, two servers on it (`pair`). A load of concurrent calls at concurrency 8
runs while one server is SIGKILLed and later restarted on the same ports: no call fails, both servers
answer before and after (Triton's own `nv_inference_request_success`), and every answer equals the
one a single server gives. Also: a list with an unreachable server and a server serving another model
(kept out, reported by `/readyz` and `/metrics`), and a `dns:///localhost:PORT` target.
"""
from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator, Iterator

import httpx
import numpy as np
import pytest

from service.api import create_app
from service.backends.triton import TritonBackend
from service.backends.triton_targets import Target, parse_targets
from service.settings import Settings
from service.triton_local import LocalTritonServer
from tests.triton_util import require_triton_platform, start_triton

pytestmark = pytest.mark.timeout(240)

T = 4
LABELS = ["open valve", "stand up", "wave hand"]
TOLERANCE = 1e-6
CONCURRENCY = 8


# ====================================================================== targets (no server)
def test_targets_parse_lists_and_dns_names() -> None:
    assert parse_targets("h1:8001") == [Target("h1", 8001)]
    assert parse_targets(" h1:8001, h2:8001 ,h1:8001") == [Target("h1", 8001), Target("h2", 8001)]
    assert parse_targets("dns:///triton.ns.svc:8001") == [Target("triton.ns.svc", 8001, dns=True)]
    assert parse_targets("[::1]:8001")[0].text == "[::1]:8001"
    for bad in ("h1", "h1:x", "dns:///h1", "h1:70000", ",", "http://h1:8001"):
        with pytest.raises(ValueError):
            parse_targets(bad)
    assert Settings(triton_url=["h1:8001", "h2:8001"]).triton_url == "h1:8001,h2:8001"
    assert Settings(triton_url="h1:8001 , dns:///t:8001").triton_url == "h1:8001,dns:///t:8001"


async def test_dns_targets_add_and_retire_servers_as_the_name_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    from service.backends import triton_pool

    answers = {"pods.svc": ["10.0.0.1:8001", "10.0.0.2:8001"]}

    async def fake_resolve(target: Target) -> list[str]:
        if target.host not in answers:
            raise socket.gaierror("Name or service not known")
        return answers[target.host] if target.dns else [target.text]

    monkeypatch.setattr(triton_pool, "resolve", fake_resolve)
    pool = triton_pool.TritonPool(parse_targets("dns:///pods.svc:8001,fixed:8001"), timeout_s=1.0)
    answers["fixed"] = []
    try:
        await pool._sync_servers()
        assert list(pool.servers) == ["10.0.0.1:8001", "10.0.0.2:8001", "fixed:8001"]
        answers["pods.svc"] = ["10.0.0.2:8001", "10.0.0.3:8001"]  # a pod replaced
        await pool._sync_servers()
        assert list(pool.servers) == ["10.0.0.2:8001", "10.0.0.3:8001", "fixed:8001"]
        del answers["pods.svc"]  # the name stops resolving: keep what was known, say why
        await pool._sync_servers()
        assert list(pool.servers) == ["10.0.0.2:8001", "10.0.0.3:8001", "fixed:8001"]
        assert "pods.svc:8001 does not resolve" in (pool.dns_error or "")
    finally:
        await pool.close()


# ====================================================================== real servers
@pytest.fixture(scope="module")
def starter() -> Iterator[ThreadPoolExecutor]:
    """Threads that start servers in parallel and live as long as them (a server gets SIGKILLed when
    the thread that started it exits)."""
    require_triton_platform()
    executor = ThreadPoolExecutor(max_workers=3, thread_name_prefix="triton-start")
    yield executor
    executor.shutdown(wait=True)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory, starter: ThreadPoolExecutor) -> Iterator[dict]:
    """A perturbed tiny checkpoint exported once (CPU, encoders batch at most 4) and two servers on it."""
    import torch

    from training.checkpoint import save_checkpoint
    from training.export import export_repository
    from training.model import ModelConfig, build_model

    work = tmp_path_factory.mktemp("triton-pool")
    torch.manual_seed(7)
    model = build_model(ModelConfig(backbone="fsar-tiny", pretrained=None, adapter="ted+ma", num_frames=T,
                                    tpcm_ffn=128, text_adapter_width=32, metric="otam"))
    with torch.no_grad():
        for param in model.trainable_parameters():
            param.add_(torch.randn_like(param) * 0.05)
    checkpoint_hash = save_checkpoint(work / "tiny.pt", model, step=1)
    repository = work / "model_repository"
    export_repository(work / "tiny.pt", repository, instance_kind="cpu", max_batch_size=4, queue_delay_us=1000)
    servers = [LocalTritonServer(repository) for _ in range(2)]
    try:
        for future in [starter.submit(server.start) for server in servers]:
            future.result()
        yield {"hash": checkpoint_hash, "repository": repository, "servers": servers}
    finally:
        for server in servers:
            server.stop()


def settings(url: str, **overrides) -> Settings:
    return Settings(**{"backend": "triton", "triton_url": url, "triton_timeout_s": 20.0,
                       "triton_health_interval_s": 0.5, "log_level": "warning", **overrides})


@asynccontextmanager
async def backend_on(url: str, **overrides) -> AsyncIterator[TritonBackend]:
    backend = TritonBackend(settings(url, **overrides))
    await backend.start()
    try:
        yield backend
    finally:
        await backend.close()


def dead_url() -> str:
    """An address nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


def successes(server: LocalTritonServer) -> float:
    """Requests the server answered, from its own metrics (all models)."""
    text = httpx.get(server.metrics_url, timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("nv_inference_request_success{"))


def frames_of(videos: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(videos, T, 64, 64, 3), dtype=np.uint8)


class Workload:
    """Four kinds of idempotent calls, and what one server answers to each."""

    def __init__(self) -> None:
        self.frames = frames_of(2, seed=3)
        self.expected: dict[str, np.ndarray] = {}

    def calls(self, backend: TritonBackend) -> dict:
        e = self.expected
        return {
            "encode_videos": lambda: backend.encode_videos(self.frames),
            "encode_texts": lambda: backend.encode_texts(LABELS),
            "classify": lambda: backend.classify(e["encode_videos"], e["prototypes"], e["encode_texts"]),
            "zero_shot": lambda: backend.zero_shot(e["encode_videos"], e["encode_texts"]),
        }

    async def reference(self, backend: TritonBackend) -> None:
        """The answers of one server (the baseline)."""
        self.expected["encode_videos"] = await backend.encode_videos(self.frames)
        self.expected["encode_texts"] = await backend.encode_texts(LABELS)
        support = await backend.encode_videos(frames_of(3, seed=4), self.expected["encode_texts"])
        self.expected["prototypes"] = await backend.build_prototypes(support, np.arange(3), self.expected["encode_texts"])
        for name, call in self.calls(backend).items():
            self.expected[name] = await call()

    async def run(self, backend: TritonBackend, stop: asyncio.Event, stats: dict) -> None:
        """CONCURRENCY workers calling until `stop` is set; every answer is compared with the baseline."""
        calls = self.calls(backend)

        async def worker(seed: int) -> None:
            rng = random.Random(seed)
            while not stop.is_set():
                name = rng.choice(list(calls))
                try:
                    got = await calls[name]()
                except Exception as err:  # counted, reported at the end
                    stats["failed"].append(f"{name}: {type(err).__name__}: {err}")
                    continue
                stats["done"] += 1
                stats["worst"] = max(stats["worst"], float(np.abs(got - self.expected[name]).max()))
                await asyncio.sleep(0.01)

        await asyncio.gather(*(worker(i) for i in range(CONCURRENCY)))


async def load_until(workload: Workload, backend: TritonBackend, stats: dict, until) -> None:
    """Run the load until the awaitable `until` finishes."""
    stop = asyncio.Event()
    runner = asyncio.create_task(workload.run(backend, stop, stats))
    try:
        return await until
    finally:
        stop.set()
        await runner


async def wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.1)


async def test_load_survives_a_killed_server_and_uses_it_again(pair: dict, starter: ThreadPoolExecutor) -> None:
    a, b = pair["servers"]
    workload = Workload()
    async with backend_on(b.grpc_url) as single:
        await workload.reference(single)
    stats = {"done": 0, "failed": [], "worst": 0.0}
    loop = asyncio.get_running_loop()
    async with backend_on(f"{a.grpc_url},{b.grpc_url}") as pool:
        assert pool.info()["fingerprint"] == pair["hash"]
        assert [s["healthy"] for s in pool.server_states()] == [True, True]
        before = {server.grpc_url: successes(server) for server in (a, b)}
        await load_until(workload, pool, stats, asyncio.sleep(3))
        used = {server.grpc_url: successes(server) - before[server.grpc_url] for server in (a, b)}
        print(f"before the kill: {stats['done']} calls, Triton successes {used}")
        assert all(count > 0 for count in used.values()), used

        async def kill_then_restart() -> LocalTritonServer:
            await asyncio.sleep(1.0)
            os.killpg(a.pid, signal.SIGKILL)  # the server and its model stubs, mid-load
            await wait_for(lambda: not pool.server_states()[0]["healthy"], 10, "the killed server is out")
            done_at_kill = stats["done"]
            await asyncio.sleep(2.0)  # the load goes on with one server
            assert stats["done"] > done_at_kill
            a.stop()
            restarted = LocalTritonServer(a.repository, http_port=a.http_port, grpc_port=a.grpc_port,
                                          metrics_port=a.metrics_port)
            await loop.run_in_executor(starter, restarted.start)
            await wait_for(lambda: pool.server_states()[0]["healthy"], 15, "the restarted server is back")
            return restarted

        restarted = await load_until(workload, pool, stats, kill_then_restart())
        try:
            before = {server.grpc_url: successes(server) for server in (restarted, b)}
            done = stats["done"]
            await load_until(workload, pool, stats, asyncio.sleep(3))
            used = {server.grpc_url: successes(server) - before[server.grpc_url] for server in (restarted, b)}
            print(f"after the restart: {stats['done'] - done} calls, Triton successes {used}")
            assert all(count > 0 for count in used.values()), used
            states = {s["url"]: s for s in pool.server_states()}
            print("gateway counts:", {url: s["requests"] for url, s in states.items()})
            assert states[b.grpc_url]["requests"]["ok"] > 0 and states[a.grpc_url]["requests"]["ok"] > 0
        finally:
            restarted.stop()
            pair["servers"][0] = restarted  # stopped; later tests use server b only
    print(f"{stats['done']} calls at concurrency {CONCURRENCY}, {len(stats['failed'])} failed, "
          f"max |pool - single server| = {stats['worst']:.1e}")
    assert not stats["failed"], stats["failed"][:5]
    assert stats["worst"] <= TOLERANCE


@asynccontextmanager
async def running(app_settings: Settings) -> AsyncIterator[tuple[httpx.AsyncClient, TritonBackend]]:
    app = create_app(app_settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            yield client, app.state.service.backend


async def test_unreachable_and_other_model_servers_are_kept_out_and_reported(pair: dict, tmp_path: Path) -> None:
    from tests.service.test_triton_backend import FAKE_FINGERPRINT, write_fake_repository

    live = pair["servers"][1]
    dead = dead_url()
    other_repository = write_fake_repository(tmp_path / "other")
    with start_triton(other_repository) as other:
        url = f"{dead},{live.grpc_url},{other.grpc_url}"
        async with running(settings(url)) as (client, backend):
            assert backend.info()["fingerprint"] == pair["hash"]
            texts = await backend.encode_texts(LABELS)
            frames = await backend.encode_videos(frames_of(2, seed=5))
            assert (await backend.zero_shot(frames, texts)).shape == (2, 3)

            response = await client.get("/readyz")
            assert response.status_code == 200, response.text
            servers = {s["url"]: s for s in response.json()["checks"]["triton_servers"]}
            print(servers)
            assert servers[live.grpc_url]["healthy"] and servers[live.grpc_url]["state"] == "up"
            assert not servers[dead]["healthy"] and servers[dead]["state"] == "down"
            assert "not reachable" in servers[dead]["last_error"]
            assert servers[other.grpc_url]["state"] == "mismatch"
            assert servers[other.grpc_url]["fingerprint"] == FAKE_FINGERPRINT
            assert FAKE_FINGERPRINT[:16] in servers[other.grpc_url]["last_error"]
            assert servers[live.grpc_url]["requests"]["ok"] >= 3
            assert servers[other.grpc_url]["requests"]["ok"] == 0

            metrics = (await client.get("/metrics")).text
            assert f'fsar_triton_server_up{{server="{live.grpc_url}"}} 1.0' in metrics
            assert f'fsar_triton_server_up{{server="{dead}"}} 0.0' in metrics
            assert f'fsar_triton_server_up{{server="{other.grpc_url}"}} 0.0' in metrics
            assert f'fsar_triton_requests_total{{outcome="ok",server="{live.grpc_url}"}}' in metrics


async def test_dns_target_finds_the_server(pair: dict) -> None:
    live = pair["servers"][1]
    async with backend_on(f"dns:///localhost:{live.grpc_port}") as backend:
        assert backend.pooled
        states = {s["url"]: s for s in backend.server_states()}
        assert states[f"127.0.0.1:{live.grpc_port}"]["healthy"], states
        assert (await backend.encode_texts(LABELS)).shape[0] == 3
        states = {s["url"]: s for s in backend.server_states()}
        assert states[f"127.0.0.1:{live.grpc_port}"]["requests"]["ok"] == 1
