"""`idlm.LLM`: offline batched generation through the engine, in one call.

    from idlm import LLM, SamplingParams
    llm = LLM()  # the embedded idlm-tiny, ISD N=4
    outs = llm.generate(["def fibonacci(n):"], SamplingParams(temperature=0, max_tokens=64))
    print(outs[0].text)
"""

from __future__ import annotations

import torch

from idlm.decoding.runner import GenerationOutput
from idlm.decoding.sampling import SamplingParams
from idlm.engine.llm_engine import EngineConfig, LLMEngine
from idlm.errors import ConfigError


class LLM:
    def __init__(self, model: str | None = None, decoder: str = "isd", stride: int = 4, lora: str | None = None,
                 dtype: str | torch.dtype | None = None, device: str | None = None, **engine_options):
        from idlm.models.loader import load_pretrained, resolve_model_path

        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"device {device!r}: CUDA is not available on this machine")
        if dtype is None:
            dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
        from idlm.models.registry import DEFAULT_MODEL

        self.model, self.tokenizer = load_pretrained(model or DEFAULT_MODEL, dtype=dtype, device=device)
        adapter = None
        if lora is not None:
            from idlm.layers.lora import LoRAAdapter

            adapter = LoRAAdapter.load(resolve_model_path(lora), self.model.config, device=device,
                                       dtype=self.model.dtype)
        config = EngineConfig(decoder=decoder, stride=stride, **engine_options)
        self.engine = LLMEngine(self.model, self.tokenizer, config, lora=adapter)

    def generate(self, prompts: str | list, params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[GenerationOutput]:
        """Prompts (strings or token-id lists) -> outputs in the same order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        return self.engine.run(list(prompts), params if params is not None else SamplingParams())
