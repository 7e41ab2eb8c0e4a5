"""A user's mistakes, as a user makes them on the command line: each command refuses before it
computes or writes, names the argument or file at fault and what to do, and leaves every file on
disk as it was (compared byte for byte). Most cases call the command's main in this process
(conftest.run_main); the corrupt-checkpoint cases run the command as a subprocess, where an
uncaught error would reach the user as a traceback."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY, default_release, run_main, script

ROOT = Path(__file__).resolve().parents[1]
TINY_ARGS = ["layers=(1,1,1,1)", "channels=(16,32,64,128)"]


def run(script, *args):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, str(ROOT / "scripts" / script), *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=900)


def tree(path: Path):
    """Every file and folder under path with its bytes: what 'nothing changed' compares."""
    return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else None) for p in sorted(path.rglob("*"))}


def train_args(cifar_dir, out, *extra):
    return ["--model", "edl_resnet18", "--model-kwargs", *TINY_ARGS, "--dataset", cifar_dir, "--output-dir", out,
            "--train-subset", "64", "--eval-subset", "16", "--batch-size", "16", "--epochs", "1", "--quiet", *extra]


@pytest.fixture(scope="module")
def finished(cifar_dir, tmp_path_factory):
    """A finished tiny run (2 epochs, so a checkpoint of epoch 1 stays beside its weights)."""
    from edl_timm.training import TrainConfig, train

    out = tmp_path_factory.mktemp("finished")
    train(TrainConfig(model="edl_resnet18", model_kwargs=dict(TINY), dataset=str(cifar_dir), output_dir=str(out),
                      train_subset=64, eval_subset=16, batch_size=16, epochs=2, quiet=True))
    return out


@pytest.mark.parametrize("extra, message", [
    (["--epochs", "0"], "--epochs must be at least 1 (a run of 0 epochs trains nothing), got 0"),
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["--lr", "-1"], "--lr must be 0 or more, got -1.0"),
    (["--eps", "300"], "--eps must be in (0, 1) pixels, e.g. 8/255 (a value above 1 is read as x/255), got 1.17647"),
    (["--eps", "-1"], "--eps must be in (0, 1) pixels"),
    (["--momentum", "1"], "--momentum must be in [0, 1), got 1.0"),
    (["--max-steps", "0"], "--max-steps must be at least 1, got 0"),
    (["--adv", "pgd", "--steps", "0"], "--steps must be at least 1 for --adv pgd, got 0"),
    (["--model-kwargs", "num_iter=2"], "--model-kwargs: edl_resnet18 takes no argument 'num_iter'; did you mean 'num_iters'?"),
])
def test_train_refuses_bad_numbers_and_arguments_before_anything_is_built(cifar_dir, tmp_path, extra, message, capsys):
    cli = script("train.py")
    args = train_args(cifar_dir, tmp_path / "out")
    if extra[0] == "--model-kwargs":  # replaces the tiny model's kwargs
        args[args.index("--model-kwargs") + 1:args.index("--model-kwargs") + 3] = []
    assert cli.main([*map(str, args), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err, err[-2000:]
    assert not (tmp_path / "out").exists()


def test_train_never_overwrites_a_run_or_a_folder_it_did_not_make(cifar_dir, tmp_path, finished, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    (run_dir / "notes.txt").write_text("mine")
    before = tree(run_dir)
    status, err = run_main(capsys, "train.py", *train_args(cifar_dir, run_dir))
    assert status == 2 and f"--output-dir {run_dir} holds a finished run (metrics.json)" in err
    assert "pass --overwrite" in err and tree(run_dir) == before
    status, err = run_main(capsys, "train.py", *train_args(cifar_dir, run_dir, "--resume", "auto"))
    assert status == 2 and "holds a finished run" in err and tree(run_dir) == before
    # an unfinished run (no metrics.json): continue it or start over, never silently mix the two
    (run_dir / "metrics.json").unlink()
    before = tree(run_dir)
    status, err = run_main(capsys, "train.py", *train_args(cifar_dir, run_dir))
    assert status == 2 and "holds an unfinished run: pass --resume auto to continue it" in err
    assert tree(run_dir) == before
    # a folder of someone else's files, with or without --overwrite
    other = tmp_path / "other"
    other.mkdir()
    (other / "thesis.tex").write_text("years of work")
    for extra in ([], ["--overwrite"]):
        status, err = run_main(capsys, "train.py", *train_args(cifar_dir, other, *extra))
        assert status == 2 and "is not empty and holds no training run" in err
        assert tree(other) == {"thesis.tex": b"years of work"}
    # --overwrite starts over: the old run's files go, the user's own file stays
    status, err = run_main(capsys, "train.py", *train_args(cifar_dir, run_dir, "--overwrite"))
    assert status == 0, err[-2000:]
    assert (run_dir / "notes.txt").read_text() == "mine" and (run_dir / "metrics.json").exists()
    assert not (run_dir / "checkpoints").exists()  # the 1-epoch rerun has none; the old run's are gone
    assert json.loads((run_dir / "args.json").read_text())["epochs"] == 1


def test_a_truncated_checkpoint_is_named_with_what_to_do(cifar_dir, tmp_path, finished):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    ckpt = next((finished / "checkpoints").glob("step_*"))
    shutil.copytree(ckpt, run_dir / "checkpoints" / ckpt.name)
    weights = next((run_dir / "checkpoints" / ckpt.name).glob("model*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    before = tree(run_dir)
    args = train_args(cifar_dir, run_dir, "--resume", "auto")
    args[args.index("--epochs") + 1] = "2"
    res = run("train.py", *args)
    assert res.returncode == 2, res.stderr[-2000:]
    assert f"checkpoint {run_dir / 'checkpoints' / ckpt.name} cannot be loaded" in res.stderr
    assert "Delete that folder to resume from the checkpoint before it" in res.stderr and "Traceback" not in res.stderr
    assert tree(run_dir) == before


@pytest.mark.parametrize("extra, message", [
    (["--n", "0"], "--n must be at least 1, got 0"),
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["--eps", "300"], "--eps must be above 0 and below 1 in [0, 1] pixels (e.g. 8/255; a value above 1 is read as "
                       "x/255), got 1.17647"),
    (["--eps", "-1"], "--eps must be above 0 and below 1"),
    (["--steps", "0"], "--steps must be at least 1, got 0"),
    (["--step-size", "0"], "--step-size must be above 0, got 0"),
])
def test_evaluate_refuses_bad_numbers_before_it_loads_or_writes(cifar_dir, finished, extra, message, capsys):
    before = tree(finished)
    with pytest.raises(SystemExit) as exit_:  # argparse's error: the usage, the message, exit 2
        script("evaluate.py").main(["--model", str(finished), "--dataset", str(cifar_dir), "--autoattack", "none", *extra])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err, err[-2000:]
    assert tree(finished) == before  # no progress file, no report


def test_evaluate_never_replaces_a_file_that_is_not_this_models_report(cifar_dir, tmp_path, finished, capsys):
    readme = tmp_path / "README.md"
    shutil.copyfile(ROOT / "README.md", readme)
    common = ["--model", finished, "--dataset", cifar_dir, "--n", "8", "--steps", "1", "--autoattack", "none", "--quiet"]
    status, err = run_main(capsys, "evaluate.py", *common, "--output", readme)
    assert status == 2 and f"--output {readme} exists and is not an evaluation report" in err
    assert readme.read_bytes() == (ROOT / "README.md").read_bytes()
    other = tmp_path / "other_report.json"
    report = json.loads((default_release()[1] / "eval_report.json").read_text())
    other.write_text(json.dumps(report))
    before = other.read_bytes()
    status, err = run_main(capsys, "evaluate.py", *common, "--output", other)
    assert status == 2 and f"--output {other} is the report of other weights" in err
    assert other.read_bytes() == before and not list(tmp_path.glob("*.progress.json"))
    # the same weights' report is replaced by the new one
    mine = tmp_path / "mine.json"
    assert run_main(capsys, "evaluate.py", *common, "--output", mine)[0] == 0
    assert run_main(capsys, "evaluate.py", *common[:-1], "--output", mine)[0] == 0


def test_evaluate_refuses_labels_outside_the_models_classes(cifar_dir, tmp_path, capsys):
    import timm
    from timm.models._hub import save_for_hf

    import edl_timm  # noqa: F401  (registers the models; run alone, nothing else has imported it)

    model = timm.create_model("edl_resnet18", num_classes=5, **TINY)
    save_for_hf(model, tmp_path / "five", model_args=dict(TINY, num_classes=5), safe_serialization=True)
    status, err = run_main(capsys, "evaluate.py", "--model", tmp_path / "five", "--dataset", cifar_dir, "--n", "8",
                           "--autoattack", "none")
    assert status == 2
    assert "labels of split 'test' range over [0, 9] but the model has 5 classes" in err
    assert sorted(p.name for p in (tmp_path / "five").iterdir()) == ["config.json", "model.safetensors"]


def test_push_to_hub_dry_run_never_rewrites_a_published_tag_or_the_checkout(tmp_path, finished, cifar_dir, capsys):
    report = tmp_path / "report.json"
    assert run_main(capsys, "evaluate.py", "--model", finished, "--dataset", cifar_dir, "--n", "8", "--steps", "1",
                    "--autoattack", "none", "--output", report, "--quiet")[0] == 0
    configs = tmp_path / "configs"
    configs.mkdir()
    published = default_release()[0]  # the shipped default tag's config
    tag = published.stem.split(".", 1)[1]
    shutil.copyfile(published, configs / published.name)
    before, checkout = tree(configs), tree(ROOT / "hub_configs")
    common = ["--train-dir", finished, "--eval-report", report, "--tag", tag, "--dataset-id", "uoft-cs/cifar10",
              "--dry-run"]
    status, err = run_main(capsys, "push_to_hub.py", *common, "--output-dir", tmp_path / "rel",
                           "--hub-configs-dir", configs)
    assert status == 2 and f"{published.name} exists: the tag '{tag}' is already published" in err
    assert tree(configs) == before and not (tmp_path / "rel").exists()
    # without --hub-configs-dir the hub config goes into the release folder only, never into the checkout
    status, err = run_main(capsys, "push_to_hub.py", *common, "--output-dir", tmp_path / "rel")
    assert status == 0, err[-2000:]
    assert (tmp_path / "rel" / published.name).exists() and tree(ROOT / "hub_configs") == checkout
    # replacing a published tag's config takes the flag that says so
    status, err = run_main(capsys, "push_to_hub.py", *common, "--output-dir", tmp_path / "rel2",
                           "--hub-configs-dir", configs, "--replace-hub-config")
    assert status == 0 and tree(configs) != before
    # a report that is not one
    status, err = run_main(capsys, "push_to_hub.py", *common, "--output-dir", tmp_path / "rel3",
                           "--eval-report", ROOT / "README.md")
    assert status == 2 and "is not an evaluation report of scripts/evaluate.py" in err
    assert not (tmp_path / "rel3").exists()


def test_a_checkpoint_with_a_broken_config_is_named_by_train_and_evaluate(cifar_dir, tmp_path, finished):
    model = tmp_path / "model"
    shutil.copytree(finished, model)
    (model / "config.json").write_text('{"architecture": "edl_resnet18",')
    before = tree(model)
    for res in (run("train.py", *train_args(cifar_dir, tmp_path / "out"), "--model", model),
                run("evaluate.py", "--model", model, "--dataset", cifar_dir, "--n", "8", "--autoattack", "none")):
        assert res.returncode == 2, res.stderr[-2000:]
        assert f"{model / 'config.json'} is not valid JSON" in res.stderr and "Traceback" not in res.stderr
    assert tree(model) == before and not (tmp_path / "out").exists()
