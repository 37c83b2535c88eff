"""Data sets, partitioning across sites, and tokenisation for training."""

from pathlib import Path

SAMPLES_DIR = Path(__file__).parent / "samples"
