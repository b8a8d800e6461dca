#!/usr/bin/env python3
"""Smoke test of a running fsar gateway, end to end through whatever backend and store it uses.

    python scripts/smoke.py --url http://127.0.0.1:8080 [--api-key KEY]

Makes real H.264 videos (PyAV) of three "actions" that differ in colour and motion, registers a
support set (2 shots per class), then classifies a new clip of each class few-shot, zero-shot and
hybrid, and checks the answers:

- every answer's probabilities sum to 1 over exactly the expected candidates, in the right mode;
- few-shot: the query's own class comes first;
- hybrid: its scores are one mix w * zero-shot + (1 - w) * few-shot of the other two answers
  (the same w, 0 <= w <= 1, for every candidate);
- the support set can be read back and deleted.

Prints one line per check; exits 0 when all pass, 1 (with the reason) otherwise. Needs httpx, numpy,
av and this checkout's video writer (`training.video.writer`: PyAV and NumPy only), none of the
service's dependencies, so it can be pointed at any deployment.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a file: make the project's packages importable
    sys.path.insert(0, str(REPO_ROOT))

from training.video.writer import video_bytes  # noqa: E402

CLASSES = ["open valve", "stand up", "wave hand"]
EXTRA_LABEL = "juggle balls"  # a zero-shot-only candidate
COLOURS = [(230, 40, 40), (40, 210, 70), (40, 70, 235)]
SHOTS = 2  # support shots per class; shot SHOTS is the query
TOLERANCE = 1e-4


class SmokeFailure(AssertionError):
    """A check failed; the message says which and what was seen."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise SmokeFailure(message)


