"""CPU speed: every bundle's training step in fp32 against bf16 autocast, and the seg step against the CPU's peak.

    python benchmarks/cpu_speed.py [--rounds 4] [--threads 1] [--only seg,vae_ct,ldm_abdomen,difftumor]
    python benchmarks/cpu_speed.py --smoke      # seconds: tiny sizes, checks that it runs

Issue 16, point 3. Whether ``precision: auto`` should mean bf16 on a CPU depends on the CPU: with AVX512-BF16 or AMX
bf16 convolutions run in hardware, with AVX2 only oneDNN emulates them. This script measures it where it runs, in
one process, the two paths of every pair interleaved (A B A B ...: ``--rounds`` rounds of one step each, after one
untimed warm-up step per path), so that a change in machine load hits both alike; a ratio is the median step time
of A over the median of B (> 1: B is faster). ``--threads`` (default 1, as the demo trains each generator) applies
to everything.

1. seg_unet3d: the training step of ``configs/train.json`` (its ``network``, ``loss`` and ``optimizer``, parsed with
   ``precision`` set to ``fp32`` or ``bf16``: bf16 wraps the network in ``scripts.precision.autocast_network``) at
   the config's full width (residual UNet 28..448, 14.7 M parameters) on ``num_samples x batch_size`` random
   ``--seg_roi``^3 crops: forward, DiceCE, backward, Adam step, as its ``SupervisedTrainer`` takes it on a CPU.
   Two more pairs, fp32 only: ``torch.set_flush_denormal(True)`` against off, and the network and crops in
   ``torch.channels_last_3d`` against contiguous (InstanceNorm may make channels-last slower).
2. the machine's matmul peak (the best of 3 square ``torch.mm`` of ``--matmul_size``, fp32 and bf16; smaller where
   one product would take over 2 s) and the seg step's achieved GFLOP/s: its FLOPs (convolutions and matrix
   products, forward and backward, counted once with ``torch.utils.flop_counter.FlopCounterMode``) over its median
   step time.
3. the generators' training steps: each trainer built from its bundle's configs (``monai.bundle.ConfigWorkflow``)
   with ``precision`` set, one batch from the config's own data loader (a small phantom, cropped as the demo crops
   it), timed as ``trainer._iteration(trainer, batch)`` (ignite's process function: the whole training step) with
   the engine's epoch and iteration past every warm-up, so the adversarial terms are on. vae_ct: VAE, VAE-GAN, GAN;
   ldm_abdomen: autoencoder, diffusion model (its frozen autoencoder's posteriors cached first, as in training);
   difftumor: stage-1 autoencoder, stage-2 diffusion model (random autoencoder weights, crops at 2 mm).
   ``demo`` width: the networks of ``tools.studies``' demo scale; where the demo has none, the configs' ratios to
   them (discriminators) or the demo VAE's decoder (the GAN). ``paper`` width: the configs' own; each row runs in a
   child process capped at ``--max_memory_gb`` and is skipped, with the reason printed, where one fp32 step takes
   longer than ``--max_step_seconds`` or does not fit in that memory.

A path whose step takes longer than ``--max_step_seconds`` is not repeated: its ratio comes from the rounds done so
far (at least one). A generator step still running after ``--max_step_seconds`` is interrupted (between two Python
calls: a long backward pass finishes first); its ratio is then only bounded (``< fp32 median / limit``).
Prints the CPU flags the answer depends on, ``scripts.precision.resolve_precision('auto', 'cpu')``, every ratio and
a conclusion per bundle: bf16 helps where every measured step of the bundle is >= 1.2x faster in bf16. Results also
go to ``<out>/cpu_speed.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from smoke import parse_args_with_smoke

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tools, when run as a script from anywhere

BUNDLES = REPO / "bundles"
PARTS = ("seg", "vae_ct", "ldm_abdomen", "difftumor")
WIDTHS = ("demo", "paper")
HELPS = 1.2  # issue 16: bf16 becomes a default only where a step is at least this much faster
#: CPU flags (Linux /proc/cpuinfo) that decide how fast bf16 and fp32 convolutions can be
REPORTED_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_fp16")
SMOKE = {
    "out": str(REPO / "runs" / "cpu_speed_smoke"),
    "rounds": 2,
    "seg_roi": 32,
    "seg_channels": "4,8,16,32,64",
    "matmul_size": 256,
    "widths": "demo",
    "phantom_cases": 6,
    "phantom_shape": "48,48,24",
    "crop_shape": "32,32,16",
}
#: a smoke run also takes fewer crops a step where the demo width alone would take seconds (not measurements)
SMOKE_GENERATOR_OVERRIDES = {("difftumor", "autoencoder"): {"train_batch_size": 1, "num_crops": 2}}


# ----------------------------------------------------------------------------------------------------------------
# the machine


def cpu_report(threads: int) -> dict[str, Any]:
    """The CPU model, the flags bf16 speed depends on, torch's view of the CPU and what ``auto`` resolves to here."""
    from tools.bundle_scripts import precision

    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    flags = precision.cpu_flags()
    return {
        "model": model,
        "flags": {flag: flag in flags for flag in REPORTED_FLAGS},
        "native_bf16": precision.cpu_has_native_bf16(),
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "onednn_bf16_supported": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        "threads": threads,
        "auto_resolves_to": precision.resolve_precision("auto", "cpu"),
    }


