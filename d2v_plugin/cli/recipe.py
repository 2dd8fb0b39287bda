"""Print what a run will really use: a recipe resolved as fairseq-hydra-train resolves it, with the plugin's
start-up decisions applied (update_freq for the global batch on the GPUs at hand, the precision's checks).

    python -m d2v_plugin.cli.recipe distilled_imagenet [OVERRIDE ...] [--world-size 8]
    python -m d2v_plugin.cli.recipe d2v2_base_imagenet dataset.batch_size=64 --world-size 4 --section optimization

fairseq-hydra-train's own `--cfg job` prints the recipe before the plugin runs: it shows
`update_freq: [1]` where a run of distilled_imagenet on 1 GPU sets 8 (task.global_batch_size 256 / 32 per GPU),
and says nothing of the checks the run makes at start-up. This command prints the resolved config as YAML,
each decision first as a comment. OVERRIDE: as on fairseq-hydra-train's command line (task.data=...);
settings the recipe leaves to you stay ???.
"""
import sys

from d2v_plugin.cli.common import fail_cleanly, load_heavy, make_parser, positive_int


def main(argv=None) -> int:
    parser = make_parser(__doc__, "recipe", trust_flag=False)
    parser.add_argument("name", help="the recipe: a name in the recipes folder (distilled_imagenet, demo, ...)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, as fairseq-hydra-train takes them")
    parser.add_argument("--config-dir", default=None, help="the recipes folder (default: the plugin's config/)")
    parser.add_argument("--world-size", type=positive_int, default=None,
                        help="ranks the run will have (default: the GPUs here, else 1)")
    parser.add_argument("--section", default=None,
                        help="print only this section (task, model, optimization, ...; default: the whole config)")
    args = parser.parse_args(argv)
    load_heavy()
    from omegaconf import OmegaConf

    import d2v_plugin
    from d2v_plugin.cli.where import locations
    from d2v_plugin.recipes import apply_startup, resolve

    with fail_cleanly():
        d2v_plugin.register()
        config_dir = args.config_dir or locations()["config"]
        overrides = list(args.overrides)
        if not any(o.lstrip("+").startswith("common.user_dir=") for o in overrides):
            overrides.append("common.user_dir=d2v_plugin")
        try:
            cfg = resolve(args.name, *overrides, config_dir=config_dir)
        except Exception as err:  # hydra's own errors: a recipe not found, an override it refuses
            raise ValueError(f"recipe {args.name}: {type(err).__name__}: {str(err).strip().splitlines()[0]}") from None
        if args.world_size is None:
            import torch

            args.world_size = max(1, torch.cuda.device_count())
        said = apply_startup(cfg, args.world_size)
        if args.section is not None and args.section not in cfg:
            raise ValueError(f"--section {args.section}: the config has {', '.join(cfg)}")
    print(f"# {args.name}, resolved as fairseq-hydra-train resolves it, on {args.world_size} rank(s); at start-up:")
    for line in said:
        print(f"#   {line}")
    print(OmegaConf.to_yaml(cfg[args.section] if args.section else cfg), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
