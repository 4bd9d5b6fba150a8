"""Decoding: sampling parameters, the filtered distribution p̃ and samplers, and the decoders."""
