"""One quantization benchmark case in a fresh process: ``python -m benchmarks.quant_case '<spec json>'``.

Loads a GPT-2-shaped model or the MiniLM with ``load_checkpoint_and_dispatch`` on a cpu+disk budget (float32 or
``quantization=``), twice: once into an empty offload folder, once reusing it. Measures placed bytes per device,
both load times, short (decode-shaped) and long (prefill-shaped) forwards, and quality against the plainly loaded
float32 model (GPT: top-1 next-token agreement and logits error on fixed prompts; MiniLM: embedding cosine
similarity on the bundled sentences). Prints one ``QUANT_RESULT {json}`` line.
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

MARKER = "QUANT_RESULT "


def _timed(fn: Callable[[], Any], warmup: int, runs: int) -> float:
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _placed(model: torch.nn.Module) -> dict[str, int]:
    from lightning_bigmodel.offload.placement import is_disk
    from lightning_bigmodel.offload.subclass import stored_nbytes

    out, seen = {"cpu": 0, "disk": 0}, set()
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            out["disk" if is_disk(tensor) else "cpu"] += stored_nbytes(tensor)
    return out


def _gpt(spec: dict[str, Any]):
    from examples.gpt import GPT, GPTConfig

    config = GPTConfig.preset(spec["preset"])
    build = lambda: GPT(config).eval()  # noqa: E731
    g = torch.Generator().manual_seed(7)
    prompts = torch.randint(0, config.vocab_size, (16, 32), generator=g)  # fixed prompts for quality
    inputs = {
        "decode": lambda: torch.randint(0, config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(1)),
        "prefill": lambda: torch.randint(0, config.vocab_size, (4, 128), generator=torch.Generator().manual_seed(2)),
    }
    return build, ["Block"], prompts, inputs, lambda model, x: model(x)


def _minilm(spec: dict[str, Any]):
    from transformers import AutoTokenizer, BertConfig, BertModel

    from examples.minilm_embed import default_model_dir, default_sentences_file, mean_pool, read_sentences

    folder = default_model_dir()
    config = BertConfig.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    batch = dict(tokenizer(read_sentences(default_sentences_file()), padding=True, return_tensors="pt"))

    def encode(n: int, length: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(1000, 20000, (n, length), generator=torch.Generator().manual_seed(length))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def embed(model, inputs):
        return mean_pool(model(**inputs)[0], inputs["attention_mask"])

    inputs = {"decode": lambda: encode(1, 8), "prefill": lambda: encode(4, 128)}
    return lambda: BertModel(config).eval(), ["BertLayer"], batch, inputs, embed


def _quality(kind: str, out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    if kind == "gpt":
        return {
            "top1_agreement": (out.argmax(-1) == ref.argmax(-1)).float().mean().item(),
            "logits_rel_error": ((out - ref).norm() / ref.norm()).item(),
        }
    cosine = torch.nn.functional.cosine_similarity(out, ref, dim=-1)
    return {"cosine_mean": cosine.mean().item(), "cosine_min": cosine.min().item()}


def run_case(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one case (see the module docstring); ``spec`` has kind, checkpoint, budget, quantization, folder, threads."""
    torch.set_num_threads(int(spec["threads"]))
    import importlib

    importlib.import_module("torch._dynamo")  # torch imports it lazily on the first meta init: keep it off the clocks
    from safetensors.torch import load_file

    from lightning_bigmodel import init_empty_weights, load_checkpoint_and_dispatch

    if spec["quantization"]:  # the lazy torchao import (about 2 s) is not part of the load time
        from lightning_bigmodel.integrations.quantization.torchao import import_torchao

        import_torchao()
    build, no_split, quality_input, inputs, run = (_gpt if spec["kind"] == "gpt" else _minilm)(spec)
    folder = Path(spec["offload_folder"])
    shutil.rmtree(folder, ignore_errors=True)
    result: dict[str, Any] = {}
    for label in ("load_s", "reload_s"):  # an empty offload folder, then the same folder reused
        with init_empty_weights():
            model = build()
        start = time.perf_counter()
        load_checkpoint_and_dispatch(
            model, spec["checkpoint"], device_map="auto", max_memory={"cpu": spec["budget"]},
            no_split_module_classes=no_split, offload_folder=folder, quantization=spec["quantization"],
        )  # fmt: skip
        result[label] = time.perf_counter() - start
    result["placed"] = _placed(model)
    result["disk_modules"] = sorted(k for k, v in model.hf_device_map.items() if v == "disk")
    for shape, make in inputs.items():
        x = make()
        result[f"{shape}_s"] = _timed(lambda: run(model, x), warmup=2, runs=spec["runs"][shape])
    plain = build()
    state = {}
    for file in sorted(Path(spec["checkpoint"]).glob("*.safetensors")):
        state.update(load_file(file))
    plain.load_state_dict(state, strict=False)  # the tied lm_head is saved once
    with torch.inference_mode():
        result.update(_quality(spec["kind"], run(model, quality_input), run(plain, quality_input)))
        if spec["quantization"] is None:  # the plain model on the same shapes, all in RAM: the reference speed
            for shape, make in inputs.items():
                x = make()
                result[f"plain_{shape}_s"] = _timed(lambda: run(plain, x), warmup=2, runs=spec["runs"][shape])
    return result


def main(argv: list[str]) -> int:
    spec = json.loads(argv[1])
    try:
        result = {"ok": True, **run_case(spec)}
    except BaseException as exc:  # noqa: BLE001 - reported, the run goes on
        error = f"{type(exc).__name__}: {exc}"[:1500]
        result = {"ok": False, "error": error, "traceback": traceback.format_exc()[-2000:]}
    print(MARKER + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
