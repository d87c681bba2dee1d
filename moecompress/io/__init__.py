"""Reading and writing checkpoints, model cards and Hub uploads."""
