"""Common corruptions: the CIFAR-10-C reader on a fixture in its layout, each generated corruption
against an independent computation of what defines it, and the whole path through the CLI."""
import colorsys
import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import edl_timm
from edl_timm.corruptions import GENERATED, CorruptionDataError, generate, read_cifar10c
from edl_timm.evaluation import accuracy, pixel_model

ROOT = Path(__file__).resolve().parents[1]


def write_layout(folder: Path, per: int = 6, corruptions=("gaussian_noise", "contrast"), size=32):
    """A folder in CIFAR-10-C's layout whose every image says what it is: pixel (0, 0) holds the
    corruption's number, (0, 1) the severity, (0, 2) the image's index in its block."""
    folder.mkdir(parents=True, exist_ok=True)
    labels = np.tile(np.arange(per) % 10, 5).astype(np.uint8)
    np.save(folder / "labels.npy", labels)
    for k, c in enumerate(corruptions):
        imgs = np.zeros((5 * per, size, size, 3), np.uint8)
        for s in range(5):
            for i in range(per):
                imgs[s * per + i, 0, :3, 0] = (k, s + 1, i)
        np.save(folder / f"{c}.npy", imgs)
    return labels[:per]


def test_the_reader_takes_each_severity_block_and_the_subset_from_the_layout(tmp_path):
    labels = write_layout(tmp_path / "c")
    sets, y = read_cifar10c(tmp_path / "c", ["gaussian_noise", "contrast"], [2, 5], subset=torch.tensor([4, 1]))
    assert sorted(sets) == [("contrast", 2), ("contrast", 5), ("gaussian_noise", 2), ("gaussian_noise", 5)]
    assert y.tolist() == [labels[4], labels[1]]
    for (c, s), imgs in sets.items():
        assert imgs.shape == (2, 3, 32, 32) and imgs.dtype == torch.uint8
        k = ["gaussian_noise", "contrast"].index(c)
        assert imgs[:, 0, 0, :3].tolist() == [[k, s, 4], [k, s, 1]]


@pytest.mark.parametrize("damage, message", [
    ("missing", "contrast.npy is missing (the folder has gaussian_noise.npy, labels.npy)"),
    ("shape", "contrast.npy holds uint8 (29, 32, 32, 3), expected uint8 (30, H, W, 3): 5 severities x 6 images"),
    ("dtype", "contrast.npy holds float32 (30, 32, 32, 3), expected uint8"),
    ("labels", "labels.npy holds uint8 (31,), expected integer labels for 5 severities"),
    ("order", "labels.npy: the labels of severity 3 differ from those of severity 1"),
    ("not npy", "contrast.npy is not a readable .npy file"),
])
def test_a_damaged_folder_is_refused_naming_the_file(tmp_path, damage, message):
    folder = tmp_path / "c"
    write_layout(folder)
    if damage == "missing":
        (folder / "contrast.npy").unlink()
    elif damage == "shape":
        np.save(folder / "contrast.npy", np.zeros((29, 32, 32, 3), np.uint8))
    elif damage == "dtype":
        np.save(folder / "contrast.npy", np.zeros((30, 32, 32, 3), np.float32))
    elif damage == "labels":
        np.save(folder / "labels.npy", np.zeros(31, np.uint8))
    elif damage == "order":
        labels = np.load(folder / "labels.npy")
        labels[12] += 1
        np.save(folder / "labels.npy", labels)
    else:
        (folder / "contrast.npy").write_text("not an array")
    with pytest.raises(CorruptionDataError, match="(?s)" + message.replace("(", r"\(").replace(")", r"\)")):
        read_cifar10c(folder, ["gaussian_noise", "contrast"])


def test_severities_out_of_range_and_unknown_corruptions_are_refused(tmp_path):
    write_layout(tmp_path / "c")
    with pytest.raises(CorruptionDataError, match=r"severities are 1 to 5, got \[0, 2\]"):
        read_cifar10c(tmp_path / "c", ["contrast"], [0, 2])
    x = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    with pytest.raises(CorruptionDataError, match="severities are 1 to 5, got \\[6\\]"):
        generate(x, "contrast", 6)
    with pytest.raises(CorruptionDataError, match="cannot generate 'fog'.*need CIFAR-10-C's published files"):
        generate(x, "fog", 1)


# ---------------------------------------------------------------------------------------------
# generated corruptions, each against what defines it

def grey(n=64, value=128, size=32):
    return torch.full((n, 3, size, size), value, dtype=torch.uint8)


@pytest.mark.parametrize("name", sorted(GENERATED))
def test_a_generated_corruption_is_reproducible_and_seeded(name):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (8, 3, 32, 32), generator=g, dtype=torch.uint8)
    a, b = generate(x, name, 3, seed=1), generate(x, name, 3, seed=1)
    assert torch.equal(a, b) and a.dtype == torch.uint8 and a.shape == x.shape
    if "noise" in name:
        assert not torch.equal(a, generate(x, name, 3, seed=2))


