"""`fsar demo`: the whole product on one machine with no network and no CLIP weights.

1. writes the synthetic motion dataset (`fsar synth`) if it is not there yet;
2. trains the `synthetic-tiny` preset once (a tiny backbone given a short stand-in pretraining on
   synthetic captioned images, then TPCM + OTAM trained on episodes; see docs/learning.md); the
   checkpoint is cached and later runs reuse it;
3. serves that checkpoint with the embedded backend (`demo=True`: the model card says "demo model");
4. registers a support set (one clip per held-out test class) over HTTP, classifies held-out clips
   of those classes over HTTP, and prints ready-to-paste curl commands (few-shot, zero-shot, hybrid).

The demo never replaces the production path: `fsar serve` with real weights never falls back to it.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

DEFAULT_WORKDIR = Path("runs")
PRESET = "synthetic-tiny"


@dataclass
class DemoResult:
    """What the demo did, for the CLI and tests."""

    url: str
    checkpoint: Path
    support_set: Dict[str, Any]
    samples: List[Dict[str, Any]] = field(default_factory=list)  # {path, true_label, few_shot, zero_shot}
    curl: List[str] = field(default_factory=list)
    trained_now: bool = False

    @property
    def few_shot_correct(self) -> int:
        return sum(1 for s in self.samples if s["few_shot"][0]["label"] == s["true_label"])


def ensure_dataset(data_dir: Path, say: Callable[[str], None]) -> Path:
    """Write the synthetic dataset unless a complete one is already there."""
    if (data_dir / "labels.json").is_file() and (data_dir / "splits" / "test.txt").is_file():
        say(f"synthetic dataset: reusing {data_dir}")
        return data_dir
    from training.data.synth import write_synthetic_dataset

    say(f"synthetic dataset: writing {data_dir} (real H.264 clips of shapes whose classes differ by motion)")
    summary = write_synthetic_dataset(data_dir, seed=0)
    say(f"synthetic dataset: {summary['videos']} videos, {summary['classes']} classes "
        f"in {summary['seconds']:.1f} s")
    return data_dir


def ensure_checkpoint(data_dir: Path, run_dir: Path, say: Callable[[str], None], *,
                      max_steps: Optional[int] = None, retrain: bool = False,
                      overrides: Sequence[str] = ()) -> tuple[Path, bool]:
    """Train the `synthetic-tiny` preset once; return (checkpoint, trained_now)."""
    done = run_dir / "DONE.json"
    if retrain and run_dir.exists():
        shutil.rmtree(run_dir)
    if done.is_file():
        checkpoint = Path(json.loads(done.read_text())["checkpoint"])
        if checkpoint.is_file():
            say(f"demo model: reusing {checkpoint} (delete {run_dir} or pass --retrain to train again)")
            return checkpoint, False
    from training.train import train

    say(f"demo model: training the '{PRESET}' preset on CPU (once; cached in {run_dir})")
    summary = train(PRESET, data_dir, run_dir, max_steps=max_steps, overrides=list(overrides), resume=True)
    checkpoint = Path(summary.get("best_checkpoint") or summary["last_checkpoint"])
    done.write_text(json.dumps({"checkpoint": str(checkpoint), "steps": summary.get("steps"),
                                "best_val_accuracy": summary.get("best_val_accuracy")}, indent=2))
    say(f"demo model: {summary.get('steps')} steps in {summary.get('elapsed_s', 0):.0f} s, "
        f"validation accuracy {summary.get('best_val_accuracy')}")
    return checkpoint, True


def _split_videos(data_dir: Path, split: str) -> Dict[str, List[Path]]:
    """class name -> its videos in `split`, in split-file order."""
    by_class: Dict[str, List[Path]] = {}
    for line in (data_dir / "splits" / f"{split}.txt").read_text().split():
        class_name, video_id = line.split("/", 1)
        matches = sorted((data_dir / "videos" / class_name).glob(f"{Path(video_id).stem}.*"))
        if matches:
            by_class.setdefault(class_name, []).append(matches[0])
    return by_class


def _curl_lines(url: str, set_id: str, sample: Path, labels: List[str]) -> List[str]:
    label_args = " ".join(f"-F 'labels={label}'" for label in labels)
    return [
        f"# few-shot: against the registered support set\n"
        f"curl -s -F video=@{sample} -F support_set_id={set_id} {url}/classify",
        f"# zero-shot: just name the candidate actions\n"
        f"curl -s -F video=@{sample} {label_args} {url}/classify",
        f"# hybrid: support classes plus text-only labels\n"
        f"curl -s -F video=@{sample} -F support_set_id={set_id} -F 'labels=something else entirely' {url}/classify",
        f"# the model card (says it is a demo model), the support set, the metrics\n"
        f"curl -s {url}/model\ncurl -s {url}/support-sets/{set_id}\ncurl -s {url}/metrics | grep fsar_",
    ]


def run_demo(workdir: Path = DEFAULT_WORKDIR, host: str = "127.0.0.1", port: Optional[int] = 8000, *,
             max_steps: Optional[int] = None, retrain: bool = False, serve_forever: bool = True,
             samples_per_class: int = 2, overrides: Sequence[str] = (),
             say: Callable[[str], None] = print) -> DemoResult:
    """Run the offline demo; blocks serving until Ctrl-C when `serve_forever`, else returns after checks.

    Args:
        workdir: holds `demo-data/` (the synthetic dataset), `demo/` (the training run and checkpoint)
            and `demo-samples/` (held-out clips for the printed curl commands).
        host, port: where the gateway listens (port None or 0: a free port).
        max_steps: cap the one-off training (tests use a handful of steps; default: the preset's).
        retrain: train again even if a demo checkpoint exists.
        serve_forever: keep serving after printing the curl commands (False: stop and return).
        samples_per_class: held-out clips classified per test class.
        overrides: ``key=value`` overrides of the preset for the one-off training (tests shorten it).
    """
    import httpx

    from service.harness import LiveGateway
    from service.settings import Settings

    workdir = Path(workdir)
    data_dir = ensure_dataset(workdir / "demo-data", say)
    checkpoint, trained_now = ensure_checkpoint(data_dir, workdir / "demo", say, max_steps=max_steps,
                                                retrain=retrain, overrides=overrides)

    settings = Settings(checkpoint=str(checkpoint.resolve()), backend="embedded", demo=True, redis_url=None,
                        log_level="warning")
    server = LiveGateway(settings, host=host, port=port or None, log_path=workdir / "demo-gateway.log",
                         ready_timeout_s=120.0)
    url = server.url
    say(f"gateway: starting the embedded backend on {url} (demo model, in-process store; log {server.log_path})")
    server.start()
    try:
        by_class = _split_videos(data_dir, "test")
        label_texts = json.loads((data_dir / "labels.json").read_text())
        classes = sorted(by_class)
        samples_dir = workdir / "demo-samples"
        samples_dir.mkdir(parents=True, exist_ok=True)

        # Register one shot per held-out class (classes the demo model never saw in training).
        files = [("videos", (path.name, path.read_bytes(), "video/mp4")) for path in
                 (by_class[c][0] for c in classes)]
        candidate_labels = [label_texts.get(c, c.replace("_", " ")) for c in classes]
        form = {"labels": candidate_labels, "name": "demo"}
        with httpx.Client(base_url=url, timeout=120.0) as client:
            response = client.post("/support-sets", files=files, data=form)
            if response.status_code != 201:
                raise RuntimeError(f"registering the demo support set failed: {response.status_code} {response.text}")
            support_set = response.json()
            say(f"support set {support_set['id']}: {len(classes)} classes x 1 shot "
                f"({', '.join(candidate_labels)})")

            result = DemoResult(url=url, checkpoint=checkpoint, support_set=support_set, trained_now=trained_now)
            for class_name in classes:
                for path in by_class[class_name][1:1 + samples_per_class]:
                    sample = samples_dir / f"{class_name}__{path.name}"
                    shutil.copyfile(path, sample)
                    true_label = label_texts.get(class_name, class_name.replace("_", " "))
                    few = client.post("/classify", files={"video": (sample.name, sample.read_bytes(), "video/mp4")},
                                      data={"support_set_id": support_set["id"], "top_k": "3"})
                    zero = client.post("/classify", files={"video": (sample.name, sample.read_bytes(), "video/mp4")},
                                       data={"labels": candidate_labels, "top_k": "3"})
                    for reply in (few, zero):
                        if reply.status_code != 200:
                            raise RuntimeError(f"classify failed: {reply.status_code} {reply.text}")
                    result.samples.append({"path": str(sample), "true_label": true_label,
                                           "few_shot": few.json()["predictions"],
                                           "zero_shot": zero.json()["predictions"]})

        say("")
        say("held-out clips (never registered), few-shot top-1 vs truth:")
        for sample in result.samples:
            top = sample["few_shot"][0]
            mark = "ok  " if top["label"] == sample["true_label"] else "miss"
            say(f"  {mark} {Path(sample['path']).name:<48} -> {top['label']:<32} p={top['score']:.2f} "
                f"(truth: {sample['true_label']})")
        chance = 1.0 / max(1, len(classes))
        zero_correct = sum(1 for s in result.samples if s["zero_shot"][0]["label"] == s["true_label"])
        say(f"few-shot top-1: {result.few_shot_correct}/{len(result.samples)} correct, zero-shot top-1: "
            f"{zero_correct}/{len(result.samples)} (chance {chance:.0%}).")
        say("The demo model is a tiny CLIP trained for minutes on synthetic data; its text tower is untrained, "
            "so zero-shot here is noise. Serve real CLIP weights for real zero-shot.")
        first = Path(result.samples[0]["path"]) if result.samples else by_class[classes[0]][0]
        result.curl = _curl_lines(url, support_set["id"], first.resolve(), candidate_labels)
        say("")
        say("try it (paste into another terminal while this one serves):")
        for block in result.curl:
            say(block)
        say("")
        say(f"page: {url}/ui (register clips, classify, see why a clip got its label)")
        if serve_forever:
            say("")
            say(f"serving on {url}; Ctrl-C to stop")
            try:
                while server.alive():
                    time.sleep(0.5)
            except KeyboardInterrupt:
                say("stopping")
        return result
    finally:
        server.stop()
