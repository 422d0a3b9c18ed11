"""Z-Image rendering through diffusers: options checked before loading, batch-invariant batches, OOM splitting.

Batch invariance (an item gives the same bytes alone or in any batch) does not survive batched matrix products:
MKL and cuBLAS pick kernels and reduction orders by the number of rows, so a row's result moves in its last bits
when rows join it (MKL float32 `linear` rows differ between 1, 2 and 4 rows, even on one thread), and captions of
different lengths are padded behind attention masks. Those ulps compound over the steps and flip uint8 pixels.
So the text encoder, transformer and VAE decoder see one item at a time, at the shapes it has alone, inside one
pipeline call; what stays batched (per-item noise, the scheduler's element-wise update) is exact per element.
"""

from __future__ import annotations

import functools
import gc
import importlib.util
import logging
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from processors.model_identity import config_fingerprint, folder_fingerprint, hub_commit
from processors.render_settings import (  # re-exported for callers
    RenderItem,
    RenderSettings,
    UnsupportedSettings,
)
from processors.tiny_model import build_tiny_pipeline_dir

log = logging.getLogger(__name__)

TINY_SOURCE = "tiny"
TINY_FOLDER_NAME = "z-image-tiny-v2"  # bump with any change to the tiny model's build
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_CHOICES = ("auto", *DTYPES)
DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
OFFLOAD_CHOICES = ("none", "model", "sequential")
MAX_SEQUENCE_LENGTH_LIMIT = 4096
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_CUDA_INDEXED = re.compile(r"^cuda:(\d+)$")


class InvalidModelOptions(ValueError):
    """Model options that cannot work on this machine; raised before anything is loaded."""


def _attention_backend_problem(name: str) -> str | None:
    from diffusers.models.attention_dispatch import (
        AttentionBackendName,
        _check_attention_backend_requirements,
    )

    allowed = ["default", *(backend.value for backend in AttentionBackendName)]
    if name not in allowed:
        return f"attention_backend {name!r} is unknown; allowed: {', '.join(allowed)}"
    if name != "default":
        try:
            _check_attention_backend_requirements(AttentionBackendName(name))
        except (RuntimeError, ImportError) as exc:
            return f"attention_backend {name!r} is not usable here: {exc}"
    return None


