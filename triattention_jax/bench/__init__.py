"""Speed and memory measurements: presets of real shapes, steady decode rounds, reload times, transformers beside us."""
