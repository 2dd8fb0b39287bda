"""A recipe resolved as fairseq-hydra-train resolves it, without training: for tests and benchmarks (the
settings every recipe leaves to the user filled with placeholders)."""
import os

from d2v_plugin import recipes

RECIPES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "config")
PLACEHOLDERS = ["common.user_dir=d2v_plugin", "task.data=/data/imagenet", "model.pretrained_checkpoint=/ckpt/model.pt"]


def resolve(name: str, *overrides: str, config_dir: str = RECIPES_DIR, placeholders=PLACEHOLDERS):
    """d2v_plugin.recipes.resolve with ``placeholders`` filling the settings every recipe leaves to the user."""
    return recipes.resolve(name, *placeholders, *overrides, config_dir=config_dir)
