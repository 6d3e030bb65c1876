"""Offline fixtures for the demo and tests: no production module imports this package."""
