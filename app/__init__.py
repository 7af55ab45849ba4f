"""prefloop: human preference labeling and the RLHF training loop that uses it."""

__version__ = "0.1.0"
