"""Typed configs: YAML presets, dotted overrides, and errors that name the field."""

from dataclasses import dataclass, field
from typing import Literal

import pytest

from pirl.config.loading import ConfigError, apply_overrides, from_dict, load_yaml, save_yaml, to_dict


@dataclass
class Inner:
    lr: float = 1e-3
    mode: Literal["a", "b"] = "a"
    steps: int = 3
    betas: tuple[float, float] = (0.9, 0.95)

    def __post_init__(self):
        if self.steps < 0:
            raise ValueError("inner.steps: must be >= 0")


@dataclass
class Outer:
    name: str = "x"
    maybe: int | None = None
    inner: Inner = field(default_factory=Inner)
    kwargs: dict = field(default_factory=dict)


def test_overrides_parse_and_type():
    cfg = apply_overrides(Outer(), ["inner.lr=0.5", "inner.mode=b", "maybe=4", "kwargs.k=[1, 2]",
                                    "inner.betas=[0.8, 0.9]"])
    assert cfg.inner.lr == 0.5 and isinstance(cfg.inner.lr, float)
    assert cfg.inner.mode == "b" and cfg.maybe == 4 and cfg.kwargs == {"k": [1, 2]}
    assert cfg.inner.betas == (0.8, 0.9)
    # ints are accepted for floats, not the other way round
    assert apply_overrides(Outer(), ["inner.lr=1"]).inner.lr == 1.0
    # YAML 1.1 reads exponent floats without a dot ("5e-4") as strings; a float field takes them
    for raw, val in (("5e-4", 5e-4), ("1E3", 1000.0), ("-2.5e-1", -0.25)):
        assert apply_overrides(Outer(), [f"inner.lr={raw}"]).inner.lr == val


@pytest.mark.parametrize("ov,needle", [
    ("inner.lr=abc", "inner.lr"),
    ("inner.mode=c", "inner.mode"),
    ("inner.steps=1.5", "inner.steps"),
    ("inner.nope=1", "inner.nope"),
    ("nope.x=1", "nope"),
    ("inner.steps=-1", "inner.steps"),
    ("novalue", "section.field=value"),
])
def test_bad_values_name_the_field(ov, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        apply_overrides(Outer(), [ov])


def test_yaml_round_trip(tmp_path):
    cfg = apply_overrides(Outer(), ["inner.lr=0.25", "name=y"])
    save_yaml(cfg, tmp_path / "c.yaml")
    back = load_yaml(Outer, tmp_path / "c.yaml")
    assert to_dict(back) == to_dict(cfg)
    with pytest.raises(ConfigError, match="unknown field"):
        from_dict(Outer, {"inner": {"lr": 1.0, "typo": 2}})


def test_partial_sections_keep_the_parents_defaults(tmp_path):
    """A preset that gives part of a section keeps the run-level defaults of the rest (TrainConfig
    sets its own sampler kind / PPO lr / env kwargs); free-form kwargs given are taken whole."""
    from pirl.config.schema import TrainConfig

    base = TrainConfig()
    cfg = from_dict(TrainConfig, {"sampler": {"num_steps": 3}, "rl": {"ppo": {"clip_low": 0.1}},
                                  "env": {"num_envs": 8}})
    assert cfg.sampler.num_steps == 3 and cfg.sampler.kind == base.sampler.kind
    assert cfg.rl.ppo.clip_low == 0.1 and cfg.rl.ppo.lr_policy == base.rl.ppo.lr_policy
    assert cfg.rl.iterations == base.rl.iterations
    assert cfg.env.num_envs == 8 and cfg.env.kwargs == base.env.kwargs
    other = from_dict(TrainConfig,  # (grounding pretraining is for the tabletop: off here)
                      {"env": {"name": "maniskill", "kwargs": {"tasks": "PushCube-v1"}},
                       "pretrain": {"steps": 0}})
    assert other.env.kwargs == {"tasks": "PushCube-v1"}


def test_train_config_defaults_validate():
    from pirl.config.schema import TrainConfig

    cfg = TrainConfig()
    assert cfg.env.name == "tabletop" and cfg.model.name == "tiny"
    with pytest.raises(ConfigError, match="env.num_envs"):
        apply_overrides(cfg, ["env.num_envs=0"])
    with pytest.raises(ConfigError, match="rl.algo"):
        apply_overrides(cfg, ["rl.algo=sac"])
    with pytest.raises(ConfigError, match="device"):
        apply_overrides(cfg, ["device=tpu"])


def test_malformed_yaml_is_a_config_error_naming_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"^kwargs: the value '\{lr:' is not valid YAML"):
        apply_overrides(Outer(), ["kwargs={lr:"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("inner: {lr: [1,\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_yaml(Outer, bad)
