"""The shipped releases: every hub_configs file has its release folder (and the reverse), and each
release loads offline through ``pretrained=True`` with the accuracy its card states."""
from pathlib import Path

import pytest
import timm
import torch

from edl_timm import hub
from edl_timm.data import load_image_split
from edl_timm.evaluation import accuracy, pixel_model

ROOT = Path(__file__).resolve().parents[1]
RELEASES = sorted(p.name for p in (ROOT / "releases").iterdir() if p.is_dir()) if (ROOT / "releases").is_dir() else []
CONFIGS = sorted(p.stem for p in hub.hub_config_files(ROOT / "hub_configs"))


def test_every_hub_config_has_its_release_folder_and_the_reverse():
    assert RELEASES == CONFIGS


def test_releases_stay_small():
    total = sum(p.stat().st_size for p in (ROOT / "releases").rglob("*") if p.is_file()) if RELEASES else 0
    assert total < 100 * 2**20, f"releases/ holds {total / 2**20:.0f} MB; the limit is 100 MB"


@pytest.mark.parametrize("name", RELEASES)
def test_release_loads_offline_with_its_cards_clean_accuracy(name, cifar_dir, tmp_path, monkeypatch):
    from huggingface_hub import constants

    # no network and an empty cache: the tag must come from its release folder in this checkout
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.delenv(hub.RELEASES_ENV, raising=False)
    cfg = hub.load_hub_config(ROOT / "hub_configs" / f"{name}.yaml")
    model = timm.create_model(f"{cfg['architecture']}.{cfg['tag']}", pretrained=True)
    stated = next(m for m in cfg["metrics"] if m["attack"] == "clean")["accuracy"]
    images, labels = load_image_split(str(cifar_dir), "test", subset=1000, seed=0)
    measured = accuracy(pixel_model(model), images.float() / 255, labels)
    assert abs(measured - stated) <= 4.0, f"{name}: {measured:.1f}% clean on 1,000 random test images, card says {stated}%"
