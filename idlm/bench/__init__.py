"""Benchmarks: `offline` (engine throughput and per-request speed vs concurrency) and `latency`
(per-forward latency vs query tokens and batch size). Each prints one JSON object as its last line."""


def environment(device) -> dict:
    """What every benchmark record starts with: the device's name ("cpu" off CUDA), torch and CUDA versions."""
    import torch

    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda}
