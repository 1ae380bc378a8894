"""Evaluation that is not a simulator rollout: a policy scored on recorded episodes (offline.py)."""
