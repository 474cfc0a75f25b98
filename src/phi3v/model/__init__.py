"""Native Phi-3-Vision: configuration, image processor, processor, model and checkpoint I/O."""
