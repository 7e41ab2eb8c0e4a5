"""hub_configs validation, publishing, and loading through the Hub code path against local files."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file
from timm.models import generate_default_cfgs
from timm.models._hub import save_for_hf

import edl_timm
from edl_timm import hub
from edl_timm.evaluation import evaluate
from edl_timm.publish import build_release

from conftest import TINY

ROOT = Path(__file__).resolve().parents[1]


def good_config(**over):
    cfg = {
        "hf_hub_id": "edl-timm/edl_resnet18.unit", "architecture": "edl_resnet18", "tag": "unit", "default": True,
        "model_args": {"num_iters": 3}, "dataset": {"id": "uoft-cs/cifar10", "note": "JPEG copy"},
        "threat_model": {"norm": "Linf", "eps": 8 / 255}, "recipe": {"adv": "fgsm", "epochs": 1},
        "metrics": [{"attack": "clean", "accuracy": 50.0, "n": 100, "dataset": "cifar10 test"},
                    {"attack": "pgd", "accuracy": 20.0, "n": 100, "dataset": "cifar10 test", "norm": "Linf", "eps": 8 / 255}],
        "license": "apache-2.0",
    }
    cfg.update(over)
    return cfg


def write(dirpath, cfg, name=None):
    path = Path(dirpath) / (name or f"{cfg['architecture']}.{cfg['tag']}.yaml")
    path.write_text(yaml.safe_dump(cfg))
    return path


# ------------------------------------------------------------------------------- hub_configs

def test_shipped_configs_are_valid_and_registered():
    cfgs = hub.load_hub_configs(known_architectures=timm.list_models("edl_*"))
    for cfg in cfgs:
        name = f"{cfg['architecture']}.{cfg['tag']}"
        assert name in timm.list_pretrained("edl_*"), name
        assert timm.models.get_pretrained_cfg(name).hf_hub_id == cfg["hf_hub_id"]
    # timm lists each tag, and an architecture with a default tag under its bare name too
    tagged = {n for n in timm.list_pretrained("edl_*") if "." in n}
    assert tagged == {f"{c['architecture']}.{c['tag']}" for c in cfgs}
    bare = {n for n in timm.list_pretrained("edl_*") if "." not in n}
    assert bare == {c["architecture"] for c in cfgs if c.get("default")}


def test_valid_config_becomes_timm_tags_with_the_default_first(tmp_path):
    write(tmp_path, good_config(tag="other", default=False, hf_hub_id="edl-timm/other"))
    write(tmp_path, good_config())
    entries = hub.pretrained_cfgs_for(["edl_resnet18"], lambda a: {"num_classes": 10, "url": ""}, tmp_path)
    assert set(entries) == {"edl_resnet18.unit*", "edl_resnet18.other"}
    default = generate_default_cfgs({"edl_resnet18": {"num_classes": 10}, **entries})["edl_resnet18"]
    assert default.tags[0] == "unit" and default.is_pretrained
    assert default.cfgs["unit"].hf_hub_id == "edl-timm/edl_resnet18.unit"
    assert hub.hub_model_args("edl_resnet18", "unit", tmp_path) == {"num_iters": 3}
    assert hub.hub_model_args("edl_resnet18", "unit") == {}  # nothing shipped under that tag


@pytest.mark.parametrize("change, field", [
    ({"hf_hub_id": None}, "'hf_hub_id'"),
    ({"hf_hub_id": "no-slash"}, "'hf_hub_id'"),
    ({"architecture": "resnet18"}, "'architecture'"),
    ({"architecture": "edl_resnet99"}, "'architecture'"),
    ({"metrics": [{"attack": "pgd", "accuracy": 20.0, "n": 100, "dataset": "x"}]}, "'metrics[0].norm'"),
    ({"metrics": [{"attack": "clean", "accuracy": 120.0, "n": 100, "dataset": "x"}]}, "'metrics[0].accuracy'"),
    ({"metrics": [{"attack": "clean", "accuracy": 50.0, "dataset": "x"}]}, "'metrics[0].n'"),
    ({"threat_model": {"norm": "Linf"}}, "'threat_model.eps'"),
])
def test_malformed_config_names_file_and_field(tmp_path, change, field):
    cfg = good_config(**change)
    path = write(tmp_path, cfg, "edl_resnet18.unit.yaml")
    with pytest.raises(hub.HubConfigError) as err:
        hub.load_hub_config(path, known_architectures=timm.list_models("edl_*"))
    assert str(path) in str(err.value) and field in str(err.value)


def test_file_name_must_match_and_one_default_per_architecture(tmp_path):
    path = write(tmp_path, good_config(), "edl_resnet18.wrong.yaml")
    with pytest.raises(hub.HubConfigError, match="must be named edl_resnet18.unit.yaml"):
        hub.load_hub_config(path)
    path.unlink()
    write(tmp_path, good_config())
    write(tmp_path, good_config(tag="second", hf_hub_id="edl-timm/second"))
    with pytest.raises(hub.HubConfigError, match="'default'.*already the default"):
        hub.load_hub_configs(tmp_path)


# ------------------------------------------------------------------------- publish and load

@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache, an unreachable endpoint, and offline mode on."""
    from huggingface_hub import constants

    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(hub, "_REACHABLE", {})
    return cache


