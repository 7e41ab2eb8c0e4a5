import os

import pytest


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", default=False, help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="slow test: run with --slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


from pathlib import Path  # noqa: E402

CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"
# a narrow ResNet-18 with one block per stage: trains in seconds on a CPU
TINY = {"layers": (1, 1, 1, 1), "channels": (16, 32, 64, 128)}
ROOT = Path(__file__).resolve().parents[1]


def default_release(architecture="edl_resnet18"):
    """The shipped release of ``architecture``'s default tag: (its hub config file, its release folder),
    read from hub_configs/ so that tests follow the release that ships rather than a tag name."""
    import yaml

    for path in sorted((ROOT / "hub_configs").glob(f"{architecture}.*.yaml")):
        cfg = yaml.safe_load(path.read_text())
        if cfg.get("default"):
            return path, ROOT / "releases" / path.stem
    raise LookupError(f"hub_configs/ has no default tag for {architecture}")


def script(name: str):
    """scripts/<name> as a module, to call its main in this process (the same code as the command,
    without starting Python and importing torch once per case)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name[:-3] + "_cli", ROOT / "scripts" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_main(capsys, name: str, *args):
    """(exit status, stderr) of ``python scripts/<name> ARGS``, run in this process: its main returns
    the status or argparse exits with it. A subprocess costs about 9 s here in imports alone
    (torch, timm and the torchvision that timm's fx helpers load), so the tests of a command's
    refusals use this; the corrupt-checkpoint tests and the slow tests of tests/test_scripts.py and
    tests/test_hub.py still run the commands as subprocesses."""
    capsys.readouterr()  # what came before is not this command's
    try:
        status = script(name).main([str(a) for a in args])
    except SystemExit as e:
        status = e.code
    return status, capsys.readouterr().err


def pytest_sessionstart(session):
    """In CI (CI set, as .ci/run sets it) a run that would skip the data tests or the fused path is
    not green: it stops at once and says why. Elsewhere those tests skip with their reason (-rs)."""
    if not os.environ.get("CI"):
        return
    from edl_timm.layers import _fused

    problems = []
    if not CIFAR.is_dir():
        problems.append(f"real CIFAR-10 not found at {CIFAR} (the parquet copy the data tests read)")
    if _fused.library() is None:
        problems.append(f"the fused CPU kernels could not be built ({_fused._load_failed})")
    if problems:
        pytest.exit("CI: " + "; ".join(problems), returncode=1)


@pytest.fixture(scope="session")
def cifar_dir():
    if not CIFAR.is_dir():
        pytest.skip(f"real CIFAR-10 not found at {CIFAR}")
    return CIFAR


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, cifar_dir):
    """A tiny EDL ResNet trained for 2 epochs (128 steps) on 2,048 CIFAR-10 images (about 30 s): a real model
    for the evaluation and publishing tests."""
    from edl_timm.training import TrainConfig, train

    out = tmp_path_factory.mktemp("tiny_run")
    cfg = TrainConfig(model="edl_resnet18", model_kwargs=dict(TINY), dataset=str(cifar_dir), output_dir=str(out),
                      train_subset=2048, eval_subset=64, epochs=2, batch_size=32, lr=0.05, eval_pgd_steps=2, quiet=True)
    metrics = train(cfg)
    return out, metrics
