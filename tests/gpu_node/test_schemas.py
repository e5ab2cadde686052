"""The node's contract: bounds on what a payload may ask, tolerance of new fields."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from pydantic import ValidationError

from sdapi.contract.events import EVENT_ADAPTER, ProgressEvent
from sdapi.contract.payloads import (
    IMAGES_MAX,
    PROMPT_MAX_CHARS,
    STEPS_MAX,
    BatchJob,
    GenerationJob,
    GenerationResult,
)
from tests.gpu_node.support import job


@pytest.mark.parametrize(
    "changes",
    [
        {"steps": STEPS_MAX + 1},
        {"num_images": IMAGES_MAX + 1},
        {"prompt": "x" * (PROMPT_MAX_CHARS + 1)},
        {"negative_prompt": "x" * (PROMPT_MAX_CHARS + 1)},
        {"width": 8192},
    ],
)
def test_payloads_past_the_node_bounds_are_refused(changes: dict[str, Any]) -> None:
    payload = job().model_dump(mode="json")
    payload["params"].update(changes)
    with pytest.raises(ValidationError):
        GenerationJob.model_validate(payload)


def test_bounds_leave_room_for_web() -> None:
    accepted = job(steps=STEPS_MAX, num_images=IMAGES_MAX, prompt="x" * 2000)
    assert GenerationJob.model_validate(accepted.model_dump(mode="json")) == accepted


def test_unknown_fields_from_a_newer_producer_are_ignored() -> None:
    request = job()
    payload = request.model_dump(mode="json")
    payload["priority"] = 3
    payload["params"]["clip_skip"] = 2
    assert GenerationJob.model_validate(payload) == request

    result = GenerationResult.model_validate(
        {
            "generation_id": str(uuid.uuid4()),
            "status": "cancelled",
            "node_id": "n",
            "model": "tiny",
            "finished_at": "2025-01-01T00:00:00Z",
            "gpu_seconds": 1.5,
        }
    )
    assert result.status == "cancelled"
    event = EVENT_ADAPTER.validate_json(
        '{"type": "progress", "step": 1, "total": 2, "eta_s": 3}'
    )
    assert event == ProgressEvent(step=1, total=2)


def test_prompt_syntax_is_part_of_the_batch_key() -> None:
    a1111, plain = job(), job(prompt_syntax="plain")
    assert a1111.params.prompt_syntax == "a1111"
    assert a1111.params.batch_key() != plain.params.batch_key()
    with pytest.raises(ValidationError, match="prompt syntax"):
        BatchJob(batch_id=uuid.uuid4(), model="tiny", items=[a1111, plain])