@pytest.fixture
def release(tmp_path):
    """A published folder of a small EDL model (num_iters=3, vanilla) with a real report."""
    torch.manual_seed(0)
    model = timm.create_model("edl_resnet18", mode="vanilla", num_iters=3, **TINY).eval()
    train_dir = tmp_path / "train"
    save_for_hf(model, train_dir, model_args=dict(model.edl_cfg), safe_serialization=True)
    x = torch.rand(8, 3, 32, 32)
    report = evaluate(model, x, model(x).argmax(1), source=str(train_dir), autoattack=None, pgd_steps=2,
                      weights_sha256=hub.sha256_file(train_dir / "model.safetensors"),
                      data={"dataset": "uoft-cs/cifar10", "split": "test", "selection": "8 random tensors"})
    out = tmp_path / "release"
    cfg = build_release(train_dir, report, out, "unit", hub_configs_dir=tmp_path / "configs", default=True)
    return model, out, cfg, tmp_path / "configs"


def test_release_folder_is_timm_format_with_card_and_config(release):
    model, out, cfg, configs = release
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "eval_report.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "edl_resnet18"
    assert config["model_args"]["num_iters"] == 3 and config["model_args"]["mode"] == "vanilla"
    # the training output's config, but its pretrained_cfg names the release's tag, not the one the
    # model was built with (timm shows it as model.pretrained_cfg["tag"])
    trained = json.loads((out.parent / "train" / "config.json").read_text())
    assert trained["pretrained_cfg"]["tag"] != "unit" and config["pretrained_cfg"]["tag"] == "unit"
    assert {**trained, "pretrained_cfg": {**trained["pretrained_cfg"], "tag": "unit"}} == config
    assert timm.create_model(f"local-dir:{out}").pretrained_cfg["tag"] == "unit"
    weights = load_file(out / "model.safetensors")
    for k, v in model.state_dict().items():
        assert torch.equal(weights[k], v), k
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "timm" and front["license"] == "apache-2.0"
    metrics = front["model-index"][0]["results"][0]["metrics"]
    assert [m["value"] for m in metrics] == [round(m["accuracy"], 2) for m in cfg["metrics"]]
    for section in ("## Usage", "accelerate launch scripts/train.py", "## Training recipe", "## Results", "## Limitations",
                    "## Citation", "2502.00834"):
        assert section in card
    written = hub.load_hub_config(configs / "edl_resnet18.unit.yaml", timm.list_models("edl_*"))
    assert written["hf_hub_id"] == "edl-timm/edl_resnet18.unit" and written["default"] is True


