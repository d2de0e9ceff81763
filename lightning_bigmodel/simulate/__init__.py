"""Simulation on a CPU-only machine: simulated GPUs computing real values (``simulated_gpus``), and peak memory per
device on fake tensors (``simulate_memory``)."""

from lightning_bigmodel.simulate.gpus import SimulatedGPUs, simulated_gpus
from lightning_bigmodel.simulate.memory import parse_input_shape, simulate_memory

__all__ = ["SimulatedGPUs", "parse_input_shape", "simulate_memory", "simulated_gpus"]
