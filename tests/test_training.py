"""Training with accelerate: objectives, bad input, fine-tuning, multi-process and exact resume."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file
from timm.models._hub import save_for_hf

from edl_timm.attacks import Normalized, pgd_step_size
from edl_timm.data import load_image_split
from edl_timm.objectives import objective_loss
from edl_timm.training import TrainConfig, TrainingInputError, train

from conftest import TINY, run_main

ROOT = Path(__file__).resolve().parents[1]
TINY_ARGS = ["layers=(1,1,1,1)", "channels=(16,32,64,128)"]


@pytest.fixture(scope="module")
def batch(cifar_dir):
    x, y = load_image_split(str(cifar_dir), "train", subset=32, seed=3)
    return x.float() / 255, y


@pytest.mark.parametrize("adv", ["none", "fgsm", "nfgsm", pytest.param("pgd", marks=pytest.mark.slow),
                                 pytest.param("trades", marks=pytest.mark.slow)])
def test_each_objective_lowers_its_loss(batch, adv):
    torch.manual_seed(0)
    x, y = batch
    model = timm.create_model("edl_resnet18", **TINY)
    net = Normalized(model, model.pretrained_cfg["mean"], model.pretrained_cfg["std"]).train()
    eps = 8 / 255
    opt = torch.optim.SGD(net.parameters(), lr=0.02, momentum=0.9)
    losses = []
    for step in range(30):
        g = torch.Generator().manual_seed(step)
        loss, x_adv = objective_loss(adv, net, x, y, eps=eps, steps=3, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if adv != "none":
            # the attack stays in the eps-ball (N-FGSM: its noise of 2 eps plus a step of eps) and in [0, 1]
            assert (x_adv - x).abs().max() <= (3 if adv == "nfgsm" else 1) * eps + 1e-6
            assert x_adv.min() >= 0 and x_adv.max() <= 1
            assert (x_adv - x).abs().max() > eps / 4  # and it moved
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.9 * first, (adv, losses)


def _kl(p_logits, q_logits):
    """KL(p || q) per example, written out."""
    p = torch.softmax(p_logits, 1)
    return (p * (torch.log_softmax(p_logits, 1) - torch.log_softmax(q_logits, 1))).sum(1)


def test_trades_ascends_the_kl_to_its_closed_form_maximum_and_its_loss_is_ce_plus_beta_kl():
    """A two-class linear model: the logit difference at x + d moves by (w_1 - w_0) d, at most
    eps ||w_1 - w_0||_1 either way, and KL(p(x) || p(x')) is convex in that shift, with its local maxima
    over the eps-ball at the two extremes. The adversary must reach one (a sign error descends to ~0);
    the loss must be CE(x) + beta * KL(p(x) || p(x_adv)) (the reversed KL differs)."""
    from edl_timm.attacks import trades_adversary

    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(48, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(2, 48, generator=g))
        lin.bias.zero_()
    net = torch.nn.Sequential(torch.nn.Flatten(), lin)
    x = 0.3 + 0.4 * torch.rand(16, 3, 4, 4, generator=g)
    y = torch.randint(0, 2, (16,), generator=g)
    eps = 0.01
    x_adv = trades_adversary(net, x, eps, pgd_step_size(eps, 10), 10, generator=g)
    with torch.no_grad():
        logits = net(x)
        shift = eps * (lin.weight[1] - lin.weight[0]).abs().sum()
        ends = torch.stack([_kl(logits, logits + torch.stack([-shift, shift]) / 2),
                            _kl(logits, logits + torch.stack([shift, -shift]) / 2)])
        got = _kl(logits, net(x_adv))
    # KL is flat at x' = x: the ascent leaves along the side its random start picked, to that side's end
    nearest = ends.gather(0, (ends - got).abs().argmin(0, keepdim=True))[0]
    torch.testing.assert_close(got, nearest, rtol=1e-4, atol=1e-8)
    assert (got > 0.5 * ends.min(0).values).all()
    loss, x_adv = objective_loss("trades", net, x, y, eps=eps, steps=10, trades_beta=6.0,
                                 generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(net(x), y) + 6.0 * _kl(net(x), net(x_adv)).mean()
        reversed_kl = torch.nn.functional.cross_entropy(net(x), y) + 6.0 * _kl(net(x_adv), net(x)).mean()
    torch.testing.assert_close(loss.detach(), expected)
    assert abs(float(reversed_kl - expected)) > 1e-4  # the test tells the two directions apart


def run_cli(args, **kw):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), *args], capture_output=True, text=True, **kw)


def base_args(cifar_dir, out, *extra):
    return ["--model", "edl_resnet18", "--model-kwargs", *TINY_ARGS, "--dataset", str(cifar_dir), "--output-dir", str(out),
            "--train-subset", "128", "--eval-subset", "32", "--batch-size", "16", "--epochs", "1", "--quiet", *extra]


def test_bad_input_fails_before_training_with_what_to_do(cifar_dir, tmp_path, capsys):
    cases = [
        (["--dataset", str(tmp_path / "nope")], "no such data set folder"),
        (["--model", "edl_resnet81"], "unknown model 'edl_resnet81'; did you mean edl_resnet18"),
        (["--label-column", "fine_label"], "has columns ['img', 'label']"),
        (["--num-classes", "5"], "labels of split 'train' range over [0, 9] but the model has 5 classes"),
    ]
    for extra, message in cases:
        args = base_args(cifar_dir, tmp_path / "out") + extra
        status, err = run_main(capsys, "train.py", *args)
        assert status == 2, err[-2000:]
        assert message in err, (message, err[-2000:])
        # refused before anything was built: the output folder is made only once the model is prepared
        assert not (tmp_path / "out").exists()


def test_checkpoint_head_mismatch_and_fine_tuning_with_new_classes(cifar_dir, tmp_path):
    five = timm.create_model("edl_resnet18", num_classes=5, **TINY)
    save_for_hf(five, tmp_path / "five", model_args=dict(five.edl_cfg), safe_serialization=True)
    with pytest.raises(TrainingInputError, match="head has 5 classes but the data set has 10: pass --num-classes 10"):
        train(TrainConfig(model=str(tmp_path / "five"), dataset=str(cifar_dir), output_dir=str(tmp_path / "a"),
                          train_subset=64, eval_subset=16, batch_size=16, max_steps=1, quiet=True))
    metrics = train(TrainConfig(model=str(tmp_path / "five"), num_classes=10, dataset=str(cifar_dir),
                                output_dir=str(tmp_path / "b"), train_subset=64, eval_subset=16, batch_size=16, max_steps=2,
                                lr=0.01, quiet=True))
    tuned = timm.create_model(f"local-dir:{tmp_path / 'b'}", pretrained=True)
    assert tuned.num_classes == 10 and metrics["eval_n"] == 16
    before, after = five.state_dict(), tuned.state_dict()
    # the body started from the checkpoint (close to it after 2 steps), the head is new
    assert (after["conv1.weight"] - before["conv1.weight"]).norm() < 0.1 * before["conv1.weight"].norm()
    assert after["fc.weight"].shape == (10, 128)


@pytest.mark.parametrize("source", ["edl_twin", "timm"])
def test_convert_flag_makes_a_trained_plain_model_edl_and_the_output_reloads(cifar_dir, tmp_path, source):
    """--convert on a plain checkpoint: the EDL layers start from its weights (lr 0 keeps them, so they
    must equal the checkpoint's), train, and the saved folder rebuilds the converted model."""
    from edl_timm import hub, is_edl_layer

    torch.manual_seed(0)
    if source == "edl_twin":
        plain = timm.create_model("edl_resnet18", mode="none", **TINY)
        model_args, expect = dict(plain.edl_cfg), 9  # the stem and the 8 3x3 convolutions
    else:  # any timm model: a tiny timm ResNet at the CIFAR size
        plain = timm.create_model("test_resnet", num_classes=10, pretrained_cfg_overlay=dict(input_size=(3, 32, 32)))
        model_args, expect = None, 10
    save_for_hf(plain, tmp_path / "plain", model_args=model_args, safe_serialization=True)
    common = dict(dataset=str(cifar_dir), train_subset=64, eval_subset=16, batch_size=16, max_steps=2, quiet=True,
                  lr=0.0, weight_decay=0.0)
    train(TrainConfig(model=str(tmp_path / "plain"), convert="elastic", convert_args={"num_iters": 1},
                      output_dir=str(tmp_path / "edl"), **common))
    loaded = hub.create_model(str(tmp_path / "edl"), require_edl=True)
    layers = {n: m for n, m in loaded.named_modules() if is_edl_layer(m)}
    assert len(layers) == expect and all(m.mode == "elastic" and m.num_iters == 1 for m in layers.values())
    saved, before = load_file(tmp_path / "edl" / "model.safetensors"), plain.state_dict()
    for name in layers:
        assert torch.equal(saved[f"{name}.weight"], before[f"{name}.weight"]), name
        assert f"{name}.beta_logit" in saved
    assert all(torch.equal(v, saved[k]) for k, v in loaded.state_dict().items() if k in saved)
    config = json.loads((tmp_path / "edl" / "config.json").read_text())
    if source == "edl_twin":  # a family model records the new mode as its model argument
        assert config["model_args"]["mode"] == "elastic" and "edl_convert" not in config
        assert timm.create_model(f"local-dir:{tmp_path / 'edl'}", pretrained=True).conv1.num_iters == 1
    else:
        assert config["edl_convert"] == {"mode": "elastic", "num_iters": 1}
        assert loaded.pretrained_cfg["input_size"] == (3, 32, 32) or list(loaded.pretrained_cfg["input_size"]) == [3, 32, 32]
    with pytest.raises(TrainingInputError, match="already has EDL layers"):
        train(TrainConfig(model=str(tmp_path / "edl"), convert="elastic", output_dir=str(tmp_path / "again"), **common))
    with pytest.raises(TrainingInputError, match="--convert takes one of elastic, vanilla, robust"):
        train(TrainConfig(model=str(tmp_path / "plain"), convert="sparse", output_dir=str(tmp_path / "bad"), **common))
    with pytest.raises(TrainingInputError, match="unknown \\['iters'\\]"):
        train(TrainConfig(model=str(tmp_path / "plain"), convert="elastic", convert_args={"iters": 1},
                          output_dir=str(tmp_path / "bad2"), **common))


def test_vanilla_then_elastic_schedule_trains_beta_only_after_the_switch(cifar_dir, tmp_path):
    metrics = train(TrainConfig(model="edl_resnet18", model_kwargs=dict(TINY), dataset=str(cifar_dir), output_dir=str(tmp_path),
                                train_subset=64, eval_subset=16, batch_size=16, epochs=2, elastic_from_epoch=1, lr=0.5,
                                quiet=True))
    model = timm.create_model(f"local-dir:{tmp_path}", pretrained=True)
    assert model.edl_cfg["mode"] == "elastic"
    logits = [m.beta_logit.item() for m in model.modules() if hasattr(m, "beta_logit")]
    assert len(logits) == len(metrics["betas"]) and all(v != 0.0 for v in logits), logits  # learned after the switch
    one = train(TrainConfig(model="edl_resnet18", model_kwargs=dict(TINY), dataset=str(cifar_dir),
                            output_dir=str(tmp_path / "v"), train_subset=64, eval_subset=16, batch_size=16, epochs=1,
                            elastic_from_epoch=1, quiet=True))
    # ended in the vanilla phase: beta = 1 was trained, and the saved config says so
    assert all(b == 1.0 for b in one["betas"].values())
    vanilla = timm.create_model(f"local-dir:{tmp_path / 'v'}", pretrained=True)
    assert vanilla.edl_cfg["mode"] == "vanilla"
    assert all(m.beta_logit.item() == 0.0 for m in vanilla.modules() if hasattr(m, "beta_logit"))


def weights(path):
    return load_file(Path(path) / "model.safetensors")


@pytest.mark.slow
def test_kill_9_and_resume_equals_an_uninterrupted_run(cifar_dir, tmp_path):
    extra = ["--epochs", "2", "--checkpoint-every", "3", "--adv", "fgsm", "--train-subset", "192"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    full = run_cli(base_args(cifar_dir, tmp_path / "full", *extra), env=env)
    assert full.returncode == 0, full.stderr[-3000:]
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "train.py"), *base_args(cifar_dir, out, *extra)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list((out / "checkpoints").glob("step_*")) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "model.safetensors").exists(), "the run finished before it could be killed"
    resumed = run_cli(base_args(cifar_dir, out, *extra, "--resume", "auto"), env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = weights(tmp_path / "full"), weights(out)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["none", "elastic"])
def test_two_processes_match_one_with_the_same_global_batch(cifar_dir, tmp_path, mode):
    """DDP over two processes: the plain twin, and elastic EDL layers trained as Vanilla DL for the
    first epoch (beta frozen, then learned: DDP must find the unused parameter and keep the ranks' betas
    equal after the switch)."""
    common = ["--no-augment", "--max-steps", "4", "--lr", "0.02", "--eval-subset", "37", "--model-kwargs", *TINY_ARGS, f"mode={mode}"]
    if mode == "elastic":
        common += ["--epochs", "2", "--max-steps", "8", "--elastic-from-epoch", "1"]
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(29531 + (mode == "elastic")),
         str(ROOT / "scripts" / "train.py"), *base_args(cifar_dir, tmp_path / "two", *common), "--batch-size", "16"],
        capture_output=True, text=True, env=env,
    )
    assert two.returncode == 0, two.stderr[-4000:]
    one = run_cli(base_args(cifar_dir, tmp_path / "one", *common, "--batch-size", "32"), env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    m2 = json.loads((tmp_path / "two" / "metrics.json").read_text())
    m1 = json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert m2["num_processes"] == 2 and m2["ranks_identical"]
    assert m2["eval_n"] == 37 and m1["eval_n"] == 37  # every example counted once despite uneven shards
    w1, w2 = weights(tmp_path / "one"), weights(tmp_path / "two")
    init = timm.create_model("edl_resnet18", mode=mode, **TINY).state_dict()
    if mode == "elastic":  # beta was trained after the switch, under DDP, identically on both ranks
        assert json.loads((tmp_path / "two" / "config.json").read_text())["model_args"]["mode"] == "elastic"
        # (its few-step move depends on BatchNorm's per-process batch, so it is not compared with one process)
        assert all(not torch.equal(w2[k], init[k]) for k in w2 if k.endswith("beta_logit"))
    for k in ("conv1.weight", "layer3.0.conv1.weight", "fc.weight"):
        moved = (w1[k] - init[k]).norm()
        # BatchNorm sees 16 images per process instead of 32, so the runs are close, not equal
        assert (w1[k] - w2[k]).norm() < 0.2 * moved + 1e-6, k


def test_bf16_channels_last_training_runs_fused_bf16_and_saves_the_usual_layout(cifar_dir, tmp_path, monkeypatch, request):
    """--mixed-precision bf16 --channels-last on the CPU: the EDL layers run the fused node in
    bfloat16 on NHWC activations during training steps, the per-epoch evaluation runs in float32,
    and every checkpoint and the final weights are written (safetensors takes contiguous tensors
    only) in the usual layout; a run resumed from a checkpoint ends with the same weights."""
    from edl_timm.layers import EDLConv2d, _fused

    seen = []
    original = EDLConv2d.forward

    def spy(self, x, num_iters=None):
        out = original(self, x, num_iters)
        node = type(out.grad_fn).__name__ if out.grad_fn is not None else None
        seen.append((self.training, torch.is_grad_enabled(), out.dtype, node,
                     x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()))
        return out

    monkeypatch.setattr(EDLConv2d, "forward", spy)
    # accelerate keeps one process-wide state, fixed by the first Accelerator: this test's bf16
    # runs share the pytest process with float32 ones, so start and leave it fresh
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state(True)
    request.addfinalizer(lambda: AcceleratorState._reset_state(True))
    common = dict(model="edl_resnet18", model_kwargs=dict(TINY), dataset=str(cifar_dir), train_subset=64, eval_subset=16,
                  batch_size=16, epochs=2, adv="fgsm", mixed_precision="bf16", channels_last=True, checkpoint_every=3,
                  keep_checkpoints=10, quiet=True)
    train(TrainConfig(output_dir=str(tmp_path / "full"), **common))
    train_calls = [s for s in seen if s[0]]
    eval_calls = [s for s in seen if not s[0]]
    if _fused.library() is not None:
        assert train_calls and all(s[2] == torch.bfloat16 and s[4] for s in train_calls), set(train_calls)
        assert all(s[3] == "_FusedSolveBackward" for s in train_calls if s[1])
    assert eval_calls and all(s[2] == torch.float32 for s in eval_calls), set(eval_calls)

    for folder in [tmp_path / "full", *sorted((tmp_path / "full" / "checkpoints").glob("step_*"))]:
        files = list(folder.glob("*.safetensors"))
        assert files, folder
        for f in files:
            assert all(t.is_contiguous() for t in load_file(f).values())
    model = timm.create_model(f"local-dir:{tmp_path / 'full'}", pretrained=True)
    assert model.conv1.weight.is_contiguous()

    ckpt = sorted((tmp_path / "full" / "checkpoints").glob("step_*"))[0]
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(ckpt, resumed / "checkpoints" / ckpt.name)
    train(TrainConfig(output_dir=str(resumed), resume="auto", **common))
    a, b = weights(tmp_path / "full"), weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("native", [False, True])
def test_bf16_on_a_cpu_without_bfloat16_instructions_warns(cifar_dir, tmp_path, monkeypatch, request, native):
    """bfloat16 autocast without AVX512-BF16 or AMX is emulated and slower than float32: the run warns
    (and still trains in the precision it was given); with the instructions it says nothing."""
    import warnings as _warnings

    import edl_timm.training as training
    from accelerate.state import AcceleratorState

    monkeypatch.setattr(training, "native_bf16", lambda: native)
    AcceleratorState._reset_state(True)
    request.addfinalizer(lambda: AcceleratorState._reset_state(True))
    cfg = TrainConfig(model="edl_resnet18", model_kwargs=dict(TINY), dataset=str(cifar_dir), train_subset=16,
                      eval_subset=8, batch_size=8, epochs=1, max_steps=1, mixed_precision="bf16",
                      output_dir=str(tmp_path / "run"), quiet=True)
    with _warnings.catch_warnings(record=True) as caught:
        _warnings.simplefilter("always")
        train(cfg)
    said = [str(w.message) for w in caught if "without bfloat16 instructions" in str(w.message)]
    assert len(said) == (0 if native else 1), said
    assert native or "use --mixed-precision no" in said[0]
    assert (tmp_path / "run" / "model.safetensors").is_file()


KILL_RUN = ["--epochs", "2", "--checkpoint-every", "3", "--adv", "fgsm", "--train-subset", "96", "--eval-subset", "16",
            "--eval-pgd-steps", "2"]  # 6 steps an epoch: step 6 is both a --checkpoint-every and an epoch-end checkpoint


def log_records(out):
    """log.jsonl without its wall-clock fields."""
    return [{k: v for k, v in json.loads(line).items() if k not in ("images_per_s", "train_seconds")}
            for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(cifar_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    res = run_cli(base_args(cifar_dir, out, *KILL_RUN), env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stderr[-3000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("phase, n", [
    ("step", 1),               # before any checkpoint: --resume auto starts afresh
    ("step", 5),               # mid-epoch, after the step-3 checkpoint
    ("checkpoint_write", 2),   # writing step 6 (the --checkpoint-every one)
    ("checkpoint_write", 3),   # writing step 6's epoch-end position
    ("after_checkpoint", 2),   # right after step 6's mid-epoch checkpoint, before the evaluation
    ("after_checkpoint", 3),   # right after the epoch-end checkpoint
    ("evaluation", 1),         # during the first epoch's evaluation
    ("evaluation", 2),         # during the last one, after the last step
    ("final_save", 1),         # while the final weights are being written
])
def test_kill_9_at_any_phase_then_resume_equals_an_uninterrupted_run(cifar_dir, tmp_path, uninterrupted, phase, n):
    """tests/killpoint.py kills the run at each phase of its life; --resume auto then finishes it
    with the uninterrupted run's weights and log, and the folder holds no finished run's output in
    between (metrics.json, written last, is the mark of one)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = tmp_path / "run"
    killed = subprocess.run([sys.executable, str(ROOT / "tests" / "killpoint.py"), phase, str(n), "--",
                             *base_args(cifar_dir, out, *KILL_RUN)], env=env, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr[-3000:])
    assert not (out / "metrics.json").exists()
    resumed = run_cli(base_args(cifar_dir, out, *KILL_RUN, "--resume", "auto"), env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = weights(uninterrupted), weights(out)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert log_records(out) == log_records(uninterrupted)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["step"] == 12 and metrics["loss"] == json.loads((uninterrupted / "metrics.json").read_text())["loss"]


def test_grad_accumulation_resumes_exactly_from_a_mid_run_checkpoint(cifar_dir, tmp_path):
    """Two micro-batches per step: a run resumed from its step-2 checkpoint ends with the weights of the
    uninterrupted run, bit for bit (the resumed epoch must skip 2 x 2 micro-batches, not 2)."""
    common = dict(model="edl_resnet18", model_kwargs=dict(TINY), dataset=str(cifar_dir), train_subset=128, eval_subset=16,
                  batch_size=16, grad_accum=2, epochs=1, max_steps=4, lr=0.05, checkpoint_every=2, quiet=True)
    train(TrainConfig(output_dir=str(tmp_path / "full"), **common))
    ckpt = tmp_path / "full" / "checkpoints" / "step_00000002"
    assert ckpt.is_dir() and json.loads((ckpt / "trainer_state.json").read_text())["batch_in_epoch"] == 2
    shutil.copytree(ckpt, tmp_path / "step2")
    # the wall clock is summed over resumes: a run that had worked 1000 s before its checkpoint
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert 0 < state["train_seconds"] < 600
    (tmp_path / "step2" / "trainer_state.json").write_text(json.dumps(dict(state, train_seconds=1000.0)))
    t0 = time.time()
    metrics = train(TrainConfig(output_dir=str(tmp_path / "resumed"), resume=str(tmp_path / "step2"), **common))
    assert 1000 < metrics["train_seconds"] <= 1000 + (time.time() - t0) + 0.1
    full, resumed = weights(tmp_path / "full"), weights(tmp_path / "resumed")
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    # and accumulation is not a no-op: one micro-batch per step gives other weights
    train(TrainConfig(output_dir=str(tmp_path / "one"), **dict(common, grad_accum=1)))
    assert not torch.equal(weights(tmp_path / "one")["conv1.weight"], full["conv1.weight"])


def test_grad_clip_bounds_the_first_step_and_the_lr_follows_warmup_then_cosine(cifar_dir, tmp_path):
    """Plain SGD (no momentum history, no weight decay) moves the weights by lr x the clipped gradient:
    at most lr x clip in norm. The logged lr is timm's warm-up then cosine, recomputed here."""
    import math

    common = dict(model="edl_resnet18", model_kwargs=dict(TINY, mode="none"), dataset=str(cifar_dir), train_subset=320,
                  eval_subset=16, batch_size=16, quiet=True, momentum=0.0, weight_decay=0.0, augment=False)
    torch.manual_seed(0)
    init = timm.create_model("edl_resnet18", mode="none", **TINY).state_dict()
    train(TrainConfig(output_dir=str(tmp_path / "clip"), max_steps=1, lr=0.5, grad_clip=1e-3, seed=0, **common))
    after = weights(tmp_path / "clip")
    moved = math.sqrt(sum(float((after[k] - init[k]).pow(2).sum()) for k in after if k in init and "running" not in k
                          and "num_batches" not in k))
    assert 0 < moved <= 0.5 * 1e-3 * (1 + 1e-4)
    # 20 steps per epoch, 2 epochs, half an epoch of warm-up from 1% of the peak
    train(TrainConfig(output_dir=str(tmp_path / "sched"), epochs=2, lr=0.2, warmup_epochs=0.5, **common))
    lrs = {r["step"]: r["lr"] for r in map(json.loads, (tmp_path / "sched" / "log.jsonl").read_text().splitlines()) if "lr" in r}
    total, warm = 40, 10

    def expected(t):  # the cosine starts at the peak where the warm-up ends: no jump
        if t < warm:
            return 0.002 + t * (0.2 - 0.002) / warm
        return 0.5 * 0.2 * (1 + math.cos(math.pi * (t - warm) / (total - warm)))

    assert set(lrs) == {10, 20, 30, 40}
    for t, lr in lrs.items():
        assert lr == pytest.approx(expected(t), rel=1e-9), t


def test_image_folder_data_is_read_resized_and_trained_on(tmp_path):
    """An image folder (<split>/<class>/<image>) with 40x40 images, for a 32x32 model: the class names
    come from the folders and the images are resized to the model's input size."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 24), ("test", 8)):
        for c, name in enumerate(["cat", "dog"]):
            (tmp_path / "data" / split / name).mkdir(parents=True)
            for i in range(n // 2):
                pixels = (torch.rand(40, 40, 3, generator=g) * 100 + 100 * c).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(tmp_path / "data" / split / name / f"{i}.png")
    x, y, names = load_image_split(str(tmp_path / "data"), "train", with_names=True)
    assert x.shape == (24, 3, 40, 40) and names == ["cat", "dog"] and sorted(y.tolist()) == [0] * 12 + [1] * 12
    metrics = train(TrainConfig(model="edl_resnet18", model_kwargs=dict(TINY), dataset=str(tmp_path / "data"),
                                output_dir=str(tmp_path / "out"), batch_size=8, max_steps=3, eval_subset=None, quiet=True))
    assert metrics["eval_n"] == 8
    model = timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True)
    assert model.num_classes == 2


def test_plain_parquet_without_the_hubs_metadata_decodes_its_images(tmp_path):
    """A parquet file written by pyarrow alone (no datasets feature metadata) holds PNG bytes in
    {bytes, path} structs, or as raw bytes: both decode to the same pixels; a column of numbers
    is refused with what to do."""
    import io

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (5, 6, 7, 3), dtype=np.uint8)
    encoded = []
    for p in pixels:
        buf = io.BytesIO()
        Image.fromarray(p).save(buf, "PNG")
        encoded.append(buf.getvalue())
    labels = [3, 1, 4, 1, 5]
    tables = {
        "struct": {"img": [{"bytes": b, "path": None} for b in encoded], "label": labels},
        "raw": {"img": encoded, "label": labels},
        "numbers": {"img": list(range(5)), "label": labels},
    }
    for name, columns in tables.items():
        (tmp_path / name).mkdir()
        pq.write_table(pa.table(columns), tmp_path / name / "train.parquet")
    for name in ("struct", "raw"):
        x, y = load_image_split(str(tmp_path / name), "train")
        assert torch.equal(x, torch.from_numpy(pixels).permute(0, 3, 1, 2)) and y.tolist() == labels, name
    with pytest.raises(ValueError, match="column 'img' of .* not images: give encoded images"):
        load_image_split(str(tmp_path / "numbers"), "train")


def test_every_config_field_is_a_flag_with_the_same_default():
    import dataclasses
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_cli", ROOT / "scripts" / "train.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    parser = cli.build_parser()
    args = vars(parser.parse_args(["--model", "m", "--output-dir", "o"]))
    cfg = TrainConfig(model="m", output_dir="o")
    assert set(args) == {f.name for f in dataclasses.fields(TrainConfig)}
    for name, value in args.items():
        assert (cli.parse_kwargs(value) if name in ("model_kwargs", "convert_args") else value) == getattr(cfg, name), name
    given = vars(parser.parse_args(["--model", "m", "--output-dir", "o", "--no-augment", "--eps", "8", "--channels-last",
                                    "--alpha", "2/255", "--max-steps", "7", "--model-kwargs", "mode=none", "layers=(1,1,1,1)"]))
    assert (given["augment"], given["channels_last"], given["max_steps"]) == (False, True, 7)
    assert given["eps"] == pytest.approx(8 / 255) and given["alpha"] == pytest.approx(2 / 255)
    assert cli.parse_kwargs(given["model_kwargs"]) == {"mode": "none", "layers": (1, 1, 1, 1)}


def test_step_schedule_divides_the_lr_by_ten_every_third_of_the_run(cifar_dir, tmp_path):
    common = dict(model="edl_resnet18", model_kwargs=dict(TINY, mode="none"), dataset=str(cifar_dir), train_subset=320,
                  eval_subset=16, batch_size=16, quiet=True, augment=False)
    train(TrainConfig(output_dir=str(tmp_path / "step"), epochs=2, lr=0.2, schedule="step", **common))
    lrs = {r["step"]: r["lr"] for r in map(json.loads, (tmp_path / "step" / "log.jsonl").read_text().splitlines()) if "lr" in r}
    decay_every = 40 // 3  # 13 steps
    assert lrs == {t: pytest.approx(0.2 * 0.1 ** (t // decay_every), rel=1e-9) for t in (10, 20, 30, 40)}


@pytest.mark.parametrize("decay_norms", [False, True], ids=["default", "weight-decay-norms"])
def test_adamw_decays_norms_biases_and_beta_only_with_weight_decay_norms(cifar_dir, tmp_path, decay_norms):
    """Decoupled weight decay: one AdamW step with lr 1e-3 and weight decay 100 shrinks every decayed
    weight by 10% (plus an Adam step of at most about lr). By default it moves norms, biases and beta
    only by the Adam step; --weight-decay-norms (the fast-AT reference's optimizer, which decays every
    parameter) shrinks them by 10% as well."""
    torch.manual_seed(0)
    kwargs = dict(TINY, beta_init=0.9)  # beta_logit 2.2: at the default 0.5 it is 0, and decay could not move it
    init = timm.create_model("edl_resnet18", **kwargs).state_dict()
    train(TrainConfig(model="edl_resnet18", model_kwargs=kwargs, dataset=str(cifar_dir), output_dir=str(tmp_path / "a"),
                      train_subset=64, eval_subset=16, batch_size=16, max_steps=1, lr=1e-3, weight_decay=100.0,
                      weight_decay_norms=decay_norms, optimizer="adamw", augment=False, quiet=True))
    after = weights(tmp_path / "a")
    for k in ("conv1.weight", "layer2.0.conv1.weight", "fc.weight"):
        assert torch.allclose(after[k], 0.9 * init[k], atol=1.5e-3), k
    assert (after["fc.weight"] - 0.9 * init["fc.weight"]).abs().max() > 0  # and the Adam step is there too
    for k in ("bn1.weight", "bn1.bias", "fc.bias", "conv1.beta_logit", "layer3.0.conv2.beta_logit"):
        expected = 0.9 * init[k] if decay_norms else init[k]
        assert (after[k] - expected).abs().max() <= 1.5e-3, k
    for k in ("bn1.weight", "conv1.beta_logit", "layer3.0.conv2.beta_logit"):
        assert init[k].abs().min() > 0.05, k  # so a 10% shrink is larger than the Adam step, and the two cases differ
    assert json.loads((tmp_path / "a" / "args.json").read_text())["weight_decay_norms"] is decay_norms


@pytest.mark.slow
def test_training_compiled_through_accelerate_has_no_graph_break_and_matches_eager(cifar_dir, tmp_path):
    """accelerate's own switch (ACCELERATE_DYNAMO_BACKEND, as accelerate launch --dynamo_backend sets
    it) compiles the model in prepare(): FGSM-RS training then runs without a graph break, ends with
    the eager run's weights, and its checkpoint names match an eager run's."""
    extra = ["--max-steps", "4", "--adv", "fgsm", "--eval-subset", "16", "--eval-pgd-steps", "1", "--checkpoint-every", "2"]
    # both on the eager solver: FGSM's sign() turns rounding differences (fused kernels against the
    # compiled eager solver) into flipped pixels, and the runs apart
    env = dict(os.environ, OMP_NUM_THREADS="1", EDL_TIMM_FUSED="0")
    eager = run_cli(base_args(cifar_dir, tmp_path / "eager", *extra), env=env)
    assert eager.returncode == 0, eager.stderr[-3000:]
    compiled = run_cli(base_args(cifar_dir, tmp_path / "compiled", *extra),
                       env=dict(env, ACCELERATE_DYNAMO_BACKEND="aot_eager", TORCH_LOGS="graph_breaks"))
    assert compiled.returncode == 0, compiled.stderr[-3000:]
    assert "Graph break" not in compiled.stderr, compiled.stderr[-3000:]
    a, b = weights(tmp_path / "eager"), weights(tmp_path / "compiled")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    saved = lambda out: sorted(p.name for p in (out / "checkpoints" / "step_00000002").iterdir())  # noqa: E731
    assert saved(tmp_path / "compiled") == saved(tmp_path / "eager")


@pytest.mark.parametrize("total", [40, 37])
def test_triangle_schedule_is_fast_ats_cyclic_lr_at_every_step(total):
    """lr(t) = peak (1 - |2 t / T - 1|) at every step t of a T-step run, T even and odd, and the momentum
    moved against it from 0.9 to 0.8 at the peak: the closed form, and PyTorch's CyclicLR run with the
    fast-AT reference's arguments (locuslab/fast_adversarial's train_fgsm.py) beside it."""
    from edl_timm.training import _scheduler

    def sgd():
        return torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.2, momentum=0.9)

    opt, ref_opt = sgd(), sgd()
    cfg = TrainConfig(model="m", output_dir="o", schedule="triangle", lr=0.2, peak_momentum=0.8)
    sched = _scheduler(cfg, opt, total, steps_per_epoch=10)
    ref = torch.optim.lr_scheduler.CyclicLR(ref_opt, base_lr=0.0, max_lr=0.2, step_size_up=total / 2,
                                            step_size_down=total / 2)
    for t in range(total + 1):
        lr, momentum = opt.param_groups[0]["lr"], opt.param_groups[0]["momentum"]
        closed = 0.2 * (1 - abs(2 * t / total - 1))
        assert lr == pytest.approx(closed, abs=1e-12), t
        assert momentum == pytest.approx(0.9 - 0.1 * closed / 0.2, abs=1e-12), t
        assert (lr, momentum) == (pytest.approx(ref_opt.param_groups[0]["lr"], abs=1e-12),
                                  pytest.approx(ref_opt.param_groups[0]["momentum"], abs=1e-12)), t
        sched.step_update(num_updates=t + 1)
        ref_opt.step()
        ref.step()
    # without --peak-momentum the momentum stays where it was set
    opt = sgd()
    sched = _scheduler(TrainConfig(model="m", output_dir="o", schedule="triangle", lr=0.2), opt, total, 10)
    sched.step_update(num_updates=total // 2)
    assert opt.param_groups[0]["momentum"] == 0.9 and opt.param_groups[0]["lr"] == pytest.approx(0.2 * (total // 2) / (total / 2))


def test_triangle_run_resumed_mid_schedule_continues_the_same_curve(cifar_dir, tmp_path):
    """A triangle run resumed from its epoch-1 checkpoint logs the uninterrupted run's lr at every later
    logged step and ends with its weights, bit for bit; args.json records the schedule."""
    common = dict(model="edl_resnet18", model_kwargs=dict(TINY, mode="none"), dataset=str(cifar_dir), train_subset=320,
                  eval_subset=16, batch_size=16, epochs=2, quiet=True, schedule="triangle", lr=0.2,
                  optimizer="momentum", peak_momentum=0.8)
    train(TrainConfig(output_dir=str(tmp_path / "full"), **common))

    def lrs(run):
        return {r["step"]: r["lr"] for r in map(json.loads, (tmp_path / run / "log.jsonl").read_text().splitlines())
                if "lr" in r}

    full = lrs("full")
    assert full == {t: pytest.approx(0.2 * (1 - abs(2 * t / 40 - 1)), abs=1e-12) for t in (10, 20, 30, 40)}
    ckpt = tmp_path / "full" / "checkpoints" / "step_00000020"
    train(TrainConfig(output_dir=str(tmp_path / "resumed"), resume=str(ckpt), **common))
    assert lrs("resumed") == {t: full[t] for t in (30, 40)}
    a, b = weights(tmp_path / "full"), weights(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    args = json.loads((tmp_path / "resumed" / "args.json").read_text())
    assert (args["schedule"], args["peak_momentum"], args["optimizer"]) == ("triangle", 0.8, "momentum")


def test_a_checkpoint_resumes_only_with_its_own_recipe(cifar_dir, tmp_path):
    """A checkpoint records the options that shape its run: a resume with another lr, epoch count or
    model option is refused, naming both values, before anything is written; where and how the run
    is kept may change (another folder, checkpoint interval), and a checkpoint written before the
    recipe was recorded still resumes. Both resumes end with the uninterrupted run's weights."""
    common = dict(model="edl_resnet18", model_kwargs=dict(TINY, mode="none"), dataset=str(cifar_dir), train_subset=160,
                  eval_subset=16, batch_size=16, epochs=2, quiet=True)
    train(TrainConfig(output_dir=str(tmp_path / "full"), **common))
    ckpt = tmp_path / "full" / "checkpoints" / "step_00000010"
    for override, message in [
        (dict(lr=0.05), "was trained with --lr 0.1, but this command has --lr 0.05: resume with the run's own options"),
        (dict(epochs=3), "was trained with --epochs 2, but this command has --epochs 3"),
        (dict(model_kwargs=dict(TINY, mode="elastic")), '"mode": "none"}, but this command has --model-kwargs {'),
    ]:
        with pytest.raises(TrainingInputError) as err:
            train(TrainConfig(output_dir=str(tmp_path / "other"), resume=str(ckpt), **dict(common, **override)))
        assert f"checkpoint {ckpt} was trained with" in str(err.value) and message in str(err.value), str(err.value)
        assert not (tmp_path / "other").exists()
    train(TrainConfig(output_dir=str(tmp_path / "moved"), resume=str(ckpt), checkpoint_every=3, **common))
    old = tmp_path / "old_ckpt"
    shutil.copytree(ckpt, old)
    state = json.loads((old / "trainer_state.json").read_text())
    assert state.pop("recipe")["lr"] == 0.1
    (old / "trainer_state.json").write_text(json.dumps(state))
    train(TrainConfig(output_dir=str(tmp_path / "from_old"), resume=str(old), **common))
    full = weights(tmp_path / "full")
    for run in ("moved", "from_old"):
        resumed = weights(tmp_path / run)
        assert all(torch.equal(full[k], resumed[k]) for k in full), run


@pytest.mark.parametrize("override, message", [
    (dict(schedule="triangle", warmup_epochs=1.0), "drop --warmup-epochs"),
    (dict(schedule="linear"), "--schedule must be one of cosine, step, triangle"),
    (dict(peak_momentum=0.8, optimizer="adamw"), "adamw has none"),
    (dict(peak_momentum=1.0), r"--peak-momentum must be in \[0, 1\)"),
])
def test_bad_schedule_arguments_fail_before_training(cifar_dir, tmp_path, override, message):
    cfg = TrainConfig(model="edl_resnet18", model_kwargs=dict(TINY, mode="none"), dataset=str(cifar_dir),
                      output_dir=str(tmp_path / "run"), quiet=True, **override)
    with pytest.raises(TrainingInputError, match=message):
        train(cfg)
    assert not (tmp_path / "run").exists()


def scripted_evaluation(pgd_by_epoch):
    """The per-epoch evaluation's stand-in for --early-stop: each call's PGD accuracy from the list,
    and a clean accuracy 30 points above it."""
    calls = iter(pgd_by_epoch)

    def evaluate(accelerator, net, images, labels, cfg, batch_size):
        pgd_acc = next(calls)
        return {"eval_n": len(labels), "clean_acc": pgd_acc + 30.0, f"pgd{cfg.eval_pgd_steps}_acc": pgd_acc}
    return evaluate


def test_early_stop_goes_back_to_the_best_epochs_weights_and_a_resumed_run_remembers_them(cifar_dir, tmp_path, monkeypatch):
    """Held-out PGD 10, 20, 12, 5 over epochs 0-3 with --early-stop 10: epoch 2 (8 below the best)
    goes on, epoch 3 (15 below) stops the run, which saves epoch 1's weights (the epoch-1 checkpoint's,
    written by another path) and reports epoch 1's figures. Resumed from the epoch-1 checkpoint, a run
    knows its best epoch from the checkpoint alone and ends the same, bit for bit."""
    import edl_timm.training as training
    from edl_timm.publish import early_stop_summary

    common = dict(model="edl_resnet18", model_kwargs=dict(TINY, mode="none"), dataset=str(cifar_dir), train_subset=64,
                  eval_subset=16, batch_size=16, epochs=6, lr=0.05, quiet=True, early_stop=10.0, keep_checkpoints=10,
                  checkpoint_every=4)  # each epoch's end also a step checkpoint: the best saved into a written one
    monkeypatch.setattr(training, "_evaluate", scripted_evaluation([10.0, 20.0, 12.0, 5.0]))
    metrics = train(TrainConfig(output_dir=str(tmp_path / "a"), **common))
    stop = {"epoch": 3, "pgd10_acc": 5.0, "best_epoch": 1, "best_pgd10_acc": 20.0}
    records = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if "clean_acc" in r] == [0, 1, 2, 3]
    assert records[-1] == {"step": 16, "early_stop": stop}
    assert (metrics["step"], metrics["clean_acc"], metrics["pgd10_acc"], metrics["early_stop"]) == (16, 50.0, 20.0, stop)
    assert json.loads((tmp_path / "a" / "metrics.json").read_text())["early_stop"] == stop
    ckpts = tmp_path / "a" / "checkpoints"
    # step 16's was written before its evaluation stopped the run; none after
    assert sorted(p.name for p in ckpts.iterdir()) == [f"step_{s:08d}" for s in (4, 8, 12, 16)]
    final = weights(tmp_path / "a")
    at = {s: {k[len("model."):]: v for k, v in weights(ckpts / f"step_{s:08d}").items() if k.startswith("model.")}
          for s in (8, 12)}
    assert final.keys() == at[8].keys() and all(torch.equal(final[k], at[8][k]) for k in final)
    assert not all(torch.equal(final[k], at[12][k]) for k in final)  # epochs 2 and 3 did train
    summary = ("after epoch 4 of 6, whose held-out PGD10 accuracy (5.0%) fell more than 10 points below epoch 2's "
               "(20.0%); these are epoch 2's weights")
    assert early_stop_summary({"epochs": 6, "early_stop": 10.0}, stop) == summary
    # the release of the stopped run says so on its card
    from edl_timm.evaluation import evaluate
    from edl_timm.hub import sha256_file
    from edl_timm.publish import build_release

    model = timm.create_model(f"local-dir:{tmp_path / 'a'}", pretrained=True).eval()
    x = torch.rand(4, 3, 32, 32)
    report = evaluate(model, x, torch.zeros(4, dtype=torch.long), source=str(tmp_path / "a"), autoattack=None, pgd_steps=1,
                      weights_sha256=sha256_file(tmp_path / "a" / "model.safetensors"),
                      data={"dataset": "uoft-cs/cifar10", "split": "test", "selection": "4 random tensors"})
    cfg = build_release(tmp_path / "a", report, tmp_path / "rel", "es", hub_configs_dir=tmp_path / "configs")
    assert cfg["recipe"]["early_stop"] == 10.0 and cfg["recipe"]["stopped_early"] == summary
    assert f"- `stopped_early`: {summary}" in (tmp_path / "rel" / "README.md").read_text()

    # step 8's checkpoint was written before epoch 1's evaluation made it the best, then updated
    monkeypatch.setattr(training, "_evaluate", scripted_evaluation([12.0, 5.0]))
    resumed = train(TrainConfig(output_dir=str(tmp_path / "b"), resume=str(ckpts / "step_00000008"), **common))
    assert resumed["early_stop"] == stop and resumed["pgd10_acc"] == 20.0
    again = weights(tmp_path / "b")
    assert all(torch.equal(final[k], again[k]) for k in final)

    # without the guard the same evaluations do not stop the run
    monkeypatch.setattr(training, "_evaluate", scripted_evaluation([10.0, 20.0, 12.0, 5.0, 5.0, 5.0]))
    free = train(TrainConfig(output_dir=str(tmp_path / "c"), **dict(common, early_stop=None)))
    assert free["step"] == 24 and "early_stop" not in free


@pytest.mark.parametrize("bad, message", [
    (dict(early_stop=0.0), "--early-stop must be above 0"),
    (dict(early_stop=5.0, eval_pgd_steps=0), "--eval-pgd-steps must be at least 1 with --early-stop"),
])
def test_early_stop_needs_a_positive_drop_and_a_per_epoch_pgd(cifar_dir, tmp_path, bad, message):
    with pytest.raises(TrainingInputError, match=message):
        train(TrainConfig(model="edl_resnet18", model_kwargs=dict(TINY), dataset=str(cifar_dir), output_dir=str(tmp_path),
                          quiet=True, **bad))
