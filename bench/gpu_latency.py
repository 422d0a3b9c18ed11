"""Denoising latency of the full-size Z-Image-Turbo transformer on a CUDA device, random weights, bf16.

    python -m bench.gpu_latency [--batches 1 2 4] [--steps 8] [--size 1024] [--vae] [--json out.json]

Builds ZImageTransformer2DModel with Z-Image-Turbo's published shape (about 6B parameters) directly on the GPU
and times `steps` denoising steps at `size` x `size` (guidance 0, so one transformer pass per step) for each
batch size, in two modes:
  batched   one transformer call over the whole batch (diffusers' own behaviour; not batch-invariant)
  per_item  one call per item, as the renderer runs it so that a batch gives the bytes of its singles
The text encoder is not included (captions are random features of --caption-tokens tokens); --vae adds one
decode per image with a VAE of the Z-Image shape. Needs a GPU: exits with code 2 where CUDA is missing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

TURBO_TRANSFORMER: dict[str, Any] = dict(
    all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=3840, n_layers=30, n_refiner_layers=2,
    n_heads=30, n_kv_heads=30, norm_eps=1e-5, qk_norm=True, cap_feat_dim=2560, rope_theta=256.0, t_scale=1000.0,
    axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512],
)
TURBO_VAE: dict[str, Any] = dict(
    in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
    latent_channels=16, norm_num_groups=32, scaling_factor=0.3611, shift_factor=0.1159,
    use_quant_conv=False, use_post_quant_conv=False,
)
VAE_SCALE = 8


def build(config: dict, model_class: type, device: torch.device, dtype: torch.dtype) -> Any:
    """Random weights initialised on the device (fast, and no 24 GB fp32 copy in host memory), then cast.
    Typed Any: the diffusers model's own methods are what callers use, and torch types them as Tensor | Module."""
    torch.manual_seed(0)
    with torch.device(device):
        model = model_class(**config)
    return model.to(dtype).eval().requires_grad_(False)


def sigmas(steps: int, shift: float = 3.0) -> list[float]:
    """Z-Image's default schedule with the Turbo scheduler's static shift 3."""
    linear = torch.linspace(1.0, 1 / steps, steps)
    shifted = shift * linear / (1 + (shift - 1) * linear)
    return [*shifted.tolist(), 0.0]


@torch.inference_mode()
def denoise(transformer, latents: list, captions: list, steps: int, per_item: bool) -> list:
    """The pipeline's loop without CFG: float32 latents, model inputs in the model dtype, Euler updates."""
    schedule = sigmas(steps)
    for step in range(steps):
        sigma, next_sigma = schedule[step], schedule[step + 1]
        t = torch.full((len(latents),), 1 - sigma, device=latents[0].device)  # the pipeline's (1000 - t) / 1000
        inputs = [latent.to(transformer.dtype) for latent in latents]
        if per_item:
            preds = [
                transformer([x], t[i : i + 1], [c], return_dict=False)[0][0]
                for i, (x, c) in enumerate(zip(inputs, captions, strict=True))
            ]
        else:
            preds = transformer(inputs, t, captions, return_dict=False)[0]
        # The model predicts the negated velocity.
        latents = [x + (next_sigma - sigma) * (-p.float()) for x, p in zip(latents, preds, strict=True)]
    return latents


@torch.inference_mode()
def decode(vae, latents: list) -> None:
    for latent in latents:  # one image at a time, as the renderer decodes
        vae.decode(latent.squeeze(1).unsqueeze(0).to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor)


def time_once(run) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    run()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(args, transformer, vae, batch: int, per_item: bool, device: torch.device) -> dict:
    generator = torch.Generator(device).manual_seed(0)
    side = args.size // VAE_SCALE
    latents = [torch.randn(16, 1, side, side, generator=generator, device=device) for _ in range(batch)]
    captions = [
        torch.randn(args.caption_tokens, TURBO_TRANSFORMER["cap_feat_dim"], generator=generator, device=device)
        .to(torch.bfloat16)
        for _ in range(batch)
    ]

    def run() -> None:
        out = denoise(transformer, latents, captions, args.steps, per_item)
        if vae is not None:
            decode(vae, out)

    row = {"batch": batch, "mode": "per_item" if per_item else "batched", "size": args.size, "steps": args.steps}
    torch.cuda.reset_peak_memory_stats(device)
    try:
        for _ in range(args.warmup):
            run()
        times = [time_once(run) for _ in range(args.repeats)]
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {**row, "error": "out of memory"}
    median = statistics.median(times)
    return {
        **row,
        "latency_s": round(median, 4),
        "per_image_s": round(median / batch, 4),
        "images_per_s": round(batch / median, 3),
        "peak_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2),
    }


def print_table(rows: list[dict]) -> None:
    print(f"{'batch':>5} {'mode':>9} {'latency s':>10} {'s/image':>8} {'img/s':>7} {'peak GiB':>9}")
    for row in rows:
        if "error" in row:
            print(f"{row['batch']:>5} {row['mode']:>9} {row['error']:>10}")
        else:
            print(
                f"{row['batch']:>5} {row['mode']:>9} {row['latency_s']:>10.3f} {row['per_image_s']:>8.3f} "
                f"{row['images_per_s']:>7.2f} {row['peak_gib']:>9.1f}"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--modes", nargs="+", choices=["batched", "per_item"], default=["batched", "per_item"])
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels (multiple of 16)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--caption-tokens", type=int, default=128, help="caption length after the chat template")
    parser.add_argument("--attention-backend", default="default", help="a diffusers attention backend name")
    parser.add_argument("--compile", action="store_true", help="regional torch.compile of the repeated blocks")
    parser.add_argument("--vae", action="store_true", help="also decode each image with a Z-Image-shaped VAE")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="write the rows here as JSON")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print("no CUDA device: bench/gpu_latency.py needs a GPU", file=sys.stderr)
        return 2
    from diffusers import AutoencoderKL, ZImageTransformer2DModel
    from diffusers import __version__ as diffusers_version
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # the cast-after-init notice is expected for random weights

    device = torch.device("cuda")
    transformer = build(TURBO_TRANSFORMER, ZImageTransformer2DModel, device, torch.bfloat16)
    if args.attention_backend != "default":
        transformer.set_attention_backend(args.attention_backend)
    if args.compile:
        transformer.compile_repeated_blocks(fullgraph=True)
    vae = build(TURBO_VAE, AutoencoderKL, device, torch.bfloat16) if args.vae else None
    parameters = sum(p.numel() for p in transformer.parameters()) / 1e9
    print(f"{torch.cuda.get_device_name(device)}: transformer {parameters:.2f}B parameters, bf16, "
          f"{args.size}x{args.size}, {args.steps} steps, caption {args.caption_tokens} tokens"
          f"{', with VAE decode' if vae is not None else ', text encoder and VAE not included'}")

    rows = [
        measure(args, transformer, vae, batch, mode == "per_item", device)
        for batch in args.batches
        for mode in args.modes
    ]
    print_table(rows)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "device": torch.cuda.get_device_name(device),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "diffusers": diffusers_version,
            "args": {key: str(value) for key, value in vars(args).items()},
        }
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
