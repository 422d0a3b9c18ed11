"""The renderer on the built-in tiny model (CPU): determinism, batch invariance, OOM splitting, options, PNG, keys."""

from __future__ import annotations

import io
import posixpath
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from processors.imaging import encode_png, object_key, sha256_hex
from processors.model_identity import folder_fingerprint
from processors.renderer import (
    TINY_FOLDER_NAME,
    InvalidModelOptions,
    ModelOptions,
    Renderer,
    RenderItem,
    RenderSettings,
    is_out_of_memory,
    render_splitting_on_oom,
)
from processors.tiny_model import (
    COMPLETE_MARKER,
    build_tiny_pipeline_dir,
    build_tokenizer,
)

SMALL = RenderSettings(width=32, height=32, steps=2, guidance=0.0)
PROMPTS = [
    "a",
    "a red bicycle leaning on a brick wall",
    "studio photo of a ceramic teapot, soft light, " * 3,
    "packshot, white background, 猫 and ümlauts, " * 8,  # longer than the tiny model's caption limit
]
NEGATIVES = [None, "blurry", None, "low quality, watermark, text, " * 4]


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny-model")


@pytest.fixture(scope="module")
def renderer(tiny_cache) -> Renderer:
    return Renderer(ModelOptions(source="tiny", device="cpu", tiny_cache_dir=tiny_cache))


def items() -> list[RenderItem]:
    pairs = zip(PROMPTS, NEGATIVES, strict=True)
    return [RenderItem(prompt, negative, 1000 + index) for index, (prompt, negative) in enumerate(pairs)]


def png_of(renderer: Renderer, batch: list[RenderItem], settings: RenderSettings) -> list[bytes]:
    return [encode_png(image) for image in renderer.render(batch, settings)]


# --- determinism -------------------------------------------------------------------------------------------------


def test_same_request_and_seed_give_the_same_bytes(renderer):
    item = RenderItem("a lighthouse at dusk", None, 7)
    first, second = png_of(renderer, [item], SMALL), png_of(renderer, [item], SMALL)
    assert first == second
    image = renderer.render([item], SMALL)[0]
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8


def test_seed_prompt_and_negative_prompt_all_change_the_image(renderer):
    base = RenderItem("a lighthouse at dusk", None, 7)
    assert png_of(renderer, [base], SMALL) != png_of(renderer, [RenderItem(base.prompt, None, 8)], SMALL)
    assert png_of(renderer, [base], SMALL) != png_of(renderer, [RenderItem("a lighthouse at dawn", None, 7)], SMALL)
    guided = RenderSettings(32, 32, 2, guidance=2.5)
    with_negative = RenderItem(base.prompt, "fog", 7)
    assert png_of(renderer, [base], guided) != png_of(renderer, [with_negative], guided)


