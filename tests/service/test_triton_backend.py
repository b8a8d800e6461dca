"""The gateway's Triton backend against REAL Triton servers (the nvidia-pytriton wheel's, CPU instances).

- `exported`: one server for the module on a repository exported (`instance_kind="cpu"`) from a tiny
  checkpoint with perturbed (non-identity) TED/MA adapters and TPCM. Every Triton backend output is
  compared with the embedded backend loaded from the same checkpoint, directly and through the HTTP API.
- `fake_triton`: a second, torch-free repository of three numpy models with the same I/O contract and
  `fsar_*` parameters (starts in seconds), for outages: the server stopped and restarted on the same
  ports, and a model slower than the request timeout.
"""
from __future__ import annotations

import asyncio
import socket
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator, Iterator

import httpx
import numpy as np
import pytest

from service.api import create_app
from service.backends import create_backend
from service.backends.embedded import EmbeddedBackend
from service.backends.triton import TritonBackend
from service.core import FsarService
from service.errors import BackendUnavailable, InvalidField
from service.settings import Settings
from service.triton_local import LocalTritonServer
from tests import media
from training.video.writer import video_bytes
from tests.triton_util import start_triton, write_python_model

pytestmark = pytest.mark.timeout(180)

T = 4  # frames per video (fsar-tiny: 64 px input, D = 64)
ATOL = 1e-4
LABELS = ["open valve", "stand up", "wave hand"]
#: Keys of `info()` that must be identical between the embedded and the Triton backend.
SHARED_INFO_KEYS = ("backbone", "pretrained", "weights_source", "backbone_hash", "adapter", "tpcm", "metric",
                    "metrics", "checkpoint_hash", "trainable_params", "total_params", "fingerprint",
                    "input_size", "num_frames", "embed_dim", "prompt", "alpha", "config")


def class_video(class_index: int, shot: int) -> bytes:
    """A real H.264 mp4 (64x48, 10 frames): the class's colour blended with the frame-index pattern."""
    return media.class_video(class_index, shot, num_frames=10)


@pytest.fixture(scope="module")
def videos() -> dict[tuple[int, int], bytes]:
    """(class, shot) -> mp4 bytes for 3 classes x 3 shots."""
    return {(c, s): class_video(c, s) for c in range(3) for s in range(3)}


