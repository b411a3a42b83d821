"""Speed of the seg_unet3d bundle against a pipeline built like the model-zoo ``spleen_ct_segmentation`` bundle.

    python benchmarks/seg_unet3d_speed.py [--pixdim 2.0] [--roi 96] [--cases 4] [--rounds 2]
    python benchmarks/seg_unet3d_speed.py --smoke      # seconds: tiny sizes, checks that it runs

Issue 3, acceptance 7. Both pipelines get the same network (the bundle's ``network_def``: residual UNet
28..448, 14.7 M parameters, or ``--channels``, with the same initial weights), the same data (``--cases`` phantom
scans of ``--shape`` 160x160x80 voxels, resampled to ``--pixdim`` mm), the same crop size (``--roi``^3) and the same
number of crops per iteration (the bundle's ``num_samples`` x ``batch_size``); everything else follows each pipeline's
own choices:

- reference (rebuilt from spleen_ct_segmentation's train.json / inference.json): ``CacheDataset`` of LoadImaged,
  EnsureChannelFirstd, Orientationd, Spacingd, ScaleIntensityRanged, EnsureTyped, then RandCropByPosNegLabeld
  (foreground / background indices recomputed for every sample); ``DataLoader`` with 4 worker processes; DiceCELoss,
  Novograd, StepLR, train post-processing + Accuracy metric every iteration, Stats and TensorBoard handlers, amp
  as configured there (a no-op on a CPU); inference: ``Dataset`` + ``DataLoader`` (4 workers),
  ``SlidingWindowInferer`` (sw_batch_size 4, overlap 0.5, constant blending) on the whole resampled scan, softmax,
  ``Invertd`` back to the scan's grid, argmax, ``SaveImaged`` (float32 NIfTI).
- this bundle: ``configs/train.json`` and ``configs/inference.json`` as shipped (body crop cached, cached
  foreground / background indices, ``ThreadDataLoader``, resumable checkpoint every epoch, gaussian sliding window
  with a cached weight map on the body box only, uint8 NIfTI output), with only the sizes above overridden, twice:
  in float32 (``precision fp32``) and in its default precision (``precision auto``: bf16 autocast on a CPU with
  AVX512-BF16 / AMX, float32 elsewhere, fp16 on CUDA; ``scripts/precision.py``). Where the default resolves to
  float32 the two are the same run and are measured once.

Training speed is iterations per second over ``--epochs`` epochs after one warm-up epoch (worker start-up and
checkpoint writing included, caching excluded); inference speed is seconds per scan for the whole evaluator run
(loading, resampling, sliding window, inversion to the original grid, writing). With ``--rounds 2`` each pipeline
runs twice in the order reference, bundle, bundle, reference (reference, fp32, default, default, fp32, reference
where the default is not float32), so that a change in machine load affects all alike. Prints each measurement and
the ratios (bundle / reference for iterations per second, reference / bundle for seconds per scan) for the bundle in
float32 and in its default precision: a ratio >= 1 means the bundle is not slower. Results also go to
``<out>/speed.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from smoke import parse_args_with_smoke

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "seg_unet3d"
HU_WINDOW = (-175.0, 250.0)
SMOKE = {
    "pixdim": 6.0,
    "roi": 32,
    "cases": 1,
    "shape": "48,48,24",
    "epochs": 1,
    "rounds": 1,
    "channels": "4,8,16,32,64",
}


def bundle_workflow(config: str, overrides: dict, workflow_type: str):
    from monai.bundle import ConfigWorkflow

    return ConfigWorkflow(
        config_file=str(BUNDLE / "configs" / config),
        meta_file=str(BUNDLE / "configs" / "metadata.json"),
        logging_file=False,
        workflow_type=workflow_type,
        **overrides,
    )


class EpochTimer:
    """Wall time and iterations of the epochs after ``warmup`` (from EPOCH_STARTED to the end of the run)."""

    def __init__(self, warmup: int = 1):
        self.warmup = warmup
        self.start = None
        self.first_iteration = None
        self.seconds = None
        self.iterations = None

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_STARTED(once=self.warmup + 1), self.started)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def started(self, engine) -> None:
        self.start = time.perf_counter()
        self.first_iteration = engine.state.iteration

    def completed(self, engine) -> None:
        self.seconds = time.perf_counter() - self.start
        self.iterations = engine.state.iteration - self.first_iteration

    @property
    def iterations_per_second(self) -> float:
        return self.iterations / self.seconds


def sizes(args) -> dict:
    """The overrides both bundle configs get: voxel size, crop size and, where given, the network's widths."""
    overrides = {"pixdim": [args.pixdim] * 3, "roi_size": [args.roi] * 3}
    if args.channels:
        overrides["network_def#channels"] = [int(v) for v in args.channels.split(",")]
    return overrides


