"""Pure-torch training recipes (no Ray): data, augmentation, balancing, splits, loop, metrics."""