# ====================================================================== the real export
@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A perturbed tiny checkpoint, its CPU export (encoders batch at most 4) and a server on it."""
    import torch

    from training.checkpoint import save_checkpoint
    from training.export import export_repository
    from training.model import ModelConfig, build_model

    work = tmp_path_factory.mktemp("triton-backend")
    torch.manual_seed(5)
    model = build_model(ModelConfig(backbone="fsar-tiny", pretrained=None, adapter="ted+ma", num_frames=T,
                                    tpcm_ffn=128, text_adapter_width=32, metric="otam"))
    with torch.no_grad():  # stand-in for training: adapters and TPCM away from their identity init
        for param in model.trainable_parameters():
            param.add_(torch.randn_like(param) * 0.05)
    checkpoint = work / "tiny.pt"
    checkpoint_hash = save_checkpoint(checkpoint, model, step=1)
    repository = work / "model_repository"
    export_repository(checkpoint, repository, instance_kind="cpu", max_batch_size=4, queue_delay_us=1000)
    with start_triton(repository) as server:
        yield {"checkpoint": str(checkpoint), "hash": checkpoint_hash, "server": server}


def embedded_settings(exported: dict, **overrides) -> Settings:
    return Settings(**{"backend": "embedded", "checkpoint": exported["checkpoint"], "pretrained": None,
                       "log_level": "warning", **overrides})


def triton_settings(url: str, **overrides) -> Settings:
    return Settings(**{"backend": "triton", "triton_url": url, "triton_timeout_s": 10.0, "log_level": "warning",
                       **overrides})


def random_frames(videos: int, seed: int, size: int = 64) -> np.ndarray:
    """uint8 [B, T, size, size, 3]: noise with a bright square moving over time."""
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 200, size=(videos, T, size, size, 3), dtype=np.uint8)
    for video in range(videos):
        for t in range(T):
            top = (7 * t + 11 * video) % (size - 12)
            frames[video, t, top:top + 12, 5 * t:5 * t + 12] = 255
    return frames


def assert_close(got: np.ndarray, expected: np.ndarray, what: str) -> float:
    """Equal within ATOL; returns the largest absolute difference (printed for the report)."""
    assert got.shape == expected.shape and got.dtype == np.float32, (what, got.shape, got.dtype)
    diff = float(np.abs(got - expected).max())
    print(f"{what}: max |triton - embedded| = {diff:.2e}")
    assert diff <= ATOL, f"{what}: Triton differs from the embedded backend by {diff}"
    return diff


async def test_triton_backend_matches_embedded_backend(exported) -> None:
    embedded = EmbeddedBackend(embedded_settings(exported))
    triton = create_backend(triton_settings(exported["server"].grpc_url))
    assert isinstance(triton, TritonBackend)
    await embedded.start()
    await triton.start()
    try:
        assert await triton.ready()
        info_e, info_t = embedded.info(), triton.info()
        assert info_t["backend"] == "triton" and info_t["fingerprint"] == exported["hash"]
        assert {key: info_t[key] for key in SHARED_INFO_KEYS} == {key: info_e[key] for key in SHARED_INFO_KEYS}

        # 6 videos > max_batch_size 4: the backend splits them into two requests.
        frames = random_frames(6, seed=1)
        texts_e = await embedded.encode_texts(LABELS)
        texts_t = await triton.encode_texts(LABELS)
        assert_close(texts_t, texts_e, "text features [3, D]")
        support_labels = np.array([0, 0, 1, 1, 2, 2], dtype=np.int64)
        queries_e = await embedded.encode_videos(frames)
        queries_t = await triton.encode_videos(frames)
        assert_close(queries_t, queries_e, "query frame features [6, T, D]")
        support_e = await embedded.encode_videos(frames, texts_e[support_labels])
        support_t = await triton.encode_videos(frames, texts_e[support_labels])
        assert_close(support_t, support_e, "support frame features [6, T, D]")
        assert np.abs(support_e - queries_e).max() > 1e-3  # the MA adapters make the label text matter

        protos_e = await embedded.build_prototypes(support_e, support_labels, texts_e)
        protos_t = await triton.build_prototypes(support_e, support_labels, texts_e)
        assert_close(protos_t, protos_e, "prototypes [3, T, D]")
        plain_means = np.stack([support_e[support_labels == c].mean(0) for c in range(3)])
        assert np.abs(protos_e - plain_means).max() > 1e-3  # TPCM is not an identity here

        for name, call in {
            "few-shot logits": lambda b: b.classify(queries_e, protos_e),
            "few-shot + text (Q2T) logits": lambda b: b.classify(queries_e, protos_e, texts_e),
            "zero-shot logits": lambda b: b.zero_shot(queries_e, texts_e),
        }.items():
            expected, got = await call(embedded), await call(triton)
            assert_close(got, expected, f"{name} [6, 3]")
            assert (np.argmax(got, axis=1) == np.argmax(expected, axis=1)).all()

        # Bad input: a clear error before anything is sent, and the model's own rejection as a 422.
        with pytest.raises(ValueError, match="frames must be uint8"):
            await triton.encode_videos(frames.astype(np.float32))
        with pytest.raises(ValueError, match="metric 'mean' is not available"):
            await triton.classify(queries_e, protos_e, metric="mean")
        with pytest.raises(InvalidField, match="support_labels must lie in") as info:
            await triton.build_prototypes(support_e, support_labels + 5, texts_e)
        assert info.value.status == 422
    finally:
        await triton.close()
        await embedded.close()


# ---------------------------------------------------------------------- through the HTTP API
@asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[tuple[httpx.AsyncClient, FsarService]]:
    """The app with its lifespan running, and a client talking to it in-process."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            yield client, app.state.service


async def register(client: httpx.AsyncClient, items: list[tuple[bytes, str]]) -> dict:
    files = [("videos", (f"clip{i}.mp4", data, "video/mp4")) for i, (data, _) in enumerate(items)]
    response = await client.post("/support-sets", files=files, data={"labels": [label for _, label in items]})
    assert response.status_code == 201, response.text
    return response.json()


