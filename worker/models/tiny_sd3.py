"""A tiny seeded random Stable Diffusion 3 pipeline, built offline for tests.

Three text encoders as in SD3: two CLIP text models with projection (CLIP-L-like and CLIP-G-like, of
different widths, so their concatenation is visible) and a T5 encoder, with byte-level BPE tokenizers
trained here; an SD3Transformer2DModel and an AutoencoderKL, random, the transformer's matrices
scaled up so its output depends on the prompt, the negative prompt and the timestep. The scheduler
is SD3's (FlowMatchEuler, shift 3, no dynamic shifting) or, with dynamic_shift=True, one that
shifts by the image's token count. Saved with `save_pretrained`, it loads through
`StableDiffusion3Pipeline.from_pretrained` like a real checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch

from worker.models.tiny import _corpus
from worker.models.tiny_flux import CLIP_MAX_LEN, T5_MAX_LEN, _bpe_tokenizer, _scale


def make_tiny_sd3(out_dir: str | Path, *, seed: int = 0, dynamic_shift: bool = False) -> Path:
    """Build and save a tiny SD3 pipeline under out_dir. Images are multiples of 4 pixels (VAE factor 2,
    patch 2); T5 prompts up to T5_MAX_LEN tokens."""
    import diffusers
    import transformers as tf

    out = Path(out_dir)
    texts = _corpus(seed)
    clip_specials = ["<|pad|>", "<|startoftext|>", "<|endoftext|>"]
    clip_toks = [_bpe_tokenizer(texts, 256, clip_specials, "<|endoftext|>", "<|pad|>", "<|startoftext|>",
                                CLIP_MAX_LEN) for _ in range(2)]
    t5_tok = _bpe_tokenizer(texts, 256, ["<pad>", "</s>", "<unk>"], "</s>", "<pad>", None, T5_MAX_LEN)
    torch.manual_seed(seed)
    clips = [tf.CLIPTextModelWithProjection(tf.CLIPTextConfig(
        vocab_size=len(tok), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=CLIP_MAX_LEN, projection_dim=width,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
        for tok, width in zip(clip_toks, (16, 32))]  # CLIP-L-like, CLIP-G-like: [.., 16 + 32] concatenated
    t5 = tf.T5EncoderModel(tf.T5Config(
        vocab_size=len(t5_tok), d_model=64, d_kv=16, d_ff=64, num_layers=1, num_heads=2,
        relative_attention_num_buckets=8, pad_token_id=t5_tok.pad_token_id, eos_token_id=t5_tok.eos_token_id,
        decoder_start_token_id=t5_tok.pad_token_id))
    transformer = diffusers.SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=16 + 32, out_channels=4,
        pos_embed_max_size=32)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
        scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
    generator = torch.Generator().manual_seed(seed)
    _scale(transformer, generator, 1.0)
    for module in (*clips, t5):
        _scale(module, generator, 1.0)
    if dynamic_shift:
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(
            shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.16, base_image_seq_len=16,
            max_image_seq_len=256)  # 32*32 .. 64*64 pixels span the shift range
    else:  # SD3's and SD3.5's
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=clips[0], tokenizer=clip_toks[0],
        text_encoder_2=clips[1], tokenizer_2=clip_toks[1], text_encoder_3=t5, tokenizer_3=t5_tok)
    pipe.save_pretrained(out)
    return out
