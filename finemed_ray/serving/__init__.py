"""Ray Serve: OpenAI-compatible ingress, engines, TTT trainer."""
