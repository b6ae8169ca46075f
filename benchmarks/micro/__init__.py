"""Timings of single operations: steps, losses, memory, the input pipeline, checkpoints and
Hessian products. Run each as ``python -m benchmarks.micro.<name>`` from the repository root."""
