"""Custom kernels of the model: the Pallas long convolution (plan -> kernels -> op)."""
