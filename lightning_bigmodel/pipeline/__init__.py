"""Micro-batch pipelining over a dispatched model (see :mod:`lightning_bigmodel.pipeline.microbatch`)."""

from lightning_bigmodel.pipeline.microbatch import MicroBatchPipeline, pipelined_forward

__all__ = ["MicroBatchPipeline", "pipelined_forward"]
