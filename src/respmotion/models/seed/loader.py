"""Reading (and, for tests, writing) the research code's published checkpoint folders.

Published layout (``DIR``)::

    DIR/image_autoenc/model.pt  + args.json   image autoencoder   (Autoencoder)
    DIR/dvf_vae/vae.pt          + args.json   DVF autoencoder     (VariationalAutoencoder)
    DIR/ldm/ldm.pt              + args.json   diffusion UNet      (UNet)

Each ``.pt`` is a plain ``state_dict`` (read weights-only); keys saved from DDP or
``torch.compile`` models carry ``module.`` / ``_orig_mod.`` prefixes, removed here as the
research loader does.  Usage::

    m = load_seed_checkpoints("weights/")
    z = m.image_encoder(ct_normalised)          # (B, 1, 50, 256, 256) -> (B, 3, 50, 32, 32)
    eps = m.unet(torch.cat([z, x_t], 1), t, phase)
    dvf = m.dvf_decoder(x0) / m.dvf_scale_factor  # airlab displacement, normalised grid units
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...io.atomic import atomic_path, file_sha256, write_json
from ...io.torchfile import load_weights_only
from .autoencoder import SeedAutoencoder
from .config import AutoencoderArgs, UNetArgs, args_document, read_args
from .unet import SeedUNet
from .vae import SeedVariationalAutoencoder

IMAGE_AE = Path("image_autoenc") / "model.pt"
DVF_AE = Path("dvf_vae") / "vae.pt"
LDM = Path("ldm") / "ldm.pt"
_PREFIXES = ("module.", "_orig_mod.")


def clean_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip leading ``module.`` / ``_orig_mod.`` prefixes (DDP, ``torch.compile``) from keys."""
    out = {}
    for key, value in state.items():
        while key.startswith(_PREFIXES):
            key = key.split(".", 1)[1]
        out[key] = value
    return out


def build_autoencoder(args: AutoencoderArgs) -> nn.Module:
    """The research class ``args.variational`` selects: VAE or plain autoencoder."""
    return SeedVariationalAutoencoder(args) if args.variational else SeedAutoencoder(args)


def _load_into(model: nn.Module, path: Path) -> nn.Module:
    state = load_weights_only(path)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a plain state_dict (name -> tensor)")
    state = clean_keys(state)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        what = f"missing key {missing[0]!r}" if missing else f"unexpected key {unexpected[0]!r}"
        raise ValueError(f"{path}: does not match its args.json ({what}; {len(missing)} missing, "
                         f"{len(unexpected)} unexpected)")
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise ValueError(f"{path}: {key} has shape {tuple(value.shape)}, its args.json gives "
                             f"{tuple(expected[key].shape)}")
    model.load_state_dict(state)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@dataclass
class SeedModels:
    """The three research networks, float32, eval mode, gradients off.

    ``image_encoder(x)`` is its ``Autoencoder.encode``, ``dvf_decoder(z)`` its
    ``VariationalAutoencoder.decode`` and ``unet(x, t, phase)`` its ``UNet.forward``.
    """

    image_autoencoder: SeedAutoencoder
    dvf_autoencoder: nn.Module
    unet: SeedUNet
    image_args: AutoencoderArgs
    dvf_args: AutoencoderArgs
    unet_args: UNetArgs
    unet_train_args: dict[str, Any]
    provenance: dict[str, Any] = field(default_factory=dict)

    def image_encoder(self, x: torch.Tensor) -> torch.Tensor:
        return self.image_autoencoder.encode(x)

    def dvf_decoder(self, z: torch.Tensor) -> torch.Tensor:
        return self.dvf_autoencoder.decode(z)

    @property
    def dvf_scale_factor(self) -> float:
        """Scale of the decoded DVF (the UNet's ``dvf_scale_factor``, as the research inference uses)."""
        return float(self.unet_args.dvf_scale_factor)

    def to(self, device: str | torch.device) -> "SeedModels":
        for m in (self.image_autoencoder, self.dvf_autoencoder, self.unet):
            m.to(device)
        return self


def load_seed_checkpoints(root: str | Path, device: str | torch.device = "cpu") -> SeedModels:
    """Load the published folders under ``root`` (see the module doc) exactly.

    Raises:
        FileNotFoundError: a checkpoint or its ``args.json`` is missing.
        ValueError: unreadable file, or keys/shapes that do not match its ``args.json``.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: seed checkpoint folder not found")
    img_args, _ = read_args(root / IMAGE_AE.parent / "args.json", "autoencoder")
    dvf_args, _ = read_args(root / DVF_AE.parent / "args.json", "autoencoder")
    unet_args, unet_train = read_args(root / LDM.parent / "args.json", "unet")
    if img_args.variational:
        raise ValueError(f"{root / IMAGE_AE.parent / 'args.json'}: the image autoencoder must not be variational")
    models = SeedModels(
        image_autoencoder=_load_into(SeedAutoencoder(img_args), root / IMAGE_AE),
        dvf_autoencoder=_load_into(build_autoencoder(dvf_args), root / DVF_AE),
        unet=_load_into(SeedUNet(unet_args), root / LDM),
        image_args=img_args, dvf_args=dvf_args, unet_args=unet_args, unet_train_args=unet_train,
        provenance={"format": "seed (research-code checkpoints)", "root": str(root.resolve()),
                    "sha256": {str(rel): file_sha256(root / rel) for rel in (IMAGE_AE, DVF_AE, LDM)}},
    )
    return models.to(device)


def write_seed_checkpoints(root: str | Path, image_autoencoder: nn.Module, image_args: AutoencoderArgs,
                           dvf_autoencoder: nn.Module, dvf_args: AutoencoderArgs, unet: nn.Module,
                           unet_args: UNetArgs, unet_train_args: dict[str, Any]) -> Path:
    """Write models in the published layout (``state_dict`` + ``args.json`` per folder)."""
    root = Path(root)
    for rel, model, args, train in ((IMAGE_AE, image_autoencoder, image_args, {}),
                                    (DVF_AE, dvf_autoencoder, dvf_args, {}),
                                    (LDM, unet, unet_args, unet_train_args)):
        (root / rel.parent).mkdir(parents=True, exist_ok=True)
        with atomic_path(root / rel) as tmp:
            torch.save(model.state_dict(), tmp)
        write_json(root / rel.parent / "args.json", args_document(args, train))
    return root


def randomize_(model: nn.Module, seed: int) -> nn.Module:
    """Fill every parameter with seeded random values for tests: weights ``N(0, 1 / fan_in)``,
    biases and embeddings ``N(0, 0.1**2)``, normalisation scales ``1 + N(0, 0.3**2)`` and shifts
    ``N(0, 0.3**2)`` (never the identity affine); returns ``model``."""
    gen = torch.Generator().manual_seed(seed)
    norms = (nn.GroupNorm, nn.BatchNorm3d, nn.InstanceNorm3d)
    with torch.no_grad():
        for name, p in model.named_parameters():
            owner = model.get_submodule(name.rsplit(".", 1)[0])
            noise = torch.randn(p.shape, generator=gen)
            if isinstance(owner, norms):
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.3 * noise)
            elif p.ndim > 1 and not isinstance(owner, nn.Embedding):
                fan_in = p.shape[0] if isinstance(owner, nn.ConvTranspose3d) else p[0].numel()
                p.copy_(noise / fan_in**0.5)
            else:
                p.copy_(0.1 * noise)
    return model
