"""Models built in code: tiny random models for every family and the trained reference MoE."""