def matmul_gflops(size: int, dtype: torch.dtype, repeats: int = 3, budget_seconds: float = 2.0) -> tuple[float, int]:
    """The best GFLOP/s of ``repeats`` square ``torch.mm`` (after one warm-up): the machine's peak, and the edge used.

    The edge is ``size`` unless one product would take longer than ``budget_seconds`` at the speed of a 256^2
    probe (emulated bf16 runs at about 1 GFLOP/s): then the largest power of two that fits.
    """
    generator = torch.Generator().manual_seed(0)

    def best_seconds(edge: int, count: int) -> float:
        a = torch.randn(edge, edge, generator=generator).to(dtype)
        b = torch.randn(edge, edge, generator=generator).to(dtype)
        torch.mm(a, b)
        best = float("inf")
        for _ in range(count):
            start = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - start)
        return best

    probe = 256
    rate = 2.0 * probe**3 / best_seconds(probe, 1)
    while size > probe and 2.0 * size**3 / rate > budget_seconds:
        size //= 2
    return 2.0 * size**3 / best_seconds(size, repeats) / 1e9, size


# ----------------------------------------------------------------------------------------------------------------
# interleaved timing


class StepTimeout(Exception):
    """A step ran past its time limit (raised from SIGALRM between two Python calls of the step)."""


@contextlib.contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Interrupt the block after ``seconds`` (None: no limit); POSIX main thread only."""
    if not seconds or not hasattr(signal, "setitimer"):
        yield
        return

    def expired(signum, frame):
        raise StepTimeout(f"still running after {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass
class TimedPath:
    """One way of running a step; ``setup`` runs before each of its steps (e.g. a global switch)."""

    name: str
    step: Callable[[], Any]
    setup: Callable[[], None] | None = None
    warmup_seconds: float | None = None
    seconds: list[float] = field(default_factory=list)
    stopped: str | None = None  # why it is not repeated any more
    failed: str | None = None  # why it has no measurement at all
    timed_out_after: float | None = None  # a step of it was interrupted after this many seconds

    def run_once(self, limit: float | None) -> float:
        if self.setup is not None:
            self.setup()
        start = time.perf_counter()
        with time_limit(limit):
            self.step()
        return time.perf_counter() - start

    def warm_up(self, max_step_seconds: float, interrupt: bool) -> bool:
        """One untimed step; False when it was interrupted (``interrupt``: cut at ``max_step_seconds``)."""
        try:
            self.warmup_seconds = self.run_once(max_step_seconds if interrupt else None)
        except StepTimeout as error:
            self.failed = f"warm-up step {error} (--max_step_seconds {max_step_seconds:g})"
            self.timed_out_after = max_step_seconds
            print(f"    {self.name}: {self.failed}", flush=True)
            return False
        if self.warmup_seconds > max_step_seconds:
            self.stopped = f"warm-up step {self.warmup_seconds:.1f} s > {max_step_seconds:g} s: one timed step only"
        return True

    @property
    def median(self) -> float | None:
        return statistics.median(self.seconds) if self.seconds else None

    def summary(self) -> dict[str, Any]:
        return {"median_seconds": self.median, "seconds": self.seconds, "warmup_seconds": self.warmup_seconds,
                "stopped": self.stopped, "failed": self.failed}  # fmt: skip


def interleave(paths: list[TimedPath], rounds: int, max_step_seconds: float, interrupt: bool) -> None:
    """One warm-up step per path (unless it had one), then ``rounds`` rounds of one step of every path in turn
    (A B A B ...).

    A path whose step (warm-up included) takes longer than ``max_step_seconds`` is not repeated after its first
    timed step; with ``interrupt`` a step is cut at ``max_step_seconds`` (no measurement from it), and a path cut in
    its warm-up leaves the others one round.
    """
    limit = max_step_seconds if interrupt else None
    for path in paths:
        if path.warmup_seconds is None and path.failed is None:
            path.warm_up(max_step_seconds, interrupt)
    for index in range(rounds):
        active = [p for p in paths if p.failed is None and not (p.stopped and (p.seconds or p.timed_out_after))]
        if not active or (index > 0 and any(p.failed for p in paths)):  # no ratio then: one round gives its bound
            break
        shown = []
        for path in active:
            try:
                seconds = path.run_once(limit)
            except StepTimeout as error:
                path.stopped = f"round {index + 1}: step {error}, not repeated"
                path.timed_out_after = max_step_seconds
                shown.append(f"{path.name} > {max_step_seconds:g} s (interrupted)")
                continue
            path.seconds.append(seconds)
            shown.append(f"{path.name} {seconds:.3f} s")
            if seconds > max_step_seconds and not path.stopped:
                path.stopped = f"round {index + 1}: step {seconds:.1f} s > {max_step_seconds:g} s, not repeated"
        print(f"    round {index + 1}: " + ", ".join(shown), flush=True)


def ratio(slow: TimedPath, fast: TimedPath) -> float | None:
    """Median step time of ``slow`` over that of ``fast`` (> 1: ``fast`` is faster)."""
    if slow.median is None or fast.median is None:
        return None
    return slow.median / fast.median


def ratio_bound(slow: TimedPath, fast: TimedPath) -> float | None:
    """Where ``fast`` never finished a step within the limit, the ratio is below ``slow``'s median / the limit."""
    if slow.median is None or fast.median is not None or fast.timed_out_after is None:
        return None
    return slow.median / fast.timed_out_after


