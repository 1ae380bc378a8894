"""Simulation: environments, rollouts, success metrics."""
