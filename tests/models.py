"""Tiny models for loading and dispatch tests: tied, untied, and with persistent + non-persistent buffers."""

from __future__ import annotations

import torch
from torch import nn

VOCAB, DIM = 40, 16


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(DIM)
        self.fc = nn.Linear(DIM, 2 * DIM)
        self.proj = nn.Linear(2 * DIM, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.proj(torch.nn.functional.gelu(self.fc(self.ln(x))))


class TiedLM(nn.Module):
    """Embedding, three blocks and an output head tied to the embedding (``head.weight is wte.weight``)."""

    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList(Block() for _ in range(3))
        self.ln_f = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.wte(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


class UntiedMLP(nn.Module):
    """Plain stack of linear layers taking float inputs; accepts a keyword argument (``scale``)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(DIM, DIM)
        self.blocks = nn.ModuleList(Block() for _ in range(3))
        self.out = nn.Linear(DIM, 4)

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        x = self.inp(x) * scale
        for block in self.blocks:
            x = block(x)
        return self.out(x)


class Scaled(nn.Module):
    """A linear layer with a persistent buffer (``offset``, in the checkpoint), a non-persistent one (``table``,
    computed at init, never in a checkpoint) and a persistent step counter mutated by every forward."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(DIM, DIM)
        self.register_buffer("offset", torch.zeros(DIM))
        self.register_buffer("table", torch.linspace(-1.0, 1.0, DIM), persistent=False)
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.steps.add_(1)
        return self.fc(x) * self.table + self.offset + 0.01 * self.steps


class BufferNet(nn.Module):
    """Two :class:`Scaled` layers around a block: exercises persistent, non-persistent and mutated buffers."""

    def __init__(self) -> None:
        super().__init__()
        self.a = Scaled()
        self.mid = Block()
        self.b = Scaled()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.mid(self.a(x)))


def make_reference(cls: type, seed: int = 0) -> nn.Module:
    """A plainly built model with random, seed-determined weights and buffers (``offset`` made non-zero)."""
    torch.manual_seed(seed)
    model = cls()
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("offset"):
                buffer.normal_()
    return model.eval()


def example_input(cls: type, batch: int = 2, seq: int = 5) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    if cls is TiedLM:
        return torch.randint(0, VOCAB, (batch, seq), generator=generator)
    return torch.randn(batch, seq, DIM, generator=generator)


# device maps over "cpu" and "disk" for each model (every key names a module)
MAPS = {
    TiedLM: {
        "cpu": {"": "cpu"},
        "disk": {"": "disk"},
        "mixed": {
            "wte": "cpu", "blocks.0": "disk", "blocks.1": "cpu", "blocks.2": "disk", "ln_f": "cpu", "head": "disk"
        },
    },
    UntiedMLP: {
        "cpu": {"": "cpu"},
        "disk": {"": "disk"},
        "mixed": {"inp": "disk", "blocks.0": "cpu", "blocks.1": "disk", "blocks.2": "disk", "out": "cpu"},
    },
    BufferNet: {
        "cpu": {"": "cpu"},
        "disk": {"": "disk"},
        "mixed": {"a": "disk", "mid": "cpu", "b": "disk"},
    },
}


def meta_gpt(preset: str = "tiny", **overrides) -> nn.Module:
    """The example GPT of ``preset`` (config fields overridden by ``overrides``) built on the meta device."""
    from examples.gpt import GPT, GPTConfig

    config = GPTConfig.preset(preset)
    for key, value in overrides.items():
        setattr(config, key, value)
    with torch.device("meta"):
        return GPT(config)


class LinearLM(nn.Module):
    """An embedding, a stack of linear blocks and an untied head (no bias): every activation is ``(B, T, width)`` or
    ``(B, T, vocab)`` float32, so memory figures can be computed by hand."""

    def __init__(self, width: int = 16, vocab: int = 1000, layers: int = 4) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))
        self.head = nn.Linear(width, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class PicklePayload:
    """Unpickling this would run ``touch marker``: a loader that honours ``weights_only=True`` never does."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))