async def classify(client: httpx.AsyncClient, video: bytes, **fields) -> httpx.Response:
    return await client.post("/classify", files=[("video", ("query.mp4", video, "video/mp4"))], data=fields)


def scores(response: httpx.Response) -> dict[str, float]:
    assert response.status_code == 200, response.text
    body = response.json()
    total = sum(p["score"] for p in body["predictions"])
    assert total == pytest.approx(1.0, abs=1e-6)
    return {p["label"]: p["score"] for p in body["predictions"]}


async def run_requests(client: httpx.AsyncClient, videos: dict) -> tuple[str, dict[str, dict[str, float]]]:
    """Register 3 classes x 2 shots, then classify shot 2 of each class few-shot, zero-shot and hybrid
    (also with text_weight 0, 0.3 and 1)."""
    items = [(videos[c, s], LABELS[c]) for c in range(3) for s in range(2)]
    set_id = (await register(client, items))["id"]
    results = {}
    for c in range(3):
        query = videos[c, 2]
        few_shot = await classify(client, query, support_set_id=set_id)
        results[f"few-shot {c}"] = scores(few_shot)
        results[f"open-set score {c}"] = {"open_set_score": few_shot.json()["open_set_score"]}
        results[f"zero-shot {c}"] = scores(await classify(client, query, labels=LABELS + ["juggle"]))
        results[f"hybrid {c}"] = scores(await classify(client, query, support_set_id=set_id, labels=["juggle"]))
        windowed = await classify(client, query, support_set_id=set_id, labels=["juggle"], segment_seconds="0.5")
        assert windowed.status_code == 200, windowed.text
        for i, segment in enumerate(windowed.json()["segments"]):  # long-video windows (hybrid)
            results[f"window {i} of {c}"] = {p["label"]: p["score"] for p in segment["predictions"]}
        for weight in ("0", "0.3", "1"):  # the request's text share, few-shot and hybrid
            results[f"few-shot {c} text_weight={weight}"] = scores(
                await classify(client, query, support_set_id=set_id, text_weight=weight))
            results[f"hybrid {c} text_weight={weight}"] = scores(
                await classify(client, query, support_set_id=set_id, labels=["juggle"], text_weight=weight))
    return set_id, results


async def test_api_with_triton_matches_embedded_app_and_shares_its_caches(exported, videos, redis_url: str,
                                                                          redis_prefix: str) -> None:
    url = exported["server"].grpc_url
    async with running(triton_settings(url, redis_url=redis_url, redis_prefix=redis_prefix + "t:")) as (client, _):
        card = (await client.get("/model")).json()
        assert card["backend"] == "triton" and card["fingerprint"] == exported["hash"]
        assert (await client.get("/readyz")).json()["checks"] == {"backend": "ok", "store": "ok"}
        set_id, via_triton = await run_requests(client, videos)
    async with running(embedded_settings(exported, redis_url=redis_url, redis_prefix=redis_prefix + "e:")) \
            as (client, _):
        _, via_embedded = await run_requests(client, videos)
    worst = 0.0
    for name, expected in via_embedded.items():
        got = via_triton[name]
        assert list(got) == list(expected), f"{name}: ranking differs: {got} vs {expected}"
        worst = max(worst, max(abs(got[label] - expected[label]) for label in expected))
    print(f"HTTP scores: max |triton - embedded| = {worst:.2e} over {len(via_embedded)} answers")
    assert worst <= ATOL

    # Same fingerprint, same keys: the embedded app serves the set the Triton app registered from
    # its stored prototypes and cached query features, without encoding a video again.
    async with running(embedded_settings(exported, redis_url=redis_url, redis_prefix=redis_prefix + "t:")) \
            as (client, service):
        got = scores(await classify(client, videos[1, 2], support_set_id=set_id))
        assert got == pytest.approx(via_triton["few-shot 1"], abs=ATOL)
        assert service.metrics.value("fsar_backend_calls_total", op="encode_videos") == 0
        assert service.metrics.value("fsar_backend_calls_total", op="build_prototypes") == 0


