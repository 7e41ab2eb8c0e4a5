"""Images/second of the robust pipeline on this machine, EDL model and its plain twin side by side.

    python benchmarks/pipeline_speed.py                    # edl_resnet18, CPU
    python benchmarks/pipeline_speed.py --device cuda --bf16 --channels-last --compile

Evaluation: PGD-20 (L-inf 8/255), batched. Training: one optimizer step of each objective
(--adv none | fgsm | pgd with 10 steps), through the same code as scripts/train.py (``edl_timm.objectives.objective_loss``).
Each figure is the fastest of --repeats timed runs after one warm-up; ratios are EDL / plain.
"""
import argparse

import timm
import torch

import edl_timm  # noqa: F401  (registers the models)
from _timing import fastest_times  # benchmarks/, first on sys.path when run as a script
from edl_timm.attacks import Normalized, pgd
from edl_timm.cpu import keep_freed_memory
from edl_timm.objectives import objective_loss


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="edl_resnet18")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true")
    args = p.parse_args()
    torch.manual_seed(0)
    dev = torch.device(args.device)
    kept = dev.type == "cpu" and keep_freed_memory()  # as scripts/train.py and evaluate.py do on the CPU
    x = torch.rand(args.batch_size, 3, 32, 32, device=dev)
    y = torch.randint(0, 10, (args.batch_size,), device=dev)
    rows = {}
    for label, mode in (("edl", "elastic"), ("plain", "none")):
        model = timm.create_model(args.model, mode=mode).to(dev)
        if args.channels_last:
            model = model.to(memory_format=torch.channels_last)
        net = Normalized(model, model.pretrained_cfg["mean"], model.pretrained_cfg["std"]).to(dev)
        if args.compile:
            net = torch.compile(net)
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
        ctx = torch.autocast(dev.type, dtype=torch.bfloat16) if args.bf16 else torch.autocast(dev.type, enabled=False)

        def attack():
            net.eval()
            with ctx:
                pgd(net, x, y, 8 / 255, 2 / 255, 20)

        def step(adv):
            def run():
                net.train()
                with ctx:
                    loss, _ = objective_loss(adv, net, x, y, eps=8 / 255, steps=10)
                opt.zero_grad()
                loss.backward()
                opt.step()
            return run

        rows[label] = {"PGD-20 eval": args.batch_size / fastest_times([attack], args.repeats)[0]}
        for adv in ("none", "fgsm", "pgd"):
            rows[label][f"train --adv {adv}"] = args.batch_size / fastest_times([step(adv)], args.repeats)[0]
    print(f"{args.model} on {args.device}, batch {args.batch_size}{', bf16' if args.bf16 else ''}"
          f"{', channels_last' if args.channels_last else ''}{', compiled' if args.compile else ''}"
          f"{', keep_freed_memory()' if kept else ''}")
    print(f"{'':<20} {'EDL img/s':>10} {'plain img/s':>12} {'EDL/plain time':>15}")
    for key in rows["edl"]:
        e, pl = rows["edl"][key], rows["plain"][key]
        print(f"{key:<20} {e:>10.1f} {pl:>12.1f} {pl / e:>15.2f}")


if __name__ == "__main__":
    main()
