"""A tiny seeded random `trust_remote_code` VLM for tests: its modeling code lives in the model directory.

The checkpoint looks like a hub repository that ships its own code: config.json's `auto_map` names
classes in modeling_tiny_remote.py (copied next to the weights), so transformers runs that file only
under trust_remote_code. Its forward is non-standard (remote_code/modeling_tiny_remote.py), which is
what the worker's one-at-a-time path (worker/engines/sequential.py) exists for. A chat template writes
`<image>` for each image part; a PIL CLIP image processor makes the 16x16 `pixel_values`.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch

from worker.models.tiny import scale_weights
from worker.models.tiny_vlm import _tokenizer

MODELING_FILE = Path(__file__).parent / "remote_code" / "modeling_tiny_remote.py"
_MODULE = MODELING_FILE.stem
AUTO_MAP = {
    "AutoConfig": f"{_MODULE}.TinyRemoteConfig",
    "AutoModelForCausalLM": f"{_MODULE}.TinyRemoteForCausalLM",
    "AutoModelForImageTextToText": f"{_MODULE}.TinyRemoteForCausalLM",
}


def modeling_module():
    """The modeling file imported as its own module (as transformers imports it from the model directory)."""
    import importlib.util

    if _MODULE not in sys.modules:
        spec = importlib.util.spec_from_file_location(_MODULE, MODELING_FILE)
        module = importlib.util.module_from_spec(spec)
        sys.modules[_MODULE] = module
        spec.loader.exec_module(module)
    return sys.modules[_MODULE]


def make_tiny_remote_vlm(out_dir: str | Path, seed: int = 0, causal_lm_only: bool = False) -> Path:
    """Build and save the model, its tokenizer, its image processor and its modeling file under out_dir.
    causal_lm_only: like glm-4v-9b, auto_map names only AutoModelForCausalLM and there is no image processor."""
    from transformers import GenerationConfig
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer("llava", out, seed)  # its specials include <image>; the template writes "<image>\n"
    module = modeling_module()
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    config = module.TinyRemoteConfig(vocab_size=len(tokenizer), image_token_id=image_token_id,
                                     bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                     pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    config.auto_map = {k: v for k, v in AUTO_MAP.items() if not causal_lm_only or k != "AutoModelForImageTextToText"}
    torch.manual_seed(seed)
    model = module.TinyRemoteForCausalLM(config)
    scale_weights(model, seed)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, do_sample=False,
                                               eos_token_id=[tokenizer.eos_token_id, im_end],
                                               pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(out)
    shutil.copy(MODELING_FILE, out / MODELING_FILE.name)
    if causal_lm_only:
        return out
    size = {"shortest_edge": 16}
    CLIPImageProcessorPil(size=size, crop_size={"height": 16, "width": 16}).save_pretrained(out)
    return out
