"""Does an EDL network train? EDL variants against their plain twin, same data, recipe and epochs.

The configuration of the learnability report in the model-families issue: a narrow CIFAR ResNet
(timm's 64-channel stem, then 16-32-64-128 channels, one block per stage), a fixed random N images of the
shared CIFAR-10 training split, batch 128, SGD (momentum 0.9, nesterov, wd 5e-4) with a one-cycle
lr peaking at 0.1; natural or FGSM-RS (eps 8/255, alpha 10/255) training. Reports clean and PGD-20
(L-inf 8/255, step 2/255, random start) accuracy on a fixed random subset of the test split (the
JPEG CIFAR-10 copy in shared/data), and each EDL layer's learned beta.

    python benchmarks/learnability.py --data ../shared/data/cifar10 --adv none \
        --variant plain:mode=none --variant edl:mode=elastic [--bf16]
"""
import argparse
import copy
import json
import time

import timm
import torch
import torch.nn.functional as F

import edl_timm
from edl_timm.attacks import Normalized, fgsm_rs, pgd
from edl_timm.data import load_image_split, random_crop_flip, random_subset


def parse_variant(text):
    name, _, rest = text.partition(":")
    kwargs = {}
    for item in filter(None, rest.split(",")):
        k, v = item.split("=")
        kwargs[k] = json.loads(v) if v[:1].isdigit() or v in ("true", "false") or v[:1] == "-" else v
    return name, kwargs


def build(kwargs, seed):
    torch.manual_seed(seed)
    model = timm.create_model("edl_resnet18", layers=(1, 1, 1, 1), channels=(16, 32, 64, 128), **kwargs)
    cfg = model.pretrained_cfg
    return Normalized(model, cfg["mean"], cfg["std"])


def accuracy(net, x, y, attack_net=None, eps=8 / 255, steps=20, batch=250):
    """Accuracy of ``net`` on PGD-``steps`` examples crafted on ``attack_net`` (default: ``net``)."""
    net.eval()
    attack_net = attack_net or net
    attack_net.eval()
    g = torch.Generator().manual_seed(0)
    correct = 0
    for i in range(0, len(x), batch):
        xb, yb = x[i:i + batch], y[i:i + batch]
        if steps:
            xb = pgd(attack_net, xb, yb, eps, max(2 / 255, eps / 4), steps, generator=g)
        with torch.no_grad():
            correct += (net(xb).argmax(1) == yb).sum().item()
    return correct / len(x)


def set_num_iters(net, factor):
    for m in net.modules():
        if edl_timm.is_edl_layer(m):
            m.num_iters = m.num_iters * factor


def audit(net, x, y, twin, steps):
    """Signs of gradient masking: PGD at growing eps must fall towards 0; an attack through a solver
    unrolled twice as deep, or transferred from the plain twin, must not beat the white-box one."""
    out = {f"pgd{steps}_eps{e}": accuracy(net, x, y, eps=e / 255, steps=steps) for e in (16, 32)}
    if any(edl_timm.is_edl_layer(m) for m in net.modules()):
        deeper = copy.deepcopy(net)
        set_num_iters(deeper, 2)
        out[f"pgd{steps}_through_2T_solver"] = accuracy(net, x, y, attack_net=deeper, steps=steps)
    if twin is not None and twin is not net:
        out[f"transfer_pgd{steps}_from_twin"] = accuracy(net, x, y, attack_net=twin, steps=steps)
    return out


def train(net, x_u8, y, args):
    steps_per_epoch = len(x_u8) // args.batch_size
    total = steps_per_epoch * args.epochs
    opt = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=total, pct_start=0.25)
    g = torch.Generator().manual_seed(args.seed)
    losses = []
    for epoch in range(args.epochs):
        net.train()
        order = torch.randperm(len(x_u8), generator=g)
        for s in range(steps_per_epoch):
            idx = order[s * args.batch_size:(s + 1) * args.batch_size]
            xb = random_crop_flip(x_u8[idx], generator=g).float() / 255
            yb = y[idx]
            # --bf16: the attack and the loss forward under autocast, as accelerate runs them for
            # scripts/train.py --mixed-precision bf16; evaluation below stays float32
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                if args.adv == "fgsm":
                    xb = fgsm_rs(net, xb, yb, 8 / 255, 10 / 255, generator=g)
                loss = F.cross_entropy(net(xb).float(), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        print(f"    epoch {epoch + 1}: loss {sum(losses[-steps_per_epoch:]) / steps_per_epoch:.3f}", flush=True)
    return losses


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/cifar10")
    ap.add_argument("--train-n", type=int, default=10000)
    ap.add_argument("--eval-n", type=int, default=500)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--adv", choices=["none", "fgsm"], default="none")
    ap.add_argument("--pgd-steps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bf16", action="store_true", help="train (attack and loss forward) under bfloat16 autocast")
    ap.add_argument("--variant", action="append", required=True, help="name:key=value,... (model kwargs)")
    ap.add_argument("--no-audit", action="store_true", help="skip the gradient-masking audit (the first variant is "
                    "the transfer source for the others)")
    args = ap.parse_args()

    # both splits of the JPEG copy are sorted by class: take fixed random subsets, not the first N
    x_train, y_train = load_image_split(args.data, "train")
    idx = random_subset(y_train, args.train_n, seed=1)
    x_train, y_train = x_train[idx], y_train[idx]
    x_test, y_test = load_image_split(args.data, "test")
    idx = random_subset(y_test, args.eval_n)
    x_test, y_test = x_test[idx].float() / 255, y_test[idx]
    print(f"{len(x_train)} train images, {len(x_test)} test images (JPEG CIFAR-10 copy), adv={args.adv}, "
          f"{args.epochs} epochs, training in {'bfloat16 autocast' if args.bf16 else 'float32'}", flush=True)
    rows, first = [], None
    for text in args.variant:
        name, kwargs = parse_variant(text)
        net = build(kwargs, args.seed)
        t0 = time.time()
        print(f"{name} {kwargs}", flush=True)
        losses = train(net, x_train, y_train, args)
        train_s = time.time() - t0
        clean = accuracy(net, x_test, y_test, steps=0)
        robust = accuracy(net, x_test, y_test, steps=args.pgd_steps)
        first = first or net
        extra = {} if args.no_audit else audit(net, x_test, y_test, first, args.pgd_steps)
        betas = [round(m.beta.item(), 3) for m in net.modules() if edl_timm.is_edl_layer(m)]
        row = dict(variant=name, kwargs=kwargs, adv=args.adv, bf16=args.bf16, clean=clean, pgd=robust, pgd_steps=args.pgd_steps, **extra,
                   min_robust=min([robust, *[v for k, v in extra.items() if "eps" not in k]]),
                   final_loss=sum(losses[-10:]) / len(losses[-10:]), train_s=round(train_s), betas=betas)
        rows.append(row)
        print("RESULT " + json.dumps(row), flush=True)
    print(f"\n{'variant':<16} {'clean':>6} {'PGD-' + str(args.pgd_steps):>6} {'loss':>6} {'train s':>7}  betas")
    for r in rows:
        print(f"{r['variant']:<16} {100 * r['clean']:6.1f} {100 * r['pgd']:6.1f} {r['final_loss']:6.3f} "
              f"{r['train_s']:7d}  {r['betas']}")


if __name__ == "__main__":
    main()
