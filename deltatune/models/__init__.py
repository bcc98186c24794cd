"""Models: loading from local folders or packaged assets, the frozen base's dtype, quantization."""
