"""Releases: publish a policy bundle to the Hub (or a local hub) and pull it back, verified."""