def test_a_single_item_matches_the_reference_diffusers_pipeline(renderer, tiny_cache):
    from diffusers import ZImagePipeline

    pipe = ZImagePipeline.from_pretrained(tiny_cache / TINY_FOLDER_NAME, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    prompt, seed = PROMPTS[1], 31
    reference = pipe(
        prompt, height=64, width=64, num_inference_steps=2, guidance_scale=0.0,
        generator=torch.Generator("cpu").manual_seed(seed), output_type="np",
    ).images[0]
    rendered = renderer.render([RenderItem(prompt, None, seed)], RenderSettings(64, 64, 2, 0.0))[0]
    np.testing.assert_array_equal(rendered, (reference * 255).round().astype(np.uint8))


def test_model_version_is_stable_across_loads_and_builds(renderer, tmp_path):
    again = Renderer(ModelOptions(device="cpu", tiny_cache_dir=tmp_path))  # an independent build of the tiny model
    assert again.model_version == renderer.model_version
    assert renderer.model_version.startswith("tiny-") and renderer.model_version.endswith("+fp32-cpu")
    assert renderer.model_id == "tiny"


# --- batch invariance --------------------------------------------------------------------------------------------

COMPOSITIONS = [[0, 1], [1, 0], [3, 0], [2, 1, 0], [0, 3, 2], [3, 2, 1, 0], [1, 2, 3, 0], [2, 2], [0, 0, 3, 3]]


@pytest.mark.parametrize("settings", [SMALL, RenderSettings(64, 64, 2, 0.0), RenderSettings(64, 32, 2, 2.5)])
def test_a_batch_gives_the_same_bytes_as_its_items_alone(renderer, settings):
    batch_items = items()
    alone = [png_of(renderer, [item], settings)[0] for item in batch_items]
    assert len(set(alone)) == len(alone)  # the items really are different images
    for composition in COMPOSITIONS:
        together = png_of(renderer, [batch_items[index] for index in composition], settings)
        assert together == [alone[index] for index in composition], f"batch {composition} differs from singles"


def test_fused_batches_render_and_say_so_in_the_model_version(renderer, tiny_cache):
    fused = Renderer(ModelOptions(source="tiny", device="cpu", tiny_cache_dir=tiny_cache, batch_invariant=False))
    assert fused.model_version == renderer.model_version + "-fused"
    batch = items()[:3]
    images = fused.render(batch, SMALL)
    assert [i.shape for i in images] == [(32, 32, 3)] * 3
    # Alone, a fused pass is the same computation as the per-item one: only batching may differ.
    assert png_of(fused, batch[:1], SMALL) == png_of(renderer, batch[:1], SMALL)


def test_prompts_longer_than_the_caption_limit_are_cut_not_fatal(renderer):
    head = "a tall stack of pancakes with syrup " * 20
    assert renderer.max_sequence_length < len(head.encode())
    cut_a, cut_b = RenderItem(head + "and blueberries", None, 3), RenderItem(head + "and lemons", None, 3)
    assert png_of(renderer, [cut_a], SMALL) == png_of(renderer, [cut_b], SMALL)


def test_warmup_and_empty_batches(renderer):
    probe = renderer.warmup()
    side = renderer.size_multiple * 4
    assert probe.shape == (side, side, 3) and probe.dtype == np.uint8
    assert probe.std() > 0  # drawn, not a blank buffer
    assert np.array_equal(renderer.warmup(), probe)  # a fixed probe: a device that draws it differently is broken
    assert renderer.render([], SMALL) == []


def test_sizes_the_model_cannot_place_are_refused(renderer):
    with pytest.raises(ValueError, match="multiples of"):
        renderer.render([RenderItem("x", None, 1)], RenderSettings(30, 32, 2, 0.0))


@pytest.mark.parametrize("kwargs", [{"seed": -1}, {"seed": 2**64}, {"seed": True}, {"prompt": None}])
def test_render_items_refuse_bad_values(kwargs):
    fields = {"prompt": "p", "negative_prompt": None, "seed": 1, **kwargs}
    with pytest.raises((TypeError, ValueError)):
        RenderItem(**fields)


@pytest.mark.parametrize("kwargs", [{"width": 0}, {"steps": 0}, {"guidance": -1.0}, {"guidance": float("nan")}])
def test_render_settings_refuse_bad_values(kwargs):
    with pytest.raises(ValueError):
        RenderSettings(**{"width": 32, "height": 32, "steps": 2, "guidance": 0.0, **kwargs})


# --- out of memory -----------------------------------------------------------------------------------------------


class FakeDevice:
    """A render function that runs out of memory above `capacity` items and records the batches it saw."""

    def __init__(self, capacity: int, error: BaseException | None = None) -> None:
        self.capacity = capacity
        self.batches: list[list[int]] = []
        self.error = error or torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def __call__(self, batch, settings):
        self.batches.append([item.seed for item in batch])
        if len(batch) > self.capacity:
            raise self.error
        return [np.full((2, 2, 3), item.seed % 256, dtype=np.uint8) for item in batch]


@pytest.mark.parametrize("capacity, count", [(1, 5), (2, 7), (3, 3), (1, 1)])
def test_oom_splits_the_batch_and_keeps_every_item_in_order(capacity, count):
    device = FakeDevice(capacity)
    batch = [RenderItem(f"p{index}", None, index) for index in range(count)]
    images = render_splitting_on_oom(device, batch, SMALL)
    assert [int(image[0, 0, 0]) for image in images] == list(range(count))
    rendered = [seed for seen in device.batches if len(seen) <= capacity for seed in seen]
    assert rendered == list(range(count))  # each item rendered exactly once, in order


def test_a_single_item_that_still_runs_out_of_memory_re_raises():
    device = FakeDevice(capacity=0)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        render_splitting_on_oom(device, [RenderItem(f"p{i}", None, i) for i in range(4)], SMALL)
    assert [len(seen) for seen in device.batches] == [4, 2, 1]


def test_other_errors_are_not_retried():
    device = FakeDevice(capacity=1, error=ValueError("bad prompt"))
    with pytest.raises(ValueError):
        render_splitting_on_oom(device, [RenderItem(f"p{i}", None, i) for i in range(4)], SMALL)
    assert len(device.batches) == 1


def test_oom_split_batches_still_match_singles(renderer):
    def limited(batch, settings):
        if len(batch) > 1:
            raise RuntimeError("CUDA error: out of memory")
        return renderer.render(batch, settings)

    batch = items()
    split = [encode_png(image) for image in render_splitting_on_oom(limited, batch, SMALL)]
    assert split == png_of(renderer, batch, SMALL)


@pytest.mark.parametrize(
    "exc, expected",
    [
        (torch.cuda.OutOfMemoryError("CUDA out of memory"), True),
        (RuntimeError("CUDA error: out of memory"), True),
        (RuntimeError("MPS backend out of memory"), True),
        (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), False),
        (MemoryError(), False),
        (ValueError("out of memory"), False),
    ],
)
def test_out_of_memory_detection(exc, expected):
    assert is_out_of_memory(exc) is expected


