"""Test-time training: retrieval index, per-question adaptation."""
