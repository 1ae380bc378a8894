"""LeRobot policy plugin: a lingbot policy bundle as LeRobot policy type "lingbot".

    lerobot-eval --policy.discover_packages_path=lerobot_policy_lingbot \
        --policy.type=lingbot --policy.bundle=models/policy \
        --policy.camera_map='{"observation.images.corner3": "observation.image",
                              "observation.images.gripperPOV": "observation.image"}' \
        --env.type=metaworld --env.task=drawer-open-v3 --eval.n_episodes=10 --eval.batch_size=2

LeRobot layout: configuration_lingbot.py (the registered config), modeling_lingbot.py (the policy:
thin glue over lingbot.policy.runtime), processor_lingbot.py (identity pipelines: the bundle
normalises). Importing this package registers the type; LeRobot finds the policy and processors by
naming convention.
"""

from lerobot_policy_lingbot.configuration_lingbot import LingbotConfig

__all__ = ["LingbotConfig"]
