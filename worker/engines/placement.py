"""Where a model computes, found by one probe forward before the KV cache exists.

A model may sit on one device, be split over several by accelerate's device_map (layers on
different GPUs, some offloaded to CPU or disk and run on the main device), or be sharded by
tensor parallelism (each process holding a share of every layer's heads). Rather than read
each scheme's bookkeeping, the engine runs one token through the model and notes what it
sees: the device and local head count of every layer's keys (the cache is placed likewise),
the device the LM head reads its hidden states on, and where the logits land.

Under tensor parallelism the probe is a collective forward: every rank runs it, in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from worker.engines import attention


@dataclass(frozen=True)
class Placement:
    input_device: torch.device  # input ids and positions
    layer_devices: list[torch.device]  # where layer i's attention runs: its KV cache lives there
    head_device: torch.device  # where the LM head's input is: the rows to keep index it there
    output_device: torch.device  # where the logits land: sampling runs there
    num_kv_heads: int  # per layer, in this process (under tensor parallelism its share)
    head_dim: int
    dtype: torch.dtype  # of the keys and values

    @property
    def devices(self) -> list[torch.device]:
        """Every device a step touches, each once."""
        return list(dict.fromkeys([self.input_device, *self.layer_devices, self.head_device, self.output_device]))


@torch.inference_mode()
def probe(model, num_layers: int) -> Placement:
    """One token through `model` (its attention set to attention.ATTENTION_NAME)."""
    layers = attention.LayerProbe()
    seen: dict[str, torch.device] = {}

    def note_head_input(module, args):
        seen["head"] = args[0].device

    device = input_device(model)
    handle = model.get_output_embeddings().register_forward_pre_hook(note_head_input)
    try:
        ids = torch.zeros((1, 1), dtype=torch.long, device=device)
        out = model(input_ids=ids, position_ids=ids, attention_mask=torch.ones((1, 1, 1, 1), dtype=torch.bool,
                                                                                 device=device),
                    use_cache=False, logits_to_keep=1, **{attention.STEP_KWARG: layers})
    finally:
        handle.remove()
    if sorted(layers.layers) != list(range(num_layers)):
        raise ValueError(
            f"the model's attention ran in layers {sorted(layers.layers)} of {num_layers}: redbatch needs every layer "
            f"to attend through transformers' attention interface")
    shapes = {(heads, dim, dtype) for _, heads, dim, dtype in layers.layers.values()}
    if len(shapes) != 1:
        raise ValueError(f"layers with different key shapes or dtypes are not supported: {sorted(map(str, shapes))}")
    (num_kv_heads, head_dim, dtype), = shapes
    return Placement(input_device=device, layer_devices=[layers.layers[i][0] for i in range(num_layers)],
                     head_device=seen["head"], output_device=out.logits.device, num_kv_heads=num_kv_heads,
                     head_dim=head_dim, dtype=dtype)


def input_device(model) -> torch.device:
    """Where the input embedding runs: accelerate's execution device when the weights are offloaded (their
    parameters then sit on `meta`), else its weight's device."""
    embedding = model.get_input_embeddings()
    device = getattr(getattr(embedding, "_hf_hook", None), "execution_device", None)
    if device is None:
        return embedding.weight.device
    return torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
