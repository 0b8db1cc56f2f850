"""Sweeps (issue 18): many trials of one base job spec, each a normal job; the Pareto front of
their verified reports. `plan` and `front` are pure; `store` and `service` do the I/O."""
