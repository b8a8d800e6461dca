"""Benchmark: what the gateway's caches save, over HTTP, one request at a time.

Same gateway as ``service.bench.e2e`` (a real uvicorn process, embedded backend, random weights, 8 frames,
the local Redis when one answers) and the same generated clips. Three comparisons, each ours
against its baseline, every request timed at the client:

- ``query feature cache``: the same query bytes twice. ``miss`` = the first request (decode + encode
  + match), ``hit`` = the second (features from the cache, only match). The response's
  ``query_cache_hit`` is checked for both.
- ``registered set vs re-register (same bytes)``: ``classify`` against the registered set, against
  ``POST /support-sets`` (the five support videos again) + ``classify`` against the new set. Each
  re-registration decodes the five videos and stores their clips; their features come from the
  gateway's shared support-feature cache (``support_videos_encoded`` shows 0).
- ``registered set vs re-register (new bytes)``: the same, with the support videos retagged each
  time (other bytes), so the re-registration also encodes all five: the cost of a set without
  any cache.

Queries are distinct in every classify row except ``hit``. Sets created by re-registration are
deleted after their row (outside its numbers). Per row: p50/p95/mean ms, the stage times the gateway recorded
(``/metrics``, ms per timed unit) and its backend counters. ``speedup_vs_baseline`` = baseline
p50 / ours p50.

JSON: ``{"machine", "quick", "settings", "clips", "comparisons": [{"name", "ours", "baseline",
"speedup_vs_baseline", "mean_speedup_vs_baseline"}], "targets"}``.

Run: ``python -m service.bench.cache [--quick] [--json out.json] [--backbone NAME] [--repeats N]
[--workdir DIR] [--redis-url URL|none]``.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

from service.bench import common
from service.bench.common import NUM_FRAMES, WARMUP, BenchRequestError, classify, retagged, scrape
from service.harness import LiveGateway

TARGET_HIT_SPEEDUP = 10.0


def default_repeats(quick: bool) -> int:
    """Timed requests per row: 3 quick, 8 full."""
    return 3 if quick else 8


async def _timed_row(client: Any, name: str, repeats: int, call: Callable[[int], Awaitable[float]]) -> dict[str, Any]:
    """Run ``call(i)`` (returns its seconds) ``repeats`` times; the row with the metrics it added."""
    before = await scrape(client)
    seconds = [await call(i) for i in range(repeats)]
    deltas = common.stage_deltas(before, await scrape(client), repeats)
    return {"row": name, "requests": repeats, **common.percentiles_ms(seconds),
            **{key: deltas[key] for key in ("decode_ms", "encode_ms", "match_ms", "store_ms")},
            "counters": {key: value for key, value in deltas.items() if not key.endswith("_ms")}}


async def _measure(gateway: LiveGateway, clips, repeats: int, run_tag: str) -> dict[str, Any]:
    import httpx

    async with httpx.AsyncClient(base_url=gateway.url, timeout=900) as client:
        model = (await client.get("/model")).json()
        set_id, _ = await common.register_support_set(client, clips.support)
        for i in range(WARMUP):
            await classify(client, retagged(clips.queries[i % len(clips.queries)], f"{run_tag}-warmup{i}"), set_id)

        def query(tag: str, i: int) -> bytes:
            return retagged(clips.queries[i % len(clips.queries)], f"{run_tag}-{tag}-{i}")

        cached_queries = [query("cache", i) for i in range(repeats)]

        async def expect_hit(i: int, hit: bool) -> float:
            body, seconds = await classify(client, cached_queries[i], set_id)
            if body["query_cache_hit"] is not hit:
                raise BenchRequestError(f"expected query_cache_hit={hit}, got {body['query_cache_hit']}")
            return seconds

        miss = await _timed_row(client, "miss (first time)", repeats, lambda i: expect_hit(i, False))
        hit = await _timed_row(client, "hit (same bytes again)", repeats, lambda i: expect_hit(i, True))

        async def against_registered(i: int) -> float:
            return (await classify(client, query("registered", i), set_id))[1]

        async def reregister(i: int, new_bytes: bool) -> float:
            support = clips.support
            if new_bytes:
                support = [retagged(data, f"{run_tag}-support-{i}") for data in clips.support]
            tag = "rereg-new" if new_bytes else "rereg-same"
            question = query(tag, i)
            new_set, register_s = await common.register_support_set(client, support)
            _, classify_s = await classify(client, question, new_set)
            created.append(new_set)
            return register_s + classify_s

        async def delete_created() -> None:  # after the row's last scrape: not part of its numbers
            for created_id in created:
                await client.delete(f"/support-sets/{created_id}")
            created.clear()

        registered = await _timed_row(client, "classify, registered set", repeats, against_registered)
        created: list[str] = []
        same = await _timed_row(client, "register + classify (same bytes)", repeats, lambda i: reregister(i, False))
        await delete_created()
        new = await _timed_row(client, "register + classify (new bytes)", repeats, lambda i: reregister(i, True))
        await delete_created()
    return {"model": model, "pairs": [("query feature cache", hit, miss),
                                      ("registered set vs re-register (same bytes)", registered, same),
                                      ("registered set vs re-register (new bytes)", registered, new)]}


def run(quick: bool = False, json_path: str | None = None, *, backbone: str | None = None,
        repeats: int | None = None, workdir: str | None = None, redis_url: str | None = common.AUTO) -> dict[str, Any]:
    """Run the benchmark, print its table, write the JSON report when ``json_path`` is given.

    Args:
        quick: tiny clips (2 s 192x108), ``fsar-tiny`` by default, 3 requests a row.
        json_path: where to write the report.
        backbone: open_clip model name (default: ``fsar-tiny`` quick, ``ViT-B-32`` full).
        repeats: timed requests per row (default :func:`default_repeats`).
        workdir: where generated clips are cached (default ``~/.cache/fsar/bench-gateway``).
        redis_url: the gateway's Redis (``"auto"``: the local one if it answers; None: in-process store).

    Returns:
        The report (see the module docstring).
    """
    backbone = backbone or common.default_backbone(quick)
    repeats = repeats or default_repeats(quick)
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    bench = common.prepare_gateway_bench(quick, workdir, backbone, redis_url)
    machine, clips, settings = bench.machine, bench.clips, bench.settings
    with common.running_gateway(settings) as gateway:
        measured = asyncio.run(_measure(gateway, clips, repeats, f"cache-{time.time_ns()}"))
    machine["load_avg_end"] = [round(value, 2) for value in os.getloadavg()]
    comparisons = [{"name": name, "ours": ours, "baseline": baseline,
                    "speedup_vs_baseline": common.ratio(baseline["p50_ms"], ours["p50_ms"]),
                    "mean_speedup_vs_baseline": common.ratio(baseline["mean_ms"], ours["mean_ms"])}
                   for name, ours, baseline in measured["pairs"]]
    hit_speedup = comparisons[0]["speedup_vs_baseline"]
    report = {
        "machine": machine,
        "quick": quick,
        "settings": {"backbone": backbone, "num_frames": NUM_FRAMES, "input_size": measured["model"]["input_size"],
                     "store": "redis" if settings.redis_url else "memory",
                     "fingerprint": measured["model"]["fingerprint"]},
        "clips": clips.describe(),
        "comparisons": comparisons,
        "targets": {"query_cache_hit_speedup": {
            "value": hit_speedup, "target": f">= {TARGET_HIT_SPEEDUP:g}",
            "met": hit_speedup is not None and hit_speedup >= TARGET_HIT_SPEEDUP}},
    }
    print(format_report(report))
    common.write_report(json_path, report)
    return report


COLUMNS = [("comparison", "comparison", ""), ("row", "row", ""), ("req", "requests", ""), ("p50_ms", "p50_ms", ".1f"),
           ("p95_ms", "p95_ms", ".1f"), ("mean_ms", "mean_ms", ".1f"), ("speedup", "speedup_vs_baseline", ".2f"),
           ("decode_ms", "decode_ms", ".1f"), ("encode_ms", "encode_ms", ".1f"), ("match_ms", "match_ms", ".1f"),
           ("store_ms", "store_ms", ".1f"), ("support_enc", "support_videos_encoded", ""),
           ("query_enc", "query_videos_encoded", "")]


def format_report(report: dict[str, Any]) -> str:
    """One table: per comparison its baseline row, then ours with the speedup; then the target."""
    rows = []
    for comparison in report["comparisons"]:
        for role in ("baseline", "ours"):
            row = dict(comparison[role], **comparison[role]["counters"], comparison=comparison["name"])
            row["row"] = f"{role}: {row['row']}"
            row["speedup_vs_baseline"] = comparison["speedup_vs_baseline"] if role == "ours" else None
            rows.append(row)
    target = report["targets"]["query_cache_hit_speedup"]
    return "\n".join([common.format_table(rows, COLUMNS), "",
                      f"target query_cache_hit_speedup: {target['value']} (want {target['target']}) -> "
                      f"{'met' if target['met'] else 'MISSED'}"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_gateway_arguments(parser, "tiny clips, fsar-tiny, 3 requests a row")
    parser.add_argument("--repeats", type=int, help="timed requests per row")
    args = parser.parse_args(argv)
    run(quick=args.quick, json_path=args.json_path, backbone=args.backbone, repeats=args.repeats,
        workdir=args.workdir, redis_url=common.redis_url_argument(args.redis_url))


if __name__ == "__main__":
    main()
