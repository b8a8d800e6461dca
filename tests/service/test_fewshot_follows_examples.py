"""Without training, a user's own example clips decide a few-shot answer, not the wording of labels.

The gateway runs with its default settings (embedded backend, in-process store, ViT-B-32 in place
of ViT-B-16 to keep it quick) on random open_clip weights saved to a file, with the temperature every
released CLIP was trained to (``logit_scale = ln 100``). A support set of three classes x two shots of
real encoded videos (frames brightening, the same frames backwards, a blinking clip) is
registered under several label wordings, and every support clip sent back to ``POST /classify``
must come back with its own class. Few-shot prediction mixes ``softmax(Q2T)`` (label texts) and
``softmax(Q2S)`` (the examples) half and half, so this holds only when Q2S logits are in CLIP's units
(docs/methods.md section 8); with the metric scale at 1.0 the labels' wording wins.
"""
from __future__ import annotations

import asyncio
import io
import math
from pathlib import Path

import av
import numpy as np
import open_clip
import pytest
import torch

from service.settings import Settings
from tests.media import frame_pattern
from tests.service.test_api import classify, register, running

pytestmark = pytest.mark.timeout(300)

WORDINGS = [
    ("brightening", "darkening", "blinking"),
    ("class a", "class b", "class c"),
    ("darkening", "blinking", "brightening"),  # the first wording's words on the wrong classes
]
NUM_VIDEO_FRAMES = 16
#: Brightness swing of the clips (0..1). Kept small: clips of a user's classes are alike, so the frame
#: costs between classes are a few hundredths, as between real videos under CLIP.
CONTRAST = 0.25


def _encode(frames: list[np.ndarray], fps: int = 8) -> bytes:
    """A real H.264 mp4 of RGB frames ``[H, W, 3]`` uint8."""
    buffer = io.BytesIO()
    height, width = frames[0].shape[:2]
    with av.open(buffer, "w", format="mp4") as output:
        stream = output.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for pixels in frames:
            output.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        output.mux(stream.encode(None))
    return buffer.getvalue()


def support_clips(size: tuple[int, int] = (96, 96), contrast: float = CONTRAST) -> list[list[bytes]]:
    """``clips[c][shot]``: class 0 brightening, class 1 the same frames backwards, class 2 blinking.

    Every frame is a grey level blended with the frame-index pattern of :mod:`tests.media`; the two
    shots of a class differ in their tint and pattern, not in their motion."""
    width, height = size
    clips: list[list[bytes]] = [[], [], []]
    for shot in range(2):
        tint = np.array([1.0, 0.9, 0.8] if shot else [0.85, 0.95, 1.0], dtype=np.float32)

        def frame(level: float, index: int) -> np.ndarray:
            pattern = frame_pattern(index, width, height).astype(np.float32) / 255.0
            return ((0.2 * pattern + 0.8 * level * tint) * 255).clip(0, 255).astype(np.uint8)

        ramp = [frame(0.5 + contrast * (i / (NUM_VIDEO_FRAMES - 1) - 0.5), 7 * shot + i)
                for i in range(NUM_VIDEO_FRAMES)]
        clips[0].append(_encode(ramp))
        clips[1].append(_encode(ramp[::-1]))
        clips[2].append(_encode([frame(0.5 + contrast * (0.5 if i % 2 else -0.5), 7 * shot + i) for i in range(NUM_VIDEO_FRAMES)]))
    return clips


def random_vit_b32(path: Path, seed: int = 0) -> Path:
    """Random ViT-B-32 open_clip weights with CLIP's trained temperature, as a state_dict file."""
    torch.manual_seed(seed)
    model = open_clip.create_model("ViT-B-32", pretrained=None)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(100.0))
    torch.save(model.state_dict(), path)
    return path


async def wrong_answers(settings: Settings, clips: list[list[bytes]]) -> list[str]:
    """Register the clips under every wording and send each back; list every clip that came back wrong.
    A wording's clips are sent at once (the backend batches them); the next wording's queries are the
    same bytes, so their features come from the query cache."""
    wrong: list[str] = []
    async with running(settings) as (client, _service):
        for wording in WORDINGS:
            items = [(clip, wording[c]) for c, shots in enumerate(clips) for clip in shots]
            created = await register(client, items)
            sent = [(c, shot, clip) for c, shots in enumerate(clips) for shot, clip in enumerate(shots)]
            responses = await asyncio.gather(*(classify(client, clip, support_set_id=created["id"])
                                               for _, _, clip in sent))
            for (c, shot, _), response in zip(sent, responses):
                assert response.status_code == 200, response.text
                body = response.json()
                assert body["mode"] == "few-shot"
                top = body["predictions"][0]["label"]
                if top != wording[c]:
                    wrong.append(f"{wording}: class {c} shot {shot} ({wording[c]!r}) -> {top!r} "
                                 f"{[(p['label'], round(p['score'], 3)) for p in body['predictions']]}")
    return wrong


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_vit_b32(tmp_path_factory.mktemp("vit-b-32") / "ViT-B-32-random.pt")


def embedded(weights: Path) -> Settings:
    """Default settings, except ViT-B-32 random weights from a file."""
    return Settings(backbone="ViT-B-32", pretrained=str(weights), log_level="warning")


async def test_each_support_clip_comes_back_with_its_own_label(weights: Path) -> None:
    wrong = await wrong_answers(embedded(weights), support_clips())
    assert not wrong, "support clips classified as another class:\n" + "\n".join(wrong)


async def test_the_same_with_the_triton_backend(weights: Path, tmp_path: Path) -> None:
    """The model the embedded backend builds from these settings, exported and served by a real
    Triton server: the gateway on the Triton backend answers the same."""
    from training.checkpoint import save_checkpoint
    from training.export import export_repository
    from training.model import ModelConfig, build_model
    from tests.triton_util import start_triton

    settings = embedded(weights)
    with torch.random.fork_rng(devices=[]):  # as EmbeddedBackend builds a model without a checkpoint
        torch.manual_seed(settings.seed)
        model = build_model(ModelConfig(backbone=settings.backbone, pretrained=settings.pretrained))
    checkpoint = tmp_path / "untrained.pt"
    save_checkpoint(checkpoint, model, step=0)
    del model
    repository = tmp_path / "model_repository"
    export_repository(checkpoint, repository, instance_kind="cpu", max_batch_size=8, queue_delay_us=1000)
    with start_triton(repository) as server:
        triton = Settings(backend="triton", triton_url=server.grpc_url, triton_timeout_s=120.0,
                          log_level="warning")
        wrong = await wrong_answers(triton, support_clips())
    assert not wrong, "support clips classified as another class (Triton backend):\n" + "\n".join(wrong)
