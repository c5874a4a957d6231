"""Full-size SDXL LoRA training on one GPU: speed, memory and FLOPs, each optimisation on and off.

    python bench/sdxl_full.py --out bench-sdxl.jsonl            # on a CUDA GPU: BENCHMARKS.md's rows
    python bench/sdxl_full.py --only baseline gradient_checkpointing=True   # some setups, by name
    python bench/sdxl_full.py --scale tiny --device cpu --steps 2 --warmup 1 --resolutions 128x128

The U-Net, VAE and both text encoders are built from SDXL's published configs with random weights
(nothing is downloaded). A train step is the train stage's: the U-Net's prediction under bf16
autocast, the loss, backward, gradient clipping and the optimizer step, with a rank-16 LoRA on the
attention layers (fp32 LoRA parameters). Its inputs are random tensors of the cached shapes, already
on the device: the data path is measured on its own (bench/caches.py data-path).

Each setup runs in a fresh process, so its peak memory is its own and a compiled model does not carry
over. Per setup: steps/s and images/s from the median of `--steps` timed steps after `--warmup`
steps, peak device memory (allocated, and reserved by PyTorch's allocator), the model FLOPs of one
step (counted by torch.utils.flop_counter on the eager model, without checkpointing's recompute) and
that rate as a fraction of the device's peak bf16 throughput, both the datasheet's and a matrix
product's measured in the same run. Before them, the VAE (bf16 and fp32) and both text encoders are
timed at the first resolution. `--scale tiny` runs the same code on the built-in tiny SDXL.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# Dense bf16 tensor throughput from the datasheets (SXM parts), by a substring of the device name.
DATASHEET_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.1, "4090": 165.2}


@dataclass(frozen=True)
class Setup:
    """One measured configuration; the defaults are the baseline every switch is compared with."""

    resolution: str = "1024x1024"  # width x height
    batch: int = 1
    weights: str = "bf16"  # the frozen model's dtype: bf16, or fp32 under bf16 autocast
    attention: str = "default"  # SDPA backend: default (PyTorch picks), flash, efficient, cudnn, math
    channels_last: bool = False
    optimizer: str = "adamw_fused"  # adamw_fused, adamw_foreach, adamw8bit (bitsandbytes)
    gradient_checkpointing: bool = False
    # torch.compile: none; regional (each transformer block, compiled once for all 70 of them);
    # or the whole U-Net in mode default, max-autotune-no-cudagraphs or reduce-overhead (CUDA graphs)
    compile: str = "none"
    quantize: str = "none"  # none, int8: optimum-quanto int8 weight-only frozen U-Net

    @property
    def switches(self) -> dict[str, Any]:
        """The fields that differ from the baseline (resolution and batch aside)."""
        baseline = Setup(resolution=self.resolution, batch=self.batch)
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != getattr(baseline, f.name)
        }

    @property
    def name(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.switches.items()) or "baseline"


def setups(resolutions: list[str], batches: list[int]) -> list[Setup]:
    """Every switch on its own against the baseline, then the combinations the memory plan needs."""
    first = resolutions[0]
    measured = []
    for batch in batches:
        for resolution in resolutions:
            measured.append(Setup(resolution, batch))
        measured += [
            Setup(first, batch, weights="fp32"),
            Setup(first, batch, channels_last=True),
            Setup(first, batch, optimizer="adamw_foreach"),
            Setup(first, batch, optimizer="adamw8bit"),
            Setup(first, batch, gradient_checkpointing=True),
            *(
                Setup(first, batch, compile=m)
                for m in ("regional", "default", "max-autotune-no-cudagraphs", "reduce-overhead")
            ),
            Setup(first, batch, quantize="int8"),
            Setup(first, batch, gradient_checkpointing=True, optimizer="adamw8bit"),
            Setup(first, batch, gradient_checkpointing=True, quantize="int8", optimizer="adamw8bit"),
        ]
    measured += [Setup(first, batches[0], attention=a) for a in ("flash", "efficient", "cudnn", "math")]
    return measured


def build_unet(scale: str, device: str, tiny_dir: Path | None) -> Any:
    """An fp32 U-Net: SDXL's published config with random weights, or the built-in tiny SDXL's."""
    import torch
    from diffusers import UNet2DConditionModel

    from sdxl_lib.models.full_size import UNET

    torch.manual_seed(0)
    if scale == "tiny":
        assert tiny_dir is not None
        return UNet2DConditionModel.from_pretrained(tiny_dir / "unet").to(device)
    with torch.device(device):
        return UNet2DConditionModel(**UNET)


def build_encoders(scale: str, device: str, tiny_dir: Path | None) -> dict[str, Any]:
    """The fp32 VAE and text encoders, likewise."""
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from sdxl_lib.models.full_size import full_size_models, full_size_vae

    torch.manual_seed(0)
    if scale == "full":
        models = full_size_models(device)
        return {"vae": full_size_vae(device), "encoders": [models["text_encoder"], models["text_encoder_2"]]}
    assert tiny_dir is not None
    return {
        "vae": AutoencoderKL.from_pretrained(tiny_dir / "vae").to(device),
        "encoders": [
            CLIPTextModel.from_pretrained(tiny_dir / "text_encoder").to(device),
            CLIPTextModelWithProjection.from_pretrained(tiny_dir / "text_encoder_2").to(device),
        ],
    }


def make_batch(unet: Any, resolution: str, batch: int, device: str) -> dict[str, Any]:
    """Random inputs in the cached shapes: latents at 1/8 the pixels, both encoders' embeds, time ids."""
    import torch

    width, height = (int(side) for side in resolution.split("x"))
    config = unet.config
    latents = (batch, config.in_channels, height // 8, width // 8)
    pooled_width = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    size = torch.tensor([height, width, 0, 0, height, width], dtype=torch.float32, device=device)
    return {
        "noisy": torch.randn(latents, device=device),
        "target": torch.randn(latents, device=device),
        "timesteps": torch.randint(0, 1000, (batch,), device=device),
        "prompt_embeds": torch.randn(batch, 77, config.cross_attention_dim, device=device),
        "pooled": torch.randn(batch, pooled_width, device=device),
        "time_ids": size.expand(batch, 6),
    }


def call_times(call: Callable[[], Any], count: int, device: str) -> list[float]:
    """Wall-clock seconds of each of `count` calls, each waited for on the device."""
    import torch

    sync = torch.cuda.synchronize if device == "cuda" else lambda: None
    times = []
    for _ in range(count):
        sync()
        started = time.perf_counter()
        call()
        sync()
        times.append(time.perf_counter() - started)
    return times


def measure_train(
    setup: Setup, scale: str, device: str, tiny_dir: Path | None, steps: int, warmup: int
) -> dict:
    """Inside the measured process: build, adapt, count FLOPs, warm up, time."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from sdxl_lib.config import TrainParams
    from sdxl_lib.train.lora import lora_config
    from sdxl_lib.train.optimizers import make_optimizer
    from sdxl_lib.train.utils import per_sample_loss, unet_prediction

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[setup.weights]
    unet = build_unet(scale, device, tiny_dir).to(dtype).requires_grad_(False)
    if setup.quantize == "int8":
        from optimum.quanto import freeze, qint8, quantize

        quantize(unet, weights=qint8)
        freeze(unet)
    cfg = TrainParams(lora_rank=16, optimizer="adamw8bit" if setup.optimizer == "adamw8bit" else "adamw")
    unet.add_adapter(lora_config(cfg))
    lora_params = [p for p in unet.parameters() if p.requires_grad]
    for p in lora_params:
        p.data = p.data.float()
    if setup.channels_last:
        unet.to(memory_format=torch.channels_last)
    if setup.optimizer == "adamw_foreach":
        optimizer = torch.optim.AdamW(lora_params, lr=cfg.learning_rate, foreach=True)
    else:
        optimizer = make_optimizer(cfg, lora_params, torch.device(device))
    inputs = make_batch(unet, setup.resolution, setup.batch, device)
    if setup.channels_last:
        inputs["noisy"] = inputs["noisy"].contiguous(memory_format=torch.channels_last)

    def loss_of(model: Any) -> Any:
        with torch.autocast(torch.device(device).type, torch.bfloat16):
            prediction = unet_prediction(
                model,
                inputs["noisy"],
                inputs["timesteps"],
                inputs["prompt_embeds"],
                inputs["pooled"],
                inputs["time_ids"],
                dtype,
            )
            return per_sample_loss(prediction, inputs["target"], "l2", cfg.huber_c).mean()

    graphs = setup.compile == "reduce-overhead"

    def step(model: Any) -> Any:
        if graphs:  # each step is a new CUDA graph replay; its outputs are cloned before the next
            torch.compiler.cudagraph_mark_step_begin()
        loss = loss_of(model)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lora_params, cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach().clone()

    backend = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "math": SDPBackend.MATH,
    }.get(setup.attention)
    attention = sdpa_kernel(backend) if backend is not None else nullcontext()
    with attention:
        with FlopCounterMode(display=False) as counter:  # model FLOPs: eager, no recompute
            loss_of(unet).backward()
        optimizer.zero_grad(set_to_none=True)
        if setup.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        model = unet
        if setup.compile == "regional":
            unet.compile_repeated_blocks()
        elif setup.compile != "none":
            model = torch.compile(unet, mode=setup.compile)
        if device == "cuda":  # the counting pass's cached blocks would hide what checkpointing saves
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        losses: list[Any] = []
        times = call_times(lambda: losses.append(step(model)), warmup + steps, device)
    seconds = statistics.median(times[warmup:])
    result = {
        "setup": dataclasses.asdict(setup),
        "name": setup.name,
        "seconds_per_step": seconds,
        "first_step_seconds": times[0],
        "flops_per_step": counter.get_total_flops(),
        "final_loss": float(losses[-1]),
        "lora_parameters": sum(p.numel() for p in lora_params),
    }
    if device == "cuda":
        result["peak_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
        result["peak_reserved_gb"] = torch.cuda.max_memory_reserved() / 2**30
    return result


def measure_encoders(
    scale: str, device: str, tiny_dir: Path | None, resolution: str, repeat: int
) -> list[dict[str, Any]]:
    """VAE encode at `resolution` (batch 1 and 4, bf16 and fp32) and both text encoders (batch 16),
    in items per second (medians of `repeat` calls)."""
    import torch

    from sdxl_lib.cache.text import embed_tokens

    models = build_encoders(scale, device, tiny_dir)
    width, height = (int(side) for side in resolution.split("x"))

    def median_seconds(call: Callable[[], Any]) -> float:
        return statistics.median(call_times(call, repeat + 2, device)[2:])  # two warm-ups

    results = []
    for dtype_name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        vae = models["vae"].to(dtype)
        for batch in (1, 4):
            pixels = torch.rand(batch, 3, height, width, device=device, dtype=dtype) * 2 - 1
            with torch.no_grad():
                seconds = median_seconds(lambda vae=vae, pixels=pixels: vae.encode(pixels).latent_dist.mean)
            name = f"VAE encode {resolution}, {dtype_name}, batch {batch}"
            results.append({"name": name, "per_s": batch / seconds})
    encoders = [encoder.to(torch.bfloat16) for encoder in models["encoders"]]
    ids = [torch.randint(0, e.config.vocab_size, (16, 77), device=device) for e in encoders]
    with torch.no_grad():
        seconds = median_seconds(lambda: embed_tokens(encoders, ids))
    results.append({"name": "text encoders, bf16, batch 16", "per_s": 16 / seconds})
    return results


def matmul_tflops(device: str) -> float:
    """The measured ceiling: an 8192^3 bf16 matrix product on random data, median of 20 timed."""
    import torch

    size = 8192 if device == "cuda" else 512
    a, b = (torch.randn(size, size, device=device, dtype=torch.bfloat16) for _ in range(2))
    return 2 * size**3 / statistics.median(call_times(lambda: a @ b, 25, device)[5:]) / 1e12


def in_fresh_process(args: argparse.Namespace, task: str) -> dict[str, Any]:
    """Measure the setup `task` in a new Python process: its last stdout line is the result as JSON;
    a failure gives its error's last line."""
    command = [sys.executable, __file__, "--task", task, "--scale", args.scale, "--device", args.device]
    command += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--resolutions", *args.resolutions]
    command += ["--tiny-dir", str(args.tiny_dir)] if args.tiny_dir else []
    command += ["--skip-encoders"] if args.skip_encoders else []
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.timeout} s"}
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or ["no output"]
        return {"error": lines[-1][:300]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_device(args: argparse.Namespace) -> dict[str, Any]:
    """In this process, before the train setups: the device, its bf16 matmul rate and the encoders.
    Their memory is handed back to the device after; the setups' peaks are their own processes'."""
    import torch

    name = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    encoders = (
        []
        if args.skip_encoders
        else measure_encoders(args.scale, args.device, args.tiny_dir, args.resolutions[0], args.steps)
    )
    measured = {"device": name, "matmul_tflops": matmul_tflops(args.device), "encoders": encoders}
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=["full", "tiny"], default="full")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--resolutions", nargs="+", default=["1024x1024", "768x1344"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--only", nargs="+", default=[], help="setups by name, as the table prints them")
    parser.add_argument("--skip-encoders", action="store_true")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per process")
    parser.add_argument("--out", type=Path, help="append each result to this file as a JSON line")
    parser.add_argument("--task", help=argparse.SUPPRESS)
    parser.add_argument("--tiny-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.task:  # inside a measured process
        setup = Setup(**json.loads(args.task))
        print(
            json.dumps(measure_train(setup, args.scale, args.device, args.tiny_dir, args.steps, args.warmup))
        )
        return
    with tempfile.TemporaryDirectory(prefix="sdxl-lora-bench-full-") as work:
        if args.scale == "tiny":
            from sdxl_lib.models import TINY_SDXL, builtin

            args.tiny_dir = Path(work) / "tiny"
            builtin.build(TINY_SDXL, args.tiny_dir)
        run(args)


def record(args: argparse.Namespace, result: dict[str, Any]) -> None:
    if args.out:
        with args.out.open("a") as out:
            out.write(json.dumps(result) + "\n")


def run(args: argparse.Namespace) -> None:
    device = measure_device(args)
    name, ceiling = device["device"], device["matmul_tflops"]
    datasheet = next((v for k, v in DATASHEET_BF16_TFLOPS.items() if k in name), None)
    print(f"{name}: bf16 matmul {ceiling:.0f} TFLOP/s measured, {datasheet} on the datasheet")
    for result in device["encoders"]:
        print(f"{result['name']} | {result['per_s']:.1f} /s")
        record(args, {**result, "device": name})
    print("setup | resolution | batch | steps/s | images/s | peak alloc GB | reserved GB | TFLOP/step | MFU")
    chosen = [s for s in setups(args.resolutions, args.batches) if not args.only or s.name in args.only]
    for setup in chosen:
        result = in_fresh_process(args, json.dumps(dataclasses.asdict(setup)))
        result.update(name=setup.name, setup=dataclasses.asdict(setup), device=name)
        result.update(matmul_tflops=ceiling, datasheet_tflops=datasheet)
        record(args, result)
        row = f"{setup.name} | {setup.resolution} | {setup.batch}"
        if "error" in result:
            print(f"{row} | failed: {result['error']}")
            continue
        rate = 1 / result["seconds_per_step"]
        achieved = result["flops_per_step"] * rate / 1e12
        mfu = f"{achieved / datasheet:.1%} of datasheet, " if datasheet else ""
        print(
            f"{row} | {rate:.2f} | {rate * setup.batch:.2f} | {result.get('peak_allocated_gb', 0):.1f} | "
            f"{result.get('peak_reserved_gb', 0):.1f} | {result['flops_per_step'] / 1e12:.2f} | "
            f"{mfu}{achieved / ceiling:.1%} of matmul"
        )


if __name__ == "__main__":
    main()