# ----------------------------------------------------------------------------------------------------------------
# the reference pipeline (spleen_ct_segmentation's choices, our network / data / crop)


def reference_train(files, network, args, crops, log_dir):
    import ignite
    from monai.data import CacheDataset, DataLoader
    from monai.engines import SupervisedTrainer
    from monai.handlers import LrScheduleHandler, StatsHandler, TensorBoardStatsHandler, from_engine
    from monai.inferers import SimpleInferer
    from monai.losses import DiceCELoss
    from monai.optimizers import Novograd
    from monai.transforms import (
        Activationsd,
        AsDiscreted,
        Compose,
        EnsureChannelFirstd,
        EnsureTyped,
        LoadImaged,
        Orientationd,
        RandCropByPosNegLabeld,
        ScaleIntensityRanged,
        Spacingd,
    )

    keys = ["image", "label"]
    transform = Compose(
        [
            LoadImaged(keys=keys),
            EnsureChannelFirstd(keys=keys),
            Orientationd(keys=keys, axcodes="RAS", labels=None),
            Spacingd(keys=keys, pixdim=[args.pixdim] * 3, mode=("bilinear", "nearest")),
            ScaleIntensityRanged(keys="image", a_min=HU_WINDOW[0], a_max=HU_WINDOW[1], b_min=0, b_max=1, clip=True),
            EnsureTyped(keys=keys),
            RandCropByPosNegLabeld(
                keys=keys,
                label_key="label",
                spatial_size=[args.roi] * 3,
                pos=1,
                neg=1,
                num_samples=crops["num_samples"],
                image_key="image",
                image_threshold=0,
            ),
        ]
    )
    dataset = CacheDataset(files, transform, cache_rate=1.0, num_workers=4, progress=False)
    loader = DataLoader(dataset, batch_size=crops["batch_size"], shuffle=True, num_workers=args.reference_workers)
    optimizer = Novograd(network.parameters(), lr=0.002)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=5000, gamma=0.1)
    loss = DiceCELoss(
        include_background=True,
        to_onehot_y=True,
        softmax=True,
        squared_pred=True,
        batch=True,
        smooth_nr=1e-5,
        smooth_dr=1e-5,
        lambda_dice=0.5,
        lambda_ce=0.5,
    )
    classes = int(crops["num_classes"])
    post = Compose(
        [
            Activationsd(keys="pred", softmax=True),
            AsDiscreted(keys=["pred", "label"], argmax=[True, False], to_onehot=classes),
        ]
    )
    timer = EpochTimer()
    handlers = [
        LrScheduleHandler(lr_scheduler=scheduler, print_lr=True),
        StatsHandler(tag_name="train_loss", output_transform=from_engine(["loss"], first=True)),
        TensorBoardStatsHandler(
            log_dir=log_dir, tag_name="train_loss", output_transform=from_engine(["loss"], first=True)
        ),
        timer,
    ]
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1 + args.epochs,
        train_data_loader=loader,
        network=network,
        optimizer=optimizer,
        loss_function=loss,
        inferer=SimpleInferer(),
        postprocessing=post,
        key_train_metric={"train_accuracy": ignite.metrics.Accuracy(output_transform=from_engine(["pred", "label"]))},
        train_handlers=handlers,
        amp=True,
    )
    trainer.run()
    return timer


def reference_infer(images, network, args, out_dir) -> float:
    from monai.data import DataLoader, Dataset
    from monai.engines import SupervisedEvaluator
    from monai.handlers import StatsHandler
    from monai.inferers import SlidingWindowInferer
    from monai.transforms import (
        Activationsd,
        AsDiscreted,
        Compose,
        EnsureChannelFirstd,
        EnsureTyped,
        Invertd,
        LoadImaged,
        Orientationd,
        SaveImaged,
        ScaleIntensityRanged,
        Spacingd,
    )

    pre = Compose(
        [
            LoadImaged(keys="image"),
            EnsureChannelFirstd(keys="image"),
            Orientationd(keys="image", axcodes="RAS", labels=None),
            Spacingd(keys="image", pixdim=[args.pixdim] * 3, mode="bilinear"),
            ScaleIntensityRanged(keys="image", a_min=HU_WINDOW[0], a_max=HU_WINDOW[1], b_min=0, b_max=1, clip=True),
            EnsureTyped(keys="image"),
        ]
    )
    dataset = Dataset([{"image": i} for i in images], pre)
    loader = DataLoader(dataset, batch_size=1, shuffle=False, num_workers=args.reference_workers)
    post = Compose(
        [
            Activationsd(keys="pred", softmax=True),
            Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=False, to_tensor=True),
            AsDiscreted(keys="pred", argmax=True),
            SaveImaged(
                keys="pred",
                output_dir=str(out_dir),
                output_postfix="trans",
                output_dtype=np.float32,
                separate_folder=True,
                print_log=False,
            ),
        ]
    )
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=loader,
        network=network,
        inferer=SlidingWindowInferer(roi_size=[args.roi] * 3, sw_batch_size=4, overlap=0.5),
        postprocessing=post,
        val_handlers=[StatsHandler(iteration_log=False)],
        amp=True,
    )
    start = time.perf_counter()
    evaluator.run()
    return (time.perf_counter() - start) / len(images)


