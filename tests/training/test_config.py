"""TrainConfig: presets, YAML files, key=value overrides with type checking, validation errors."""
from __future__ import annotations

import pytest
import yaml

from training.config import ConfigError, TrainConfig, list_presets, load_config, parse_override, save_config
from training.optim import build_optimizer, build_scheduler, effective_lr

STANDARD_PRESETS = ["ssv2-full", "ssv2-small", "kinetics-100", "ucf101", "hmdb51"]


def test_every_packaged_preset_loads_and_round_trips():
    names = list_presets()
    for name in ["synthetic-tiny", "m2clip-k400", *STANDARD_PRESETS]:
        assert name in names
    for name in names:
        cfg = load_config(name)
        assert cfg.name == name
        again = TrainConfig.from_dict(cfg.to_dict())
        assert again == cfg
        assert cfg.model_config().num_frames == 8 or name == "synthetic-tiny"


def test_standard_presets_follow_the_clip_fsar_recipes():
    expected = {"ssv2-full": (5e-5, 30000, 3.0), "ssv2-small": (5e-5, 30000, 3.0),
                "kinetics-100": (1e-5, 5000, 1.5), "ucf101": (2e-6, 5000, 1.5), "hmdb51": (1e-5, 5000, 1.5)}
    for name, (lr, episodes, text_weight) in expected.items():
        cfg = load_config(name)
        assert cfg.regime == "episodic" and cfg.optim.name == "adam"
        assert (cfg.optim.lr, cfg.episodic.episodes, cfg.loss.text_weight) == (lr, episodes, text_weight)
        assert (cfg.episodic.way, cfg.episodic.shot, cfg.episodic.query) == (5, 1, 5)
        model = cfg.model_config()
        assert (model.backbone, model.pretrained, model.num_frames) == ("ViT-B-16", "openai", 8)
        assert cfg.data.preset == name


def test_m2clip_preset_recipe():
    cfg = load_config("m2clip-k400")
    assert cfg.regime == "supervised" and cfg.optim.name == "adamw"
    assert cfg.optim.weight_decay == 0.01 and cfg.optim.no_decay_bias
    assert cfg.optim.text_adapter_lr_scale == 0.5
    assert cfg.schedule.name == "cosine" and cfg.schedule.warmup_epochs == 2
    global_batch = cfg.supervised.batch_size * cfg.grad_accum
    assert effective_lr(cfg.optim, global_batch) == pytest.approx(1e-3 * global_batch / 256)


def test_overrides_are_parsed_and_type_checked(tmp_path):
    cfg = load_config("synthetic-tiny", overrides=["optim.lr=1e-3", "episodic.way=3", "model.metric=bimhm",
                                                  "data.size=null", "loss.multitask_weights={vc: 2}", "amp=off"])
    assert cfg.amp == "off"  # YAML 1.1 reads "off" as false
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)  # YAML 1.1 reads 1e-3 as a string
    assert cfg.episodic.way == 3
    assert cfg.model["metric"] == "bimhm" and cfg.model_config().metric == "bimhm"
    assert cfg.data.size is None
    assert cfg.loss.multitask_weights == {"vc": 2.0}
    assert parse_override("val.every=0") == ("val.every", 0)

    path = tmp_path / "run.yaml"
    save_config(cfg, path)
    assert load_config(path) == cfg
    assert load_config(str(path), overrides=["seed=7"]).seed == 7


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1e-3", "Did you mean optim.lr"),
    ("optim.lr=fast", "optim.lr must be a number"),
    ("episodic.way=2.5", "episodic.way must be an integer"),
    ("episodic.way=1", "episodic.way must be at least 2"),
    ("optim.name=rmsprop", "optim.name must be one of"),
    ("amp=yes-please", "amp must be one of"),
    ("optim.no_decay_bias=3", "must be true or false"),
    ("model.adapterr=ted", "Did you mean model.adapter"),
    ("model.num_frames=eight", "model.num_frames must be an integer"),
    ("loss.alpha=1.5", "loss.alpha must be in [0, 1]"),
    ("grad_accum=0", "grad_accum must be > 0"),
    ("optim.lr", "is not of the form key=value"),
    ("optim=3", "optim must be a mapping"),
])
def test_bad_overrides_raise_config_error_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config("synthetic-tiny", overrides=[override])


def test_bad_config_sources(tmp_path):
    with pytest.raises(ConfigError, match="neither a YAML file nor a packaged preset.*Did you mean 'ssv2-full'"):
        load_config("ssv2-ful")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(bad)
    invalid_model = tmp_path / "invalid_model.yaml"
    invalid_model.write_text(yaml.safe_dump({"model": {"adapter": "lora"}}))
    with pytest.raises(ConfigError, match="model"):
        load_config(invalid_model)


def test_optimizer_groups_and_warmup_cosine_schedule():
    from torch import nn

    net = nn.ModuleDict({"head": nn.Linear(4, 4), "text_adapter": nn.Linear(4, 4),
                         "visual_adapter": nn.Linear(4, 4)})
    cfg = load_config("m2clip-k400", overrides=["optim.lr_reference_batch=null", "optim.lr=0.1",
                                                "optim.visual_adapter_lr_scale=0.2"])
    optimizer = build_optimizer(net.named_parameters(), cfg.optim, global_batch=64,
                                is_text_adapter=lambda name: name.startswith("text_adapter"),
                                is_visual_adapter=lambda name: name.startswith("visual_adapter"))
    by_name = {group["name"]: group for group in optimizer.param_groups}
    assert by_name["main"]["weight_decay"] == 0.01 and by_name["main_no_decay"]["weight_decay"] == 0.0
    assert by_name["text_adapter"]["lr"] == pytest.approx(0.05) and by_name["main"]["lr"] == pytest.approx(0.1)
    assert by_name["visual_adapter"]["lr"] == pytest.approx(0.02)
    assert by_name["visual_adapter"]["params"] == [net["visual_adapter"].weight]
    with pytest.raises(ConfigError, match="visual_adapter_lr_scale"):
        load_config("m2clip-k400", overrides=["optim.visual_adapter_lr_scale=-1"])

    scheduler = build_scheduler(optimizer, cfg.schedule, total_steps=100, steps_per_epoch=10)  # 20 warm-up steps
    rates = []
    for _ in range(100):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[0] == pytest.approx(0.1 / 20) and rates[19] == pytest.approx(0.1)
    assert all(b <= a + 1e-12 for a, b in zip(rates[19:], rates[20:]))  # cosine decays after warm-up
    assert rates[-1] < 0.001
