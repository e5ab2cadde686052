"""The diffusers engine: the module that runs torch for the node.

It loads a model folder (safetensors only) for one device and runs one
pipeline call at a time on the calling thread, telling a `StepObserver` about
every denoising step. (`gpu_node.tiny` builds the tiny model; nothing else in
the node imports torch.) It is longer than our other modules on purpose:
keeping torch behind one engine module (docs/ARCHITECTURE.md) is worth more
than splitting it, and each of its parts reads top to bottom.
"""

from __future__ import annotations

import gc
import importlib.util
import io
import json
import logging
import os
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any

import diffusers
import safetensors.torch
import torch
import transformers
from diffusers import (
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.models.attention_processor import AttnProcessor2_0
from PIL import Image

from gpu_node import checkpoints, loras, single_file, weights
from gpu_node.calls import (
    LoraError,
    LoraUse,
    ModelError,
    ModelProfile,
    OutOfMemory,
    PipelineCall,
    SharedComponents,
    StepObserver,
)
from gpu_node.prompt_weights import Chunk, chunks_of, is_break
from sdapi.contract.nodes import ModelLimits
from sdapi.contract.payloads import Mode

log = logging.getLogger(__name__)

# name -> (diffusers class, overrides of the model's scheduler config)
SCHEDULERS: Mapping[str, tuple[str, Mapping[str, Any]]] = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2},
    ),
    "dpmpp_2m_karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "ddim": ("DDIMScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
}
# diffusers is only partly typed: pipelines and models are handled as Any.
PIPELINES: Mapping[str, tuple[Any, str]] = {
    "StableDiffusionPipeline": (StableDiffusionPipeline, "sd"),
    "StableDiffusionXLPipeline": (StableDiffusionXLPipeline, "sdxl"),
    # Dedicated inpainting checkpoints (a 9-channel UNet) load as these.
    "StableDiffusionInpaintPipeline": (StableDiffusionInpaintPipeline, "sd"),
    "StableDiffusionXLInpaintPipeline": (StableDiffusionXLInpaintPipeline, "sdxl"),
}
# The pipeline class of each mode, built per call around the loaded modules.
MODE_PIPELINES: Mapping[tuple[str, Mode], Any] = {
    ("sd", Mode.TXT2IMG): StableDiffusionPipeline,
    ("sd", Mode.IMG2IMG): StableDiffusionImg2ImgPipeline,
    ("sd", Mode.INPAINT): StableDiffusionInpaintPipeline,
    ("sdxl", Mode.TXT2IMG): StableDiffusionXLPipeline,
    ("sdxl", Mode.IMG2IMG): StableDiffusionXLImg2ImgPipeline,
    ("sdxl", Mode.INPAINT): StableDiffusionXLInpaintPipeline,
}
# Channels of a dedicated inpainting UNet: latents, mask, masked-image latents.
INPAINT_UNET_CHANNELS = 9
# Linear latent -> RGB approximations (rows: latent channels), as used by
# AUTOMATIC1111 and ComfyUI for live previews; under 1 ms per image.
PREVIEW_FACTORS: Mapping[str, tuple[list[list[float]], list[float]]] = {
    "sd": (
        [
            [0.3512, 0.2297, 0.3227],
            [0.3250, 0.4974, 0.2350],
            [-0.2829, 0.1762, 0.2721],
            [-0.2120, -0.2616, -0.7177],
        ],
        [0.0, 0.0, 0.0],
    ),
    "sdxl": (
        [
            [0.3651, 0.4232, 0.4341],
            [-0.2533, -0.0042, 0.1068],
            [0.1076, 0.1111, -0.0362],
            [-0.3165, -0.2492, -0.2188],
        ],
        [0.1084, -0.0175, -0.0011],
    ),
}


# LoRA adapters kept loaded per model: switching among them reads no file.
LORA_CACHE = 8
# The active adapters and their weights.
ActiveLoras = tuple[tuple[str, float], ...]

# A1111's `comma_padding_backtrack`: a window that fills up within this many
# tokens of a comma ends at the comma, so a phrase is not cut in two.
COMMA_BACKTRACK = 20

# One encoder window: token ids (start and end tokens included) and weights.
TokenWindow = tuple[list[int], list[float]]


