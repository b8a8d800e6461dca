"""`fsar demo`: the whole product on one machine with no network and no CLIP weights.

1. writes the synthetic motion dataset (`fsar synth`) if it is not there yet;
2. builds the demo model once: the `synthetic-tiny` preset's tiny backbone (its stand-in pretrained
   image tower ships in the repository and is rebuilt in seconds), unit frames, frame centering,
   identity TPCM and OTAM, **without training**: on held-out classes of two independent synthetic datasets no
   training recipe beat this training-free model (docs/learning.md). ``--train`` trains the preset
   instead. Its few-shot probabilities are then calibrated: a temperature fitted on the validation
   classes (``training.calibration``) is recorded in the checkpoint, so a printed p says how often such
   an answer is right. The checkpoint is cached and later runs reuse it while the preset, the overrides,
   ``--train`` and the calibration recipe are the same (otherwise it is made again);
3. serves that checkpoint with the embedded backend (`demo=True`: the model card says "demo model");
4. registers a support set (``shots`` clips per held-out test class) over HTTP, classifies held-out
   clips of those classes over HTTP, prints each answer beside the frame-mean baseline (the same
   model and support clips, temporal means compared: blind to frame order) on the same clips, and
   ready-to-paste curl commands (few-shot, zero-shot, hybrid).

The demo never replaces the production path: `fsar serve` with real weights never falls back to it.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

DEFAULT_WORKDIR = Path("runs")
PRESET = "synthetic-tiny"
# How the demo model's probabilities are calibrated once it is made (`training.calibration`): temperatures
# fitted on the demo data's validation classes (never the held-out test classes the demo classifies), at the
# demo's own size (its 6 held-out classes), for 1, 5 and 10 shots a class.
CALIBRATION = {"split": "val", "way": 6, "episodes": 1000}


@dataclass
class DemoResult:
    """What the demo did, for the CLI and tests."""

    url: str
    checkpoint: Path
    support_set: Dict[str, Any]
    samples: List[Dict[str, Any]] = field(default_factory=list)  # {path, true_label, few_shot, zero_shot, frame_mean}
    curl: List[str] = field(default_factory=list)
    trained_now: bool = False

    @property
    def few_shot_correct(self) -> int:
        return sum(1 for s in self.samples if s["few_shot"][0]["label"] == s["true_label"])

    @property
    def frame_mean_correct(self) -> int:
        return sum(1 for s in self.samples if s.get("frame_mean") == s["true_label"])


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


def demo_recipe(overrides: Sequence[str] = (), train_model: bool = False) -> str:
    """sha256 of what makes the demo model: the preset with ``overrides`` as loaded now, and whether it
    is trained. A cached model is reused only when this matches."""
    from training.config import load_config

    made_of = {"config": load_config(PRESET, list(overrides)).to_dict(), "trained": bool(train_model),
               "calibration": CALIBRATION}
    return hashlib.sha256(json.dumps(made_of, sort_keys=True, default=str).encode()).hexdigest()


def ensure_checkpoint(data_dir: Path, run_dir: Path, say: Callable[[str], None], *,
                      max_steps: Optional[int] = None, retrain: bool = False,
                      overrides: Sequence[str] = (), train_model: bool = False) -> tuple[Path, bool]:
    """Make the demo model once; return (checkpoint, made_now). By default the training-free model
    of the `synthetic-tiny` preset; with ``train_model`` the preset trained on ``data_dir``."""
    done = run_dir / "DONE.json"
    recipe = demo_recipe(overrides, train_model)
    if retrain and run_dir.exists():
        shutil.rmtree(run_dir)
    if done.is_file():
        record = json.loads(done.read_text())
        checkpoint = Path(record["checkpoint"])
        if checkpoint.is_file() and record.get("recipe") == recipe:
            say(f"demo model: reusing {checkpoint} (delete {run_dir} or pass --retrain to make it again)")
            return checkpoint, False
        # Made by another version of the preset, with other overrides, or trained vs not: a stale model
        # would be served under the current name, and a trained run would resume from it.
        say(f"demo model: {run_dir} holds a model made with other settings (an older '{PRESET}' preset, "
            f"other overrides or --train); making it again")
        shutil.rmtree(run_dir)
    if not train_model:
        from training.train import untrained_checkpoint

        started = time.perf_counter()
        say(f"demo model: the '{PRESET}' preset without training (stand-in pretrained tiny backbone, unit "
            f"frames, frame centering, OTAM; cached in {run_dir})")
        checkpoint = untrained_checkpoint(PRESET, run_dir, overrides, progress=False)
        calibrate(checkpoint, data_dir, say)
        done.write_text(json.dumps({"checkpoint": str(checkpoint), "trained": False, "recipe": recipe}, indent=2))
        say(f"demo model: ready in {time.perf_counter() - started:.0f} s")
        return checkpoint, True
    from training.train import train

    say(f"demo model: training the '{PRESET}' preset on CPU (once; cached in {run_dir})")
    summary = train(PRESET, data_dir, run_dir, max_steps=max_steps, overrides=list(overrides), resume=True)
    checkpoint = Path(summary.get("best_checkpoint") or summary["last_checkpoint"])
    calibrate(checkpoint, data_dir, say)
    done.write_text(json.dumps({"checkpoint": str(checkpoint), "steps": summary.get("steps"), "trained": True,
                                "recipe": recipe,
                                "best_val_accuracy": summary.get("best_val_accuracy")}, indent=2))
    say(f"demo model: {summary.get('steps')} steps in {summary.get('elapsed_s', 0):.0f} s, "
        f"validation accuracy {summary.get('best_val_accuracy')}")
    return checkpoint, True


def calibrate(checkpoint: Path, data_dir: Path, say: Callable[[str], None]) -> Optional[float]:
    """Fit the temperature of the demo model's few-shot probabilities on the validation classes and record
    it in the checkpoint (the gateway applies it); returns it, or None when the data cannot calibrate."""
    from training.evaluate import calibrate_checkpoint

    started = time.perf_counter()
    try:
        fit = calibrate_checkpoint(checkpoint, data_dir, CALIBRATION["split"], way=CALIBRATION["way"],
                                   episodes=CALIBRATION["episodes"], num_workers=0, progress=False)
    except ValueError as err:  # e.g. a dataset without a large enough val split
        say(f"demo model: probabilities left uncalibrated ({err})")
        return None
    temperatures = ", ".join(f"{t:.3g} at {s} shot{'s' * (s != '1')}" for s, t in fit["temperatures"].items())
    before, after = fit["nll"][next(iter(fit["nll"]))]
    say(f"demo model: probabilities calibrated on the {CALIBRATION['split']} classes (temperature {temperatures}; "
        f"one-shot log-loss there {before:.2f} -> {after:.2f}) in {time.perf_counter() - started:.0f} s")
    return float(fit["temperature"])


def _split_videos(data_dir: Path, split: str) -> Dict[str, List[Path]]:
    """class name -> its videos in `split`, in split-file order."""
    by_class: Dict[str, List[Path]] = {}
    for line in (data_dir / "splits" / f"{split}.txt").read_text().split():
        class_name, video_id = line.split("/", 1)
        matches = sorted((data_dir / "videos" / class_name).glob(f"{Path(video_id).stem}.*"))
        if matches:
            by_class.setdefault(class_name, []).append(matches[0])
    return by_class


def frame_mean_predictions(checkpoint: Path, support: Dict[str, List[Path]], samples: List[Path],
                           labels: Dict[str, str]) -> List[str]:
    """The frame-mean baseline on the demo's clips: the same model and support clips, each class's
    prototype and each sample compared by their temporal-mean features (``metric=mean``: blind to
    frame order). Returns the predicted label text of every sample."""
    import torch

    from training.data.datasets import VideoDataset
    from training.evaluate import encode_split, load_for_eval, swap_metric

    model, _ = load_for_eval(checkpoint, device="cpu")
    swap_metric(model, "mean")
    classes = sorted(support)
    texts = [labels.get(c, c.replace("_", " ")) for c in classes]
    paths = [p for c in classes for p in support[c]] + list(samples)
    targets = [i for i, c in enumerate(classes) for _ in support[c]] + [0] * len(samples)
    dataset = VideoDataset(paths, targets, [False] * len(paths), classes, texts, num_frames=model.num_frames,
                           size=model.image_size[0], mode="test")
    encoded = encode_split(model, dataset, batch_size=16, num_workers=0, progress=False)
    count = sum(len(support[c]) for c in classes)
    with torch.no_grad():
        prototypes = model.build_prototypes(encoded.support_feats[:count], encoded.labels[:count],
                                            encoded.text_feats)
        logits = model.classify(encoded.query_feats[count:], prototypes)
    return [texts[i] for i in logits.argmax(dim=-1).tolist()]


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
             samples_per_class: int = 2, overrides: Sequence[str] = (), shots: int = 1,
             train_model: bool = False, say: Callable[[str], None] = print) -> DemoResult:
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
        shots: support clips registered per held-out class.
        train_model: train the preset (minutes) instead of serving its training-free model.
    """
    import httpx

    from service.harness import LiveGateway
    from service.settings import Settings

    workdir = Path(workdir)
    data_dir = ensure_dataset(workdir / "demo-data", say)
    checkpoint, trained_now = ensure_checkpoint(data_dir, workdir / "demo", say, max_steps=max_steps,
                                                retrain=retrain, overrides=overrides, train_model=train_model)

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

        # Register `shots` clips per held-out class (classes the demo model never saw in training). The
        # classified clips are the same whatever `shots` is (each class's 2nd, 3rd, ... clip), so answers
        # with more shots compare with fewer on the same clips; support = the 1st clip, then the ones after.
        held_out = {c: by_class[c][1:1 + samples_per_class] for c in classes}
        support = {c: by_class[c][:1] + by_class[c][1 + samples_per_class:][:shots - 1] for c in classes}
        short = [c for c in classes if len(support[c]) < shots or not held_out[c]]
        if short:
            raise RuntimeError(f"the demo data has too few test clips of {', '.join(short)} for {shots} shots and "
                               f"{samples_per_class} held-out clips a class")
        files = [("videos", (path.name, path.read_bytes(), "video/mp4")) for c in classes for path in support[c]]
        candidate_labels = [label_texts.get(c, c.replace("_", " ")) for c in classes]
        form = {"labels": [label for c, label in zip(classes, candidate_labels) for _ in support[c]],
                "name": "demo"}
        with httpx.Client(base_url=url, timeout=120.0) as client:
            response = client.post("/support-sets", files=files, data=form)
            if response.status_code != 201:
                raise RuntimeError(f"registering the demo support set failed: {response.status_code} {response.text}")
            support_set = response.json()
            say(f"support set {support_set['id']}: {len(classes)} classes x {shots} shot{'s' * (shots > 1)} "
                f"({', '.join(candidate_labels)})")

            result = DemoResult(url=url, checkpoint=checkpoint, support_set=support_set, trained_now=trained_now)
            for class_name in classes:
                for path in held_out[class_name]:
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

        baseline = frame_mean_predictions(checkpoint, support, [Path(s["path"]) for s in result.samples],
                                          label_texts)
        for sample, label in zip(result.samples, baseline):
            sample["frame_mean"] = label
        say("")
        say("held-out clips (never registered): few-shot top-1 (served, OTAM; p = its calibrated probability) "
            "| frame-mean baseline | truth")
        for sample in result.samples:
            top = sample["few_shot"][0]
            mark = "ok  " if top["label"] == sample["true_label"] else "miss"
            base_mark = "ok  " if sample["frame_mean"] == sample["true_label"] else "miss"
            say(f"  {mark} {top['label']:<34} p={top['score']:.2f} | {base_mark} {sample['frame_mean']:<34} "
                f"| {sample['true_label']}")
        chance = 1.0 / max(1, len(classes))
        zero_correct = sum(1 for s in result.samples if s["zero_shot"][0]["label"] == s["true_label"])
        n = len(result.samples)
        say(f"few-shot top-1: {result.few_shot_correct}/{n} correct; frame-mean baseline on the same clips: "
            f"{result.frame_mean_correct}/{n}; zero-shot top-1: {zero_correct}/{n} (chance {chance:.0%}).")
        say("The demo model is a tiny CLIP whose image tower had a few minutes of stand-in pretraining on synthetic "
            "pictures; its text tower is random, so zero-shot here is noise. Serve real CLIP weights for real "
            "zero-shot.")
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
