"""A recipe resolved as fairseq-hydra-train resolves it (hydra 1.1 semantics, fairseq's defaults added), and
with the plugin's start-up decisions applied: what a run will really use. ``cli.recipe`` prints it; the
tests and benchmarks build their configs with it."""
from __future__ import annotations

import logging


def resolve(name: str, *overrides: str, config_dir: str):
    """hydra_init + the recipe + add_defaults + resolve, what fairseq-hydra-train builds before training (the
    recipe merged onto FairseqConfig as fairseq's hydra.main gets it without a version_base). Settings the
    recipe leaves to the user (``???``) stay ``???``."""
    from fairseq.dataclass.initialize import add_defaults, hydra_init
    from fairseq.dataclass.utils import omegaconf_no_object_check
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from d2v_plugin import compat

    hydra_init(name)
    with initialize_config_dir(config_dir=config_dir, version_base="1.1"):
        cfg = compose(name, overrides=list(overrides))
    unset = [f"{group}.{key}" for group in cfg if OmegaConf.is_config(cfg[group])
             for key in cfg[group] if OmegaConf.is_missing(cfg[group], key)]
    compat.ALLOW_MISSING["on"] = True
    try:
        add_defaults(cfg)
    finally:
        compat.ALLOW_MISSING["on"] = False
    with omegaconf_no_object_check():
        cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
    for path in unset:  # shown as the recipe has them: a run stops until they are given
        OmegaConf.update(cfg, path, "???")
    return cfg


def unset_settings(cfg) -> list[str]:
    """The settings a resolved recipe still leaves to the user (``???``)."""
    from omegaconf import OmegaConf

    return [f"{group}.{key}" for group in cfg if OmegaConf.is_config(cfg[group])
            for key in cfg[group] if OmegaConf.is_missing(cfg[group], key)]


def apply_startup(cfg, world_size: int) -> list[str]:
    """The decisions the plugin's task makes when a run starts, applied to ``cfg`` for ``world_size`` ranks
    (update_freq from task.global_batch_size, the precision's checks): what each decided, one line each."""
    from d2v_plugin.training import ConfigError, check_flat_params, check_precision, resolve_update_freq

    cfg.distributed_training.distributed_world_size = world_size
    said = [f"not set: {path} (the run stops until it is given)" for path in unset_settings(cfg)]

    class Lines(logging.Handler):
        def emit(self, record):
            said.append(record.getMessage())

    handler = Lines()
    log = logging.getLogger("d2v_plugin.training")
    log.addHandler(handler)
    previous = log.level
    log.setLevel(logging.INFO)
    try:
        for check in (lambda: resolve_update_freq(cfg.task.get("global_batch_size"), cfg),
                      lambda: check_precision(cfg.common), lambda: check_flat_params(cfg)):
            try:
                check()
            except ConfigError as err:
                said.append(f"on this machine the run would stop: {err}")
    finally:
        log.removeHandler(handler)
        log.setLevel(previous)
    half = [n for n in ("fp16", "bf16", "memory_efficient_fp16", "memory_efficient_bf16") if cfg.common.get(n)]
    said.append(f"precision: {', '.join(half) if half else 'fp32'}" + (" on the CPU" if cfg.common.get("cpu") else ""))
    return said
