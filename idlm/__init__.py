"""idlm: train, decode and serve Introspective Diffusion Language Models (I-DLM).

An I-DLM is a causal transformer fine-tuned so that one forward pass verifies its previous drafts
and drafts the next ones (introspective strided decoding), committing 1..N tokens per forward while
keeping the AR output distribution. See SPEC.md for the method and README.md for usage.
"""

__version__ = "0.1.0"