def token_windows(tokenizer: Any, chunks: list[Chunk], size: int) -> list[TokenWindow]:
    """`chunks` as A1111 feeds them to a text encoder: windows of `size` tokens.

    Each window is [start, tokens, end, padding]; a BREAK or a full window
    starts the next one. Never empty: "" is one window of padding.
    """
    bos, eos = int(tokenizer.bos_token_id), int(tokenizer.eos_token_id)
    pad = eos if tokenizer.pad_token_id is None else int(tokenizer.pad_token_id)
    comma = tokenizer.convert_tokens_to_ids(",</w>")
    # Chunks are tokenized apart, as A1111 does; verbose=False: a long text is
    # expected here, not worth the tokenizer's warning.
    tokenized = tokenizer(
        [text for text, _ in chunks],
        add_special_tokens=False,
        truncation=False,
        verbose=False,
    )["input_ids"]
    windows: list[TokenWindow] = []
    tokens: list[int] = []
    weights: list[float] = []
    last_comma = -1

    def close() -> None:
        nonlocal tokens, weights, last_comma
        padding = size - len(tokens)
        windows.append(
            (
                [bos, *tokens, eos, *[pad] * padding],
                [1.0, *weights, *[1.0] * (padding + 1)],
            )
        )
        tokens, weights, last_comma = [], [], -1

    for chunk, ids in zip(chunks, tokenized, strict=True):
        if is_break(chunk):
            close()
            continue
        for token in ids:
            if token == comma:
                last_comma = len(tokens)
            elif (
                len(tokens) == size
                and last_comma != -1
                and len(tokens) - last_comma <= COMMA_BACKTRACK
            ):
                cut = last_comma + 1
                moved = tokens[cut:], weights[cut:]
                tokens, weights = tokens[:cut], weights[:cut]
                close()
                tokens, weights = list(moved[0]), list(moved[1])
            if len(tokens) == size:
                close()
            tokens.append(int(token))
            weights.append(chunk[1])
    if tokens or not windows:
        close()
    return windows


