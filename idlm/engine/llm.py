"""`idlm.LLM`: offline batched generation through the engine, in one call.

    from idlm import LLM, SamplingParams
    llm = LLM()  # the embedded idlm-tiny, ISD with the adaptive stride (stride=4: a fixed N)
    outs = llm.generate(["def fibonacci(n):"], SamplingParams(temperature=0, max_tokens=64))
    print(outs[0].text)
"""

from __future__ import annotations

import torch

from idlm.decoding.output import GenerationOutput
from idlm.decoding.sampling import SamplingParams
from idlm.engine.llm_engine import EngineConfig, LLMEngine


class LLM:
    def __init__(self, model: str | None = None, decoder: str | None = None, stride: int | str | None = None,
                 lora: str | None = None, dtype: str | torch.dtype | None = None, device: str | None = None,
                 **engine_options):
        """decoder None: ISD for an I-DLM, lossless R-ISD for an AR model with a known adapter, else AR
        (`idlm.inference`); `lora`: an R-ISD adapter name or path (default: the model's known one); stride
        None: "auto" (the adaptive stride) for ISD / R-ISD, 4 in exact mode or with a stride schedule
        (`idlm.engine.options.default_stride`)."""
        from idlm.engine.options import default_stride
        from idlm.inference import load_for_inference

        inf = load_for_inference(model, decoder, lora, device, dtype)
        self.model, self.tokenizer, self.decoder = inf.model, inf.tokenizer, inf.decoder
        if stride is None:
            stride = default_stride(inf.decoder, engine_options.get("exact", False),
                                    engine_options.get("stride_schedule"))
        config = EngineConfig(decoder=inf.decoder, stride=stride, **engine_options)
        self.engine = LLMEngine(self.model, self.tokenizer, config, lora=inf.adapter)

    def generate(self, prompts: str | list, params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[GenerationOutput]:
        """Prompts (strings or token-id lists) -> outputs in the same order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        return self.engine.run(list(prompts), params if params is not None else SamplingParams())