# ----------------------------------------------------------------------------------------------------------------
# this bundle


def bundle_train(files, args, crops, work: Path, precision: str):
    overrides = {
        "precision": precision,
        **sizes(args),
        "bundle_root": str(BUNDLE),
        "ckpt_dir": str(work / "models"),
        "output_dir": str(work / "eval"),
        "train#dataset#data": files,
        "validate#dataset#data": [],  # no validation in the timed run (inference is timed separately)
        "train#trainer#max_epochs": 1 + args.epochs,
        "num_samples": crops["num_samples"],
        "batch_size": crops["batch_size"],
    }
    workflow = bundle_workflow("train.json", overrides, "train")
    workflow.initialize()
    timer = EpochTimer()
    timer.attach(workflow.parser.get_parsed_content("train#trainer"))
    workflow.run()
    workflow.finalize()
    return timer


def bundle_infer(images, args, ckpt: Path, out_dir: Path, precision: str) -> float:
    overrides = {
        "precision": precision,
        **sizes(args),
        "bundle_root": str(BUNDLE),
        "datalist": images,
        "ckpt_path": str(ckpt),
        "output_dir": str(out_dir),
    }
    workflow = bundle_workflow("inference.json", overrides, "infer")
    workflow.initialize()
    start = time.perf_counter()
    workflow.run()
    seconds = (time.perf_counter() - start) / len(images)
    workflow.finalize()
    return seconds


