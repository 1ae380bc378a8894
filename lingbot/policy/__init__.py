"""The real-time policy: KV-cached streaming inference, the release bundle, the LeRobot adapter, the server."""
