"""Learning check of the seg_unet3d bundle (issue 3, acceptance 6): does the bundle really learn the pancreas?

    python benchmarks/seg_unet3d_learning.py [--out runs/seg_unet3d_learning] [--epochs 40] [--seed 0]
    python benchmarks/seg_unet3d_learning.py --smoke    # seconds: tiny sizes in runs/seg_unet3d_learning_smoke

1. Makes a phantom data set with ``tools`` (``--n_cases`` patients, half with a tumor, a quarter held out as the
   test set), the same as ``python -m tools data phantom``.
2. Trains the bundle's own ``configs/train.json`` (the 14.7 M-parameter residual UNet, DiceCE, Adam, crops sampled
   half on the pancreas) on the CPU with command-line style overrides only: coarser voxels (``--pixdim`` mm), smaller
   crops (``--roi``), fewer epochs, validation every ``--val_interval`` epochs, and ``--learning_rate``.
3. Evaluates the best checkpoint with ``configs/evaluate.json`` on the held-out test patients (original grid).

``--precision`` (auto, fp32, bf16) sets the bundle's precision: the same seed in fp32 and in bf16 tells whether bf16
learns as well (issue 16: within 0.02 validation Dice).

Prints the validation pancreas Dice after each validation, the best one, the test-set Dice / NSD / HD95 and the
wall time, and writes them to ``<out>/result.json``. The pancreas region is labels 1 and 2 (the organ with its
tumor). The bundle's equivalent command line is printed too.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from smoke import parse_args_with_smoke

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "seg_unet3d"
SMOKE = {
    "out": "runs/seg_unet3d_learning_smoke",
    "n_cases": 4,
    "shape": "48,48,24",
    "pixdim": 8.0,
    "roi": 32,
    "epochs": 1,
    "val_interval": 1,
    "channels": "4,8,16,32,64",
}


def bundle_overrides(args: argparse.Namespace, data: Path, out: Path) -> dict:
    overrides = {
        "bundle_root": str(BUNDLE),
        "dataset_dir": str(data),
        "ckpt_dir": str(out / "models"),
        "output_dir": str(out / "eval"),
        "pixdim": [args.pixdim] * 3,
        "roi_size": [args.roi] * 3,
        "train#trainer#max_epochs": args.epochs,
        "val_interval": args.val_interval,
        "learning_rate": args.learning_rate,
        "seed": args.seed,
        "cache_workers": 2,
    }
    if args.channels:
        overrides["network_def#channels"] = [int(v) for v in args.channels.split(",")]
    if args.precision:
        overrides["precision"] = args.precision
    return overrides


def shell_value(value) -> str:
    """A command-line value as ``python -m monai.bundle run`` (fire) reads it: lists quoted, without spaces."""
    if isinstance(value, str):
        return value
    text = json.dumps(value, separators=(",", ":"))
    return f'"{text}"' if isinstance(value, (list, dict)) else text


def run_workflow(config_files: list[str], overrides: dict, on_ready=None):
    from monai.bundle import ConfigWorkflow

    sys.path.insert(0, str(BUNDLE))
    workflow = ConfigWorkflow(
        config_file=[str(BUNDLE / name) for name in config_files],
        meta_file=str(BUNDLE / "configs" / "metadata.json"),
        logging_file=str(BUNDLE / "configs" / "logging.conf"),
        workflow_type="train",
        **overrides,
    )
    workflow.initialize()
    if on_ready is not None:
        on_ready(workflow)
    workflow.run()
    workflow.finalize()
    return workflow


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/seg_unet3d_learning")
    parser.add_argument("--n_cases", type=int, default=16)
    parser.add_argument("--shape", default="160,160,80")
    parser.add_argument("--seed", type=int, default=0, help="phantom seed and training seed")
    parser.add_argument("--pixdim", type=float, default=3.0)
    parser.add_argument("--roi", type=int, default=48)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--val_interval", type=int, default=5)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--channels", default=None, help="UNet channels, e.g. 4,8,16,32,64 (default: the config's)")
    parser.add_argument(
        "--precision", default=None, help="auto, fp32, bf16 (default: the config's, auto); compare runs on one seed"
    )
    args = parse_args_with_smoke(parser, SMOKE)

    from ignite.engine import Events

    from tools.phantom import make_dataset

    out = Path(args.out).resolve()
    if (out / "models").exists():
        raise SystemExit(f"{out / 'models'} exists: the run would resume; remove it or pick another --out")
    start = time.perf_counter()
    shape = tuple(int(v) for v in args.shape.split(","))
    data = out / "phantom"
    make_dataset(
        data, n_cases=args.n_cases, seed=args.seed, shape=shape, tumor_fraction=0.5, test_fraction=0.25, progress=False
    )
    made = time.perf_counter()
    overrides = bundle_overrides(args, data, out)
    print("equivalent command (from bundles/seg_unet3d):")
    print(
        "  python -m monai.bundle run --config_file configs/train.json "
        + " ".join(f"--{k} {shell_value(v)}" for k, v in overrides.items() if k != "bundle_root")
    )

    history = []

    def record(workflow):
        evaluator = workflow.parser.get_parsed_content("validate#evaluator")
        trainer = workflow.parser.get_parsed_content("train#trainer")

        def log(engine):
            metrics = dict(engine.state.metrics)
            row = {"epoch": trainer.state.epoch, "seconds": round(time.perf_counter() - start, 1), **metrics}
            history.append(row)
            print(
                f"[learning] epoch {row['epoch']}: validation pancreas Dice {metrics['val_pancreas_dice']:.4f} "
                f"(mean Dice {metrics['val_mean_dice']:.4f}) at {row['seconds']:.0f} s",
                flush=True,
            )

        evaluator.add_event_handler(Events.COMPLETED, log)

    train = run_workflow(["configs/train.json"], overrides, record)
    trained = time.perf_counter()
    split = train.parser.get_parsed_content("data_split")
    evaluation = run_workflow(["configs/train.json", "configs/evaluate.json"], overrides)
    report = next(h for h in evaluation.parser.get_parsed_content("validate#handlers") if hasattr(h, "summary"))
    end = time.perf_counter()

    test = {(row["region"], row["metric"]): row for row in report.summary["regions"]}
    best = max(history, key=lambda row: row["val_mean_dice"]) if history else {}
    result = {
        "settings": vars(args),
        "data": {
            "training": len(split["training"]),
            "validation": len(split["validation"]),
            "test": len(split["test"]),
        },
        "validation_history": history,
        "best_validation_pancreas_dice": max((row["val_pancreas_dice"] for row in history), default=None),
        "validation_pancreas_dice_of_best_checkpoint": best.get("val_pancreas_dice"),
        "final_validation_pancreas_dice": history[-1]["val_pancreas_dice"] if history else None,
        "test_pancreas_dice": test[("pancreas", "dice")]["mean"],
        "test_pancreas_nsd_2mm": test[("pancreas", "nsd")]["mean"],
        "test_pancreas_hd95_mm": test[("pancreas", "hd95")]["mean"],
        "seconds": {
            "phantom": round(made - start, 1),
            "training": round(trained - made, 1),
            "evaluation": round(end - trained, 1),
            "total": round(end - start, 1),
        },
    }
    (out / "result.json").write_text(json.dumps(result, indent=1, default=str))
    print(f"[learning] data: {result['data']} scans (training / validation / test)")
    best_dice = result["validation_pancreas_dice_of_best_checkpoint"]
    print(
        f"[learning] validation pancreas Dice of the best checkpoint: {best_dice:.4f} (best seen "
        f"{result['best_validation_pancreas_dice']:.4f}, last {result['final_validation_pancreas_dice']:.4f})"
    )
    print(
        f"[learning] test pancreas Dice {result['test_pancreas_dice']:.4f}, "
        f"NSD@2mm {result['test_pancreas_nsd_2mm']:.4f}, HD95 {result['test_pancreas_hd95_mm']:.1f} mm "
        f"over {result['data']['test']} test scans"
    )
    print(f"[learning] time: {result['seconds']}")


if __name__ == "__main__":
    main()