def make_video(class_index: int, shot: int, *, frames: int = 16, width: int = 96, height: int = 72) -> bytes:
    """An H.264 mp4: the class's colour, a white square moving in the class's direction, shot-dependent noise."""
    rng = np.random.default_rng(1000 * class_index + shot)
    base = np.array(COLOURS[class_index], dtype=np.float32)
    dx, dy = [(1, 0), (0, 1), (-1, -1)][class_index]

    def frame(i: int) -> np.ndarray:
        pixels = base + rng.normal(0, 12, size=(height, width, 3))
        x = (width // 2 + dx * 3 * i + 5 * shot) % (width - 16)
        y = (height // 2 + dy * 3 * i + 3 * shot) % (height - 16)
        pixels[y:y + 16, x:x + 16] = 255
        return np.clip(pixels, 0, 255).astype(np.uint8)

    return video_bytes((frame(i) for i in range(frames)), fps=8, codec="libx264", container="mp4")


class Smoke:
    def __init__(self, url: str, api_key: str | None, timeout_s: float) -> None:
        headers = {"X-API-Key": api_key} if api_key else {}
        self.client = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout_s)
        self.url = url

    def ok(self, message: str) -> None:
        print(f"  ok  {message}", flush=True)

    def expect(self, response: httpx.Response, status: int, what: str) -> Any:
        check(response.status_code == status,
              f"{what}: expected HTTP {status}, got {response.status_code}: {response.text[:500]}")
        return response.json() if response.content else None

    # ------------------------------------------------------------------ steps
    def wait_ready(self, wait_s: float) -> None:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                response = self.client.get("/readyz")
                if response.status_code == 200:
                    break
                last = f"{response.status_code} {response.text[:300]}"
            except httpx.HTTPError as err:
                last = str(err)
            check(time.monotonic() < deadline, f"{self.url}/readyz not ready within {wait_s:g} s: {last}")
            time.sleep(0.5)
        model = self.expect(self.client.get("/model"), 200, "GET /model")
        self.ok(f"ready: {model.get('description')} (backend {model.get('backend')}, "
                f"fingerprint {str(model.get('fingerprint'))[:12]})")

    def register(self, videos: dict[tuple[int, int], bytes]) -> str:
        files = [("videos", (f"{c}-{s}.mp4", videos[c, s], "video/mp4")) for c in range(len(CLASSES))
                 for s in range(SHOTS)]
        labels = [CLASSES[c] for c in range(len(CLASSES)) for _ in range(SHOTS)]
        body = self.expect(self.client.post("/support-sets", files=files,
                                            data={"labels": labels, "name": "smoke test"}), 201, "POST /support-sets")
        check(body["classes"] == [{"label": label, "shots": SHOTS} for label in CLASSES],
              f"registered classes are {body['classes']}")
        self.ok(f"registered support set {body['id']}: {len(CLASSES)} classes x {SHOTS} shots")
        got = self.expect(self.client.get(f"/support-sets/{body['id']}"), 200, "GET /support-sets/{id}")
        check(got["num_videos"] == len(files), f"the set reads back with {got['num_videos']} videos")
        return body["id"]

    def classify(self, video: bytes, mode: str, candidates: list[str], **fields: Any) -> dict[str, float]:
        response = self.client.post("/classify", files=[("video", ("query.mp4", video, "video/mp4"))], data=fields)
        body = self.expect(response, 200, f"POST /classify ({mode})")
        check(body["mode"] == mode, f"expected mode {mode}, got {body['mode']}")
        scores = {p["label"]: float(p["score"]) for p in body["predictions"]}
        check(sorted(scores) == sorted(candidates), f"{mode}: candidates {sorted(scores)} != {sorted(candidates)}")
        total = sum(scores.values())
        check(abs(total - 1.0) < 1e-6, f"{mode}: probabilities sum to {total}, not 1")
        check(all(0.0 <= s <= 1.0 for s in scores.values()), f"{mode}: a score outside [0, 1]: {scores}")
        return scores

    def run(self, wait_s: float) -> None:
        self.wait_ready(wait_s)
        videos = {(c, s): make_video(c, s) for c in range(len(CLASSES)) for s in range(SHOTS + 1)}
        set_id = self.register(videos)
        try:
            everything = CLASSES + [EXTRA_LABEL]
            for c, label in enumerate(CLASSES):
                query = videos[c, SHOTS]  # a clip the support set does not hold
                few = self.classify(query, "few-shot", CLASSES, support_set_id=set_id)
                best = max(few, key=few.get)
                check(best == label, f"few-shot: a new '{label}' clip was labelled '{best}' ({few})")
                zero = self.classify(query, "zero-shot", everything, labels=everything)
                hybrid = self.classify(query, "hybrid", everything, support_set_id=set_id, labels=[EXTRA_LABEL])
                weight = self.hybrid_weight(few, zero, hybrid)
                self.ok(f"'{label}': few-shot first = own label ({few[label]:.3f}); zero-shot and hybrid sum to 1; "
                        f"hybrid = {weight:.2f} x zero-shot + {1 - weight:.2f} x few-shot")
        finally:
            self.expect(self.client.delete(f"/support-sets/{set_id}"), 204, "DELETE /support-sets/{id}")
        self.expect(self.client.get(f"/support-sets/{set_id}"), 404, "GET of the deleted set")
        self.ok(f"deleted support set {set_id}")

    @staticmethod
    def hybrid_weight(few: dict[str, float], zero: dict[str, float], hybrid: dict[str, float]) -> float:
        """The w with hybrid = w * zero + (1 - w) * few (few is 0 for text-only labels); checks one w fits all."""
        labels = list(zero)
        few_all = np.array([few.get(label, 0.0) for label in labels])
        zero_all = np.array([zero[label] for label in labels])
        hybrid_all = np.array([hybrid[label] for label in labels])
        spread = zero_all - few_all
        weight = float(np.dot(spread, hybrid_all - few_all) / max(float(np.dot(spread, spread)), 1e-12))
        residual = float(np.abs(few_all + weight * spread - hybrid_all).max())
        check(-TOLERANCE <= weight <= 1 + TOLERANCE and residual < TOLERANCE,
              f"hybrid scores {hybrid} are not one mix of zero-shot {zero} and few-shot {few} "
              f"(best w {weight:.4f}, residual {residual:.2e})")
        return weight


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Smoke-test a running fsar gateway end to end.")
    parser.add_argument("--url", default="http://127.0.0.1:8080", help="the gateway's base URL")
    parser.add_argument("--api-key", default=os.environ.get("FSAR_SMOKE_API_KEY"),
                        help="X-API-Key to send when the gateway requires keys (env FSAR_SMOKE_API_KEY)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per HTTP request")
    parser.add_argument("--wait", type=float, default=60.0, help="seconds to wait for /readyz")
    args = parser.parse_args(argv)
    print(f"smoke test of {args.url}", flush=True)
    smoke = Smoke(args.url, args.api_key, args.timeout)
    started = time.monotonic()
    try:
        smoke.run(args.wait)
    except (SmokeFailure, httpx.HTTPError) as err:
        print(f"smoke test FAILED: {err}", file=sys.stderr, flush=True)
        return 1
    finally:
        smoke.client.close()
    print(f"smoke test passed in {time.monotonic() - started:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