def describe_pair(label: str, a: TimedPath, b: TimedPath) -> str:
    def one(path: TimedPath) -> str:
        if path.median is None:
            return f"{path.name} no measurement ({path.failed or path.stopped})"
        text = f"{path.name} {path.median:.3f} s (median of {len(path.seconds)})"
        return text + (f" [{path.stopped}]" if path.stopped else "")

    value, bound = ratio(a, b), ratio_bound(a, b)
    shown = f"{value:.3f}" if value is not None else (f"< {bound:.3f}" if bound is not None else "n/a")
    return f"  {label}: {one(a)}, {one(b)}; ratio {a.name} / {b.name} = {shown}"


# ----------------------------------------------------------------------------------------------------------------
# seg_unet3d


def seg_parts(args, precision: str, seed: int) -> tuple[torch.nn.Module, Any, torch.optim.Optimizer, int, int]:
    """``network``, ``loss`` and ``optimizer`` of seg_unet3d's train.json parsed with ``precision``; crops a step."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(BUNDLES / "seg_unet3d" / "configs" / "train.json"))
    parser["bundle_root"] = str(BUNDLES / "seg_unet3d")
    parser["device"] = "$torch.device('cpu')"
    parser["precision"] = precision
    if args.seg_channels:
        parser["network_def#channels"] = [int(v) for v in args.seg_channels.split(",")]
    torch.manual_seed(seed)  # the same initial weights for every path
    network = parser.get_parsed_content("network")
    loss = parser.get_parsed_content("loss")
    optimizer = parser.get_parsed_content("optimizer")
    crops = args.seg_crops or int(parser["num_samples"]) * int(parser["batch_size"])
    return network, loss, optimizer, crops, int(parser["num_classes"])


def seg_step(args, precision: str, channels_last: bool = False) -> tuple[Callable[[], torch.Tensor], dict]:
    """One seg_unet3d training step as its SupervisedTrainer takes it (no amp on a CPU), and what it is."""
    network, loss, optimizer, crops, classes = seg_parts(args, precision, seed=0)
    generator = torch.Generator().manual_seed(1)
    size = [crops, 1] + [args.seg_roi] * 3
    images = torch.rand(size, generator=generator)
    labels = torch.randint(0, classes, size, generator=generator)
    if channels_last:
        network.to(memory_format=torch.channels_last_3d)  # parameters change in place: the optimizer keeps them
        images = images.contiguous(memory_format=torch.channels_last_3d)
    network.train()

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        value = loss(network(images), labels)
        value.backward()
        optimizer.step()
        return value.detach()

    info = {
        "network": type(network).__name__,
        "parameters_millions": sum(p.numel() for p in network.parameters()) / 1e6,
        "crops": crops,
        "roi": args.seg_roi,
    }
    return step, info


def count_flops(step: Callable[[], Any]) -> int:
    """FLOPs of one call of ``step`` (convolutions and matrix products, forward and backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return int(counter.get_total_flops())


def run_seg(args, peaks: dict[str, float]) -> dict[str, Any]:
    from tools.bundle_scripts.precision import cpu_has_native_bf16
    from tools.bundles import bundle_on_path

    result: dict[str, Any] = {}
    with bundle_on_path(BUNDLES / "seg_unet3d"):
        fp32, info = seg_step(args, "fp32")
        bf16, _ = seg_step(args, "bf16")
        result["step"] = info
        print(
            f"seg_unet3d: {info['network']} {info['parameters_millions']:.1f} M parameters (configs/train.json), "
            f"{info['crops']} x {info['roi']}^3 crops a step, forward + DiceCE + backward + Adam",
            flush=True,
        )
        flops = count_flops(seg_step(args, "fp32")[0])
        result["gflop_per_step"] = flops / 1e9
        pairs = {
            "precision": [TimedPath("fp32", fp32), TimedPath("bf16", bf16)],
            "flush_denormal": [
                TimedPath("denormals_kept", seg_step(args, "fp32")[0], setup=lambda: torch.set_flush_denormal(False)),
                TimedPath("denormals_flushed", seg_step(args, "fp32")[0], setup=lambda: torch.set_flush_denormal(True)),
            ],
            "channels_last_3d": [
                TimedPath("contiguous", seg_step(args, "fp32")[0]),
                TimedPath("channels_last_3d", seg_step(args, "fp32", channels_last=True)[0]),
            ],
        }
        lines = []
        try:
            for label, (a, b) in pairs.items():
                print(f"  {label}: {a.name} against {b.name}, {args.rounds} rounds", flush=True)
                interleave([a, b], args.rounds, args.max_step_seconds, interrupt=False)
                result[label] = {a.name: a.summary(), b.name: b.summary(), "ratio": ratio(a, b)}
                lines.append(describe_pair(f"seg_unet3d {label}", a, b))
        finally:
            torch.set_flush_denormal(False)
    fp32_path, bf16_path = pairs["precision"]
    achieved = {}
    for path, peak_key in ((fp32_path, "fp32"), (bf16_path, "bf16")):
        if path.median:
            gflops = flops / path.median / 1e9
            achieved[path.name] = {"gflops": gflops, "fraction_of_matmul_peak": gflops / peaks[peak_key]}
    result["achieved"] = achieved
    print("\n".join(lines))
    print(f"  seg step: {flops / 1e9:.1f} GFLOP (convolutions + matmuls, forward + backward, FlopCounterMode)")
    emulated = not cpu_has_native_bf16()
    for name, value in achieved.items():
        # oneDNN emulates bf16 convolutions by other kernels than the (also emulated) bf16 matmul: no bound then
        caveat = " (both emulated here: the matmul is no bound)" if name == "bf16" and emulated else ""
        print(
            f"  achieved {name}: {value['gflops']:.1f} GFLOP/s = {value['fraction_of_matmul_peak']:.1%} of the "
            f"{name} matmul peak ({peaks[name]:.1f} GFLOP/s){caveat}"
        )
    return result


# ----------------------------------------------------------------------------------------------------------------
# generators


@dataclass
class GeneratorStep:
    bundle: str
    name: str
    configs: list[str]
    networks: tuple[str, ...]  # config keys of the networks the step trains (or runs frozen), for their sizes
    demo: Callable[[dict, "Data"], dict]  # the demo-width overrides (networks, batch)
    data: Callable[["Data"], dict]  # where its data are (both widths)
    extra: dict = field(default_factory=dict)  # both widths: what a single step without earlier stages needs
    paper: dict = field(default_factory=dict)  # paper width: what does not enter the timed step


@dataclass
class Data:
    phantom: Path  # MSD layout (difftumor)
    crops_split: Path  # the demo's pancreas crops and split (vae_ct, ldm_abdomen)


def _vae_demo(settings: dict, data: Data) -> dict:
    from tools.studies import vae_net_overrides

    net = vae_net_overrides(settings)
    return {**net, **{k: v for k, v in settings["vae"].items() if k not in net}}


def _vaegan_demo(settings: dict, data: Data) -> dict:
    """The demo trains no discriminator: the patch discriminator keeps the configs' ratio of its width to the
    VAE encoder's first stage (64 / 32)."""
    over = _vae_demo(settings, data)
    return {**over, "disc_channels": 2 * int(over["channels"][0])}


def _gan_demo(settings: dict, data: Data) -> dict:
    """The demo trains no GAN: its generator mirrors the demo VAE's decoder (same stages, widths reversed)."""
    over = _vaegan_demo(settings, data)
    channels, strides = over.pop("channels"), over.pop("strides")
    over.pop("latent_size", None)
    return {**over, "gan_channels": list(reversed(channels)) + [channels[0]], "gan_strides": strides}


def _vae_data(data: Data) -> dict:
    return {"dataset_dir": str(data.crops_split.parent), "datalist_file": str(data.crops_split),
            "val_key": "validation", "num_workers": 0}  # fmt: skip


def _ldm_demo(stage: str) -> Callable[[dict, Data], dict]:
    def overrides(settings: dict, data: Data) -> dict:
        from tools.studies import ldm_image_size

        return {**ldm_image_size(settings), **settings["ldm_nets"], **settings["ldm_train"],
                **settings["ldm_stage"].get(stage, {})}  # fmt: skip

    return overrides


def _ldm_data(data: Data) -> dict:
    prep = json.loads((data.crops_split.parent / "dataset.json").read_text()).get("prep") or {}
    over = {"dataset_dir": str(data.crops_split.parent), "crop_mode": prep.get("mode", "pancreas"),
            "prep_out_shape": prep.get("out_shape"), "num_workers": 0, "scale_factor_samples": 2}  # fmt: skip
    for key, sections in (("train_datalist", "'training'"), ("val_datalist", "['validation', 'test']")):
        over[key] = f"$scripts.data.load_datalist(@dataset_dir, {sections}, datalist_file={str(data.crops_split)!r})"
    return over


def _difftumor_demo(stage: str) -> Callable[[dict, Data], dict]:
    """The demo's DiffTumor widths (``tumor_family_args``, used for synthesis with random weights): the autoencoder
    for both stages, the early-tumor diffusion model for stage 2; its crop size."""

    def overrides(settings: dict, data: Data) -> dict:
        family = settings["tumor_family_args"]["difftumor"]
        over = {f"autoencoder_def#{k}": v for k, v in family["autoencoder"].items()}
        if stage == "autoencoder":  # no demo discriminators: the configs' ratio to the first stage (64 / 16)
            width = 4 * int(family["autoencoder"]["channels"][0])
            over.update({"discriminator_2d_def#channels": width, "discriminator_3d_def#channels": width})
        if stage == "diffusion":
            over.update({f"diffusion_def#{k}": v for k, v in family["diffusion_early"].items()})
        over["roi_size"] = [int(family["crop_size"])] * 3
        return over

    return overrides


def _difftumor_data(data: Data) -> dict:
    # 2 mm instead of 1 mm: the phantom's small scans, resampled, still fill the crops; the step does not change
    return {"dataset_dir": str(data.phantom), "num_workers": 0, "spacing": [2.0, 2.0, 2.0]}


#: ldm_abdomen's diffusion step reads cached posteriors of its frozen autoencoder (encoded before the timing): at
#: paper width a narrow autoencoder with the same levels gives the same latent shape without minutes of encoding
_LDM_FROZEN_AUTOENCODER = {"autoencoder_def#channels": [8, 8, 8], "autoencoder_def#norm_num_groups": 4}

GENERATORS = [
    GeneratorStep("vae_ct", "VAE", ["train.json", "train_3d.json"], ("network_def",), _vae_demo, _vae_data),
    # a family overlay before train_3d.json, as the bundle's docs ask
    GeneratorStep("vae_ct", "VAE-GAN", ["train.json", "train_vaegan.json", "train_3d.json"],
                  ("network_def", "discriminator_def"), _vaegan_demo, _vae_data),
    GeneratorStep("vae_ct", "GAN", ["train.json", "train_gan.json", "train_3d.json"],
                  ("network_def", "discriminator_def"), _gan_demo, _vae_data),
    GeneratorStep("ldm_abdomen", "autoencoder", ["train.json", "train_autoencoder.json"],
                  ("network_def", "discriminator_def"), _ldm_demo("autoencoder"), _ldm_data),
    GeneratorStep("ldm_abdomen", "diffusion", ["train.json"], ("network_def", "autoencoder_def"),
                  _ldm_demo("diffusion"), _ldm_data, paper=_LDM_FROZEN_AUTOENCODER),
    GeneratorStep("difftumor", "autoencoder", ["train.json"],
                  ("network_def", "discriminator_2d_def", "discriminator_3d_def"), _difftumor_demo("autoencoder"),
                  _difftumor_data),
    GeneratorStep("difftumor", "diffusion", ["train.json", "train_diffusion.json"], ("network_def", "autoencoder_def"),
                  _difftumor_demo("diffusion"), _difftumor_data, extra={"allow_random_weights": True}),
]  # fmt: skip


def prepare_data(args, work: Path) -> Data:
    """A small phantom (MSD layout) and the demo's pancreas crops of it with their split (made once, reused)."""
    from tools.phantom import make_dataset
    from tools.studies import prepared_split

    phantom = work / "phantom"
    shape = tuple(int(v) for v in args.phantom_shape.split(","))
    make_dataset(phantom, n_cases=args.phantom_cases, seed=0, shape=shape, tumor_fraction=0.75, test_fraction=0.2,
                 progress=False)  # fmt: skip
    crop_shape = [int(v) for v in args.crop_shape.split(",")]
    split = prepared_split(phantom, work / f"crops_{'x'.join(map(str, crop_shape))}", "pancreas", crop_shape)
    return Data(phantom=phantom, crops_split=split)


def build_trainer(gen: GeneratorStep, overrides: dict, precision: str | None, ckpt_dir: Path):
    """The trainer of ``gen``'s configs with ``overrides`` (``precision`` too where the configs define it), ready for
    one step: random weights saved where a later stage loads the earlier one's, latent statistics prepared, cached
    posteriors encoded; with one batch of the config's data loader and the sizes of the networks."""
    from monai.bundle import ConfigWorkflow

    from tools.bundle_scripts.config_check import check_overrides
    from tools.bundles import config_files

    root = BUNDLES / gen.bundle
    files = config_files(root, gen.configs)
    over = {**overrides, "ckpt_dir": str(ckpt_dir), "output_dir": str(ckpt_dir / "eval")}
    if precision is not None:
        over["precision"] = precision
    check_overrides(files, list(over))
    workflow = ConfigWorkflow(config_file=files, meta_file=str(root / "configs" / "metadata.json"),
                              logging_file=False, workflow_type="train", bundle_root=str(root))  # fmt: skip
    for key, value in over.items():
        workflow.parser[key] = value
    workflow.initialize()
    parser = workflow.parser
    # ldm_abdomen stage 2 loads stage 1's weights (random ones here) and freezes them; only for a step that trains on
    # a frozen autoencoder: the autoencoder's own step must keep its weights trainable (train.json defines
    # latent_stats for every stage, and preparing it froze the network the autoencoder step trains)
    if parser.get("latent_stats") is not None and "autoencoder_def" in gen.networks:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        autoencoder = parser.get_parsed_content("autoencoder_def")
        torch.save(autoencoder.state_dict(), parser.get_parsed_content("autoencoder_path"))
        parser.get_parsed_content("latent_stats").prepare()
    trainer = parser.get_parsed_content("train#trainer")
    if not any(p.requires_grad for p in parser.get_parsed_content(gen.networks[0]).parameters()):
        raise RuntimeError(f"{gen.bundle} {gen.name}: the network this step trains ({gen.networks[0]}) is frozen, so "
                           "the timed step would not be a training step")  # fmt: skip
    # past every warm-up (vae_ct adv_start_epoch, ldm adversarial_start_epoch, difftumor discriminator_start):
    # the step most of training takes, adversarial terms included
    trainer.state.epoch = trainer.state.iteration = 10**6
    batch = next(iter(trainer.data_loader))
    if getattr(trainer.prepare_batch, "cache_posteriors", False):  # training encodes each case once, not per step
        trainer.prepare_batch(batch, trainer.state.device)
    sizes = {key: sum(p.numel() for p in parser.get_parsed_content(key).parameters()) / 1e6 for key in gen.networks}
    return trainer, batch, sizes


def defines_precision(gen: GeneratorStep) -> bool:
    from monai.bundle import ConfigParser

    return "precision" in ConfigParser.load_config_files([str(BUNDLES / gen.bundle / "configs" / c)
                                                          for c in gen.configs])  # fmt: skip


def _out_of_memory(error: BaseException) -> bool:
    return isinstance(error, MemoryError) or "can't allocate memory" in str(error) or "not enough memory" in str(error)


def run_generator(gen: GeneratorStep, width: str, args, data: Data, work: Path) -> dict[str, Any]:
    """fp32 against bf16 for one generator step at one width; the fp32 warm-up step is the probe: a step over
    ``--max_step_seconds`` skips the row before the bf16 trainer is built."""
    from tools.bundles import bundle_on_path
    from tools.studies import scale_settings

    settings = scale_settings("demo")
    settings["crop_shape"] = [int(v) for v in args.crop_shape.split(",")]
    overrides = {**gen.data(data), **gen.extra, **(gen.demo(settings, data) if width == "demo" else gen.paper)}
    if args.smoke:
        overrides.update(SMOKE_GENERATOR_OVERRIDES.get((gen.bundle, gen.name), {}))
    label = f"{gen.bundle} {gen.name} ({width} width)"
    row: dict[str, Any] = {"bundle": gen.bundle, "step": gen.name, "width": width, "configs": gen.configs,
                           "overrides": {k: v for k, v in overrides.items() if not str(v).startswith("$")}}  # fmt: skip
    print(f"{label}: configs {' + '.join(gen.configs)}", flush=True)
    started = time.perf_counter()
    has_precision = defines_precision(gen)
    paths: list[TimedPath] = []
    with tempfile.TemporaryDirectory(prefix="cpu_speed_", dir=work) as tmp, bundle_on_path(BUNDLES / gen.bundle):
        try:
            for precision in ("fp32", "bf16"):
                if precision == "bf16" and not has_precision:
                    row["skipped"] = "bf16 not measured: the configs define no 'precision' key"
                    break
                torch.manual_seed(0)
                trainer, batch, sizes = build_trainer(gen, overrides, precision if has_precision else None,
                                                      Path(tmp) / precision)  # fmt: skip
                if not paths:
                    row["parameters_millions"] = sizes
                    print("  parameters (M): " + ", ".join(f"{k} {v:.3f}" for k, v in sizes.items()), flush=True)
                path = TimedPath(precision, lambda t=trainer, b=batch: t._iteration(t, b))
                paths.append(path)
                if precision == "fp32" and not path.warm_up(args.max_step_seconds, interrupt=True):
                    row["skipped"] = f"one fp32 step takes longer than {args.max_step_seconds:g} s"
                    break
            if paths and not paths[0].failed:
                interleave(paths, args.rounds, args.max_step_seconds, interrupt=True)
        except (MemoryError, RuntimeError) as error:  # only an allocation refused under --max_memory_gb is a result
            if not _out_of_memory(error):
                raise
            row["skipped"] = f"out of memory (limit {args.max_memory_gb:g} GB): {str(error).splitlines()[0][:160]}"
    for path in paths:
        row[path.name] = path.summary()
    if "skipped" in row:
        print(f"  {label} skipped: {row['skipped']}", flush=True)
    if len(paths) == 2:
        row["ratio"], row["ratio_below"] = ratio(*paths), ratio_bound(*paths)
        print(describe_pair(label, *paths), flush=True)
    row["row_seconds"] = time.perf_counter() - started
    print(f"  ({row['row_seconds']:.0f} s with building and data)", flush=True)
    return row


#: seconds a child process may spend on building a paper-width trainer and its data, beyond the steps themselves
BUILD_SECONDS = 300


def run_generator_isolated(index: int, width: str, args) -> dict[str, Any]:
    """One generator row in a child process (``--row``) with its memory capped at ``--max_memory_gb`` and a
    wall-clock limit, so that a paper-width network too large for this machine skips its row instead of taking the
    machine's memory or the whole benchmark down."""
    gen = GENERATORS[index]
    row_json = Path(args.out).resolve() / f"row_{index}_{width}.json"
    row_json.unlink(missing_ok=True)
    command = [sys.executable, __file__, "--row", str(index), "--row_width", width, "--row_json", str(row_json)]
    for name in ("out", "rounds", "threads", "max_step_seconds", "max_memory_gb", "phantom_cases", "phantom_shape",
                 "crop_shape"):  # fmt: skip
        command += [f"--{name}", str(getattr(args, name))]
    wall = BUILD_SECONDS + args.max_step_seconds * (2 * args.rounds + 6)
    skipped = None
    try:
        done = subprocess.run(command + (["--smoke"] if args.smoke else []), timeout=wall)
        if not row_json.is_file():
            skipped = f"the child process ended with exit status {done.returncode} and no result"
    except subprocess.TimeoutExpired:
        skipped = f"not finished within {wall:.0f} s (child process killed)"
    if skipped:
        print(f"  {gen.bundle} {gen.name} ({width} width) skipped: {skipped}", flush=True)
        return {"bundle": gen.bundle, "step": gen.name, "width": width, "configs": gen.configs, "skipped": skipped}
    return json.loads(row_json.read_text())


def run_row_child(args) -> None:
    """``--row``: one generator row, its memory capped (Linux ``RLIMIT_DATA``), the row written to ``--row_json``."""
    import resource

    limit = int(args.max_memory_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, resource.getrlimit(resource.RLIMIT_DATA)[1]))
    torch.set_num_threads(args.threads)
    out = Path(args.out).resolve()
    row = run_generator(GENERATORS[args.row], args.row_width, args, prepare_data(args, out / "data"), out)
    Path(args.row_json).write_text(json.dumps(row, default=str) + "\n")


