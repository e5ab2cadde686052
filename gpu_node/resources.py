"""What a running node holds: opened in `GpuNode.start`, closed in `close`."""

from __future__ import annotations

from dataclasses import dataclass

from gpu_node.announcer import Announcer
from gpu_node.executor import GpuExecutor
from gpu_node.health import NodeMetrics
from gpu_node.loras import LoraFolder
from gpu_node.progress import CancelWatch, EventPublisher
from gpu_node.residency import ModelResidency
from gpu_node.settings import GpuNodeSettings
from gpu_node.speed import SpeedBook
from sdapi.contract.nodes import NodeInfo
from sdapi.infra.queue import QueuePool


@dataclass
class NodeResources:
    """The models, the GPU thread, Redis and the announcements of one node.

    `info` is the node's first model's announcement (its primary model)."""

    settings: GpuNodeSettings
    metrics: NodeMetrics
    redis: QueuePool
    models: ModelResidency
    executor: GpuExecutor
    publisher: EventPublisher
    cancels: CancelWatch
    announcer: Announcer
    info: NodeInfo
    loras: LoraFolder
    speeds: SpeedBook

    @property
    def node_id(self) -> str:
        return self.info.node_id
