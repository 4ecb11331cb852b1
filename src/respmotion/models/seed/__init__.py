"""The research code's networks (Axreub/ldm-respiratory-motion), re-implemented to load its
published checkpoints exactly.

``load_seed_checkpoints(DIR)`` reads the published folders (``image_autoenc/model.pt``,
``dvf_vae/vae.pt``, ``ldm/ldm.pt``, each with ``args.json``) into :class:`SeedModels`.  Module
and attribute names follow the research code so ``state_dict`` keys and shapes are identical;
the code is ours.  One class a file: :mod:`.encoder`, :mod:`.decoder`, :mod:`.autoencoder`,
:mod:`.vae`, :mod:`.unet`; building blocks in :mod:`.blocks`; arguments in :mod:`.config`.
Pre/post-processing, units and sampling: :mod:`respmotion.synthesis.seed` and CONVENTIONS.md.
"""

from .autoencoder import SeedAutoencoder
from .config import AutoencoderArgs, UNetArgs
from .loader import SeedModels, clean_keys, load_seed_checkpoints, randomize_, write_seed_checkpoints
from .unet import SeedUNet
from .vae import SeedVariationalAutoencoder

__all__ = ["AutoencoderArgs", "SeedAutoencoder", "SeedModels", "SeedUNet", "SeedVariationalAutoencoder", "UNetArgs",
           "clean_keys", "load_seed_checkpoints", "randomize_", "write_seed_checkpoints"]