def test_a_new_corruption_does_not_redraw_the_others(monkeypatch):
    """A generated set is reproducible across versions that add corruptions: the draws of one depend
    on its own name, not on its place among the others."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (8, 3, 32, 32), generator=g, dtype=torch.uint8)
    before = {name: generate(x, name, 2, seed=0) for name in ("gaussian_noise", "impulse_noise", "shot_noise")}
    # a name that sorts before all of them would shift every index in the table
    monkeypatch.setitem(GENERATED, "a_new_noise", GENERATED["gaussian_noise"])
    for name, images in before.items():
        assert torch.equal(generate(x, name, 2, seed=0), images), name
    # and two corruptions with the same primitive and parameters still draw different noise
    assert not torch.equal(generate(x, "a_new_noise", 2, seed=0), before["gaussian_noise"])


@pytest.mark.parametrize("severity, sigma", [(1, 0.04), (5, 0.10)])
def test_gaussian_noise_adds_cifar10c_sigma(severity, sigma):
    out = generate(grey(), "gaussian_noise", severity).double() / 255
    noise = out - 128 / 255
    # truncation to uint8 takes half a level off on average
    assert noise.mean().item() == pytest.approx(-0.5 / 255, abs=0.002)
    assert noise.std().item() == pytest.approx(sigma, rel=0.03)


def test_shot_noise_is_poisson_with_cifar10c_photon_counts():
    for severity, photons in [(1, 500), (5, 50)]:
        out = generate(grey(), "shot_noise", severity).double() / 255
        p = 128 / 255
        assert out.var().item() == pytest.approx(p / photons, rel=0.05)  # Poisson(p c) / c: variance p / c


def test_impulse_noise_sets_a_cifar10c_fraction_to_black_or_white_half_each():
    for severity, amount in [(1, 0.01), (5, 0.07)]:
        out = generate(grey(), "impulse_noise", severity)
        white, black = (out == 255).double().mean().item(), (out == 0).double().mean().item()
        assert white + black == pytest.approx(amount, rel=0.06)
        assert white == pytest.approx(black, rel=0.15)
        assert ((out == 128) | (out == 0) | (out == 255)).all()


def test_contrast_scales_each_channels_deviation_from_its_mean():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(80, 176, (4, 3, 32, 32), generator=g, dtype=torch.uint8)  # no clipping
    xd = x.double() / 255
    mean = xd.mean(dim=(2, 3), keepdim=True)
    for severity, c in [(1, 0.75), (5, 0.15)]:
        want = torch.floor(((xd - mean) * c + mean) * 255)
        assert (generate(x, "contrast", severity).double() - want).abs().max() <= 1


def test_brightness_matches_hsv_value_shift_of_colorsys():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (2, 3, 6, 6), generator=g, dtype=torch.uint8)
    x[0, :, 0, 0] = 0  # black
    for severity, c in [(1, 0.05), (5, 0.3)]:
        out = generate(x, "brightness", severity)
        for n, i, j in [(0, 0, 0), (0, 2, 3), (1, 5, 5), (1, 1, 4)]:
            h, s, v = colorsys.rgb_to_hsv(*(x[n, :, i, j].double() / 255).tolist())
            want = [int(np.floor(t * 255)) for t in colorsys.hsv_to_rgb(h, s, min(v + c, 1.0))]
            assert all(abs(a - b) <= 1 for a, b in zip(out[n, :, i, j].tolist(), want)), (n, i, j)


def test_gaussian_blur_is_a_gaussian_kernel_with_replicated_edges():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (2, 3, 16, 16), generator=g, dtype=torch.uint8)
    sigma = 1.0  # severity 5
    r = int(4 * sigma + 0.5)
    t = torch.arange(-r, r + 1, dtype=torch.float64)
    k = torch.exp(-t ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    xd = F.pad(x.double() / 255, (r, r, r, r), mode="replicate")
    blurred = F.conv2d(xd.reshape(-1, 1, *xd.shape[2:]), (k[:, None] * k[None, :])[None, None]).reshape(x.shape)
    assert (generate(x, "gaussian_blur", 5).double() - torch.floor(blurred * 255)).abs().max() <= 1


@pytest.mark.parametrize("name", ["zoom_blur", "pixelate", "gaussian_blur", "contrast"])
def test_a_constant_image_stays_constant_under_blur_and_contrast(name):
    out = generate(grey(2, 100), name, 5)
    assert (out.int() - 100).abs().max() <= 1


def test_jpeg_compression_is_a_pillow_round_trip_at_cifar10c_quality():
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (2, 3, 32, 32), generator=g, dtype=torch.uint8)
    out = generate(x, "jpeg_compression", 5)
    buf = io.BytesIO()
    Image.fromarray(x[1].permute(1, 2, 0).numpy()).save(buf, "JPEG", quality=40)
    assert torch.equal(out[1], torch.from_numpy(np.array(Image.open(buf))).permute(2, 0, 1))
    assert not torch.equal(out, generate(x, "jpeg_compression", 1))


# ---------------------------------------------------------------------------------------------
# the CLI

def evaluate_cli(*args):
    """scripts/evaluate.py's main in this process, on these arguments."""
    spec = importlib.util.spec_from_file_location("evaluate_cli", ROOT / "scripts" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main([str(a) for a in args])


def test_generated_corruptions_through_the_cli_match_an_independent_measurement(tiny_run, cifar_dir, tmp_path):
    from edl_timm.data import load_image_split, select_subset

    out = tmp_path / "c.json"
    assert evaluate_cli(*["--model", tiny_run[0], "--dataset", cifar_dir, "--n", "24", "--corruptions", "generated",
                       "--corruption-names", "gaussian_noise", "contrast", "--severities", "1", "5", "--output", out,
                       "--quiet"]) == 0
    report = json.loads(out.read_text())
    assert report["schema"] == "edl-timm/corruption-report/1" and report["data"]["n"] == 24
    assert "not the published CIFAR-10-C files" in report["data"]["corruptions"] and not report["data"]["cifar10c"]
    assert out.with_suffix(".png").exists() and not out.with_name("c.progress.json").exists()
    model = edl_timm.hub.create_model(str(tiny_run[0])).eval()
    x, y = load_image_split(str(cifar_dir), "test")
    keep = select_subset(y, 24, 0)
    x, y = x[keep], y[keep]
    net = pixel_model(model)
    for r in report["results"]:
        assert r["accuracy"] == accuracy(net, generate(x, r["corruption"], r["severity"], 0).float() / 255, y)
    assert report["clean"] == accuracy(net, x.float() / 255, y)
    means = {c: np.mean([r["accuracy"] for r in report["results"] if r["corruption"] == c]) for c in ("gaussian_noise", "contrast")}
    assert report["per_corruption"] == pytest.approx(means)
    assert report["mean"] == pytest.approx(np.mean([r["accuracy"] for r in report["results"]]))


def test_a_cifar10c_folder_through_the_cli(tiny_run, cifar_dir, tmp_path):
    folder = tmp_path / "CIFAR-10-C"
    write_layout(folder, per=12)
    out = tmp_path / "c.json"
    assert evaluate_cli(*["--model", tiny_run[0], "--dataset", cifar_dir, "--n", "12", "--corruptions", folder,
                       "--corruption-names", "contrast", "--severities", "2", "--output", out, "--quiet"]) == 0
    report = json.loads(out.read_text())
    assert report["data"]["cifar10c"] and report["data"]["corruptions"].startswith("CIFAR-10-C")
    sets, y = read_cifar10c(folder, ["contrast"], [2])
    net = pixel_model(edl_timm.hub.create_model(str(tiny_run[0])).eval())
    assert report["results"] == [{"corruption": "contrast", "severity": 2,
                                  "accuracy": accuracy(net, sets[("contrast", 2)].float() / 255, y)}]


@pytest.mark.parametrize("args, message", [
    (["--corruptions", "generated", "--corruption-names", "fog"], "--corruption-names: fog not generated; choose from"),
    (["--corruptions", "generated", "--severities", "0", "3"], "--severities are 1 to 5, got 0"),
    (["--corruptions", "generated", "--audit"], "--audit and --surrogate are for attacks"),
    (["--corruptions", "nowhere/CIFAR-10-C"], "--corruptions nowhere/CIFAR-10-C: no such folder"),
    (["--corruption-names", "contrast"], "--corruption-names needs --corruptions"),
])
def test_the_cli_refuses_bad_corruption_arguments_before_it_loads_anything(tmp_path, args, message, capsys):
    with pytest.raises(SystemExit) as e:
        evaluate_cli(*["--model", "edl_resnet18", "--output", tmp_path / "c.json", *args])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_a_folder_missing_a_file_fails_through_the_cli_with_nothing_written(tiny_run, cifar_dir, tmp_path, capsys):
    folder = tmp_path / "CIFAR-10-C"
    write_layout(folder, per=12)
    out = tmp_path / "out" / "c.json"
    assert evaluate_cli(*["--model", tiny_run[0], "--dataset", cifar_dir, "--n", "12", "--corruptions", folder,
                       "--corruption-names", "contrast", "fog", "--output", out, "--quiet"]) == 2
    assert "fog.npy is missing" in capsys.readouterr().err
    assert not out.parent.exists() or not any(out.parent.iterdir())