def test_card_says_what_the_model_and_its_training_are_and_ships_the_audit_plot(tmp_path):
    """A naturally trained plain twin is called that (not "adversarially trained EDL"), its clean row
    counts the larger clean set, the audit lists only the checks it ran, and the plot travels along."""
    torch.manual_seed(0)
    model = timm.create_model("edl_resnet18", mode="none", **TINY).eval()
    train_dir = tmp_path / "train"
    save_for_hf(model, train_dir, model_args={"mode": "none"}, safe_serialization=True)
    (train_dir / "args.json").write_text(json.dumps({"adv": "none", "eps": 8 / 255, "epochs": 3, "lr": 0.1, "seed": 0}))
    (train_dir / "metrics.json").write_text(json.dumps({"images_per_s": 61.26, "train_seconds": 5400.0}))
    x_all = torch.rand(12, 3, 32, 32)
    y_all = model(x_all).argmax(1)
    y_all[:3] = (y_all[:3] + 1) % 1000  # three of twelve wrong: 75% clean on the whole set
    plot = tmp_path / "sweep.png"
    report = evaluate(model, x_all[3:7], y_all[3:7], source=str(train_dir), autoattack=None, pgd_steps=1, do_audit=True,
                      eps_sweep=[0.0, 8 / 255], plot_path=str(plot), clean_set=(x_all, y_all, "all 12 images"),
                      weights_sha256=hub.sha256_file(train_dir / "model.safetensors"),
                      data={"dataset": "uoft-cs/cifar10", "split": "test", "selection": "4 chosen tensors"})
    clean = report["results"][0]
    assert (clean["n"], clean["accuracy"], clean["selection"]) == (12, 75.0, "all 12 images")
    assert all(r["n"] == 4 for r in report["results"][1:]) and report["data"]["n"] == 4
    out = tmp_path / "release"
    cfg = build_release(train_dir, report, out, "twin", hub_configs_dir=tmp_path / "configs",
                        notes="Trained on 2 CPU cores.")
    assert (out / "eps_sweep.png").read_bytes() == plot.read_bytes()
    assert json.loads((out / "eval_report.json").read_text())["audit"]["plot"] == "eps_sweep.png"
    assert cfg["recipe"]["images_per_s"] == 61.3 and cfg["recipe"]["train_hours"] == 1.5
    assert cfg["metrics"][0]["selection"] == "all 12 images"
    card = (out / "README.md").read_text()
    assert "The plain twin of `edl_resnet18`: the same network with ordinary convolutions" in card
    assert "Trained naturally (no adversarial examples) for 3 epochs on uoft-cs/cifar10." in card
    assert "adversarially trained" not in card and "Elastic Dictionary Learning (EDL) layers" not in card
    assert "clean accuracy on all 12 images, the attacks on 4 chosen tensors" in card
    assert "| clean | 12 | 75.00 |" in card and "![PGD accuracy against eps" in card
    assert "- `train_hours`: 1.5\n\nTrained on 2 CPU cores.\n\n## Results" in card
    assert "It ran no transfer attack" in card and "the solver unrolled" not in card  # the twin has no solver
    assert report["audit"]["notes"] == [] and "Note:" not in card
    # an audit's notes (what limits a check, not a sign of masking) are printed after its verdict
    report["audit"]["notes"] = ["the solver unrolled to 4 steps predicts the deployed model's class on only 30.0% of the "
                                "clean images: it is another function"]
    build_release(train_dir, report, tmp_path / "noted", "twin_noted", hub_configs_dir=tmp_path / "configs")
    assert ("It ran no transfer attack (no surrogate was given). Note: The solver unrolled to 4 steps predicts the deployed "
            "model's class on only 30.0% of the clean images: it is another function.") in (tmp_path / "noted" / "README.md").read_text()
    # a report whose plot is not there (made on another machine) still releases, without the plot, and says so
    plot.unlink()
    with pytest.warns(UserWarning, match=r"names the plot .*sweep\.png, which is not there"):
        build_release(train_dir, report, tmp_path / "unplotted", "twin_unplotted", hub_configs_dir=tmp_path / "configs")
    assert not (tmp_path / "unplotted" / "eps_sweep.png").exists()
    assert "plot" not in json.loads((tmp_path / "unplotted" / "eval_report.json").read_text())["audit"]
    assert "![PGD accuracy against eps" not in (tmp_path / "unplotted" / "README.md").read_text()


def _released_model_and_images(release, tmp_path, seed):
    """The release fixture's model, its training folder and weights' sha256, 8 random images and the
    model's own labels for them."""
    model = release[0]
    train_dir = tmp_path / "train"
    torch.manual_seed(seed)
    x = torch.rand(8, 3, 32, 32)
    return model, train_dir, hub.sha256_file(train_dir / "model.safetensors"), x, model(x).argmax(1)


