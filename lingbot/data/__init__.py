"""Data front: scripted-expert collection, LeRobot v3 ingestion, Great Expectations validation."""
