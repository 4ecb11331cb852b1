"""The config system: precedence, coercion, unknown keys, saving."""

from dataclasses import dataclass, field

import pytest
import yaml

from respmotion.config import ConfigError, from_dict, load_config, save_config


@dataclass
class Inner:
    lr: float = 1e-3
    views: tuple[str, ...] = ("axial",)


@dataclass
class Outer:
    shape: tuple[int, int, int] = (50, 256, 256)
    name: str = "a"
    flag: bool = False
    inner: Inner = field(default_factory=Inner)


def test_precedence_and_coercion(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("name: fromfile\ninner:\n  lr: 0.5\n")
    cfg = load_config(Outer, f, {"name": "fromflag", "shape": "16,64,64"}, ["inner.lr=2e-4", "flag=true",
                                                                          "inner.views=axial,coronal"])
    assert cfg.name == "fromflag" and cfg.shape == (16, 64, 64) and cfg.flag is True
    assert cfg.inner.lr == 2e-4 and cfg.inner.views == ("axial", "coronal")
    assert load_config(Outer, None, None, ["shape=24x96x96"]).shape == (24, 96, 96)


def test_unknown_key_names_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("nmae: x\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*unknown config key 'nmae'"):
        load_config(Outer, f)
    f.write_text("inner:\n  colormap: jet\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'inner.colormap'"):
        load_config(Outer, f)
    with pytest.raises(ConfigError, match="inner.lrr"):
        load_config(Outer, None, None, ["inner.lrr=1"])
    with pytest.raises(ConfigError, match="expected int"):
        load_config(Outer, None, None, ["shape=1,2,x"])


def test_saved_config_reloads(tmp_path):
    cfg = load_config(Outer, None, None, ["inner.lr=0.25"])
    p = save_config(cfg, tmp_path / "config.yaml")
    assert yaml.safe_load(p.read_text())["inner"]["lr"] == 0.25
    assert load_config(Outer, p) == cfg


def test_configs_saved_under_older_names_still_load(tmp_path):
    """Renamed settings (a class's ``RENAMED``) are read under today's names, in nested sections too, from a file
    and from ``key=value``; a flag given under today's name still wins over the file."""
    from respmotion.registration.config import RegisterConfig
    from respmotion.synthesis.run import SynthesizeConfig
    from respmotion.training.autoencoder import AutoencoderRunConfig

    f = tmp_path / "old.yaml"
    f.write_text(yaml.safe_dump({"ffd": {"clip_hu": [-900, 900], "texture_lung_hu": None}}))
    cfg = load_config(RegisterConfig, f)
    assert cfg.ffd.hu_window == (-900.0, 900.0) and cfg.ffd.texture_air_hu is None
    f.write_text(yaml.safe_dump({"samples": 3, "seed": 5, "formats": ["mha"], "sampler": "", "steps": 0}))
    s = load_config(SynthesizeConfig, f, {"options.seed": 7})
    assert (s.options.samples, s.options.seed, s.options.formats, s.sampler, s.steps) == (3, 7, ("mha",), None, None)
    a = load_config(AutoencoderRunConfig, None, overrides=["data.split_seed=9"])
    assert a.data.patient_split.seed == 9
    # a config stored in an older checkpoint, rebuilt with from_dict (evaluate autoencoder does this)
    old = from_dict(AutoencoderRunConfig, {"kind": "dvf", "data": {"split_ratios": [0.6, 0.2, 0.2], "split_seed": 4}})
    assert old.data.patient_split.ratios == (0.6, 0.2, 0.2) and old.data.patient_split.seed == 4


def test_synthesis_options_are_checked_once_when_made():
    from respmotion.synthesis.pipeline import SynthesisOptions
    from respmotion.synthesis.run import SynthesizeConfig

    o = SynthesisOptions(formats=["NIfTI", "mha", "nifti"], input_phase="50")
    assert o.formats == ("nifti", "mha") and o.input_phase == 50
    assert SynthesizeConfig(dicom=True).options.formats == ("nifti", "dicom")
    with pytest.raises(ValueError, match="--intensity"):
        SynthesisOptions(intensity="density")