# ----------------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pixdim", type=float, default=2.0, help="voxel size in mm for both pipelines")
    parser.add_argument("--roi", type=int, default=96, help="crop / sliding-window size")
    parser.add_argument("--cases", type=int, default=4, help="phantom scans (training set and inference set)")
    parser.add_argument("--shape", default="160,160,80", help="voxels of each phantom scan")
    parser.add_argument("--channels", default=None, help="UNet channels, e.g. 4,8,16,32,64 (default: the config's)")
    parser.add_argument("--epochs", type=int, default=2, help="timed training epochs after one warm-up epoch")
    parser.add_argument("--rounds", type=int, default=2, help="1: reference then bundle; 2: ABBA")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="folder for speed.json (default: a temporary folder)")
    parser.add_argument(
        "--precision", default=None, help="the bundle precision compared with fp32 (default: the config's, auto)"
    )
    parser.add_argument("--skip_training", action="store_true")
    parser.add_argument("--skip_inference", action="store_true")
    parser.add_argument(
        "--reference_workers", type=int, default=4, help="DataLoader workers of the reference (spleen: 4); a diagnostic"
    )
    args = parse_args_with_smoke(parser, SMOKE)

    from monai.bundle import ConfigParser
    from monai.utils import set_determinism

    from tools.phantom import make_dataset

    sys.path.insert(0, str(BUNDLE))
    work = Path(
        args.out or tempfile.mkdtemp(prefix="seg_unet3d_speed_smoke_" if args.smoke else "seg_unet3d_speed_")
    ).resolve()
    work.mkdir(parents=True, exist_ok=True)
    data = work / "phantom"
    shape = tuple(int(v) for v in args.shape.split(","))
    make_dataset(
        data,
        n_cases=args.cases,
        seed=args.seed,
        shape=shape,
        tumor_fraction=0.5,
        test_fraction=0.0,
        progress=False,
    )
    entries = json.loads((data / "dataset.json").read_text())["training"]
    files = [{"image": str(data / e["image"]), "label": str(data / e["label"])} for e in entries]
    images = [f["image"] for f in files]

    config = ConfigParser()
    config.read_config(str(BUNDLE / "configs" / "train.json"))
    crops = {
        "num_samples": int(config["num_samples"]),
        "batch_size": int(config["batch_size"]),
        "num_classes": int(config["num_classes"]),
    }

    def network(seed: int = args.seed):
        torch.manual_seed(seed)
        parser = ConfigParser()
        parser.read_config(str(BUNDLE / "configs" / "inference.json"))
        if args.channels:  # the same widths as the bundle's overrides (sizes)
            parser["network_def#channels"] = sizes(args)["network_def#channels"]
        return parser.get_parsed_content("network_def")

    initial = work / "initial_weights.pt"
    torch.save(network().state_dict(), initial)
    sys.path.insert(0, str(BUNDLE))
    from scripts.precision import describe

    requested = args.precision or config["precision"]
    default = describe(requested, "cpu")
    # the bundle's runs: float32, and its default precision where that is not float32 on this CPU
    bundles = {"bundle": "fp32"}
    if default["precision"] != "fp32":
        bundles["bundle_default"] = requested
    order = ["reference", *bundles]
    if args.rounds > 1:
        order += order[::-1]
    results: dict[str, dict[str, list[float]]] = {name: {} for name in ["reference", *bundles]}
    print(
        f"bundle precision compared with fp32: {requested!r} -> {default['precision']} on this CPU "
        f"(native bf16: {default.get('cpu_native_bf16')})",
        flush=True,
    )
    print(
        f"threads {torch.get_num_threads()}, {args.cases} phantom scans {'x'.join(map(str, shape))} at "
        f"{args.pixdim} mm, "
        f"crops {args.roi}^3 x {crops['num_samples'] * crops['batch_size']} per iteration",
        flush=True,
    )

    for index, name in enumerate(order):
        if args.skip_training:
            break
        set_determinism(args.seed)
        run_dir = work / f"train_{index}_{name}"
        if name == "reference":
            timer = reference_train(files, network(), args, crops, str(run_dir / "tensorboard"))
        else:
            timer = bundle_train(files, args, crops, run_dir, bundles[name])
        results[name].setdefault("train_iterations_per_second", []).append(timer.iterations_per_second)
        print(
            f"train {name}: {timer.iterations} iterations in {timer.seconds:.1f} s = "
            f"{timer.iterations_per_second:.4f} it/s",
            flush=True,
        )

    for index, name in enumerate(order):
        if args.skip_inference:
            break
        set_determinism(args.seed)
        out_dir = work / f"infer_{index}_{name}"
        if name == "reference":
            net = network()
            net.load_state_dict(torch.load(initial, map_location="cpu", weights_only=True))
            seconds = reference_infer(images, net.eval(), args, out_dir)
        else:
            seconds = bundle_infer(images, args, initial, out_dir, bundles[name])
        results[name].setdefault("infer_seconds_per_volume", []).append(seconds)
        print(f"inference {name}: {seconds:.2f} s per scan", flush=True)

    summary = {}
    for name, measured in results.items():
        summary[name] = {key: statistics.mean(values) for key, values in measured.items()}
    ratios: dict[str, dict[str, float]] = {}
    reference = summary["reference"]
    for name in bundles:
        measured = summary[name]
        ratios[name] = {}
        if "train_iterations_per_second" in measured:
            ratios[name]["train_iterations_per_second"] = (
                measured["train_iterations_per_second"] / reference["train_iterations_per_second"]
            )
        if "infer_seconds_per_volume" in measured:
            ratios[name]["infer_seconds_per_volume"] = (
                reference["infer_seconds_per_volume"] / measured["infer_seconds_per_volume"]
            )
    if "bundle_default" not in bundles:
        ratios["bundle_default"] = ratios["bundle"]  # the default is float32 on this CPU: the same run
    report = {
        "settings": vars(args),
        "crops": crops,
        "default_precision": default,
        "measurements": results,
        "mean": summary,
        "ratios": ratios,
    }
    (work / "speed.json").write_text(json.dumps(report, indent=1))
    chosen = f"default: {default['precision']}" if args.precision is None else default["precision"]
    labels = {"bundle": "bundle (fp32)", "bundle_default": f"bundle ({chosen})"}
    for name, label in labels.items():
        measured = summary.get(name, summary["bundle"])
        if "train_iterations_per_second" in ratios[name]:
            print(
                f"training: {label} {measured['train_iterations_per_second']:.4f} it/s, reference "
                f"{reference['train_iterations_per_second']:.4f} it/s, "
                f"ratio bundle/reference = {ratios[name]['train_iterations_per_second']:.2f}"
            )
        if "infer_seconds_per_volume" in ratios[name]:
            print(
                f"inference: {label} {measured['infer_seconds_per_volume']:.2f} s/scan, reference "
                f"{reference['infer_seconds_per_volume']:.2f} s/scan, "
                f"ratio reference/bundle = {ratios[name]['infer_seconds_per_volume']:.2f}"
            )
    if "bundle_default" not in bundles:
        print(f"(the default precision is {default['precision']} on this CPU: the default's ratios are the fp32 run's)")
    print(f"(ratio >= 1: the bundle is not slower) results in {work / 'speed.json'}")


if __name__ == "__main__":
    main()
