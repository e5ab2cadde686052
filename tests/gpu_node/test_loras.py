"""LoRAs per request: files found and described, applied, and never leaked."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis.asyncio
from PIL import Image

from gpu_node.calls import CallItem, Engine, LoraUse, PipelineCall, QuietObserver
from gpu_node.loras import LoraFolder, detect_kind, read_header
from sdapi.contract.names import image_key
from sdapi.contract.payloads import GenerationParams, LoraSpec, take_lora_tags
from sdapi.contract.status import Status
from sdapi.infra.announcements import live_nodes
from sdapi.infra.queue import enqueue_generation
from tests.gpu_node.conftest import node_settings, running_node
from tests.gpu_node.lora_support import sdxl_targets, write_lora
from tests.gpu_node.support import job, result_of
from tests.support import until


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("loras")
    write_lora(folder / "kohya_fox.safetensors", fmt="kohya", seed=1)
    write_lora(folder / "peft_fox.safetensors", fmt="peft", seed=2)
    write_lora(
        folder / "big_fox.safetensors", fmt="kohya", seed=3, targets=sdxl_targets()
    )
    return folder


@pytest.fixture(scope="module")
def folder(lora_dir: Path) -> LoraFolder:
    found = LoraFolder(lora_dir)
    found.scan()
    return found


def use(folder: LoraFolder, name: str, weight: float) -> LoraUse:
    file = folder.get(name)
    assert file is not None
    return LoraUse(name, weight, file.path, file.sha256)


def pixels(
    engine: Engine,
    loras: tuple[LoraUse, ...] = (),
    prompts: tuple[str, ...] = ("a red fox in the snow",),
) -> list[np.ndarray]:
    call = PipelineCall(
        width=64,
        height=64,
        steps=3,
        guidance_scale=7.5,
        scheduler="euler",
        items=tuple(
            CallItem(f"k{i}", text, "blurry", (100 + i,))
            for i, text in enumerate(prompts)
        ),
        loras=loras,
    )
    images = engine.run(call, QuietObserver())
    return [np.asarray(images[f"k{i}"][0]) for i in range(len(prompts))]


def test_lora_files_are_described_in_both_formats(
    folder: LoraFolder, lora_dir: Path
) -> None:
    files = folder.files
    assert {name: file.kind for name, file in files.items()} == {
        "kohya_fox": "tiny",
        "peft_fox": "tiny",
        "big_fox": "sdxl",
    }
    shapes, _, _ = read_header(lora_dir / "peft_fox.safetensors")
    assert detect_kind(shapes) == "tiny"
    assert all(len(file.sha256) == 64 for file in files.values())


def test_lora_trigger_words_come_from_the_tag_frequency(tmp_path: Path) -> None:
    write_lora(tmp_path / "tagged.safetensors", tags={"fox": 3, "snow": 9, " ": 4})
    found = LoraFolder(tmp_path)
    assert found.scan()
    tagged = found.get("tagged")
    assert tagged is not None
    assert tagged.trigger_words == ("snow", "fox")
    # Nothing changed: the file is not read again.
    assert not found.scan()


@pytest.mark.parametrize("name", ["kohya_fox", "peft_fox"])
def test_a_lora_changes_pixels_in_either_format(
    tiny_engine: Engine, folder: LoraFolder, name: str
) -> None:
    (baseline,) = pixels(tiny_engine)
    (changed,) = pixels(tiny_engine, (use(folder, name, 1.0),))
    assert np.abs(changed.astype(int) - baseline).sum() > 0
    (stronger,) = pixels(tiny_engine, (use(folder, name, 2.0),))
    assert not np.array_equal(stronger, changed)


def test_lora_weight_zero_gives_the_baseline_pixels(
    tiny_engine: Engine, folder: LoraFolder
) -> None:
    (baseline,) = pixels(tiny_engine)
    (zero,) = pixels(tiny_engine, (use(folder, "kohya_fox", 0.0),))
    assert np.array_equal(zero, baseline)


def test_no_lora_right_after_one_gives_the_baseline_pixels(
    tiny_engine: Engine, folder: LoraFolder
) -> None:
    prompts = ("a red fox in the snow", "a grey wolf")
    baseline = pixels(tiny_engine, prompts=prompts)
    both = (use(folder, "kohya_fox", 0.8), use(folder, "peft_fox", -1.5))
    with_loras = pixels(tiny_engine, both, prompts=prompts)
    assert all(
        not np.array_equal(a, b) for a, b in zip(with_loras, baseline, strict=True)
    )
    after = pixels(tiny_engine, prompts=prompts)
    assert all(np.array_equal(a, b) for a, b in zip(after, baseline, strict=True))
    # Switching back is the cached adapter: the same pixels again.
    assert all(
        np.array_equal(a, b)
        for a, b in zip(
            pixels(tiny_engine, both, prompts=prompts), with_loras, strict=True
        )
    )
    pixels(tiny_engine)


def test_lora_prompt_tag_equals_the_field(
    tiny_engine: Engine, folder: LoraFolder
) -> None:
    text, tags = take_lora_tags("a red fox <lora:peft_fox:0.7> in the snow")
    assert (text, tags) == ("a red fox in the snow", [("peft_fox", 0.7)])
    (tagged,) = pixels(
        tiny_engine,
        tuple(use(folder, name, weight) for name, weight in tags),
        prompts=(text,),
    )
    (field,) = pixels(tiny_engine, (use(folder, "peft_fox", 0.7),))
    assert np.array_equal(tagged, field)
    pixels(tiny_engine)


def test_lora_set_is_part_of_the_batch_key() -> None:
    plain = GenerationParams.model_validate(
        {
            "prompt": "x",
            "width": 64,
            "height": 64,
            "steps": 2,
            "guidance_scale": 7,
            "seed": 1,
            "num_images": 1,
            "scheduler": "euler",
        }
    )
    one = plain.model_copy(update={"loras": (LoraSpec(name="a", weight=0.5),)})
    other = plain.model_copy(update={"loras": (LoraSpec(name="a", weight=0.6),)})
    hashed = plain.model_copy(
        update={"loras": (LoraSpec(name="a", weight=0.5, sha256="ab"),)}
    )
    keys = {p.batch_key() for p in (plain, one, other, hashed)}
    assert len(keys) == 4


async def test_node_applies_loras_records_their_hashes_and_serves_new_files(
    models_dir: Path,
    clean_redis: str,
    tiny_engine: Engine,
    client: redis.asyncio.Redis,
    tmp_path: Path,
) -> None:
    write_lora(tmp_path / "fox.safetensors", seed=5)
    settings = node_settings(
        models_dir, clean_redis, lora_dir=tmp_path, gpu_lora_scan_s=0.1
    )
    async with running_node(settings, clean_redis, tiny_engine) as node:
        infos = await live_nodes(client)
        assert [lora.name for lora in infos[0].loras] == ["fox"]
        assert infos[0].lora_kind == "tiny"
        fox = node.resources.loras.get("fox")

        with_lora = job(loras=[{"name": "fox", "weight": 0.6}])
        missing = job(loras=[{"name": "later", "weight": 1}])
        for item in (with_lora, missing):
            await enqueue_generation(client, item, owner="test")
        done = await result_of(client, with_lora.generation_id)
        assert done.status is Status.SUCCEEDED
        failed = await result_of(client, missing.generation_id)
        assert failed.status is Status.FAILED and failed.error is not None
        assert "'later'" in failed.error.message
        png = await client.get(image_key(with_lora.generation_id, 0))
        assert fox is not None and png is not None
        text = Image.open(io.BytesIO(png)).text  # type: ignore[attr-defined]
        assert "<lora:fox:0.6>" in text["parameters"]
        assert f'Lora hashes: "fox: {fox.sha256[:10]}"' in text["parameters"]
        assert json.loads(text["sdapi"])["loras"][0]["sha256"] == fox.sha256

        # A file copied in while the node runs is announced at the next scan.
        write_lora(tmp_path / "later.safetensors", fmt="peft", seed=6)

        async def announced() -> bool:
            infos = await live_nodes(client)
            return any(lora.name == "later" for lora in infos[0].loras)

        await until(announced, 10)
        again = job(loras=[{"name": "later", "weight": 1}])
        await enqueue_generation(client, again, owner="test")
        assert (await result_of(client, again.generation_id)).status is Status.SUCCEEDED


def test_a_premium_call_nested_in_a_lora_batch_gets_no_lora_and_leaves_it(
    tiny_engine: Engine, folder: LoraFolder
) -> None:
    fox = (use(folder, "kohya_fox", 1.0),)
    (baseline,) = pixels(tiny_engine)
    (alone,) = pixels(tiny_engine, fox)
    nested: list[np.ndarray] = []

    class Nesting(QuietObserver):
        def on_step(self, step: int, total: int, preview: Any) -> None:
            # What the GPU executor does at a batch's step boundary.
            if step == 1:
                nested.extend(pixels(tiny_engine))

    call = PipelineCall(
        width=64,
        height=64,
        steps=3,
        guidance_scale=7.5,
        scheduler="euler",
        items=(CallItem("k0", "a red fox in the snow", "blurry", (100,)),),
        loras=fox,
    )
    outer = np.asarray(tiny_engine.run(call, Nesting())["k0"][0])
    assert np.array_equal(nested[0], baseline)
    assert np.array_equal(outer, alone)
    pixels(tiny_engine)


@pytest.mark.parametrize(
    ("shapes", "kind"),
    [
        (
            {
                "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0"
                "_attn2_to_k.lora_down.weight": [8, 768],
            },
            "sd1",
        ),
        (
            {
                "unet.down_blocks.1.attentions.0.transformer_blocks.0"
                ".attn2.to_k.lora_A.weight": [4, 1024],
            },
            "sd2",
        ),
        (
            {
                "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"
                ".lora_down.weight": [16, 2048],
            },
            "sdxl",
        ),
        (
            {"lora_te_text_model_encoder_layers_0_q_proj.lora_down.weight": [4, 768]},
            "sd1",
        ),
        (
            {"lora_te2_text_model_encoder_layers_0_q_proj.lora_down.weight": [4, 1280]},
            "sdxl",
        ),
    ],
)
def test_lora_base_kind_is_told_from_cross_attention_widths(
    shapes: dict[str, list[int]], kind: str
) -> None:
    assert detect_kind(shapes) == kind