# ----------------------------------------------------------------------------------------------------------------


def conclusions(report: dict) -> dict[str, dict]:
    """Per bundle: every measured fp32 / bf16 ratio (an upper bound where bf16 never finished a step within the
    limit), and whether all of them reach ``HELPS``."""
    ratios: dict[str, list[tuple[str, str, float]]] = {}
    if report.get("seg", {}).get("precision", {}).get("ratio") is not None:
        ratios["seg_unet3d"] = [("training step", "=", report["seg"]["precision"]["ratio"])]
    for row in report.get("generators", []):
        name = f"{row['step']} ({row['width']})"
        if row.get("ratio") is not None:
            ratios.setdefault(row["bundle"], []).append((name, "=", row["ratio"]))
        elif row.get("ratio_below") is not None:
            ratios.setdefault(row["bundle"], []).append((name, "<", row["ratio_below"]))
    return {bundle: {"ratios": {name: value if how == "=" else f"< {value:.3f}" for name, how, value in values},
                     "bf16_helps": all(how == "=" and value >= HELPS for _, how, value in values)}
            for bundle, values in ratios.items()}  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "runs" / "cpu_speed"), help="folder for cpu_speed.json and data")
    parser.add_argument("--rounds", type=int, default=4, help="timed rounds of each interleaved pair")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: as the demo trains each generator)")
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts of {', '.join(PARTS)}")
    parser.add_argument("--widths", default=",".join(WIDTHS), help="generator widths: demo, paper or both")
    parser.add_argument(
        "--max_step_seconds",
        type=float,
        default=60.0,
        help="a path whose step takes longer is not repeated; a paper-width generator is skipped",
    )
    parser.add_argument("--seg_roi", type=int, default=96, help="edge of the seg_unet3d crops")
    parser.add_argument("--seg_crops", type=int, default=None, help="crops a step (default: num_samples x batch_size)")
    parser.add_argument("--seg_channels", default=None, help="UNet channels, e.g. 4,8,16,32,64 (default: the config's)")
    parser.add_argument("--matmul_size", type=int, default=2048, help="edge of the square matrices of the peak")
    parser.add_argument("--phantom_cases", type=int, default=8, help="patients of the generators' phantom data")
    parser.add_argument("--phantom_shape", default="64,64,32", help="voxels of each phantom scan")
    parser.add_argument("--crop_shape", default=None, help="generator crops (default: the demo's crop_shape)")
    parser.add_argument(
        "--max_memory_gb",
        type=float,
        default=8.0,
        help="memory cap of each paper-width row (a child process): over it the row is skipped",
    )
    parser.add_argument("--row", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--row_width", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--row_json", default=None, help=argparse.SUPPRESS)
    args = parse_args_with_smoke(parser, SMOKE, argv)
    from tools.studies import scale_settings

    args.crop_shape = args.crop_shape or ",".join(str(v) for v in scale_settings("demo")["crop_shape"])
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    widths = [w.strip() for w in args.widths.split(",") if w.strip()]
    unknown = sorted(set(parts) - set(PARTS)) + sorted(set(widths) - set(WIDTHS))
    if unknown:
        parser.error(f"unknown parts or widths {unknown}; parts: {', '.join(PARTS)}; widths: {', '.join(WIDTHS)}")
    # said once below: the precision helper warns at every autocast on a CPU that emulates bf16, MONAI at every
    # workflow built without a logging file
    for name in ("scripts.precision", "tools.bundle_scripts.precision", "monai.bundle.workflows"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if args.row is not None:
        run_row_child(args)
        return {}
    torch.set_num_threads(args.threads)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    cpu = cpu_report(torch.get_num_threads())
    print(f"CPU: {cpu['model']}; torch {cpu['torch']}, capability {cpu['torch_cpu_capability']}, "
          f"{cpu['threads']} thread(s)")  # fmt: skip
    print("flags: " + ", ".join(f"{flag} {'yes' if present else 'no'}" for flag, present in cpu["flags"].items()))
    print(f"native bf16 (avx512_bf16 or amx_bf16): {'yes' if cpu['native_bf16'] else 'no'}; oneDNN bf16 supported: "
          f"{cpu['onednn_bf16_supported']}; scripts.precision.resolve_precision('auto', 'cpu') = "
          f"{cpu['auto_resolves_to']!r}"
          + ("" if cpu["native_bf16"] else "; bf16 below is emulated by oneDNN"), flush=True)  # fmt: skip
    peaks, edges = {}, {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        peaks[name], edges[name] = matmul_gflops(args.matmul_size, dtype)
    print("matmul peak (square torch.mm, best of 3): " + ", ".join(
        f"{name} {peaks[name]:.1f} GFLOP/s ({edges[name]}^2)" for name in peaks), flush=True)  # fmt: skip
    report: dict[str, Any] = {"settings": vars(args), "cpu": cpu, "matmul_peak_gflops": peaks, "matmul_edge": edges}

    if "seg" in parts:
        report["seg"] = run_seg(args, peaks)
    chosen = [g for g in GENERATORS if g.bundle in parts]
    if chosen:
        data = prepare_data(args, out / "data")
        report["generators"] = []
        for width in widths:
            for gen in chosen:
                if width == "paper":
                    report["generators"].append(run_generator_isolated(GENERATORS.index(gen), width, args))
                else:
                    report["generators"].append(run_generator(gen, width, args, data, out))

    report["conclusions"] = conclusions(report)
    report["total_seconds"] = time.perf_counter() - started
    print("fp32 / bf16 step-time ratios (> 1: bf16 is faster):")
    for bundle, verdict in report["conclusions"].items():
        shown = ", ".join(f"{name} {value if isinstance(value, str) else f'{value:.3f}'}"
                          for name, value in verdict["ratios"].items())  # fmt: skip
        print(f"  {bundle}: {shown}; bf16 helps (ratio >= {HELPS}): {'yes' if verdict['bf16_helps'] else 'no'}")
    (out / "cpu_speed.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(f"total {report['total_seconds']:.0f} s; results in {out / 'cpu_speed.json'}")
    return report


if __name__ == "__main__":
    main()
