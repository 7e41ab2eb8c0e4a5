#!/usr/bin/env python
"""Package a training output and its evaluation report for the Hugging Face Hub, and upload it.

    python scripts/push_to_hub.py --train-dir runs/rn18 --eval-report runs/rn18/eval_report.json \
        --tag cifar10_fgsm_at --default --dry-run --output-dir releases/edl_resnet18.cifar10_fgsm_at

Writes a Hub-ready folder (model.safetensors, timm config.json, model card README.md,
eval_report.json, and the checkpoint's hub config <architecture>.<tag>.yaml, which --hub-configs-dir
hub_configs also writes into the checkout to register the tag), then uploads the folder with
huggingface_hub (token from --token, HF_TOKEN or `hf auth login`), unless --dry-run. Nothing that
exists is overwritten: a release folder must be new or empty, and a tag's existing hub config is
replaced only with --replace-hub-config.
"""
import argparse
import json
import sys
import tempfile
from pathlib import Path

import jsonschema

from edl_timm.evaluation import validate_corruption_report, validate_report
from edl_timm.hub import CheckpointError
from edl_timm.publish import build_release, upload_release


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--train-dir", required=True, help="training output: model.safetensors + config.json (+ args.json)")
    p.add_argument("--eval-report", required=True, help="scripts/evaluate.py's JSON report for these weights")
    p.add_argument("--extra-reports", nargs="+", default=[], metavar="REPORT",
                   help="reports of the same weights beside --eval-report: evaluate.py reports of other norms "
                        "(--norm L2, L1) and corruption reports (--corruptions), shown on the card and kept in the folder; "
                        "a report of --eval-report's own threat model joins it (e.g. AutoAttack run again with more "
                        "attacks beside the first report's audit)")
    p.add_argument("--tag", required=True, help="timm tag, e.g. cifar10_fgsm_at")
    p.add_argument("--repo-id", default=None, help="default: edl-timm/<architecture>.<tag>")
    p.add_argument("--default", action="store_true", help="make this the architecture's default tag")
    p.add_argument("--output-dir", default=None, help="where to write the Hub-ready folder (default: a temporary folder)")
    p.add_argument("--hub-configs-dir", default=None,
                   help="also write the hub config (<architecture>.<tag>.yaml) here, e.g. the checkout's hub_configs, "
                        "which registers the tag with the package (default: only into the release folder)")
    p.add_argument("--replace-hub-config", action="store_true",
                   help="replace an existing hub config of the same architecture and tag in --hub-configs-dir")
    p.add_argument("--dataset-id", default=None, help="Hub id of the training data (needed when the report names a local folder)")
    p.add_argument("--license", default="apache-2.0")
    p.add_argument("--notes", default="")
    p.add_argument("--dry-run", action="store_true", help="write the folder and the hub config, upload nothing")
    p.add_argument("--token", default=None)
    p.add_argument("--private", action="store_true")
    args = p.parse_args(argv)
    try:
        report = json.loads(Path(args.eval_report).read_text())
        validate_report(report)
    except FileNotFoundError:
        print(f"error: --eval-report {args.eval_report} does not exist: write it with scripts/evaluate.py --model "
              f"{args.train_dir} --output {args.eval_report}", file=sys.stderr)
        return 2
    except (ValueError, jsonschema.ValidationError) as e:  # not JSON, or not a report
        print(f"error: --eval-report {args.eval_report} is not an evaluation report of scripts/evaluate.py "
              f"({str(e).splitlines()[0]})", file=sys.stderr)
        return 2
    extra = []
    for path in args.extra_reports:
        try:
            r = json.loads(Path(path).read_text())
            (validate_corruption_report if r.get("schema") == "edl-timm/corruption-report/1" else validate_report)(r)
        except FileNotFoundError:
            print(f"error: --extra-reports {path} does not exist", file=sys.stderr)
            return 2
        except (ValueError, AttributeError, jsonschema.ValidationError) as e:
            print(f"error: --extra-reports {path} is not a report of scripts/evaluate.py ({str(e).splitlines()[0]})",
                  file=sys.stderr)
            return 2
        extra.append(r)
    out = Path(args.output_dir) if args.output_dir else Path(tempfile.mkdtemp(prefix="edl_release_"))
    try:
        cfg = build_release(args.train_dir, report, out, args.tag, repo_id=args.repo_id, hub_configs_dir=args.hub_configs_dir,
                            default=args.default, license=args.license, notes=args.notes, dataset_id=args.dataset_id,
                            replace_hub_config=args.replace_hub_config, extra_reports=extra)
    except (CheckpointError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cfg_dir = Path(args.hub_configs_dir) if args.hub_configs_dir else out
    print(f"release folder: {out}\nhub config: {cfg_dir / (cfg['architecture'] + '.' + cfg['tag'] + '.yaml')}")
    if args.dry_run:
        return 0
    print("uploaded:", upload_release(out, cfg["hf_hub_id"], token=args.token, private=args.private))
    return 0


if __name__ == "__main__":
    sys.exit(main())
