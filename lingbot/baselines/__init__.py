"""Every policy lingbot is compared with, each behind the session interface `lingbot.sim.evaluate` drives
(`new_session(task, seed)` -> `infer(observation)` / `observe(observation)` / `close()`, `latency_ms`):

- `bc.py`: plain image behaviour cloning, the yardstick trained here;
- `lerobot_peers.py`: LeRobot's ACT and Diffusion Policy, trained by LeRobot's own `lerobot-train`.
"""
