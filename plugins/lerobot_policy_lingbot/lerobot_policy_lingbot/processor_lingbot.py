"""LeRobot's processor pipelines for a lingbot policy: glue only, no normalisation.

The bundle normalises by itself (quantile stats in its normalization.json: actions come back in robot
units) and the policy converts images, so the preprocessor only renames (an empty map: cameras are
routed by the config's camera_map), adds the batch dimension a single robot observation lacks and
moves tensors to the policy's device; the postprocessor moves actions to the CPU. The steps are
LeRobot's standard ones, under their standard names, so `lerobot-eval`'s device/rename overrides and
the saved pipelines work as for any policy. `dataset_stats` are accepted and ignored.
"""

from __future__ import annotations

from typing import Any

import torch
from lerobot.processor import (
    AddBatchDimensionProcessorStep,
    DeviceProcessorStep,
    PolicyAction,
    PolicyProcessorPipeline,
    RenameObservationsProcessorStep,
    make_policy_processor_pipelines,
)

from lerobot_policy_lingbot.configuration_lingbot import LingbotConfig


def make_lingbot_pre_post_processors(
    config: LingbotConfig,
    dataset_stats: dict[str, dict[str, torch.Tensor]] | None = None,
) -> tuple[
    PolicyProcessorPipeline[dict[str, Any], dict[str, Any]],
    PolicyProcessorPipeline[PolicyAction, PolicyAction],
]:
    return make_policy_processor_pipelines(
        input_steps=[
            RenameObservationsProcessorStep(rename_map={}),
            AddBatchDimensionProcessorStep(),
            DeviceProcessorStep(device=config.device),
        ],
        output_steps=[DeviceProcessorStep(device="cpu")],
    )
