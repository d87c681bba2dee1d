"""moecompress: prune, merge and quantize Mixture-of-Experts checkpoints."""

__version__ = "0.1.0"
