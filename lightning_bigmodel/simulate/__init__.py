"""Simulation on a CPU-only machine: simulated GPUs computing real values (``simulated_gpus``)."""

from lightning_bigmodel.simulate.gpus import SimulatedGPUs, simulated_gpus

__all__ = ["SimulatedGPUs", "simulated_gpus"]
