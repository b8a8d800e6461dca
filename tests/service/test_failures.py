"""Failures: Redis killed and restarted, the gateway killed and restarted, Redis killed in the middle of a
registration's write, and registrations that fail half-way.

Redis here is a real `redis-server` with append-only persistence in a temporary folder
(`--appendonly yes --save ""`), killed with SIGKILL. The mid-write tests put a small TCP proxy between
the gateway and Redis that kills Redis at a precise point of the registration's MULTI/EXEC transaction
(before EXEC arrives, or right after it was applied). Triton down or slow (503 within
`triton_timeout_s`) is tested with the Triton backend in `test_triton_backend.py`.
"""
from __future__ import annotations

import re
import socket
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import httpx
import pytest
import redis

from service.harness import RedisServer
from tests.service.live_gateway import LiveGateway, free_port
from tests.service.test_api import LABELS, assert_error, class_video, classify, register, running, tiny_settings, \
    upload_form

pytestmark = pytest.mark.timeout(300)


class AofRedis(RedisServer):
    """A private `redis-server` with append-only persistence in `workdir`; SIGKILL and restart keep data.

    `appendfsync` as in production (docker-compose.yml: everysec); "always" where a test needs every
    acknowledged write on disk before the next command is answered."""

    def __init__(self, workdir: Path, appendfsync: str = "everysec") -> None:
        super().__init__(workdir, args=["--appendonly", "yes", "--appendfsync", appendfsync, "--save", ""],
                         db=13, log_path=workdir / "redis.log")

    def url_via(self, port: int) -> str:
        """The URL of this server's database through another port (a proxy in front of it)."""
        return f"redis://127.0.0.1:{port}/{self.db}"

    def exists(self, pattern: str) -> bool:
        return bool(self.keys(pattern))

    def keys(self, pattern: str = "*") -> list[str]:
        client = redis.Redis(port=self.port, db=13)
        try:
            return sorted(key.decode() for key in client.scan_iter(match=pattern, count=1000))
        finally:
            client.close()


