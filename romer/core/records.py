"""Records passed between the model adapters, the CIM mapping and the methods.

A weight tensor on analog arrays travels as an AnalogTensor: what it is (kind), where it sits
(layer, expert, part) and the tensor itself, so no module has to parse a tensor name back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True, eq=False)
class AnalogTensor:
    name: str  # unique key: seeds the tensor's noise draw and names its clean copy
    kind: str  # routed_experts | shared_experts | router | attention | dense_mlp
    tensor: torch.Tensor  # the model's own parameter data, edited in place
    layer: Optional[int] = None  # decoder layer
    part: str = ""  # which weight of its module: gate_up_proj, down_proj, q_proj, ...
    # Routed experts: the expert of a per-expert layout (one Linear per expert); None for a fused
    # [E, out, in] tensor that holds every expert of the layer.
    expert: Optional[int] = None

    @property
    def fused(self) -> bool:
        return self.kind == "routed_experts" and self.expert is None