# ====================================================================== outages (a torch-free fake export)
FAKE_FINGERPRINT = "fake0123456789abcdef"
FAKE_D, FAKE_SIZE = 8, 64
FAKE_PARAMS = {"fsar_fingerprint": FAKE_FINGERPRINT, "fsar_checkpoint_hash": FAKE_FINGERPRINT,
               "fsar_backbone": "fake-numpy", "fsar_adapter": "none", "fsar_metric": "mean",
               "fsar_num_frames": str(T), "fsar_image_size": str(FAKE_SIZE), "fsar_embed_dim": str(FAKE_D),
               "fsar_prompt": "a video of {}", "fsar_pretrained": ""}

_FAKE_COMMON = '''
import hashlib, time
from pathlib import Path
import numpy as np
import triton_python_backend_utils as pb_utils

D = {d}

def pause(args):
    """Sleep as many seconds as the file `slow_s` beside the models says (no file: no pause)."""
    flag = Path(args["model_repository"]).parent / "slow_s"
    if flag.exists():
        time.sleep(float(flag.read_text()))
'''.format(d=FAKE_D)

FAKE_MODELS = {
    "text_encoder": ('''
        { name: "LABEL" data_type: TYPE_STRING dims: [ 1 ] }''', '''
        { name: "TEXT_FEATS" data_type: TYPE_FP32 dims: [ %d ] }''' % FAKE_D, 8, _FAKE_COMMON + '''
class TritonPythonModel:
    def initialize(self, args):
        self.args = args

    def execute(self, requests):
        responses = []
        for request in requests:
            labels = pb_utils.get_input_tensor_by_name(request, "LABEL").as_numpy().reshape(-1)
            feats = np.stack([np.random.default_rng(int(hashlib.sha256(label).hexdigest()[:8], 16))
                              .standard_normal(D).astype(np.float32) for label in labels])
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("TEXT_FEATS", feats)]))
        return responses
'''),
    "video_encoder": ('''
        { name: "FRAMES" data_type: TYPE_UINT8 dims: [ %d, %d, %d, 3 ] },
        { name: "TEXT_FEATS" data_type: TYPE_FP32 dims: [ %d ] optional: true }''' % (T, FAKE_SIZE, FAKE_SIZE, FAKE_D),
                      '''
        { name: "FRAME_FEATS" data_type: TYPE_FP32 dims: [ %d, %d ] }''' % (T, FAKE_D), 8, _FAKE_COMMON + '''
class TritonPythonModel:
    def initialize(self, args):
        self.args = args

    def execute(self, requests):
        pause(self.args)
        responses = []
        for request in requests:
            frames = pb_utils.get_input_tensor_by_name(request, "FRAMES").as_numpy()  # [B, T, S, S, 3]
            feats = np.zeros(frames.shape[:2] + (D,), dtype=np.float32)
            feats[..., :3] = frames.mean(axis=(2, 3)) / 255.0
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("FRAME_FEATS", feats)]))
        return responses
'''),
    "fewshot_head": ('''
        { name: "OP" data_type: TYPE_STRING dims: [ 1 ] },
        { name: "QUERY_FEATS" data_type: TYPE_FP32 dims: [ -1, %d, %d ] optional: true },
        { name: "TEXT_FEATS" data_type: TYPE_FP32 dims: [ -1, %d ] optional: true }''' % (T, FAKE_D, FAKE_D), '''
        { name: "LOGITS" data_type: TYPE_FP32 dims: [ -1, -1 ] }''', 0, _FAKE_COMMON + '''
class TritonPythonModel:
    def initialize(self, args):
        self.args = args

    def execute(self, requests):
        responses = []
        for request in requests:
            queries = pb_utils.get_input_tensor_by_name(request, "QUERY_FEATS").as_numpy().mean(axis=1)
            texts = pb_utils.get_input_tensor_by_name(request, "TEXT_FEATS").as_numpy()
            logits = (queries @ texts.T).astype(np.float32)  # zero_shot only
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("LOGITS", logits)]))
        return responses
'''),
}


