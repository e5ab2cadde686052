"""Same model and seed, same bytes: across processes, and a race to build tiny."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gpu_node.calls import Engine

REPO = Path(__file__).resolve().parents[2]

# Builds (or finds) the tiny model in argv[1], generates two images and prints
# the model hash and the PNG digests.
SCRIPT = """
import sys
from pathlib import Path
from gpu_node import pipeline, tiny, weights
from gpu_node.images import ImageManifest, encode_png, sha256_hex
from gpu_node.calls import CallItem, PipelineCall

class Quiet:
    def before_start(self): pass
    def on_step(self, step, total, preview): pass
    def between_images(self): pass

location = weights.locate_model("tiny", Path(sys.argv[1]))
tiny.prepare_model(location)
engine = pipeline.load_engine(location, device="cpu")
item = CallItem("g", "a castle", "fog", (5, 6))
call = PipelineCall(64, 64, 5, 7.5, "euler_a", (item,))
images = engine.run(call, Quiet())["g"]
print(engine.profile.model_hash)
for index, image in enumerate(images):
    manifest = ImageManifest("g", index, "tiny", engine.profile.model_hash, "euler_a",
                             5 + index, 5, 7.5, 64, 64, "a castle", "fog",
                             engine.profile.versions)
    print(sha256_hex(encode_png(image, manifest)))
"""


@pytest.mark.slow
def test_two_processes_build_tiny_at_once_and_make_the_same_pngs(
    tmp_path: Path, tiny_engine: Engine
) -> None:
    models = tmp_path / "fresh-models"
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", SCRIPT, str(models)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = []
    for run in runs:
        out, err = run.communicate(timeout=120)
        assert run.returncode == 0, err
        outputs.append(out.split())
    assert outputs[0] == outputs[1]
    assert len(outputs[0]) == 3
    # The same seed made the same weights as the session's tiny model.
    assert outputs[0][0] == tiny_engine.profile.model_hash
    # Both raced to build the model; one rename won, nothing half-built is left.
    assert [p.name for p in models.iterdir()] == ["tiny"]