@dataclass(frozen=True)
class ModelOptions:
    """Which model to load and how to run it. `validate()` is called by the Renderer before loading."""

    source: str = TINY_SOURCE  # "tiny", a Hugging Face id such as "Tongyi-MAI/Z-Image-Turbo", or a local folder
    revision: str | None = None  # hub models only: branch, tag or commit
    dtype: str = "auto"  # auto = bf16 on cuda, fp32 elsewhere
    device: str = "auto"  # auto = cuda, else mps, else cpu
    compile: bool = False  # torch.compile of the transformer's repeated blocks
    cpu_offload: str = "none"
    attention_backend: str = "default"  # or a diffusers AttentionBackendName value, e.g. "flash", "_flash_3"
    tiny_cache_dir: str | Path | None = None  # where the tiny model is built; default: a folder in the temp dir
    max_sequence_length: int = 512  # prompt tokens kept (chat template included)
    # True: the model runs once per image inside a batch call, so a batched image is byte-identical to the
    # image alone. False: one fused transformer pass per batch, faster on a GPU, but an image then depends
    # (in its low bits) on what it was batched with; model_version says "fused" so no one mistakes the two.
    batch_invariant: bool = True

    @property
    def source_kind(self) -> str:
        """"tiny", "local" or "hub"; "invalid" when the source is none of them."""
        if self.source == TINY_SOURCE:
            return "tiny"
        if self.source.startswith((".", "/", "~")) or os.path.isabs(self.source) or Path(self.source).exists():
            return "local"
        return "hub" if _HUB_ID.match(self.source) else "invalid"

    def resolved_device(self) -> torch.device:
        if self.device != "auto":
            return torch.device(self.device)
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")

    def resolved_dtype(self) -> torch.dtype:
        if self.dtype != "auto":
            return DTYPES[self.dtype]
        return torch.bfloat16 if self.resolved_device().type == "cuda" else torch.float32

    def validate(self) -> None:
        problems = self._problems()
        if problems:
            raise InvalidModelOptions("invalid model options:\n  - " + "\n  - ".join(problems))

    def _problems(self) -> list[str]:
        problems = [*self._source_problems(), *self._device_problems()]
        if not isinstance(self.compile, bool):
            problems.append(f"compile must be true or false, got {self.compile!r}")
        problems.append(_attention_backend_problem(self.attention_backend))
        length = self.max_sequence_length
        if isinstance(length, bool) or not isinstance(length, int) or not 1 <= length <= MAX_SEQUENCE_LENGTH_LIMIT:
            problems.append(f"max_sequence_length must be an int in 1..{MAX_SEQUENCE_LENGTH_LIMIT}, got {length!r}")
        if self.tiny_cache_dir is not None and Path(self.tiny_cache_dir).is_file():
            problems.append(f"tiny_cache_dir {str(self.tiny_cache_dir)!r} is a file, not a folder")
        return [problem for problem in problems if problem]

    def _device_problems(self) -> list[str | None]:
        indexed = _CUDA_INDEXED.match(self.device)
        device_problem = None
        if self.device not in DEVICE_CHOICES and not indexed:
            device_problem = f"device {self.device!r} is unknown; allowed: {', '.join(DEVICE_CHOICES)}"
        elif (self.device == "cuda" or indexed) and not torch.cuda.is_available():
            device_problem = f"device {self.device!r} asked but CUDA is not available; use 'cpu' or 'auto'"
        elif indexed and int(indexed.group(1)) >= torch.cuda.device_count():
            device_problem = f"device {self.device!r} does not exist: {torch.cuda.device_count()} CUDA device(s)"
        elif self.device == "mps" and not torch.backends.mps.is_available():
            device_problem = "device 'mps' asked but MPS is not available; use 'cpu' or 'auto'"
        device_type = None if device_problem else self.resolved_device().type
        problems = [device_problem]
        if self.dtype not in DTYPE_CHOICES:
            problems.append(f"dtype {self.dtype!r} is unknown; allowed: {', '.join(DTYPE_CHOICES)}")
        elif self.dtype == "fp16" and device_type == "cpu":
            problems.append("dtype 'fp16' is not supported on cpu; use 'fp32' or 'bf16'")
        if self.cpu_offload not in OFFLOAD_CHOICES:
            problems.append(f"cpu_offload {self.cpu_offload!r} is unknown; allowed: {', '.join(OFFLOAD_CHOICES)}")
        elif self.cpu_offload != "none":
            if device_type not in (None, "cuda"):
                problems.append(f"cpu_offload {self.cpu_offload!r} needs a CUDA device, not {device_type!r}")
            if importlib.util.find_spec("accelerate") is None:
                problems.append(f"cpu_offload {self.cpu_offload!r} needs the 'accelerate' package installed")
        return problems

    def _source_problems(self) -> list[str | None]:
        kind, folder = self.source_kind, Path(self.source).expanduser()
        problems: list[str | None] = []
        if kind == "invalid":
            problems.append(f"source {self.source!r} is not 'tiny', a Hugging Face id or a local model folder")
        elif kind == "local" and not (folder / "model_index.json").is_file():
            state = "does not exist" if not folder.exists() else "is not a folder" if not folder.is_dir() else (
                "has no model_index.json (not a diffusers model)")
            problems.append(f"source folder {self.source!r} {state}")
        revision = self.revision
        if revision is not None and (kind != "hub" or not isinstance(revision, str) or not revision.strip()):
            problems.append("revision must be a non-empty branch, tag or commit, and only with a Hugging Face id")
        return problems


def is_out_of_memory(exc: BaseException) -> bool:
    # torch.cuda.OutOfMemoryError is a RuntimeError; other backends raise plain RuntimeErrors saying so.
    return isinstance(exc, RuntimeError) and (
        isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()
    )


RenderFn = Callable[[list[RenderItem], RenderSettings], Sequence[np.ndarray]]


