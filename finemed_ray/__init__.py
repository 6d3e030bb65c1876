"""finemed-ray: Ray-native FineMedLM-o1 pipeline."""
__version__ = "0.1.0"