@pytest.fixture
def aof_redis(tmp_path: Path) -> Iterator[AofRedis]:
    server = AofRedis(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.kill()


# ------------------------------------------------------------------ kill and restart everything
def test_sigkilled_redis_and_gateway_lose_no_support_set(aof_redis: AofRedis, tmp_path: Path) -> None:
    clips = {(c, s): class_video(c, s) for c in range(3) for s in range(2)}
    settings = tiny_settings(redis_url=aof_redis.url, redis_prefix="fsar:", decode_concurrency=1)
    gateway = LiveGateway(settings, tmp_path / "gateway")
    gateway.start()
    try:
        sets = {}
        for name, classes in (("first", (0, 1)), ("second", (1, 2))):
            files, data = upload_form([(clips[c, 0], LABELS[c]) for c in classes])
            created = httpx.post(f"{gateway.url}/support-sets", files=files, data={**data, "name": name}, timeout=60)
            assert created.status_code == 201, created.text
            sets[name] = created.json()["id"]

        def predictions() -> dict[str, list]:
            found = {}
            for name, set_id in sets.items():
                response = httpx.post(f"{gateway.url}/classify", data={"support_set_id": set_id}, timeout=60,
                                      files=[("video", ("q.mp4", clips[1, 1], "video/mp4"))])
                assert response.status_code == 200, response.text
                found[name] = response.json()["predictions"]
            return found

        before = predictions()
        assert before["first"][0]["label"] == LABELS[1] and before["second"][0]["label"] == LABELS[1]

        # Redis dies: clear 503s (and /readyz says why) while the gateway stays up...
        aof_redis.kill()
        down = httpx.get(f"{gateway.url}/support-sets/{sets['first']}", timeout=30)
        error = assert_error(down, 503, "store_unavailable")
        assert "retry when it is back" in error["message"]
        assert_error(httpx.post(f"{gateway.url}/classify", data={"support_set_id": sets["first"]}, timeout=30,
                                files=[("video", ("q.mp4", clips[0, 1], "video/mp4"))]), 503, "store_unavailable")
        assert httpx.get(f"{gateway.url}/readyz", timeout=30).status_code == 503
        assert httpx.get(f"{gateway.url}/healthz", timeout=30).status_code == 200

        # ...and Redis comes back from its append-only file: same gateway, nothing lost.
        aof_redis.start()
        assert httpx.get(f"{gateway.url}/readyz", timeout=30).status_code == 200
        assert predictions() == before

        # The gateway dies (SIGKILL) and starts again: the sets are served from Redis.
        gateway.kill()
        gateway.start()
        assert predictions() == before

        # Both die at once and come back.
        gateway.kill()
        aof_redis.kill()
        aof_redis.start()
        gateway.start()
        listed = httpx.get(f"{gateway.url}/support-sets", timeout=30).json()
        assert sorted(s["name"] for s in listed["support_sets"]) == ["first", "second"]
        assert predictions() == before
    finally:
        gateway.stop()


# ------------------------------------------------------------------ failures half-way through a registration
async def test_a_bad_video_among_good_ones_leaves_nothing_behind(redis_url: str, redis_prefix: str) -> None:
    good = [class_video(c) for c in range(3)]
    bad = good[1][: len(good[1]) // 3]  # a truncated mp4: its index (moov) is gone
    async with running(tiny_settings(redis_url=redis_url, redis_prefix=redis_prefix)) as (client, service):
        files, data = upload_form([(good[0], "a"), (bad, "b"), (good[2], "c")])
        error = assert_error(await client.post("/support-sets", files=files, data=data), 415)
        assert "clip1.mp4" in error["message"]
        assert await service.store.keys("set:*") == []
        assert (await client.get("/support-sets")).json()["count"] == 0

        created = await register(client, [(good[0], "a")])
        set_id = created["id"]
        keys_before = sorted(await service.store.keys(f"set:{set_id}:*"))
        files, data = upload_form([(good[2], "c"), (bad, "b")])
        assert_error(await client.post(f"/support-sets/{set_id}/videos", files=files, data=data), 415)
        assert sorted(await service.store.keys(f"set:{set_id}:*")) == keys_before
        got = (await client.get(f"/support-sets/{set_id}")).json()
        assert got["revision"] == 1 and got["num_videos"] == 1
        assert (await classify(client, good[0], support_set_id=set_id)).status_code == 200


class KillingProxy:
    """A TCP proxy in front of Redis that SIGKILLs it at one point of the first MULTI/EXEC transaction
    that writes a support-set manifest:

    - `"before_exec"`: Redis has received MULTI and every queued SET except the manifest and EXEC;
    - `"after_exec"`: Redis has received and applied the whole transaction (the manifest can be read on a
      direct connection); its reply is not passed on.
    Either way the gateway's connection then breaks. Later connections pass through untouched."""

    MULTI = b"*1\r\n$5\r\nMULTI\r\n"
    EXEC = b"*1\r\n$4\r\nEXEC\r\n"
    SET_MANIFEST = re.compile(rb"\$3\r\nSET\r\n\$\d+\r\n[^\r]*:manifest\r\n")

    def __init__(self, server: AofRedis, when: str) -> None:
        self.server, self.when = server, when
        self.port = free_port()
        self.fired = threading.Event()  # replies on the transaction's connection are held back
        self.killed = threading.Event()  # Redis has been killed
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.server.port), timeout=5)
                upstream.settimeout(None)
            except OSError:  # Redis is down: so is this connection
                _close(client)
                continue
            self._sockets += [client, upstream]
            threading.Thread(target=self._pump_up, args=(client, upstream), daemon=True).start()
            # Replies on connections opened before the kill are never passed on after it.
            before_kill = not self.fired.is_set()
            threading.Thread(target=self._pump, args=(upstream, client, lambda: before_kill and self.fired.is_set()),
                             daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket, drop: Callable[[], bool]) -> None:
        try:
            while chunk := source.recv(65536):
                if not drop():  # a dropped reply: the connection stays open until Redis dies
                    target.sendall(chunk)
        except OSError:
            pass
        for sock in (source, target):
            _close(sock)

    def _pump_up(self, client: socket.socket, upstream: socket.socket) -> None:
        """Client to Redis, watching for the manifest's transaction."""
        seen = bytearray()
        try:
            while chunk := client.recv(65536):
                if self.fired.is_set():
                    upstream.sendall(chunk)
                    continue
                start = len(seen)
                seen += chunk
                multi = seen.rfind(self.MULTI)
                queued = self.SET_MANIFEST.search(seen, multi) if multi >= 0 else None  # not WATCH/GET's key
                manifest = queued.start() if queued else -1
                if manifest < 0 or (self.when == "after_exec" and seen.find(self.EXEC, manifest) < 0):
                    upstream.sendall(chunk)
                    continue
                self.fired.set()  # from now on no reply reaches the gateway on this connection
                if self.when == "before_exec":
                    upstream.sendall(bytes(seen[start:max(start, manifest - 64)]))
                    time.sleep(0.2)  # Redis queues what it got
                else:
                    upstream.sendall(chunk)
                    deadline = time.monotonic() + 10
                    while not self.server.exists("fsar:set:*:manifest") and time.monotonic() < deadline:
                        time.sleep(0.01)
                self.server.kill()
                self.killed.set()
                break
        except OSError:
            pass
        for sock in (client, upstream):
            _close(sock)

    def close(self) -> None:
        _close(self._listener)
        for sock in self._sockets:
            _close(sock)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


@pytest.mark.parametrize("when", ["before_exec", "after_exec"])
async def test_redis_killed_during_a_registration_write_leaves_all_or_nothing(tmp_path: Path, when: str) -> None:
    aof_redis = AofRedis(tmp_path / "redis", appendfsync="always")
    aof_redis.start()
    proxy = KillingProxy(aof_redis, when)
    clips = [class_video(c, s) for c in range(3) for s in range(2)]
    settings = tiny_settings(redis_url=aof_redis.url_via(proxy.port), redis_prefix="fsar:")
    try:
        async with running(settings) as (client, service):
            files, data = upload_form([(clip, LABELS[i // 2]) for i, clip in enumerate(clips)])
            response = await client.post("/support-sets", files=files, data=data)
            assert proxy.killed.wait(15), response.text
            error = assert_error(response, 503, "store_unavailable")
            assert "retry" in error["message"]

            aof_redis.start()
            set_keys = aof_redis.keys("fsar:set:*")
            manifests = [key for key in set_keys if key.endswith(":manifest")]
            if when == "before_exec":
                assert set_keys == []  # nothing of the set was applied
                assert (await client.get("/support-sets")).json()["count"] == 0
            else:
                assert len(manifests) == 1  # the whole set was applied: complete and usable
                set_id = manifests[0].split(":")[2]
                got = (await client.get(f"/support-sets/{set_id}")).json()
                assert got["num_videos"] == 6
                assert len([key for key in set_keys if ":clip:" in key]) == 6
                assert len([key for key in set_keys if ":proto:" in key]) == 1
                answer = await classify(client, clips[2], support_set_id=set_id)
                assert answer.status_code == 200 and answer.json()["predictions"][0]["label"] == LABELS[1]
            # Either way a new registration works once Redis is back.
            await register(client, [(clips[0], LABELS[0])])
    finally:
        proxy.close()
        aof_redis.kill()