def render_splitting_on_oom(
    render_fn: RenderFn, items: Sequence[RenderItem], settings: RenderSettings
) -> list[np.ndarray]:
    """render_fn(items), retrying each half separately when the device runs out of memory; order is kept.
    A single item that still runs out of memory re-raises; other errors propagate untouched."""
    items = list(items)
    try:
        images = list(render_fn(items, settings))
    except Exception as exc:
        if len(items) <= 1 or not is_out_of_memory(exc):
            raise
        # Leaving the except block drops the traceback, and with it the frames holding the failed batch's tensors.
    else:
        if len(images) != len(items):
            raise RuntimeError(f"render returned {len(images)} images for {len(items)} items")
        return images
    if torch.cuda.is_available():  # hand the failed attempt's blocks back before retrying
        gc.collect()
        torch.cuda.empty_cache()
    half = (len(items) + 1) // 2
    log.warning("out of memory rendering %d items; retrying as %d + %d", len(items), half, len(items) - half)
    first, second = items[:half], items[half:]
    return render_splitting_on_oom(render_fn, first, settings) + render_splitting_on_oom(render_fn, second, settings)


def _run_transformer_per_item(transformer: torch.nn.Module) -> None:
    """Make the transformer compute each list entry alone, at the shapes it has when rendered by itself."""
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    batched_forward = transformer.forward

    @functools.wraps(batched_forward)
    def forward(x: list, t: torch.Tensor, cap_feats: list, return_dict: bool = True, **kwargs: Any):
        samples = []
        for index, (latent, caption) in enumerate(zip(x, cap_feats, strict=True)):
            samples.extend(batched_forward([latent], t[index : index + 1], [caption], return_dict=False, **kwargs)[0])
        return Transformer2DModelOutput(sample=samples) if return_dict else (samples,)

    transformer.forward = forward


def caption_token_limit(transformer: torch.nn.Module) -> int:
    """Most caption tokens the transformer can place: captions are padded to multiples of 32 and take RoPE
    positions 1..n on the first axis, the image the next one, all below axes_lens[0]."""
    from diffusers.models.transformers.transformer_z_image import SEQ_MULTI_OF

    config: Any = transformer.config  # a diffusers config; torch types a Module's attributes as Tensor | Module
    return (config.axes_lens[0] - 2) // SEQ_MULTI_OF * SEQ_MULTI_OF


