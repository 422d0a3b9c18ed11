"""A tiny random-weight Z-Image model, built locally from fixed seeds, and the fingerprint of a model folder.

The model is written as an ordinary diffusers folder (model_index.json and one sub-folder per component) so that
the renderer loads it through the same `ZImagePipeline.from_pretrained` path as the published checkpoints. It
needs no network: the tokenizer is a byte-level vocabulary built here, not downloaded.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    ZImagePipeline,
    ZImageTransformer2DModel,
)
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3Model

TINY_SEED = 0
# Written last: a folder without it is a half-written build and is rebuilt.
COMPLETE_MARKER = ".complete"

PAD_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = (PAD_TOKEN, "<|im_start|>", "<|im_end|>", "<think>", "</think>")

# Same shape as Qwen3's template for a user turn: with enable_thinking=False the assistant turn opens with an empty
# think block, with enable_thinking=True (what ZImagePipeline asks for) it opens bare.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{ '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif -%}"
    "{%- endif -%}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer with a fixed vocabulary: the 256 byte symbols, then the chat special tokens.

    No merges, so every UTF-8 byte of a prompt is one token: any text encodes, and the vocabulary never depends
    on a training corpus.
    """
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: index for index, symbol in enumerate(alphabet)}
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        eos_token="<|im_end|>",
        additional_special_tokens=list(SPECIAL_TOKENS[1:]),
        model_max_length=4096,
        padding_side="right",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _transformer() -> ZImageTransformer2DModel:
    torch.manual_seed(TINY_SEED)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=16,
        dim=32,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        norm_eps=1e-5,
        qk_norm=True,
        cap_feat_dim=16,
        rope_theta=256.0,
        t_scale=1000.0,
        axes_dims=[8, 4, 4],
        axes_lens=[256, 64, 64],  # up to 64 patches a side: 256x256 images
    )
    # The pad tokens are left uninitialised by the constructor; fix them so the weights are a function of the seed.
    # (They are parameters the constructor registers; diffusers' types do not declare them.)
    with torch.no_grad():
        for pad in (transformer.x_pad_token, transformer.cap_pad_token):  # type: ignore[attr-defined]
            pad.copy_(torch.ones_like(pad))
    return transformer


def _vae() -> AutoencoderKL:
    torch.manual_seed(TINY_SEED)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        block_out_channels=[32, 64],
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=32,
        sample_size=32,
        scaling_factor=0.3611,
        shift_factor=0.1159,
    )


def _text_encoder(vocab_size: int) -> Qwen3Model:
    torch.manual_seed(TINY_SEED)
    config = Qwen3Config(
        hidden_size=16,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=512,
    )
    return Qwen3Model(config).eval()


def build_tiny_pipeline() -> ZImagePipeline:
    """The tiny pipeline in memory, weights drawn from fixed seeds without disturbing the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        tokenizer = build_tokenizer()
        return ZImagePipeline(
            transformer=_transformer(),
            vae=_vae(),
            # Z-Image-Turbo's published scheduler: static shift 3.0, no resolution-dependent shifting.
            scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False),
            text_encoder=_text_encoder(len(tokenizer)),
            tokenizer=tokenizer,
        )


def is_complete(path: Path) -> bool:
    return (Path(path) / COMPLETE_MARKER).is_file()


def build_tiny_pipeline_dir(path: Path) -> Path:
    """Write the tiny model as a diffusers folder at `path`; a folder that already holds a complete build is kept."""
    path = Path(path)
    if is_complete(path):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and swap it in, so a concurrent reader never sees a partial folder as complete.
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        staging.chmod(0o755)
        pipe = build_tiny_pipeline()
        pipe.save_pretrained(staging, safe_serialization=True)  # type: ignore[attr-defined]  # DiffusionPipeline's
        (staging / COMPLETE_MARKER).write_text("ok\n", encoding="utf-8")
        if path.exists() and not is_complete(path):
            shutil.rmtree(path)  # a build that stopped half-way
        try:
            staging.rename(path)
        except OSError:
            if not is_complete(path):  # not merely another process finishing first
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return path