# --- model options -----------------------------------------------------------------------------------------------


def option_cases(tmp_path: Path) -> list[tuple[dict, str]]:
    a_file = tmp_path / "weights.bin"
    a_file.write_bytes(b"0")
    (tmp_path / "empty").mkdir()
    return [
        ({"dtype": "fp64"}, "dtype 'fp64' is unknown; allowed: auto, bf16, fp16, fp32"),
        ({"device": "cpu", "dtype": "fp16"}, "fp16"),
        ({"device": "tpu"}, "device 'tpu' is unknown"),
        ({"device": "cpu", "cpu_offload": "model"}, "needs a CUDA device"),
        ({"cpu_offload": "always"}, "cpu_offload 'always' is unknown; allowed: none, model, sequential"),
        ({"attention_backend": "warp-speed"}, "attention_backend 'warp-speed' is unknown"),
        ({"source": str(a_file)}, "is not a folder"),
        ({"source": str(tmp_path / "empty")}, "no model_index.json"),
        ({"source": str(tmp_path / "missing")}, "does not exist"),
        ({"source": "not a model id!"}, "is not 'tiny', a Hugging Face id or a local model folder"),
        ({"revision": "main"}, "only with a Hugging Face id"),
        ({"max_sequence_length": 0}, "max_sequence_length"),
        ({"compile": "yes"}, "compile"),
    ]


def test_invalid_options_fail_loudly_with_the_allowed_values(tmp_path):
    for kwargs, message in option_cases(tmp_path):
        with pytest.raises(InvalidModelOptions, match=re.escape(message)):
            ModelOptions(**kwargs).validate()


def test_every_problem_is_reported_at_once():
    with pytest.raises(InvalidModelOptions) as caught:
        ModelOptions(dtype="fp8", device="tpu", cpu_offload="always").validate()
    assert all(word in str(caught.value) for word in ("dtype", "device", "cpu_offload"))
    assert isinstance(caught.value, ValueError)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_without_cuda_is_refused(device):
    with pytest.raises(InvalidModelOptions, match="CUDA is not available"):
        ModelOptions(device=device).validate()


def test_the_renderer_checks_options_before_loading_anything(tmp_path):
    with pytest.raises(InvalidModelOptions):
        Renderer(ModelOptions(dtype="fp64", tiny_cache_dir=tmp_path))
    assert list(tmp_path.iterdir()) == []  # the tiny model was not even built


def test_valid_options_pass():
    ModelOptions(device="cpu").validate()
    hub = ModelOptions(source="Tongyi-MAI/Z-Image-Turbo", revision="main", device="cpu", dtype="bf16")
    hub.validate()
    assert hub.source_kind == "hub" and ModelOptions().source_kind == "tiny"