class Renderer:
    """One loaded Z-Image pipeline; renders batches of items with one pipeline call per batch."""

    def __init__(self, options: ModelOptions | None = None) -> None:
        from diffusers import ZImagePipeline

        options = options or ModelOptions()
        options.validate()
        self.options = options
        self.device = options.resolved_device()
        self.dtype = options.resolved_dtype()
        folder = self._local_folder()
        log.info("loading %s (%s on %s)", options.source, self.dtype, self.device)
        pipe = ZImagePipeline.from_pretrained(
            str(folder) if folder else options.source,
            revision=options.revision,
            torch_dtype=self.dtype,
            low_cpu_mem_usage=importlib.util.find_spec("accelerate") is not None,
        )
        pipe.set_progress_bar_config(disable=True)
        if options.batch_invariant:
            _run_transformer_per_item(pipe.transformer)
        if options.attention_backend != "default":
            pipe.transformer.set_attention_backend(options.attention_backend)
        if options.compile:
            # Regional compilation: the repeated blocks only, compiled once and reused by every layer.
            pipe.transformer.compile_repeated_blocks(fullgraph=True)
        if options.cpu_offload == "model":
            pipe.enable_model_cpu_offload(device=self.device)
        elif options.cpu_offload == "sequential":
            pipe.enable_sequential_cpu_offload(device=self.device)
        else:
            pipe.to(self.device)
        self._pipe = pipe
        self.max_sequence_length = min(options.max_sequence_length, caption_token_limit(pipe.transformer))
        if self.max_sequence_length < options.max_sequence_length:
            log.info("prompts capped at %d tokens: the model places no more", self.max_sequence_length)
        self._weights_version = self._identify_weights(folder)

    def _local_folder(self) -> Path | None:
        kind = self.options.source_kind
        if kind == "tiny":
            cache = self.options.tiny_cache_dir or Path(tempfile.gettempdir()) / "zimage-stream"
            return build_tiny_pipeline_dir(Path(cache) / TINY_FOLDER_NAME)
        return Path(self.options.source).expanduser() if kind == "local" else None

    def _identify_weights(self, folder: Path | None) -> str:
        if folder is not None:  # always the case for the tiny model, built into a folder
            kind = "tiny" if self.options.source_kind == "tiny" else "local"
            return f"{kind}-{folder_fingerprint(folder)[:16]}"
        commit = hub_commit(self.options.source, self.options.revision)
        return f"{self.options.source}@{commit or 'config-' + config_fingerprint(self._pipe)[:16]}"

    @property
    def model_id(self) -> str:
        return self.options.source

    @property
    def model_version(self) -> str:
        """The weights plus what changes their numerics: dtype, device type, compilation, attention kernel."""
        dtype_name = next(name for name, dtype in DTYPES.items() if dtype == self.dtype)
        numerics = f"{dtype_name}-{self.device.type}"
        if self.options.compile:
            numerics += "-compiled"
        if self.options.attention_backend != "default":
            numerics += f"-{self.options.attention_backend}"
        if not self.options.batch_invariant:
            numerics += "-fused"
        return f"{self._weights_version}+{numerics}"

    @property
    def size_multiple(self) -> int:
        """Width and height must be multiples of this (VAE downsampling times the 2x2 patches)."""
        return self._pipe.vae_scale_factor * 2

    @property
    def max_side(self) -> int:
        """Largest width or height the transformer's position table covers."""
        transformer = self._pipe.transformer
        patch = transformer.config.all_patch_size[0]
        return min(transformer.config.axes_lens[1:]) * patch * self._pipe.vae_scale_factor

    def check_settings(self, settings: RenderSettings) -> None:
        """Raises UnsupportedSettings for what this model can never render (a permanent, not a transient error)."""
        size = f"{settings.width}x{settings.height}"
        if settings.width % self.size_multiple or settings.height % self.size_multiple:
            raise UnsupportedSettings(f"width and height must be multiples of {self.size_multiple}, got {size}")
        if max(settings.width, settings.height) > self.max_side:
            raise UnsupportedSettings(f"{size} is larger than this model renders ({self.max_side} a side at most)")

    def warmup(self, settings: RenderSettings | None = None) -> np.ndarray:
        """Render one small image so lazy initialisation (kernels, caches, compilation) happens before traffic.
        Also the device probe after failed renders: it raises when the device cannot render a known-good item."""
        size = self.size_multiple * 4
        settings = settings or RenderSettings(size, size, steps=1, guidance=0.0)
        (image,) = self.render([RenderItem("warmup", None, 0)], settings)
        return image

    @torch.inference_mode()
    def render(self, items: Sequence[RenderItem], settings: RenderSettings) -> list[np.ndarray]:
        """One HxWx3 uint8 image per item, in order; each item's noise comes from its own CPU generator."""
        if not items:
            return []
        self.check_settings(settings)
        pipe = self._pipe
        use_guidance = settings.guidance > 0  # the pipeline applies CFG for any guidance above 0
        positives: list[torch.Tensor] = []
        negatives: list[torch.Tensor] = []
        for item in items:
            positive, negative = pipe.encode_prompt(
                prompt=[item.prompt],
                device=pipe._execution_device,
                do_classifier_free_guidance=use_guidance,
                negative_prompt=[item.negative_prompt or ""],
                max_sequence_length=self.max_sequence_length,
            )
            positives.extend(positive)
            negatives.extend(negative)
        latents = pipe(
            prompt_embeds=positives,
            negative_prompt_embeds=negatives if use_guidance else None,
            width=settings.width,
            height=settings.height,
            num_inference_steps=settings.steps,
            guidance_scale=settings.guidance,
            # On the CPU so that a seed draws the same noise whatever the device.
            generator=[torch.Generator("cpu").manual_seed(item.seed) for item in items],
            output_type="latent",
            return_dict=False,
        )[0]
        return [self._decode(latents[index : index + 1]) for index in range(len(items))]

    def _decode(self, latent: torch.Tensor) -> np.ndarray:
        # The pipeline's own decode and post-processing, for one latent at a time.
        vae = self._pipe.vae
        latent = latent.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        image = vae.decode(latent, return_dict=False)[0]
        image = (image / 2 + 0.5).clamp(0, 1)
        pixels = image[0].permute(1, 2, 0).float().cpu().numpy()
        return (pixels * 255).round().astype(np.uint8)

