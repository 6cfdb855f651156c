"""Random-init bases, built in code (no downloads, no hub).

`tiny`, `tiny-sdxl`, `tiny-sd3` and `tiny-flux` (`tiny-flux-schnell`: without the guidance
embedding) train in seconds on a CPU at 32-64 px and are what the tests use; `sd15`, `sdxl`,
`sd3.5-medium` and `flux-dev` are the real architectures (random weights; their parameter counts
are checked on the meta device in tests/test_flow_archs.py) for GPU benchmarks, where only shapes
and FLOPs matter. `write_base` saves any of them in the diffusers folder layout,
so the trainer loads it exactly as it would load a real checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ctrlnet.errors import UserError

# torch, diffusers and transformers are imported where a base is built: `ctrlnet model init`
# checks --arch and --out first, and a typo should not wait ten seconds for the imports.
if TYPE_CHECKING:
    from transformers import CLIPTokenizer

    from ctrlnet_trainer.models.parts import Base

# Model hyper-parameters per architecture. Note diffusers' naming quirk: for these UNets
# `attention_head_dim` is really the number of heads (SD1.5's "8" means 8 heads).
ARCHS: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {
        "unet": dict(
            sample_size=8,  # latent side for 64 px images; the pipeline's default size is 8 * 8
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=4,
            norm_num_groups=8,
        ),
        # Four blocks so it downsamples by 8, like the real VAE (the pipeline derives its
        # latent scale from the number of blocks).
        "vae": dict(
            sample_size=64,
            block_out_channels=(8, 16, 16, 32),
            layers_per_block=1,
            norm_num_groups=8,
        ),
        # vocab_size None = exactly the tokenizer's vocabulary.
        "text_encoder": dict(
            vocab_size=None,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
        ),
    },
    "sd15": {
        "unet": dict(
            sample_size=64,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            down_block_types=(
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            ),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=768,
            attention_head_dim=8,
            norm_num_groups=32,
        ),
        "vae": dict(
            sample_size=512,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            norm_num_groups=32,
        ),
        "text_encoder": dict(
            vocab_size=49408,  # the real CLIP vocabulary size, so embedding FLOPs/memory match
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
        ),
    },
    # SDXL: a second text encoder (with a projection: its pooled output is the UNet's text_embeds),
    # cross-attention over both encoders' hidden states concatenated, and the "text_time" added
    # embedding of the pooled text and the six size/crop numbers (6 x addition_time_embed_dim).
    "tiny-sdxl": {
        "unet": dict(
            sample_size=8,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            cross_attention_dim=64,  # 32 + 32: both encoders' hidden states
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=80,  # 32 (pooled) + 6 x 8
            norm_num_groups=8,
        ),
        "vae": dict(
            sample_size=64,
            block_out_channels=(8, 16, 16, 32),
            layers_per_block=1,
            norm_num_groups=8,
            scaling_factor=0.13025,
            force_upcast=True,
        ),
        "text_encoder": dict(
            vocab_size=None,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,  # SDXL reads the penultimate layer: at least two
            num_attention_heads=4,
        ),
        "text_encoder_2": dict(
            vocab_size=None,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            projection_dim=32,
            hidden_act="gelu",
        ),
    },
    "sdxl": {  # stabilityai/stable-diffusion-xl-base-1.0's configs
        "unet": dict(
            sample_size=128,
            block_out_channels=(320, 640, 1280),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            use_linear_projection=True,
            cross_attention_dim=2048,  # 768 (CLIP ViT-L) + 1280 (OpenCLIP ViT-bigG)
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,  # 1280 + 6 x 256
            norm_num_groups=32,
        ),
        "vae": dict(
            sample_size=1024,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            norm_num_groups=32,
            scaling_factor=0.13025,
            force_upcast=True,
        ),
        "text_encoder": dict(
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            projection_dim=768,
        ),
        "text_encoder_2": dict(
            vocab_size=49408,
            hidden_size=1280,
            intermediate_size=5120,
            num_hidden_layers=32,
            num_attention_heads=20,
            projection_dim=1280,
            hidden_act="gelu",
        ),
    },
}

# SD1.x's training noise schedule.
SCHEDULER_CONFIG = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    clip_sample=False,
    steps_offset=1,
    prediction_type="epsilon",
)

MAX_LENGTH = 77  # CLIP's context length; SD pads every prompt to it

# The flow-matching families' bases: a transformer, a 16-channel VAE with a shift, CLIP encoders
# (SD3: two, with projections; Flux.1: one, its pooled output) and a T5 encoder.
_FLOW_VAE_TINY = dict(
    sample_size=64,
    block_out_channels=(8, 16, 16, 32),
    layers_per_block=1,
    norm_num_groups=8,
    use_quant_conv=False,  # SD3's and Flux.1's VAEs have neither quant conv
    use_post_quant_conv=False,
)
_CLIP_TINY = dict(vocab_size=None, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
_T5_TINY = dict(d_model=64, d_kv=16, d_ff=37, num_layers=2, num_heads=4, relative_attention_num_buckets=8)
FLOW_ARCHS: dict[str, dict[str, Any]] = {
    "tiny-sd3": {
        "family": "sd3",
        "transformer": dict(
            sample_size=8,
            patch_size=2,
            in_channels=16,
            num_layers=4,
            attention_head_dim=8,
            num_attention_heads=4,
            joint_attention_dim=64,  # T5's width; the two CLIPs (2 x 32) are padded to it
            caption_projection_dim=32,
            pooled_projection_dim=64,  # both CLIPs' projections
            out_channels=16,
            pos_embed_max_size=32,  # up to 512 px
        ),
        "vae": dict(_FLOW_VAE_TINY, shift_factor=0.0609, scaling_factor=1.5305),  # SD3's VAE factors
        "clip": [dict(_CLIP_TINY, projection_dim=32), dict(_CLIP_TINY, projection_dim=32, hidden_act="gelu")],
        "t5": _T5_TINY,
        "scheduler": dict(num_train_timesteps=1000, shift=3.0),  # SD3's
    },
    "tiny-flux": {
        "family": "flux",
        "transformer": dict(
            patch_size=1,
            in_channels=64,  # 16 latent channels x a 2x2 patch
            num_layers=2,
            num_single_layers=2,
            attention_head_dim=8,
            num_attention_heads=4,
            joint_attention_dim=64,  # T5's width
            pooled_projection_dim=32,  # CLIP's
            guidance_embeds=True,  # Flux.1-dev's shape
            axes_dims_rope=(2, 2, 4),  # sums to attention_head_dim
        ),
        "vae": dict(_FLOW_VAE_TINY, shift_factor=0.1159, scaling_factor=0.3611),  # Flux.1's VAE factors
        "clip": [_CLIP_TINY],
        "t5": _T5_TINY,
        "scheduler": dict(  # Flux.1-dev's
            num_train_timesteps=1000,
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        ),
    },
}
FLOW_ARCHS["tiny-flux-schnell"] = {
    **FLOW_ARCHS["tiny-flux"],
    "transformer": dict(FLOW_ARCHS["tiny-flux"]["transformer"], guidance_embeds=False),
    "scheduler": dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False),  # schnell's
}

# The full-size flow bases (random weights, for GPU benchmarks: only shapes and FLOPs matter), each
# from its hub repo's config files. The text encoders' configs beyond their size (bos/eos/pad ids,
# the 77-token context) come from the offline tokenizers, as for the tiny ones; the vocabularies are
# the real ones (CLIP 49408, T5 32128), so embedding sizes, parameter counts and FLOPs match.
_FLOW_VAE_FULL = dict(  # both families' vae/config.json: SD3's VAE layout with 16 latent channels
    sample_size=1024,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    norm_num_groups=32,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
_CLIP_L = dict(  # openai/clip-vit-large-patch14's text model (text_encoder/config.json)
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    hidden_act="quick_gelu",
)
_CLIP_G = dict(  # laion/CLIP-ViT-bigG-14's text model (SD3's text_encoder_2/config.json)
    vocab_size=49408,
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    hidden_act="gelu",
)
_T5_XXL = dict(  # google/t5-v1_1-xxl's encoder (text_encoder_3/ in SD3, text_encoder_2/ in Flux.1)
    vocab_size=32128,
    d_model=4096,
    d_kv=64,
    d_ff=10240,
    num_layers=24,
    num_heads=64,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
)
FLOW_ARCHS["sd3.5-medium"] = {  # stabilityai/stable-diffusion-3.5-medium
    "family": "sd3",
    "transformer": dict(
        sample_size=128,
        patch_size=2,
        in_channels=16,
        num_layers=24,
        attention_head_dim=64,
        num_attention_heads=24,
        joint_attention_dim=4096,
        caption_projection_dim=1536,
        pooled_projection_dim=2048,  # 768 (CLIP-L) + 1280 (CLIP-G) projections
        out_channels=16,
        pos_embed_max_size=384,
        dual_attention_layers=tuple(range(13)),  # MMDiT-X: blocks 0..12
        qk_norm="rms_norm",
    ),
    "vae": dict(_FLOW_VAE_FULL, shift_factor=0.0609, scaling_factor=1.5305),
    "clip": [dict(_CLIP_L, projection_dim=768), dict(_CLIP_G, projection_dim=1280)],
    "t5": _T5_XXL,
    "scheduler": dict(num_train_timesteps=1000, shift=3.0),
}
FLOW_ARCHS["flux-dev"] = {  # black-forest-labs/FLUX.1-dev
    "family": "flux",
    "transformer": dict(
        patch_size=1,
        in_channels=64,
        num_layers=19,
        num_single_layers=38,
        attention_head_dim=128,
        num_attention_heads=24,
        joint_attention_dim=4096,
        pooled_projection_dim=768,
        guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    ),
    "vae": dict(_FLOW_VAE_FULL, shift_factor=0.1159, scaling_factor=0.3611),
    "clip": [_CLIP_L],
    "t5": _T5_XXL,
    "scheduler": FLOW_ARCHS["tiny-flux"]["scheduler"],  # FLUX.1-dev's scheduler_config.json, dynamic shifting
}
T5_MAX_LENGTH = 512  # T5's context; a run sets its own (model.max_sequence_length)


def family_of(arch: str) -> str:
    if arch in FLOW_ARCHS:
        return FLOW_ARCHS[arch]["family"]
    return "sdxl" if "text_encoder_2" in ARCHS[arch] else "sd"


def all_archs() -> list[str]:
    return sorted([*ARCHS, *FLOW_ARCHS])


def _byte_chars() -> list[str]:
    """The 256 printable characters byte-level BPE (GPT-2/CLIP) uses for the 256 bytes, in the
    order of CLIP's vocab.json: printable bytes as themselves first, then the other bytes mapped
    to code points from 256 up (this is CLIP's `bytes_to_unicode`)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("\N{INVERTED EXCLAMATION MARK}"), ord("\N{NOT SIGN}") + 1),
        *range(ord("\N{REGISTERED SIGN}"), ord("\N{LATIN SMALL LETTER Y WITH DIAERESIS}") + 1),
    ]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def _write_vocab_files(folder: Path) -> None:
    """vocab.json (bytes, bytes + '</w>', then the two specials) and a merges.txt with no merges."""
    chars = _byte_chars()
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(tokens)}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")