def test_a_release_shows_other_norms_and_corruptions_beside_its_own_threat_model(release, tmp_path):
    """Extra reports of the same weights land in the folder, on the card (their own section: the main
    table keeps the release's threat model) and, the attacks', in the hub config's metrics; reports of
    other weights, or two of one threat model, are refused with nothing written."""
    from edl_timm.evaluation import evaluate_corruptions

    model, train_dir, digest, x, y = _released_model_and_images(release, tmp_path, seed=1)
    data = {"dataset": "uoft-cs/cifar10", "split": "test", "selection": "8 random tensors"}
    main = evaluate(model, x, y, source=str(train_dir), autoattack=None, pgd_steps=2, weights_sha256=digest, data=data)
    l2 = evaluate(model, x, y, source=str(train_dir), norm="L2", autoattack=None, pgd_steps=2, weights_sha256=digest, data=data)
    l1 = evaluate(model, x, y, source=str(train_dir), norm="L1", autoattack=None, pgd_steps=2, weights_sha256=digest, data=data)
    xu = (x * 255).to(torch.uint8)
    corr = evaluate_corruptions(model, xu, y, source=str(train_dir), corruptions=["contrast"], severities=[1, 5],
                                weights_sha256=digest, data=data)
    out = tmp_path / "with_extra"
    cfg = build_release(train_dir, main, out, "extra", extra_reports=[l2, l1, corr])
    assert json.loads((out / "eval_report_L2_0.5.json").read_text()) == l2
    assert json.loads((out / "corruption_report.json").read_text()) == corr
    l2_pgd = next(r for r in l2["results"] if r["attack"] == "pgd")
    assert any(m.get("norm") == "L2" and m["accuracy"] == round(l2_pgd["accuracy"], 2) for m in cfg["metrics"])
    card = (out / "README.md").read_text()
    main_table = card.split("### Other threat models")[0].split("## Results")[1]
    assert "L2" not in main_table and "Linf eps=8/255" in main_table
    other = card.split("### Other threat models and common corruptions")[1]
    assert f"| L2 eps=0.5 | PGD-2, 1 restart(s) | 8 | {l2_pgd['accuracy']:.2f} |" in other
    # an L2 or L1 radius is the number itself (L1 12 is not "3060/255"); an L-inf one is x/255
    l1_pgd = next(r for r in l1["results"] if r["attack"] == "pgd")
    assert f"| L1 eps=12 | PGD-2, 1 restart(s) | 8 | {l1_pgd['accuracy']:.2f} |" in other and "/255 |" not in other
    assert f"| contrast | {corr['per_corruption']['contrast']:.2f} |" in other and "not the published CIFAR-10-C" in other
    stranger = dict(l2, model=dict(l2["model"], weights_sha256="0" * 64))
    for bad, message in [([stranger], "extra report 1 is for weights 000"), ([l2, l2], "extra report 2 repeats")]:
        with pytest.raises((hub.CheckpointError, ValueError), match=message):
            build_release(train_dir, main, tmp_path / "refused", "refused", extra_reports=bad)
        assert not (tmp_path / "refused").exists()


def test_a_report_of_the_releases_own_threat_model_joins_its_report(release, tmp_path):
    """A later evaluation of the same weights, images and threat model (here: the masking audit, run
    after the first report) is not a second file: the release holds one report with both, and its card
    shows the audit's attacks. One that disagrees on a figure measured the same way is refused, with
    nothing written (combine_reports itself: tests/test_evaluation.py)."""
    model, train_dir, digest, x, y = _released_model_and_images(release, tmp_path, seed=2)
    kw = dict(source=str(train_dir), autoattack=None, pgd_steps=2, weights_sha256=digest,
              data={"dataset": "uoft-cs/cifar10", "split": "test", "selection": "8 random tensors"})
    first = evaluate(model, x, y, **kw)
    later = evaluate(model, x, y, do_audit=True, eps_sweep=[0.0, 8 / 255, 0.5], **kw)
    out = tmp_path / "combined"
    build_release(train_dir, first, out, "combined", extra_reports=[later])
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "edl_resnet18.combined.yaml", "eval_report.json",
                                                     "model.safetensors"]  # no second report of the same threat model
    report = json.loads((out / "eval_report.json").read_text())
    assert [(r["attack"], r["accuracy"]) for r in report["results"]] == [(r["attack"], r["accuracy"]) for r in later["results"]]
    assert report["audit"]["eps_sweep"] == later["audit"]["eps_sweep"]
    assert [c["attacks"] for c in report["combined_from"]] == [["clean", "pgd"], ["unrolled", "bpda", "audit"]]
    assert "PGD with a straight-through (BPDA) backward" in (out / "README.md").read_text()
    disagrees = dict(later, results=[dict(r, accuracy=r["accuracy"] + 12.5) if r["attack"] == "pgd" else r
                                     for r in later["results"]])
    with pytest.raises(ValueError, match="disagree on pgd"):
        build_release(train_dir, first, tmp_path / "refused", "refused", extra_reports=[disagrees])
    assert not (tmp_path / "refused").exists()