def write_fake_repository(repository: Path, fingerprint: str = FAKE_FINGERPRINT) -> Path:
    """Three numpy models with the fsar I/O contract (zero-shot path only) and fsar_* parameters."""
    params = {**FAKE_PARAMS, "fsar_fingerprint": fingerprint, "fsar_checkpoint_hash": fingerprint}
    parameters = ",\n".join(f'  {{ key: "{key}" value: {{ string_value: "{value}" }} }}'
                            for key, value in params.items())
    for name, (inputs, outputs, max_batch, source) in FAKE_MODELS.items():
        config = (f'name: "{name}"\nbackend: "python"\nmax_batch_size: {max_batch}\n'
                  f"input [{inputs}\n]\noutput [{outputs}\n]\n"
                  "instance_group [ { kind: KIND_CPU count: 1 } ]\n"
                  f"parameters [\n{parameters}\n]\n")
        write_python_model(repository, name, config, source)
    return repository


@pytest.fixture
def fake_triton(tmp_path: Path) -> Iterator[LocalTritonServer]:
    repository = write_fake_repository(tmp_path / "fake_repository")
    server = start_triton(repository)
    try:
        yield server
    finally:
        server.stop()


def plain_video(shade: int) -> bytes:
    """A real H.264 mp4 (64x64, 6 frames) of one grey shade: every query gets new bytes (no cache hit)."""
    return video_bytes([np.full((64, 64, 3), shade, dtype=np.uint8)] * 6, fps=8)


def assert_backend_unavailable(response: httpx.Response) -> str:
    assert response.status_code == 503, response.text
    error = response.json()["error"]
    assert error["code"] == "backend_unavailable" and error["message"]
    return error["message"]


async def test_triton_down_gives_503_and_recovers_when_back(fake_triton: LocalTritonServer) -> None:
    server = fake_triton
    ports = {"http_port": server.http_port, "grpc_port": server.grpc_port, "metrics_port": server.metrics_port}
    async with running(triton_settings(server.grpc_url, triton_timeout_s=2.0)) as (client, _):
        assert (await client.get("/model")).json()["fingerprint"] == FAKE_FINGERPRINT
        assert scores(await classify(client, plain_video(10), labels=["a", "b"]))

        server.stop()
        started = time.monotonic()
        message = assert_backend_unavailable(await classify(client, plain_video(20), labels=["a", "b"]))
        assert time.monotonic() - started < 2.0 + 1.0  # refused connections fail fast, never past the timeout
        assert server.grpc_url in message and "not reachable" in message
        readiness = await client.get("/readyz")
        assert readiness.status_code == 503 and readiness.json()["checks"]["backend"].startswith("unavailable")

        # Triton comes back on the same ports with another export: the gateway notices the new model.
        write_fake_repository(server.repository, fingerprint="fake-v2")
        restarted = LocalTritonServer(server.repository, **ports).start()
        try:
            deadline = time.monotonic() + 15
            while (await client.get("/readyz")).status_code != 200:
                assert time.monotonic() < deadline, "the gateway did not see Triton come back"
                await asyncio.sleep(0.25)
            assert (await client.get("/model")).json()["fingerprint"] == "fake-v2"
            body = (await classify(client, plain_video(30), labels=["a", "b"])).json()
            assert body["model"] == "fake-v2" and len(body["predictions"]) == 2
        finally:
            restarted.stop()


async def test_slow_triton_gives_503_within_the_timeout(fake_triton: LocalTritonServer) -> None:
    async with running(triton_settings(fake_triton.grpc_url, triton_timeout_s=1.0)) as (client, _):
        (fake_triton.repository / "slow_s").write_text("3")  # video_encoder now takes 3 s a request
        started = time.monotonic()
        message = assert_backend_unavailable(await classify(client, plain_video(40), labels=["a", "b"]))
        elapsed = time.monotonic() - started
        assert "no answer within 1 s" in message
        assert 1.0 <= elapsed < 2.5, elapsed


async def test_start_fails_clearly_when_nothing_listens() -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        url = f"127.0.0.1:{sock.getsockname()[1]}"
    backend = TritonBackend(triton_settings(url, triton_timeout_s=1.0))
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=f"Triton at {url} did not serve the fsar models within 1 s"):
        await backend.start()
    assert 1.0 <= time.monotonic() - started < 3.0
    with pytest.raises(BackendUnavailable):
        backend.info()
