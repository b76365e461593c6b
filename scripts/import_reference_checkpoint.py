"""Convert an authors' RETINA checkpoint (BaderLab/RETINA key layout) into this project's format.

    python scripts/import_reference_checkpoint.py IN.pth OUT.pt [--preset retina] [--img_size 224]

The output is a plain TransUNet state dict that both bundles load (``pretrained_path`` of
retina_finetune, or ``models/model.pt`` of either bundle). It is checked by loading it into the
network the preset describes (the number of classes and the head are read from the checkpoint).
"""

from __future__ import annotations

import sys

import fire

from custom.checkpoints import CheckpointError, load_weights, read_state_dict, save_state_dict
from custom.networks import transunet_from_preset


def main(src: str, dst: str, preset: str = "", img_size: int = 0) -> str:
    """Convert ``src`` to ``dst``; ``preset`` defaults to the width found in the checkpoint."""
    try:
        sd = read_state_dict(src)
        hidden = sd["embeddings.patch_embeddings.weight"].shape[0]
        preset = preset or {192: "retina", 768: "vit_b"}.get(hidden, "")
        if not preset:
            raise CheckpointError(f"{src}: hidden size {hidden} matches no preset; pass --preset")
        n_tokens = sd["embeddings.position_embeddings"].shape[1]
        grid = int(round(n_tokens**0.5))
        head = sd["head.weight"]  # a 1-channel head is a reconstruction or a binary head: same shapes
        model = transunet_from_preset(preset, img_size=img_size or grid * 16, out_channels=head.shape[0])
        load_weights(model, sd, strict=True)
    except (CheckpointError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    save_state_dict(model.state_dict(), dst)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {dst}: preset {preset}, {len(sd)} tensors, {n:,} parameters, {head.shape[0]} output channel(s)")
    return dst


if __name__ == "__main__":
    fire.Fire(main)