def test_release_refuses_weights_that_were_not_evaluated(release, tmp_path):
    _, out, _, _ = release
    report = json.loads((out / "eval_report.json").read_text())
    report["model"]["weights_sha256"] = "0" * 64
    with pytest.raises(edl_timm.hub.CheckpointError, match="evaluate these weights"):
        build_release(tmp_path / "train", report, tmp_path / "again", "unit2")
    assert not (tmp_path / "again").exists()


def test_a_publish_that_dies_midway_leaves_no_release_and_no_config(release, tmp_path, monkeypatch):
    """The model card fails after the weights are copied: neither the release folder nor the
    hub_configs file appears (the hidden partial folder is not a release), and the next try,
    which finds the output folder absent, completes it."""
    from edl_timm import publish

    _, out, _, _ = release
    report = json.loads((out / "eval_report.json").read_text())

    def dies(*a, **k):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(publish, "model_card", dies)
    with pytest.raises(KeyboardInterrupt):
        build_release(tmp_path / "train", report, tmp_path / "second", "second", hub_configs_dir=tmp_path / "cfgs")
    assert not (tmp_path / "second").exists() and not (tmp_path / "cfgs" / "edl_resnet18.second.yaml").exists()
    monkeypatch.undo()
    build_release(tmp_path / "train", report, tmp_path / "second", "second", hub_configs_dir=tmp_path / "cfgs")
    assert sorted(p.name for p in (tmp_path / "second").iterdir()) == sorted(p.name for p in out.iterdir())
    assert (tmp_path / "cfgs" / "edl_resnet18.second.yaml").exists()
    assert not list(tmp_path.glob(".*partial"))


def test_a_checkpoint_rebuilds_its_own_layers_not_the_default_tags(tmp_path):
    """A bare edl_resnet18 (T = 2) carries the default tag's pretrained_cfg, which timm saves with
    its weights; that tag's model_args (T = 1) must not fill in what the checkpoint's own model_args
    leave out (an older checkpoint recorded only the given arguments), or the reloaded model
    silently runs another solver on the same weights."""
    if not hub.hub_model_args("edl_resnet18", timm.get_pretrained_cfg("edl_resnet18").tag):
        pytest.skip("edl_resnet18's default tag records no model_args")
    torch.manual_seed(0)
    model = timm.create_model("edl_resnet18", **TINY).eval()
    tag_args = hub.hub_model_args("edl_resnet18", model.pretrained_cfg["tag"])
    assert tag_args.get("num_iters", model.conv1.num_iters) != model.conv1.num_iters, "the test needs a differing tag"
    sparse = {"mode": "elastic", **{k: list(v) for k, v in TINY.items()}}
    save_for_hf(model, tmp_path / "old", model_args=sparse, safe_serialization=True)
    save_for_hf(model, tmp_path / "new", model_args=dict(model.edl_cfg, **TINY), safe_serialization=True)
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        for name in ("old", "new"):
            loaded = hub.create_model(str(tmp_path / name)).eval()
            assert loaded.conv1.num_iters == model.conv1.num_iters, name
            assert torch.equal(loaded(x), expected), name


