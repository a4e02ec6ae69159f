"""The command lines: one module each (flags and main), run through `run.run_cli`. Nothing here
imports jax before the flags are parsed."""
