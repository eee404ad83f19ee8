"""Config: presets load, flags override, the JSON round trip, impossible settings fail early."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_train import TINY, load_train

from runner import config as rc

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["imagenet", "cifar10", "digits"])
def test_presets_load_and_pass_validation(name):
    cfg = rc.load_preset(ROOT / "configs" / f"{name}.toml")
    rc.validate(replace_device(cfg), cuda_available=True)
    assert cfg.loss.temperature > 0 and cfg.aug.n_large >= 2


def replace_device(cfg):
    return cfg  # presets name cuda; validation is given cuda_available=True


def test_imagenet_preset_has_the_paper_settings():
    cfg = rc.load_preset(ROOT / "configs" / "imagenet.toml")
    assert cfg.model.arch == "resnet50"
    assert (cfg.aug.n_large, cfg.aug.large_size, cfg.aug.n_small, cfg.aug.small_size) == (
        2, 224, 6, 96,
    )  # fmt: skip
    assert cfg.optim.base_lr * 4096 / cfg.optim.lr_batch_ref == pytest.approx(4.8)
    assert cfg.optim.warmup_epochs == 10 and cfg.run.epochs == 500
    assert cfg.loss.temperature == 0.1


def test_flags_override_the_preset():
    train = load_train()
    args = train.build_parser().parse_args(
        ["--config", str(ROOT / "configs" / "digits.toml"), "--batch-size", "7",
         "--no-channels-last", "--large-scale", "0.3,0.9", "--set", "optim.base_lr=0.5",
         "--pipeline", "synthetic"]
    )  # fmt: skip
    cfg = train.resolve_config(args)
    assert cfg.data.batch_size == 7 and cfg.model.channels_last is False
    assert cfg.aug.large_scale == (0.3, 0.9) and cfg.optim.base_lr == 0.5
    assert cfg.data.backend == "synthetic"
    assert cfg.model.arch == "resnet18"  # from the preset


def test_config_json_round_trip(tmp_path):
    cfg = rc.load_preset(ROOT / "configs" / "imagenet.toml")
    rc.save_json(cfg, tmp_path / "config.json")
    assert rc.load_json(tmp_path / "config.json") == cfg


def test_unknown_preset_option_is_named(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[data]\nbatch_sise = 3\n")
    with pytest.raises(rc.ConfigError, match="data.batch_sise"):
        rc.load_preset(bad)


def test_a_preset_key_outside_its_section_or_a_folder_is_named(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("batch_size = 16\n[model]\narch = 'resnet18'\n")
    with pytest.raises(rc.ConfigError, match=r"batch_size = 16 is outside any section; put it "
                       r"under \[data\]"):  # fmt: skip
        rc.load_preset(bad)
    with pytest.raises(rc.ConfigError, match="is a folder; name a preset TOML file"):
        rc.load_preset(tmp_path)


@pytest.mark.parametrize(
    "flags, option",
    [
        (["--classes-per-batch", "20"], "--classes-per-batch"),  # C > classes in the split
        (["--classes-per-batch", "4", "--images-per-class", "9"], "--images-per-class"),  # C*K
        (["--pipeline", "tfrecord"], "--pipeline"),
        (["--crops", "gpu"], "--crops"),
        (["--device", "tpu"], "--device"),
        (["--precision", "fp16"], "--precision fp16"),
        (["--batch-size", "0"], "--batch-size"),
        (["--epochs", "0"], "--epochs"),
        (["--images-per-class", "1"], "--images-per-class 1"),  # SuNCEt without positives
        (["--large-size", "0"], "--large-size"),
        (["--small-size", "4"], "--small-size"),
        (["--large-scale", "1.0,0.08"], "--large-scale"),  # min above max
        (["--small-scale", "0,0.1"], "--small-scale"),
        (["--std", "0,0,0"], "--std"),
        (["--gray-p", "1.5"], "--gray-p"),
        (["--temperature", "0"], "--temperature"),
        (["--sup-temperature", "-1"], "--sup-temperature"),
        (["--no-small-pairs", "--n-large", "0", "--n-small", "2"], "--no-small-pairs"),
        (["--arch", "resnet7"], "--arch: unknown 'resnet7'; choose from resnet101"),
        (["--head-layers", "0"], "--head-layers"),
        (["--temperature", "nan"], "--temperature: must be finite and > 0, got nan"),
        (["--sup-temperature", "inf"], "--sup-temperature: must be finite and > 0, got inf"),
        (["--label-smoothing", "1.5"], "--label-smoothing: must be in [0, 1)"),
        (["--lr-batch-ref", "0"], "--lr-batch-ref: must be >= 1, got 0"),
        (["--base-lr", "-1"], "--base-lr: must be in (0, inf), got -1.0"),
        (["--weight-decay", "-1"], "--weight-decay: must be in [0, inf)"),
        (["--momentum", "2"], "--momentum: must be in [0, 1), got 2.0"),
        (["--warmup-epochs", "-1"], "--warmup-epochs: must be in [0, inf)"),
        (["--seed", "-1"], "--seed: must be in [0, 2**63), got -1"),
        (["--seed", str(2**64)], "--seed: must be in [0, 2**63)"),
        (["--std=nan,1,1"], "--std: every channel's std must be finite and > 0"),
        (["--std=inf,1,1"], "--std: every channel's std must be finite and > 0"),
        (["--mean=inf,0,0"], "--mean: every channel's mean must be finite"),
        (["--color-strength", "nan"], "--color-strength: must be finite and >= 0, got nan"),
        (["--color-strength", "inf"], "--color-strength: must be finite and >= 0, got inf"),
        (["--num-workers", "-1"], "--num-workers: must be >= 1, got -1"),
        (["--pipeline", "dali", "--crops", "host"], "--crops host: chooses where the ffcv"),
        (["--small-size", "64", "--large-size", "32"], "--small-size 64 is above --large-size 32"),
        (["--eval-resize", "16", "--eval-size", "32"], "--eval-size 32 / --eval-resize 16"),
    ],
)
def test_impossible_settings_fail_before_work_naming_the_option(tmp_path, capsys, flags, option):
    out = tmp_path / "run"
    assert load_train().main([*TINY, "--out", str(out), *flags]) == 2
    assert option in capsys.readouterr().err
    assert not (out / "checkpoint.pt").exists()
    assert not (out / "config.json").exists()  # a refused run leaves no run behind


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_cuda_without_cuda_is_refused(tmp_path, capsys):
    assert load_train().main([*TINY, "--out", str(tmp_path / "r"), "--device", "cuda"]) == 2
    assert "--device cuda" in capsys.readouterr().err


def test_one_image_per_class_needs_a_second_view_or_rank_or_simclr():
    cfg = rc.apply(rc.TrainConfig(), {"data": {"images_per_class": 1}}, "t")
    with pytest.raises(rc.ConfigError, match="positives"):
        rc.validate(cfg, False)
    rc.validate(rc.apply(cfg, {"data": {"n_supervised_views": 2}}, "t"), False)
    rc.validate(cfg, False, world_size=2)  # the other rank draws the same classes
    with pytest.raises(rc.ConfigError, match="positives"):
        rc.validate(rc.apply(cfg, {"data": {"per_rank_classes": True}}, "t"), False, world_size=2)
    rc.validate(rc.apply(cfg, {"loss": {"sup_weight": 0.0}}, "t"), False)  # plain SimCLR


def test_global_batch_below_world_size_is_refused():
    cfg = rc.TrainConfig()
    with pytest.raises(rc.ConfigError, match="--batch-size"):
        rc.validate(rc.apply(cfg, {"data": {"batch_size": 1}}, "t"), False, world_size=1)
