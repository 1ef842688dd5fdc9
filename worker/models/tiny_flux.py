"""A tiny seeded random FLUX.1 pipeline (dev-like or schnell-like), built offline for tests and benches.

CLIP and T5 tokenizers are byte-level BPEs trained here on a word salad; the CLIP text model,
T5 encoder, FluxTransformer2DModel and AutoencoderKL are random, with the transformer's matrices
scaled up (std ~2/sqrt(fan_in)) so its output depends on the prompt and the timestep. Saved with
`save_pretrained`, it loads through `FluxPipeline.from_pretrained` like a real checkpoint.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from worker.models.tiny import _corpus

CLIP_MAX_LEN = 77  # as real CLIP
T5_MAX_LEN = 64  # the tiny T5's positions; requests and the stock pipeline pass max_sequence_length <= this


def _bpe_tokenizer(texts: list[str], vocab_size: int, specials: list[str], eos: str, pad: str, bos: str | None,
                   model_max_length: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(texts, trainer=trainer)
    # CLIP: <bos> text <eos> (its pooled output is read at the eos); T5: text </s>
    single = f"{bos} $A {eos}" if bos else f"$A {eos}"
    bpe.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[(t, bpe.token_to_id(t)) for t in (bos, eos) if t])
    extra = {"bos_token": bos} if bos else {}
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=eos, pad_token=pad, model_max_length=model_max_length,
                                   **extra)


def _scale(module: torch.nn.Module, generator: torch.Generator, gain: float) -> None:
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.dim() == 2:
                std = gain if "embed" in name and "time" not in name else gain / math.sqrt(param.shape[1])
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def make_tiny_flux(out_dir: str | Path, *, guidance: bool = True, seed: int = 0, hidden: int = 32,
                   num_layers: int = 1, num_single_layers: int = 1) -> Path:
    """Build and save a tiny FLUX pipeline under out_dir; guidance=True is FLUX.1-dev-like (guidance
    embedding, dynamic shifting), False is FLUX.1-schnell-like. Images are multiples of 4 pixels."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    out = Path(out_dir)
    texts = _corpus(seed)
    clip_tok = _bpe_tokenizer(texts, 256, ["<|pad|>", "<|startoftext|>", "<|endoftext|>"], "<|endoftext|>",
                              "<|pad|>", "<|startoftext|>", CLIP_MAX_LEN)
    t5_tok = _bpe_tokenizer(texts, 256, ["<pad>", "</s>", "<unk>"], "</s>", "<pad>", None, T5_MAX_LEN)
    torch.manual_seed(seed)
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(clip_tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=CLIP_MAX_LEN, projection_dim=hidden,
        bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id, pad_token_id=clip_tok.pad_token_id))
    t5 = T5EncoderModel(T5Config(
        vocab_size=len(t5_tok), d_model=hidden, d_kv=16, d_ff=2 * hidden, num_layers=1, num_heads=2,
        relative_attention_num_buckets=8, pad_token_id=t5_tok.pad_token_id, eos_token_id=t5_tok.eos_token_id,
        decoder_start_token_id=t5_tok.pad_token_id))
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=num_layers, num_single_layers=num_single_layers,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=hidden, pooled_projection_dim=hidden,
        guidance_embeds=guidance, axes_dims_rope=(4, 6, 6))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
        scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
    generator = torch.Generator().manual_seed(seed)
    _scale(transformer, generator, 2.0)
    _scale(clip, generator, 1.0)
    _scale(t5, generator, 1.0)
    if guidance:  # FLUX.1-dev's schedule: shift by the image's token count
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                    max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    else:  # FLUX.1-schnell's: no shift
        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=clip_tok, text_encoder_2=t5,
                        tokenizer_2=t5_tok, transformer=transformer)
    pipe.save_pretrained(out)
    return out
