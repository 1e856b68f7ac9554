"""Pure-torch training recipes (no Ray): data, augmentation, balancing, splits, loop, metrics."""

# torch.compile's modes (`engine.train.loop.compile_in_place`), here so that a job's --help
# lists them without importing torch
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