@pytest.mark.parametrize("how", ["hf-hub", "registry", "local-dir"])
def test_published_folder_loads_offline_identically(release, hf_cache, how):
    model, out, cfg, _ = release
    repo = cfg["hf_hub_id"]
    snapshot = hub.install_into_cache(out, repo)
    assert snapshot.parent.parent.name == "models--edl-timm--edl_resnet18.unit"
    assert (snapshot.parent.parent / "refs" / "main").read_text() == snapshot.name
    assert (snapshot / "model.safetensors").is_symlink()
    if how == "hf-hub":
        loaded = timm.create_model(f"hf-hub:{repo}", pretrained=True)
        again = hub.create_model(f"hf-hub:{repo}")
        assert again.edl_cfg == loaded.edl_cfg
    elif how == "registry":
        loaded = timm.create_model("edl_resnet18", pretrained=True, mode="vanilla", num_iters=3, **TINY,
                                   pretrained_cfg_overlay={"hf_hub_id": repo})
    else:
        loaded = hub.create_model(f"local-dir:{out}")
    loaded.eval()
    assert loaded.edl_cfg["mode"] == "vanilla" and loaded.edl_cfg["num_iters"] == 3
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_no_network_and_nothing_cached_fails_fast_with_remedies(hf_cache, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # "online", but the endpoint refuses connections
    t0 = time.time()
    with pytest.raises(hub.WeightsUnavailableError) as err:
        hub.create_model("hf-hub:edl-timm/edl_resnet18.missing")
    with pytest.raises(hub.WeightsUnavailableError):
        # (edl_resnet34: no release folder in this checkout to fall back on)
        timm.create_model("edl_resnet34", pretrained=True, pretrained_cfg_overlay={"hf_hub_id": "edl-timm/missing"})
    assert time.time() - t0 < 10
    msg = str(err.value)
    for part in ("edl-timm/edl_resnet18.missing", "cannot be reached", "HF_HUB_OFFLINE=1", "local-dir:", "hf download"):
        assert part in msg


def test_offline_and_nothing_cached_names_the_repository(hf_cache):
    with pytest.raises(hub.WeightsUnavailableError, match="'edl-timm/nothing'.*offline mode"):
        hub.create_model("hf-hub:edl-timm/nothing")


def test_hub_unreachable_but_cached_loads_from_cache(release, hf_cache, monkeypatch):
    from huggingface_hub import constants

    model, out, cfg, _ = release
    hub.install_into_cache(out, cfg["hf_hub_id"])
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    loaded = hub.create_model(f"hf-hub:{cfg['hf_hub_id']}").eval()
    assert constants.HF_HUB_OFFLINE is False  # restored after the load
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_truncated_weights_give_a_clear_error(release, hf_cache):
    _, out, cfg, _ = release
    data = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(hub.CheckpointError, match="truncated or corrupted"):
        hub.create_model(f"local-dir:{out}")
    hub.install_into_cache(out, cfg["hf_hub_id"])
    with pytest.raises(hub.CheckpointError, match="truncated or corrupted"):
        hub.create_model(f"hf-hub:{cfg['hf_hub_id']}")
    (out / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!")
    with pytest.raises(hub.CheckpointError, match="truncated or corrupted"):
        hub.create_model(f"local-dir:{out}")


def test_wrong_architecture_and_wrong_shapes_give_clear_errors(release, tmp_path):
    _, out, _, _ = release
    config = json.loads((out / "config.json").read_text())
    plain = dict(config, architecture="resnet18")
    (out / "config.json").write_text(json.dumps(plain))
    with pytest.raises(hub.CheckpointError, match="'resnet18' is not an edl_\\* model"):
        hub.create_model(f"local-dir:{out}")
    wrong = dict(config)
    wrong["model_args"] = dict(config["model_args"], channels=[8, 16, 32, 64])
    (out / "config.json").write_text(json.dumps(wrong))
    with pytest.raises(hub.CheckpointError, match="do not fit the model.*size mismatch"):
        hub.create_model(f"local-dir:{out}")


def test_registry_pretrained_without_weights_says_how_to_load():
    with pytest.raises(RuntimeError, match="no pretrained weights are published for 'edl_resnet34'.*local-dir"):
        timm.create_model("edl_resnet34", pretrained=True)


@pytest.mark.slow
def test_wheel_ships_hub_configs_and_registers_their_tags(tmp_path):
    """Build a wheel from a copy of the repo with one extra config; installed elsewhere, timm lists its
    tag and the EDL layers build and take the fused CPU path."""
    src = tmp_path / "src"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(src)], check=True)
    for rel in ("edl_timm", "hub_configs", "pyproject.toml"):  # the working tree, not only what is committed
        subprocess.run(["rm", "-rf", str(src / rel)], check=True)
        subprocess.run(["cp", "-r", str(ROOT / rel), str(src / rel)], check=True)
    for shipped in (src / "hub_configs").glob("*.yaml"):  # the extra config is the default tag
        shipped.unlink()
    write(src / "hub_configs", good_config())
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path / "dist"), str(src)], check=True)
    wheel = next((tmp_path / "dist").glob("edl_timm-*.whl"))
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)], check=True)
    code = ("import edl_timm, timm, torch; print(edl_timm.__file__); print(timm.list_pretrained('edl_*')); "
            "print(timm.models.get_pretrained_cfg('edl_resnet18').hf_hub_id); "
            "y = edl_timm.EDLConv2d(3, 4, 3)(torch.randn(2, 3, 8, 8, requires_grad=True)); "
            "print(type(y.grad_fn).__name__)")  # the wheel carries the fused kernels' C source
    env = dict(os.environ, PYTHONPATH=str(target), EDL_TIMM_CACHE=str(tmp_path / "kernels"))
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, check=True).stdout
    lines = out.strip().splitlines()
    assert lines[0].startswith(str(target))
    assert "'edl_resnet18.unit'" in lines[1]
    assert lines[2] == "edl-timm/edl_resnet18.unit"
    assert lines[3] == "_FusedSolveBackward"


