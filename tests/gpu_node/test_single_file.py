"""Single-file checkpoints: detection, loading, dtypes and the files refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis.asyncio
import torch
from safetensors.torch import load_file

from gpu_node import checkpoints, pipeline, tiny, weights
from gpu_node.calls import CallItem, ModelError, PipelineCall, QuietObserver
from tests.gpu_node.single_file_support import (
    TINY_YAML,
    ldm_state_dict,
    tiny_single_file,
    write_single_file,
)


def _generate(engine: pipeline.DiffusersEngine) -> list[object]:
    call = PipelineCall(64, 64, 2, 7.5, "euler", (CallItem("g", "a boat", "", (1,)),))
    return list(engine.run(call, QuietObserver())["g"])


def _load(path: Path, models_dir: Path) -> pipeline.DiffusersEngine:
    location = weights.locate_model(str(path), models_dir)
    weights.prepare_model(location, tiny.build_tiny_model)
    return pipeline.load_engine(location, device="cpu")


@pytest.fixture(scope="module")
def tiny_file(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("single")
    return tiny_single_file(models_dir / "tiny", folder / "tiny-ldm.safetensors")


def test_a_single_file_loads_and_generates(tiny_file: Path, models_dir: Path) -> None:
    engine = _load(tiny_file, models_dir)
    # Named by its stem, hashed as A1111 does (SHA-256 of the file).
    assert engine.profile.model == "tiny-ldm"
    assert engine.profile.pipeline == "sd"
    assert len(engine.profile.model_hash) == 64
    # The weights are the tiny folder's, exactly, after diffusers' conversion.
    unet = load_file(
        models_dir / "tiny" / "unet" / "diffusion_pytorch_model.safetensors"
    )
    loaded = engine._base.unet.state_dict()
    assert all(torch.equal(loaded[key], value) for key, value in unet.items())
    [image] = _generate(engine)
    assert image.size == (64, 64)  # type: ignore[attr-defined]


def test_a_single_file_is_served_under_a_given_name(
    tiny_file: Path, models_dir: Path
) -> None:
    location = weights.locate_model(str(tiny_file), models_dir, name="mine")
    assert (location.model_id, location.source) == ("mine", "file")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_files_load(
    dtype: torch.dtype, models_dir: Path, tmp_path: Path
) -> None:
    path = tiny_single_file(
        models_dir / "tiny", tmp_path / f"half-{dtype}.safetensors", dtype=dtype
    )
    engine = _load(path, models_dir)
    # Loaded in the node's dtype (float32 on CPU), whatever the file holds.
    assert engine._base.unet.dtype == torch.float32
    [image] = _generate(engine)
    assert image.size == (64, 64)  # type: ignore[attr-defined]


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin"])
def test_a_pickle_checkpoint_is_refused(
    suffix: str, models_dir: Path, tmp_path: Path
) -> None:
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"\x80\x04not loaded")
    with pytest.raises(ModelError) as caught:
        weights.locate_model(str(path), models_dir)
    message = str(caught.value)
    assert "\n" not in message
    assert str(path) in message and "safetensors" in message


def test_a_wrongly_shaped_key_is_named(models_dir: Path, tmp_path: Path) -> None:
    tensors = load_file(
        str(tiny_single_file(models_dir / "tiny", tmp_path / "a.safetensors"))
    )
    key = "model.diffusion_model.out.2.weight"
    tensors[key] = torch.zeros(4, 16, 3, 3)
    path = write_single_file(
        tmp_path / "bad.safetensors", tensors, yaml=TINY_YAML.format(in_channels=4)
    )
    with pytest.raises(ModelError) as caught:
        _load(path, models_dir)
    assert str(path) in str(caught.value)
    assert key in str(caught.value) and "[4, 16, 3, 3]" in str(caught.value)


def test_a_missing_key_is_named(models_dir: Path, tmp_path: Path) -> None:
    tensors = load_file(
        str(tiny_single_file(models_dir / "tiny", tmp_path / "a.safetensors"))
    )
    key = "first_stage_model.decoder.conv_out.bias"
    del tensors[key]
    path = write_single_file(
        tmp_path / "bad.safetensors", tensors, yaml=TINY_YAML.format(in_channels=4)
    )
    with pytest.raises(ModelError) as caught:
        _load(path, models_dir)
    assert str(path) in str(caught.value) and f"{key} is missing" in str(caught.value)


def test_the_yaml_beside_the_file_wins_over_detection(
    tiny_file: Path, models_dir: Path, tmp_path: Path
) -> None:
    detected = checkpoints.detect(tiny_file, checkpoints.read_shapes(tiny_file))
    assert (detected.kind, detected.prediction) == ("sd1", "epsilon")
    path = tmp_path / "v-model.safetensors"
    path.write_bytes(tiny_file.read_bytes())
    yaml = TINY_YAML.format(in_channels=4).replace(
        "  params:\n", '  params:\n    parameterization: "v"\n', 1
    )
    path.with_suffix(".yaml").write_text(yaml)
    arch = checkpoints.architecture(path)
    assert (arch.kind, arch.prediction, arch.source) == (
        "sd1",
        "v_prediction",
        str(path.with_suffix(".yaml")),
    )
    engine = _load(path, models_dir)
    assert engine._base.scheduler.config.prediction_type == "v_prediction"


# --- detection from the keys and shapes alone ---------------------------------

_UNET = checkpoints.UNET_PREFIX


def _shapes(in_channels: int, context: int, encoder: str) -> checkpoints.Shapes:
    shapes: checkpoints.Shapes = {
        checkpoints.FIRST_CONV: (320, in_channels, 3, 3),
        f"{_UNET}input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (
            320,
            context,
        ),
    }
    shapes[encoder] = (77, 768)
    return shapes


@pytest.mark.parametrize(
    ("in_channels", "context", "encoder", "kind", "prediction"),
    [
        (
            4,
            768,
            "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight",
            "sd1",
            "epsilon",
        ),
        (
            9,
            768,
            "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight",
            "sd1-inpaint",
            "epsilon",
        ),
        (4, 1024, "cond_stage_model.model.positional_embedding", "sd2", "v_prediction"),
        (
            9,
            1024,
            "cond_stage_model.model.positional_embedding",
            "sd2-inpaint",
            "epsilon",
        ),
        (
            4,
            2048,
            "conditioner.embedders.1.model.positional_embedding",
            "sdxl",
            "epsilon",
        ),
        (
            9,
            2048,
            "conditioner.embedders.1.model.positional_embedding",
            "sdxl-inpaint",
            "epsilon",
        ),
    ],
)
def test_the_architecture_is_detected_from_the_tensors(
    in_channels: int, context: int, encoder: str, kind: str, prediction: str
) -> None:
    arch = checkpoints.detect(
        Path("x.safetensors"), _shapes(in_channels, context, encoder)
    )
    assert (arch.kind, arch.prediction) == (kind, prediction)
    assert arch.original_config.is_file()
    assert checkpoints.from_yaml(Path(str(arch.original_config))).kind == kind


def test_a_file_of_another_model_is_refused_naming_what_it_lacks(
    tmp_path: Path,
) -> None:
    with pytest.raises(
        ModelError, match=r"no model\.diffusion_model\.input_blocks\.0\.0"
    ):
        checkpoints.detect(tmp_path / "x.safetensors", {"transformer.x": (1,)})


@pytest.mark.slow
def test_a_real_size_sd15_file_is_detected_and_loads(
    tmp_path: Path, models_dir: Path
) -> None:
    """SD 1.5's full architecture with random weights, written in float16 (~2 GB)."""
    import json

    import yaml
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        create_unet_diffusers_config_from_ldm,
        create_vae_diffusers_config_from_ldm,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    shipped = checkpoints.shipped_configs()
    original = yaml.safe_load((shipped / "v1-inference.yaml").read_text())
    marker = {
        "model.diffusion_model.output_blocks.11.0.skip_connection.weight": torch.empty(
            320, 640, 1, 1, device="meta"
        )
    }
    unet_config = create_unet_diffusers_config_from_ldm(original, marker)
    vae_config = create_vae_diffusers_config_from_ldm(original, marker)
    text_config = json.loads(
        (shipped / "sd1" / "text_encoder" / "config.json").read_text()
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        tensors = ldm_state_dict(
            UNet2DConditionModel.from_config(unet_config).half().state_dict(),
            unet_config,
            AutoencoderKL.from_config(vae_config).half().state_dict(),
            vae_config,
            CLIPTextModel(CLIPTextConfig(**text_config)).half().state_dict(),
        )
    path = write_single_file(
        tmp_path / "sd15-random.safetensors", tensors, dtype=torch.float16
    )
    del tensors
    arch = checkpoints.architecture(path)
    assert (arch.kind, arch.prediction, arch.source) == ("sd1", "epsilon", "detected")
    engine = _load(path, models_dir)
    assert engine.profile.model == "sd15-random"
    assert engine.profile.limits.default_width == 512
    assert engine._base.unet.config.cross_attention_dim == 768


@pytest.mark.slow
async def test_a_gpu_node_serves_a_single_file_under_its_stem(
    tiny_file: Path,
    models_dir: Path,
    clean_redis: str,
    tmp_path: Path,
    client: redis.asyncio.Redis,
) -> None:
    from sdapi.contract.names import node_key
    from sdapi.contract.status import Status
    from sdapi.infra.queue import enqueue_generation
    from tests.gpu_node.support import job, result_of, start_node_process
    from tests.support import until

    log_path = tmp_path / "node.log"
    process = start_node_process(
        log_path,
        redis_url=clean_redis,
        models_dir=models_dir,
        node_id="file-node",
        SDAPI_MODEL=str(tiny_file),
        SDAPI_GPU_HEALTH_PORT="0",
    )
    try:
        await until(lambda: client.exists(node_key("file-node")), 120)
        request = job(model="tiny-ldm")
        await enqueue_generation(client, request, owner="test")
        result = await result_of(client, request.generation_id, timeout=60)
        assert result.status is Status.SUCCEEDED and len(result.images) == 1
    finally:
        process.terminate()
        process.wait(60)
    assert "gpu node file-node: model tiny-ldm" in log_path.read_text()