def emphasize(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Token embeddings times their weights, each window's mean kept (A1111).

    `hidden` is (windows, tokens, dim), `weights` (windows, tokens).
    """
    if bool((weights == 1).all()):
        # Bit for bit what the pipeline's own encoding gives.
        return hidden
    values = hidden.float()
    original = values.mean(dim=(1, 2), keepdim=True)
    values = values * weights[:, :, None]
    values = values * (original / values.mean(dim=(1, 2), keepdim=True))
    return values.to(hidden.dtype)


def quiet_libraries() -> None:
    """Turn off diffusers' and transformers' progress bars."""
    # Progress bars are multi-line noise in a service log; we log our own lines.
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]


def available_schedulers() -> tuple[str, ...]:
    """Scheduler names this installation can run (LMS needs scipy)."""
    has_scipy = importlib.util.find_spec("scipy") is not None
    return tuple(name for name in SCHEDULERS if name != "lms" or has_scipy)


# --- loading -------------------------------------------------------------------


def _pick_device(preference: str) -> torch.device:
    if preference == "cuda" and not torch.cuda.is_available():
        raise ModelError("SDAPI_GPU_DEVICE=cuda but torch sees no CUDA device")
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _describe_device(device: torch.device) -> tuple[str, int]:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"cuda:{device.index} {props.name}", int(props.total_memory)
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return "cpu", int(memory)


def _pipeline_class(folder: Path) -> tuple[Any, str]:
    index = json.loads((folder / "model_index.json").read_text())
    name = str(index.get("_class_name", ""))
    if name not in PIPELINES:
        raise ModelError(
            f"model in {folder} is a {name or 'unknown pipeline'}; this node serves "
            + ", ".join(PIPELINES)
        )
    return PIPELINES[name]


def _single_file_class(arch: checkpoints.Architecture) -> tuple[Any, str]:
    name = {
        ("sd", False): "StableDiffusionPipeline",
        ("sd", True): "StableDiffusionInpaintPipeline",
        ("sdxl", False): "StableDiffusionXLPipeline",
        ("sdxl", True): "StableDiffusionXLInpaintPipeline",
    }[(arch.pipeline, arch.inpaint)]
    return PIPELINES[name]


class DiffusersEngine:
    """One loaded pipeline on one device; `run` is called from one thread at a time."""

    def __init__(
        self,
        base: Any,
        kind: str,
        profile: ModelProfile,
        count_tokenizer: Any,
    ) -> None:
        self._base = base
        self._kind = kind
        self._profile = profile
        self._device = base.device
        # The pipeline's own tokenizer is busy on the GPU thread, and a fast
        # tokenizer raises "Already borrowed" when two threads share it.
        self._count_tokenizer = count_tokenizer
        self._count_lock = threading.Lock()
        # Tokens between the start and end tokens of one encoder window.
        self._window = profile.token_window - 2
        # A dedicated inpainting checkpoint runs every mode as inpainting.
        self._inpaint_only = int(base.unet.config.in_channels) == INPAINT_UNET_CHANNELS
        # Adapter names (by file hash), least recently used first.
        self._adapters: OrderedDict[str, None] = OrderedDict()
        self._active: ActiveLoras = ()

    @property
    def profile(self) -> ModelProfile:
        return self._profile

    def prompt_windows(self, text: str, syntax: str) -> int:
        """Text encoder windows `text` takes, read with `syntax`."""
        chunks = chunks_of(text, syntax)
        with self._count_lock:
            return len(token_windows(self._count_tokenizer, chunks, self._window))

    @property
    def base(self) -> Any:
        """The diffusers pipeline (its modules may be shared with other engines)."""
        return self._base

    def to_host(self, keep: Collection[str] = ()) -> None:
        """Move the weights to host RAM, freeing their device memory; the
        components in `keep` stay: another model on the device uses them."""
        if self._device.type == "cpu":
            return
        for name, module in self._base.components.items():
            if name not in keep and isinstance(module, torch.nn.Module):
                module.to("cpu")
        torch.cuda.empty_cache()

    def to_device(self) -> None:
        """Move the weights back from host RAM."""
        self._base.to(self._device)

    def memory_stats(self) -> dict[str, int]:
        """Device memory in bytes; {} on CPU."""
        if self._device.type != "cuda":
            return {}
        return {
            "allocated": int(torch.cuda.memory_allocated(self._device)),
            "reserved": int(torch.cuda.memory_reserved(self._device)),
            "peak": int(torch.cuda.max_memory_allocated(self._device)),
            "total": int(torch.cuda.get_device_properties(self._device).total_memory),
        }

    def _scheduler(self, name: str) -> Any:
        if name not in self._profile.limits.schedulers:
            raise ValueError(f"unknown scheduler {name!r}")
        class_name, overrides = SCHEDULERS[name]
        scheduler_class = getattr(diffusers, class_name)
        config = self._base.scheduler.config
        scheduler = scheduler_class.from_config(config, **overrides)
        if self._kind == "sd":
            # StableDiffusionPipeline rewrites these two (with a FutureWarning on
            # every call) when a scheduler has them otherwise; set them as it would.
            fixes: dict[str, Any] = {}
            if getattr(scheduler.config, "steps_offset", 1) != 1:
                fixes["steps_offset"] = 1
            if getattr(scheduler.config, "clip_sample", False) is True:
                fixes["clip_sample"] = False
            if fixes:
                scheduler = scheduler_class.from_config(config, **overrides, **fixes)
        return scheduler

    def _wrapper(self, cls: Any, scheduler: Any) -> Any:
        # A pipeline object per call keeps per-call state (scheduler, guidance,
        # interrupt flag) apart, so a premium call nested at a step boundary of a
        # batch leaves the batch's state untouched; the modules are shared, so
        # img2img and inpainting hold no second copy of the weights.
        # (`from_pipe` would also cast the shared modules to float32.)
        expected, optional = cls._get_signature_keys(cls)
        kwargs: dict[str, Any] = {
            name: module
            for name, module in self._base.components.items()
            if name in expected
        }
        kwargs["scheduler"] = scheduler
        kwargs.update(
            {k: self._base.config[k] for k in optional if k in self._base.config}
        )
        pipe = cls(**kwargs)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def _adapter(self, lora: LoraUse) -> str:
        """The adapter of `lora`, loaded from its file unless it is cached."""
        name = f"lora_{lora.sha256[:16]}"
        if name in self._adapters:
            self._adapters.move_to_end(name)
            return name
        try:
            data = safetensors.torch.load_file(str(lora.path), device="cpu")
        except (OSError, safetensors.SafetensorError) as exc:
            raise LoraError(f"cannot read LoRA {lora.name!r}: {exc}") from None
        try:
            with warnings.catch_warnings():
                # Several adapters side by side are the point of the cache.
                warnings.filterwarnings(
                    "ignore",
                    message="Already found a `peft_config`",
                    category=UserWarning,
                )
                self._base.load_lora_weights(data, adapter_name=name)
        except (ValueError, KeyError, RuntimeError) as exc:
            text = " ".join(str(exc).split())[:200]
            raise LoraError(
                f"LoRA {lora.name!r} does not fit this model: {text}"
            ) from None
        # Loading activates the new adapter: the active set is unknown now.
        self._active = (("", 0.0),)
        self._adapters[name] = None
        log.info("loaded LoRA %s (%s)", lora.name, lora.sha256[:10])
        return name

    def _apply_loras(self, wanted_loras: tuple[LoraUse, ...]) -> None:
        """Make exactly `wanted_loras` active on the shared modules.

        Weight 0 is no LoRA at all, and none disables every adapter, so those
        images are bit for bit the model's own.
        """
        wanted = tuple(
            (self._adapter(lora), lora.weight)
            for lora in wanted_loras
            if lora.weight != 0
        )
        if wanted == self._active:
            return
        if wanted:
            self._base.enable_lora()
            self._base.set_adapters(
                [name for name, _ in wanted], [weight for _, weight in wanted]
            )
        elif self._adapters:
            self._base.disable_lora()
        self._active = wanted
        keep = {name for name, _ in wanted}
        for name in list(self._adapters):
            if len(self._adapters) <= LORA_CACHE:
                break
            if name not in keep:
                self._base.delete_adapters(name)
                del self._adapters[name]

    def _preview(self, latent: torch.Tensor) -> bytes | None:
        factors = PREVIEW_FACTORS.get(self._kind)
        if factors is None or latent.shape[0] != len(factors[0]):
            return None
        mix = torch.tensor(factors[0], dtype=torch.float32)
        bias = torch.tensor(factors[1], dtype=torch.float32)
        rgb = torch.einsum("chw,cr->hwr", latent.detach().float().cpu(), mix) + bias
        pixels = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
        buffer = io.BytesIO()
        Image.fromarray(pixels, mode="RGB").save(buffer, format="JPEG", quality=70)
        return buffer.getvalue()

    def _encoders(self, pipe: Any) -> list[tuple[Any, Any]]:
        """(tokenizer, text encoder) pairs whose outputs the pipeline joins."""
        pairs = [(pipe.tokenizer, pipe.text_encoder)]
        if self._kind == "sdxl":
            pairs.append((pipe.tokenizer_2, pipe.text_encoder_2))
        return [(t, e) for t, e in pairs if t is not None and e is not None]

    def _encode(
        self, pipe: Any, texts: list[str], syntax: str
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Each text's embeddings, all padded to the longest's windows, and the
        pooled embeddings of their first window (SDXL).

        Windows past a text's own are the encoding of "", as A1111 pads.
        """
        chunks = {text: chunks_of(text, syntax) for text in dict.fromkeys(texts)}
        # Per encoder: each text's windows, then the empty prompt's.
        encoded: list[tuple[dict[str, list[torch.Tensor]], torch.Tensor]] = []
        pooled: dict[str, torch.Tensor] = {}
        for tokenizer, encoder in self._encoders(pipe):
            per_text = {
                text: token_windows(tokenizer, found, self._window)
                for text, found in chunks.items()
            }
            rows = [w for found in per_text.values() for w in found]
            rows += token_windows(tokenizer, [("", 1.0)], self._window)
            ids = torch.tensor([w[0] for w in rows], device=self._device)
            weights = torch.tensor(
                [w[1] for w in rows], device=self._device, dtype=torch.float32
            )
            firsts: torch.Tensor | None = None
            if self._kind == "sdxl":
                # SDXL reads the penultimate layer, and the projected end token
                # (of a text's first window) of the encoder that has one.
                output = encoder(ids, output_hidden_states=True)
                hidden = output.hidden_states[-2]
                firsts = output[0] if output[0].ndim == 2 else None
            else:
                hidden = encoder(ids)[0]
            hidden = emphasize(hidden.to(dtype=encoder.dtype), weights)
            own: dict[str, list[torch.Tensor]] = {}
            start = 0
            for text, found in per_text.items():
                own[text] = list(hidden[start : start + len(found)])
                if firsts is not None:
                    pooled[text] = firsts[start]
                start += len(found)
            encoded.append((own, hidden[-1]))
        windows = max(len(w) for own, _ in encoded for w in own.values())
        embeds = {
            text: torch.cat(
                [
                    torch.cat(own[text] + [empty] * (windows - len(own[text])))
                    for own, empty in encoded
                ],
                dim=-1,
            )
            for text in chunks
        }
        return embeds, pooled

    def _prompt_inputs(self, pipe: Any, call: PipelineCall) -> dict[str, Any]:
        """Weighted, windowed embeddings of every image's prompts (A1111's way).

        Every row is padded to the call's longest text: the runner puts only
        items of equal length in one call, so each image is encoded as it
        would be alone.
        """
        prompts = [item.prompt for item in call.items for _ in item.seeds]
        negatives = [item.negative_prompt for item in call.items for _ in item.seeds]
        embeds, pooled = self._encode(pipe, prompts + negatives, call.prompt_syntax)
        inputs: dict[str, Any] = {
            "prompt_embeds": torch.stack([embeds[text] for text in prompts]),
            "negative_prompt_embeds": torch.stack([embeds[text] for text in negatives]),
        }
        if self._kind != "sdxl":
            return inputs
        negative_pooled = torch.stack([pooled[text] for text in negatives])
        if bool(pipe.config.get("force_zeros_for_empty_prompt", False)):
            # SDXL's own reading of "no negative prompt": zero embeddings.
            empty = torch.tensor([not text for text in negatives], device=self._device)
            inputs["negative_prompt_embeds"] = inputs[
                "negative_prompt_embeds"
            ].masked_fill(empty[:, None, None], 0)
            negative_pooled = negative_pooled.masked_fill(empty[:, None], 0)
        inputs["pooled_prompt_embeds"] = torch.stack([pooled[t] for t in prompts])
        inputs["negative_pooled_prompt_embeds"] = negative_pooled
        return inputs

    def _plan(self, call: PipelineCall) -> tuple[Mode, float]:
        """The pipeline mode and strength that make what `call` asks for."""
        mode, strength = call.mode, call.strength
        if mode is Mode.IMG2IMG and strength >= 1:
            # Strength 1 ignores the input: exactly text-to-image at its seed.
            mode = Mode.TXT2IMG
        if self._inpaint_only and mode is not Mode.INPAINT:
            # A 9-channel UNet needs a mask: all white repaints everything.
            return Mode.INPAINT, strength if mode is Mode.IMG2IMG else 1.0
        return mode, strength

    def _image_inputs(
        self, call: PipelineCall, mode: Mode, strength: float
    ) -> dict[str, Any]:
        if mode is Mode.TXT2IMG:
            return {"width": call.width, "height": call.height}
        size = (call.width, call.height)
        rows = [item for item in call.items for _ in item.seeds]
        images = [
            item.init_image or Image.new("RGB", size, (127, 127, 127)) for item in rows
        ]
        inputs: dict[str, Any] = {"image": images, "strength": strength}
        if mode is Mode.INPAINT:
            inputs["mask_image"] = [
                item.mask or Image.new("L", size, 255) for item in rows
            ]
            inputs.update(width=call.width, height=call.height)
        return inputs

    def run(
        self, call: PipelineCall, observer: StepObserver
    ) -> dict[str, list[Image.Image]]:
        """Run `call` on this thread; images grouped by item key."""
        observer.before_start()
        if call.mode is not Mode.TXT2IMG and int(call.steps * call.strength) < 1:
            # No denoising step at this strength (diffusers refuses the call):
            # the input comes back unchanged.
            return {
                item.key: [
                    (item.init_image or Image.new("RGB", (call.width, call.height)))
                    for _ in item.seeds
                ]
                for item in call.items
            }
        mode, strength = self._plan(call)
        self._apply_loras(call.loras)
        pipe = self._wrapper(
            MODE_PIPELINES[(self._kind, mode)], self._scheduler(call.scheduler)
        )
        # CPU generators: a seed means the same starting noise on any device.
        generators = [
            torch.Generator(device="cpu").manual_seed(seed)
            for item in call.items
            for seed in item.seeds
        ]
        first_row: dict[str, int] = {}
        rows = [item.key for item in call.items for _ in item.seeds]
        for row, key in enumerate(rows):
            first_row.setdefault(key, row)

        def on_step_end(
            pipe: Any, index: int, timestep: Any, tensors: dict[str, Any]
        ) -> dict[str, Any]:
            latents = tensors["latents"]
            observer.on_step(
                index + 1,
                int(pipe.num_timesteps),
                lambda key: self._preview(latents[first_row[key]]),
            )
            # A premium call nested at this step boundary may have set its
            # own LoRAs on the shared modules.
            self._apply_loras(call.loras)
            return {}

        vae = self._base.vae
        vae_dtype = vae.dtype

        def before_decode(module: Any, args: Any) -> None:
            # The VAE decodes a batch one image at a time (slicing): waiting
            # premium work runs between two of them. Not while SDXL has the
            # VAE upcast to float32: a nested call's own float16 latents
            # would not fit it.
            if vae.dtype == vae_dtype:
                observer.between_images()

        decode_hook = vae.decoder.register_forward_pre_hook(before_decode)
        out_of_memory = False
        try:
            with torch.inference_mode():
                output = pipe(
                    **self._prompt_inputs(pipe, call),
                    **self._image_inputs(call, mode, strength),
                    num_inference_steps=call.steps,
                    guidance_scale=call.guidance_scale,
                    generator=generators,
                    callback_on_step_end=on_step_end,
                    output_type="pil",
                )
        except torch.cuda.OutOfMemoryError:
            # Handled below, outside this block: here the error's traceback
            # still holds the failed call's frames and their device tensors.
            out_of_memory = True
        finally:
            decode_hook.remove()
            # SDXL's pipeline casts the shared float16 VAE to float32 for
            # decoding and casts it back only if decoding returns; left in
            # float32, every later call would fail on a dtype mismatch.
            if vae.dtype != vae_dtype:
                vae.to(dtype=vae_dtype)
        if out_of_memory:
            gc.collect()
            torch.cuda.empty_cache()
            raise OutOfMemory(
                f"{call.image_count} images of {call.width}x{call.height}"
            )
        images: list[Image.Image] = list(output.images)
        grouped: dict[str, list[Image.Image]] = {}
        for item in call.items:
            made = images[: len(item.seeds)]
            images = images[len(item.seeds) :]
            if call.mode is Mode.INPAINT and item.init_image and item.mask:
                # Outside the mask the input's own pixels, not their VAE round
                # trip (which blurs them, and with random weights ruins them).
                made = [
                    Image.composite(image, item.init_image, item.mask) for image in made
                ]
            grouped.setdefault(item.key, []).extend(made)
        return grouped


def _defaults(kind: str, location: weights.ModelLocation) -> dict[str, Any]:
    if location.source == "tiny":
        return {"steps": 20, "guidance": 7.5}
    if kind == "sdxl":
        return {"steps": 30, "guidance": 5.0}
    return {"steps": 25, "guidance": 7.5}


def load_engine(
    location: weights.ModelLocation,
    *,
    device: str = "auto",
    max_size: int | None = None,
    default_steps: int | None = None,
    default_scheduler: str | None = None,
    on_phase: Callable[[str], None] | None = None,
    shared: SharedComponents | None = None,
) -> DiffusersEngine:
    """Load a model readied by `weights.prepare_model` (blocking: call in a thread).

    Components of `shared` already loaded for another model are reused, not
    loaded again; this one's are offered to the next models.
    """
    quiet_libraries()
    folder = location.path
    arch = checkpoints.architecture(folder) if location.source == "file" else None
    cls, kind = _single_file_class(arch) if arch else _pipeline_class(folder)
    target = _pick_device(device)
    if target.type == "cuda":
        # SDXL's VAE overflows in float16; bfloat16 keeps its range, where the
        # GPU has it natively (compute capability 8+): emulated, it is slower
        # than float16 with the VAE upcast for decoding.
        bf16 = kind == "sdxl" and torch.cuda.is_bf16_supported(
            including_emulation=False
        )
        dtype = torch.bfloat16 if bf16 else torch.float16
    else:
        dtype = torch.float32
    if on_phase:
        on_phase("hashing weights")
    model_hash = weights.weights_hash(folder)
    if on_phase:
        on_phase("loading pipeline")
    # No safety checker (see weights.SKIPPED_COMPONENTS): it is not downloaded,
    # and one in a local folder is not loaded.
    base: Any
    extra: dict[str, Any] = (
        {"safety_checker": None, "requires_safety_checker": False}
        if kind == "sd"
        else {}
    )
    if arch:
        base, count_tokenizer = single_file.load(
            folder, arch, cls, dtype=dtype, extra=extra
        )
        log.info("loaded %s as %s (%s)", folder, arch.kind, arch.source)
    else:
        reused = {}
        if shared is not None:
            for name, key in shared.keys.items():
                module = shared.modules.get(f"{key}:{dtype}")
                if module is not None:
                    reused[name] = module
            if reused:
                log.info("%s shares %s", location.model_id, ", ".join(sorted(reused)))
        try:
            base = cls.from_pretrained(
                str(folder),
                dtype=dtype,
                use_safetensors=True,
                local_files_only=True,
                **extra,
                **reused,
            )
        except (OSError, ValueError) as exc:
            text = " ".join(str(exc).split())[:300]
            raise ModelError(
                f"cannot load model {location.model_id} from {folder}: {text}"
            ) from None
        # Counting must see past the window without the "longer than the
        # maximum sequence length" warning: the window is enforced (and
        # reported) elsewhere.
        count_tokenizer = type(base.tokenizer).from_pretrained(
            str(folder / "tokenizer"), model_max_length=1_000_000
        )
    base.to(target)
    if shared is not None and not arch:
        for name, key in shared.keys.items():
            module = getattr(base, name, None)
            if module is not None:
                shared.modules[f"{key}:{dtype}"] = module
    if target.type == "cuda":
        # PyTorch's scaled_dot_product_attention (flash / memory-efficient
        # kernels), whatever processor a model's config would otherwise pick.
        base.unet.set_attn_processor(AttnProcessor2_0())  # type: ignore[no-untyped-call]
        base.vae.set_attn_processor(AttnProcessor2_0())  # type: ignore[no-untyped-call]
    # Decode a batch one image at a time: the VAE's activations at full
    # size are what runs out of memory first on large batches.
    base.vae.enable_slicing()
    base.set_progress_bar_config(disable=True)
    vae_scale = 2 ** (len(base.vae.config.block_out_channels) - 1)
    native = int(base.unet.config.sample_size) * vae_scale
    limit = max_size or min(2 * native, 2048)
    schedulers = available_schedulers()
    scheduler = default_scheduler or "euler_a"
    if scheduler not in schedulers:
        raise ModelError(
            f"SDAPI_GPU_DEFAULT_SCHEDULER={scheduler} is not one of "
            + ", ".join(schedulers)
        )
    defaults = _defaults(kind, location)
    description, memory = _describe_device(target)
    profile = ModelProfile(
        model=location.model_id,
        model_hash=model_hash,
        pipeline=kind,
        device=description,
        memory_bytes=memory,
        limits=ModelLimits(
            max_batch=8 if target.type == "cuda" else 4,
            default_steps=default_steps or defaults["steps"],
            default_guidance=defaults["guidance"],
            default_scheduler=scheduler,
            default_width=min(native, limit),
            default_height=min(native, limit),
            max_width=limit,
            max_height=limit,
            schedulers=list(schedulers),
        ),
        token_window=int(base.tokenizer.model_max_length),
        lora_kind=loras.base_kind(int(base.unet.config.cross_attention_dim)),
        versions={
            "diffusers": diffusers.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
    )
    return DiffusersEngine(base, kind, profile, count_tokenizer)
