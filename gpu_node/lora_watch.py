"""Serving LoRA files added to the folder while the node runs."""

from __future__ import annotations

import asyncio
import logging

from gpu_node.resources import NodeResources

log = logging.getLogger(__name__)


async def rescan_loras(resources: NodeResources) -> bool:
    """Look at the folder once; announce the new list if it changed."""
    if not await asyncio.to_thread(resources.loras.scan):
        return False
    offers = resources.loras.offers()
    log.info("LoRAs now: %s", ", ".join(offer.name for offer in offers) or "none")
    # Every model's announcement lists the folder (`Node.model_infos`).
    await resources.announcer.announce()
    return True


async def watch_loras(resources: NodeResources) -> None:
    """Rescan every SDAPI_GPU_LORA_SCAN_S: a listing and a stat per file,
    and only new or changed files are read."""
    while True:
        await asyncio.sleep(resources.settings.gpu_lora_scan_s)
        try:
            await rescan_loras(resources)
        except OSError as exc:
            log.warning("cannot scan %s: %s", resources.loras.folder, exc)
