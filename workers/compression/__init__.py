"""Compression transforms: one entry point each (`Pruner` for pruning, `clip_weights_` for
clipping, `workers.compression.quantization` for int8). Schedules are pure functions of the step."""