# --- tiny model --------------------------------------------------------------------------------------------------


def test_tiny_builds_are_deterministic_and_cached(tmp_path):
    first = build_tiny_pipeline_dir(tmp_path / "a")
    second = build_tiny_pipeline_dir(tmp_path / "b")
    assert folder_fingerprint(first) == folder_fingerprint(second)
    (first / "kept.txt").write_text("a complete build is not rebuilt")
    assert build_tiny_pipeline_dir(first) == first and (first / "kept.txt").exists()


def test_a_half_written_tiny_build_is_rebuilt(tmp_path):
    target = tmp_path / "tiny"
    (target / "transformer").mkdir(parents=True)
    (target / "transformer" / "config.json").write_text("{")  # interrupted before the marker
    build_tiny_pipeline_dir(target)
    assert (target / COMPLETE_MARKER).is_file()
    assert folder_fingerprint(target) == folder_fingerprint(build_tiny_pipeline_dir(tmp_path / "fresh"))


def test_the_tiny_tokenizer_round_trips_any_text_and_templates_chats():
    tokenizer = build_tokenizer()
    text = "Zürich 猫 🚲 \t new\nline"
    assert tokenizer.decode(tokenizer(text).input_ids) == text
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True, enable_thinking=True
    )
    assert isinstance(chat, str) and text in chat and chat.endswith("assistant\n")
    without_thinking = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert without_thinking.startswith(chat) and "</think>" in without_thinking


# --- PNG and object keys -----------------------------------------------------------------------------------------


def png_chunk_types(data: bytes) -> list[bytes]:
    types, offset = [], 8
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        types.append(data[offset + 4 : offset + 8])
        offset += 12 + length
    return types


def test_png_encoding_is_deterministic_lossless_and_carries_no_metadata():
    pixels = np.random.default_rng(0).integers(0, 256, size=(17, 23, 3), dtype=np.uint8)
    data = encode_png(pixels)
    assert data == encode_png(pixels.copy()) and sha256_hex(data) == sha256_hex(encode_png(pixels))
    with Image.open(io.BytesIO(data)) as opened:
        assert opened.format == "PNG" and opened.mode == "RGB" and opened.size == (23, 17)
        np.testing.assert_array_equal(np.asarray(opened), pixels)
    assert set(png_chunk_types(data)) == {b"IHDR", b"IDAT", b"IEND"}


@pytest.mark.parametrize(
    "bad", [np.zeros((4, 4, 3), np.float32), np.zeros((4, 4), np.uint8), np.zeros((4, 4, 4), np.uint8), [[0]]]
)
def test_png_encoding_refuses_what_is_not_rgb_bytes(bad):
    with pytest.raises(ValueError):
        encode_png(bad)


HOSTILE_IDS = ["../../etc/passwd", "/abs/path", "a/../../b", "..", ".", "", "C:\\Windows\\system32", "a\x00b",
               "名前/..", "x" * 500, "...hidden", "normal-id_1.2"]


@pytest.mark.parametrize("tenant", [t for t in HOSTILE_IDS if t])
def test_object_keys_never_escape_their_prefix(tenant):
    digest = sha256_hex(b"image")
    key = object_key(tenant, digest)
    assert key == object_key(tenant, digest)
    assert re.fullmatch(r"images/[A-Za-z0-9._-]{1,64}-[0-9a-f]{16}/[0-9a-f]{2}/[0-9a-f]{64}\.png", key), key
    segments = key.split("/")
    assert len(segments) == 4 and not any(segment in ("", ".", "..") for segment in segments)
    assert not segments[1].startswith(".") and posixpath.normpath(key) == key


def test_object_keys_separate_tenants_and_contents():
    one, two = sha256_hex(b"one"), sha256_hex(b"two")
    keys = {object_key("a/b", one), object_key("a_b", one), object_key("a/b", two)}  # "a_b" sanitizes like "a/b"
    assert len(keys) == 3
    for bad in ("", "ABC", one.upper(), one[:-1]):
        with pytest.raises(ValueError):
            object_key("tenant", bad)