def test_full_pipeline_train_evaluate_publish_load_offline(tiny_run, cifar_dir, hf_cache, tmp_path):
    """The CPU proof of the release pipeline: a trained output, evaluated, packaged, laid out as a
    Hub download, loaded offline through the Hub code path; its clean accuracy matches the card."""
    from edl_timm.data import load_image_split
    from edl_timm.evaluation import accuracy, pixel_model

    out, _ = tiny_run
    model = hub.create_model(str(out)).eval()
    x, y = load_image_split(str(cifar_dir), "test", subset=64, seed=5)
    report = evaluate(model, x, y, source=str(out), autoattack=None, pgd_steps=3,
                      weights_sha256=hub.sha256_file(out / "model.safetensors"),
                      data={"dataset": str(cifar_dir), "split": "test", "selection": "64 random (seed 5)"})
    cfg = build_release(out, report, tmp_path / "rel", "cpu_proof", hub_configs_dir=tmp_path / "cfgs",
                        dataset_id="uoft-cs/cifar10")
    hub.install_into_cache(tmp_path / "rel", cfg["hf_hub_id"])
    loaded = timm.create_model(f"hf-hub:{cfg['hf_hub_id']}", pretrained=True).eval()
    card = yaml.safe_load((tmp_path / "rel" / "README.md").read_text().split("---")[1])
    card_clean = card["model-index"][0]["results"][0]["metrics"][0]["value"]
    assert abs(accuracy(pixel_model(loaded), x.float() / 255, y) - card_clean) <= 1.0


# ------------------------------------------------------------------------- the Hub's download path and release folders

_LOAD = """
import sys, torch, timm, edl_timm
model = timm.create_model("edl_resnet18", pretrained=True, mode="vanilla", num_iters=3, layers=(1, 1, 1, 1),
                          channels=(16, 32, 64, 128), pretrained_cfg_overlay={"hf_hub_id": sys.argv[1], "tag": "unit"})
torch.save(model.eval()(torch.load(sys.argv[2])).detach(), sys.argv[3])
"""


