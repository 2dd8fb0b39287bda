"""A recipe resolved as fairseq-hydra-train resolves it, without training: for tests and benchmarks."""
import os

RECIPES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "config")
PLACEHOLDERS = ["common.user_dir=d2v_plugin", "task.data=/data/imagenet", "model.pretrained_checkpoint=/ckpt/model.pt"]


def resolve(name: str, *overrides: str, config_dir: str = RECIPES_DIR, placeholders=PLACEHOLDERS):
    """hydra_init + the recipe + add_defaults + resolve, what fairseq-hydra-train builds before training
    (the recipe merged onto FairseqConfig with hydra 1.1 semantics, as fairseq's hydra.main gets without a
    version_base). ``placeholders`` fill the settings every recipe leaves to the user."""
    from fairseq.dataclass.initialize import add_defaults, hydra_init
    from fairseq.dataclass.utils import omegaconf_no_object_check
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    hydra_init(name)
    with initialize_config_dir(config_dir=config_dir, version_base="1.1"):
        cfg = compose(name, overrides=[*placeholders, *overrides])
    add_defaults(cfg)
    with omegaconf_no_object_check():
        return OmegaConf.create(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
