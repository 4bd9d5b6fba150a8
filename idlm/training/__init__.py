"""Training: AR pretraining, introspective-consistency conversion (SPEC §3), the R-ISD gated LoRA
(SPEC §5) and the SDAR-style baseline (SPEC §3.5)."""