def _load_in_fresh_process(tmp_path, repo, endpoint, cache, releases):
    """timm.create_model(..., pretrained=True) in a new interpreter whose huggingface_hub reads HF_ENDPOINT
    and the cache location from the environment, as a user's does; returns its logits on a fixed batch."""
    env = dict(os.environ, HF_ENDPOINT=endpoint, HF_HUB_CACHE=str(cache), HF_HOME=str(tmp_path / "hf_home"))
    env.pop("HF_HUB_OFFLINE", None)
    env[hub.RELEASES_ENV] = str(releases)
    x, out = tmp_path / "x.pt", tmp_path / "logits.pt"
    torch.save(torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)), x)
    done = subprocess.run([sys.executable, "-c", _LOAD, repo, str(x), str(out)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out), torch.load(x), done.stderr


def test_pretrained_downloads_through_hf_endpoint_then_loads_from_cache_without_it(release, tmp_path):
    from hub_standin import HubStandIn

    model, out, cfg, _ = release
    repo, cache = cfg["hf_hub_id"], tmp_path / "empty_cache"
    with HubStandIn({repo: out}) as standin:
        logits, x, _ = _load_in_fresh_process(tmp_path, repo, standin.endpoint, cache, tmp_path / "no_releases")
        assert f"GET /{repo}/resolve/main/model.safetensors" in standin.requests
    with torch.no_grad():
        assert torch.equal(logits, model(x))
    blobs = list((cache / ("models--" + repo.replace("/", "--")) / "blobs").iterdir())
    assert hub.sha256_file(out / "model.safetensors") in [b.name for b in blobs]
    # the stand-in is gone: the Hub is unreachable, and the cached download serves the same call
    again, _, _ = _load_in_fresh_process(tmp_path, repo, standin.endpoint, cache, tmp_path / "no_releases")
    assert torch.equal(again, logits)


def test_a_tag_the_hub_does_not_have_loads_its_release_folder(release, tmp_path):
    """Reachable Hub without the repository (not uploaded yet): the release folder serves the tag."""
    import shutil

    from hub_standin import HubStandIn

    model, out, cfg, _ = release
    releases = tmp_path / "releases"
    shutil.copytree(out, releases / "edl_resnet18.unit")
    with HubStandIn({}) as standin:
        logits, x, log = _load_in_fresh_process(tmp_path, cfg["hf_hub_id"], standin.endpoint, tmp_path / "c", releases)
        assert any("model.safetensors" in r for r in standin.requests)  # the Hub was asked first
    assert "loading the release folder" in log
    with torch.no_grad():
        assert torch.equal(logits, model(x))


def test_offline_with_nothing_cached_loads_the_release_folder(release, hf_cache, tmp_path, monkeypatch):
    import shutil

    model, out, cfg, _ = release
    kwargs = dict(mode="vanilla", num_iters=3, **TINY, pretrained_cfg_overlay={"hf_hub_id": cfg["hf_hub_id"], "tag": "unit"})
    with pytest.raises(hub.WeightsUnavailableError):  # no release folder either: the error with its remedies
        timm.create_model("edl_resnet18", pretrained=True, **kwargs)
    monkeypatch.setenv(hub.RELEASES_ENV, str(tmp_path / "releases"))
    shutil.copytree(out, tmp_path / "releases" / "edl_resnet18.unit")
    loaded = timm.create_model("edl_resnet18", pretrained=True, **kwargs).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert not list(hf_cache.iterdir())  # the release is read where it is, not copied into the cache
    (tmp_path / "releases" / "edl_resnet18.unit" / "model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(hub.CheckpointError, match="truncated or corrupted"):
        timm.create_model("edl_resnet18", pretrained=True, **kwargs)


def test_card_says_the_schedule_the_weights_were_trained_with():
    from edl_timm.publish import training_summary

    fast_at = {"adv": "fgsm", "eps": 8 / 255, "epochs": 15, "lr": 0.2, "schedule": "triangle", "momentum": 0.9,
               "peak_momentum": 0.8}
    assert training_summary(fast_at) == (
        "adversarially trained with FGSM and a random start (L-inf eps 8/255) for 15 epochs, the learning rate rising "
        "linearly from 0 to 0.2 at the middle of the run and falling back to 0 at its end (fast-AT's cyclic schedule), "
        "with the momentum moving from 0.9 to 0.8 at the peak")
    released = {"adv": "fgsm", "eps": 8 / 255, "epochs": 5, "lr": 0.1, "schedule": "cosine", "warmup_epochs": 1.0}
    assert training_summary(released).endswith("for 5 epochs, a cosine learning-rate schedule from 0.1 after a linear "
                                               "warm-up of 1 epoch")
    assert training_summary(dict(released, schedule="step", warmup_epochs=0.5)).endswith(
        "a learning rate of 0.1 divided by 10 every third of the run after a linear warm-up of 0.5 epochs")
