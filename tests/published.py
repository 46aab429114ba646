"""What the published weights say about the reference bases (finetune/models/configs/): parameter counts to
check the shipped configs against. Sources, per number:

- "index": the checkpoint's safetensors index (`metadata.total_size`, bf16 bytes) / 2;
- "card": the count the model card / the widely quoted converted-checkpoint count gives;
- the SD 3.5 pair: keras-hub's presets count SD 3.5 Large and Medium with the same CLIPs and VAE (9,048,410,595
  and 3,371,793,763 parameters), so their difference is the MMDiTs' alone, position table included.
"""

from __future__ import annotations

#: reference name -> {component: parameters}
PUBLISHED = {
    "sd15": {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},  # card
    "sdxl": {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480,
             "text_encoder_2": 694_659_840},  # card
    "flux1-dev": {"transformer": 23_802_816_640 // 2, "text_encoder_2": 9_524_621_312 // 2},  # index
    "flux1-schnell": {"transformer": 23_782_357_120 // 2, "text_encoder_2": 9_524_621_312 // 2},  # index
    "qwen-image": {"transformer": 40_860_802_176 // 2, "text_encoder": 16_584_333_312 // 2},  # index
    "flux2-klein-4b": {"vae": 84_046_115},  # its VAE safetensors (250 weights + batch-norm statistics)
    "hunyuanimage-2.1": {"text_encoder": 16_584_333_312 // 2},  # index: Qwen2.5-VL-7B-Instruct, as Qwen-Image's
}
#: model cards that give a rounded count only: reference name -> {component: (billions, the card's decimals)}
CARDS = {"chroma1-hd": {"transformer": (8.9, 1)},  # "8.9B parameters" (lodestones/Chroma1-HD, diffusers' docs)
         "flux2-dev": {"transformer": (32, 0),  # "a 32 billion parameter rectified flow transformer" (FLUX.2-dev)
                       "text_encoder": (24, 0)},  # Mistral-Small-3.1-24B-Instruct-2503, vision tower included
         # "2.6B" (Lumina-Image 2.0's paper and card); Gemma 2 2B: "2.6B" (Gemma 2's report)
         "lumina-image-2": {"transformer": (2.6, 1), "text_encoder": (2.6, 1)},
         "sana-1600m-1024px": {"transformer": (1.6, 1)}}  # "Sana_1600M" (its card: 1.6B)
#: SD 3.5 Large minus Medium, MMDiT parameters and position embeddings (keras-hub presets' difference)
SD35_LARGE_MINUS_MEDIUM = 9_048_410_595 - 3_371_793_763
#: Qwen3 model cards (Qwen3-4B, Qwen3-8B): total and non-embedding parameters in billions, and half a unit of
#: the card's last digit
QWEN3_CARDS = {"flux2-klein-4b": (4.0, 3.6, 0.05), "z-image-turbo": (4.0, 3.6, 0.05), "flux2-klein-9b": (8.2, 6.95, 0.005)}