def build_tokenizer(pad_token: str | None = None) -> CLIPTokenizer:
    """A real CLIPTokenizer with a byte-level vocabulary and no merges.

    Every string tokenizes (one token per byte, a word's last byte with CLIP's '</w>' suffix);
    the 512 byte tokens have the same ids as in the real CLIP vocabulary. It is loaded from
    vocab.json/merges.txt exactly as a downloaded one would be. `pad_token`: SDXL's second
    tokenizer pads with "!" instead of the end-of-text token.
    """
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        _write_vocab_files(Path(tmp))
        extra = {"pad_token": pad_token} if pad_token else {}
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=MAX_LENGTH, **extra)


def build_t5_tokenizer():
    """A real T5Tokenizer (unigram, like T5's sentencepiece model) over the printable ASCII
    characters: every string tokenizes, offline, and it saves and loads as a downloaded one does."""
    import string

    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]  # T5's word-start marker
    pieces += [(c, -2.0) for c in string.printable[:94]]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=T5_MAX_LENGTH)


def _build_flow_base(arch: str, seed: int) -> Base:
    import diffusers
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from ctrlnet_trainer.models.families import family_named
    from ctrlnet_trainer.models.parts import Base

    spec = FLOW_ARCHS[arch]
    family = family_named(spec["family"])
    clip_tokenizers = [build_tokenizer(), *(build_tokenizer(pad_token="!") for _ in spec["clip"][1:])]
    t5_tokenizer = build_t5_tokenizer()
    vae_spec = dict(spec["vae"])
    blocks = len(vae_spec["block_out_channels"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = getattr(diffusers, family.transformer_class)(**spec["transformer"])
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=16,
            down_block_types=("DownEncoderBlock2D",) * blocks,
            up_block_types=("UpDecoderBlock2D",) * blocks,
            **vae_spec,
        )
        # SD3: both CLIPs with projections (pooled = their text_embeds); Flux.1: one, its pooler output.
        clip_class = CLIPTextModelWithProjection if family.name == "sd3" else CLIPTextModel
        clips = [clip_class(_text_config(c, tok, arch)) for c, tok in zip(spec["clip"], clip_tokenizers, strict=True)]
        t5_spec = {"vocab_size": len(t5_tokenizer), **spec["t5"]}  # a full-size arch: the real vocabulary
        if t5_spec["vocab_size"] < len(t5_tokenizer):
            raise ValueError(f"{arch}: T5 vocab_size < tokenizer size {len(t5_tokenizer)}")
        t5 = T5EncoderModel(
            T5Config(
                feed_forward_proj="gated-gelu",  # T5 v1.1 (T5-XXL)'s
                pad_token_id=t5_tokenizer.pad_token_id,
                eos_token_id=t5_tokenizer.eos_token_id,
                **t5_spec,
            )
        )
    names = [("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"), ("tokenizer_3", "text_encoder_3")]
    text = {}
    encoders = zip([*clip_tokenizers, t5_tokenizer], [*clips, t5], strict=True)
    for (tok_name, enc_name), (tok, enc) in zip(names, encoders, strict=False):  # Flux.1 has no third
        text |= {tok_name: tok, enc_name: enc}
    return Base(family, text, vae, transformer, FlowMatchEulerDiscreteScheduler(**spec["scheduler"]))


def _text_config(spec: dict[str, Any], tokenizer: CLIPTokenizer, arch: str):
    from transformers import CLIPTextConfig

    spec = dict(spec)
    spec["vocab_size"] = spec["vocab_size"] or len(tokenizer)
    if spec["vocab_size"] < len(tokenizer):
        raise ValueError(f"{arch}: text encoder vocab_size < tokenizer size {len(tokenizer)}")
    return CLIPTextConfig(
        **spec,
        max_position_embeddings=MAX_LENGTH,
        # CLIP pools the hidden state at the first eos token, so these must be the tokenizer's.
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_base(arch: str = "tiny", seed: int = 0) -> Base:
    """Build a random-init base. Weights depend only on (arch, seed).

    Seeds torch's global CPU generator inside `torch.random.fork_rng`, so the caller's random
    state is left as it was.
    """
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from ctrlnet_trainer.models.families import family_named
    from ctrlnet_trainer.models.parts import Base

    if arch in FLOW_ARCHS:
        return _build_flow_base(arch, seed)
    if arch not in ARCHS:
        raise ValueError(f"unknown base arch {arch!r}; choose one of {all_archs()}")
    spec = ARCHS[arch]
    sdxl = family_of(arch) == "sdxl"
    tokenizer = build_tokenizer()
    tokenizer_2 = build_tokenizer(pad_token="!") if sdxl else None
    vae_spec = dict(spec["vae"])
    blocks = len(vae_spec["block_out_channels"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(in_channels=4, out_channels=4, **spec["unet"])
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * blocks,
            up_block_types=("UpDecoderBlock2D",) * blocks,
            **vae_spec,
        )
        text_encoder = CLIPTextModel(_text_config(spec["text_encoder"], tokenizer, arch))
        text_encoder_2 = (
            CLIPTextModelWithProjection(_text_config(spec["text_encoder_2"], tokenizer_2, arch)) if sdxl else None
        )
    text = {"tokenizer": tokenizer, "text_encoder": text_encoder}
    if sdxl:
        text |= {"tokenizer_2": tokenizer_2, "text_encoder_2": text_encoder_2}
    return Base(family_named(family_of(arch)), text, vae, unet, DDPMScheduler(**SCHEDULER_CONFIG))


# What a base in the diffusers layout holds, all that `write_base` writes (and may replace).
BASE_ENTRIES = frozenset(
    {
        "model_index.json",
        "unet",
        "transformer",
        "vae",
        "text_encoder",
        "text_encoder_2",
        "text_encoder_3",
        "tokenizer",
        "tokenizer_2",
        "tokenizer_3",
        "scheduler",
    }
)
_STAGING = ".ctrlnet-partial-"


def check_out(out: str | Path, overwrite: bool) -> None:
    """--out must be a folder, empty unless `overwrite`; with `overwrite`, holding nothing but a
    base's files (what is replaced), so that nothing ctrlnet did not write is ever deleted."""
    from ctrlnet_trainer.fs import check_folder_path, one_line_errors

    out = check_folder_path(out, "--out")
    with one_line_errors(out):
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {out} is a file: give a folder for the base")
        entries = sorted(out.iterdir()) if out.is_dir() else []
    held = [p.name + ("/" if p.is_dir() else "") for p in entries]
    if held and not overwrite:
        shown = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
        raise UserError(
            f"--out {out} already holds files ({shown}): pass --overwrite to replace them, or choose an empty folder"
        )
    foreign = [p.name + ("/" if p.is_dir() else "") for p in entries if p.name not in BASE_ENTRIES]
    foreign = [name for name in foreign if not name.startswith(_STAGING)]
    if foreign:
        shown = ", ".join(foreign[:4]) + (", ..." if len(foreign) > 4 else "")
        raise UserError(
            f"--out {out} holds {shown}, not part of a base: --overwrite replaces only a base's files "
            f"({', '.join(sorted(BASE_ENTRIES))}); move it away or choose another folder"
        )


def write_base(out: str | Path, arch: str = "tiny", seed: int = 0, *, overwrite: bool = False) -> Path:
    """Save a random-init base to `out` in the diffusers layout (safetensors); return `out`.

    unet/ vae/ text_encoder/ tokenizer/ scheduler/ (SDXL: also text_encoder_2/ tokenizer_2/) and
    model_index.json, written by the family's pipeline itself, so model_index.json is exactly what
    a pipeline loader expects. sd15 is ~4 GB, sdxl ~14 GB (fp32).
    A folder that already holds files is refused unless `overwrite`, and one holding anything
    but a base's files always is. The new base is written into a staging folder inside `out`,
    then each entry is swapped in (model_index.json removed first and put back last, so an
    interrupted write never looks like a whole base); `out` itself is never renamed or removed
    (`--out .` works).
    """
    from transformers.utils import logging as transformers_logging

    from ctrlnet_trainer.fs import check_writable, one_line_errors

    transformers_logging.disable_progress_bar()  # "Writing model shards" for a one-shard write
    out = Path(out)
    check_out(out, overwrite)
    check_writable(out, "--out")
    parts = build_base(arch, seed)
    pipe = parts.family.pipeline(parts.pipeline_parts())  # its model_index.json is the family's
    staging = out / f"{_STAGING}{os.getpid()}"
    with one_line_errors(out):
        shutil.rmtree(staging, ignore_errors=True)
        try:
            pipe.save_pretrained(staging, safe_serialization=True)
            # transformers 5 saves only tokenizer.json; add the classic vocab files too so that a
            # transformers 4.x CLIPTokenizer (the slow one, which needs them) loads this folder as well.
            for folder, tokenizer in parts.text.items():
                if folder.startswith("tokenizer") and type(tokenizer).__name__.startswith("CLIP"):
                    _write_vocab_files(staging / folder)
            index = "model_index.json"
            (out / index).unlink(missing_ok=True)
            for name in sorted(BASE_ENTRIES - {index}):  # the previous base's parts, this one's in
                old = out / name
                if old.is_dir() and not old.is_symlink():
                    shutil.rmtree(old)
                elif old.exists() or old.is_symlink():
                    old.unlink()
                if (staging / name).exists():
                    (staging / name).rename(old)
            (staging / index).rename(out / index)  # last: the base is whole
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return out
