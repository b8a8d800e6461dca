"""The embedded backend's lanes: the few-shot head answers while every model lane is busy encoding."""
from __future__ import annotations

import asyncio
import threading

import numpy as np

from service.backends.embedded import EmbeddedBackend
from service.settings import Settings


async def test_matching_does_not_wait_behind_encodes() -> None:
    backend = EmbeddedBackend(Settings(backbone="fsar-tiny", pretrained=None, num_frames=4, demo=True,
                                       log_level="warning", encode_concurrency=1, runtime="torch"))
    await backend.start()
    release = threading.Event()
    try:
        frames = np.random.default_rng(0).integers(0, 256, size=(3, 4, 64, 64, 3), dtype=np.uint8)
        feats = await backend.encode_videos(frames)
        texts = await backend.encode_texts(["a", "b", "c"])
        prototypes = await backend.build_prototypes(feats, np.arange(3), texts)
        expected = await backend.classify(feats, prototypes, texts)
        # Occupy the only model lane (an encode that takes as long as the test wants), then match.
        busy = asyncio.ensure_future(backend._run(lambda runner: release.wait(30)))
        await asyncio.sleep(0.05)
        assert not busy.done()
        logits = await asyncio.wait_for(backend.classify(feats, prototypes, texts), timeout=10)
        zero_shot = await asyncio.wait_for(backend.zero_shot(feats, texts), timeout=10)
        assert not busy.done()  # the head answered while the lane was still busy
        np.testing.assert_array_equal(logits, expected)
        assert zero_shot.shape == (3, 3) and np.isfinite(zero_shot).all()
        release.set()
        assert await busy is True
    finally:
        release.set()
        await backend.close()
