"""What the measurement commands share: inputs, method presets, GFLOPs, timing, memory, pictures, reports."""
