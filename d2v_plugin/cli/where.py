"""Print where the plugin and its recipes are, so fairseq-hydra-train runs from any folder.

    python -m d2v_plugin.cli.where [user_dir | config]

    fairseq-hydra-train --config-dir "$(python -m d2v_plugin.cli.where config)" \\
      --config-name distilled_imagenet common.user_dir="$(python -m d2v_plugin.cli.where user_dir)" \\
      task.data=/data/imagenet ...

user_dir: the plugin's package folder (fairseq imports it by this path); config: the recipes folder of
the checkout the plugin is installed from (pip install -e). With no argument, both as one JSON line.
"""
import json
import os
import sys

from d2v_plugin.cli.common import make_parser


def locations() -> dict:
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    config = os.path.join(os.path.dirname(package), "config")
    if not os.path.isdir(config):
        raise FileNotFoundError(f"no recipes folder next to the plugin ({config}): install it from a checkout "
                                f"with pip install -e, or pass --config-dir to your copy of config/")
    return {"user_dir": package, "config": config}


def main(argv=None) -> int:
    parser = make_parser(__doc__, "where", trust_flag=False)
    parser.add_argument("what", nargs="?", choices=("user_dir", "config"), help="print only this path")
    args = parser.parse_args(argv)
    try:
        found = locations()
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(found[args.what] if args.what else json.dumps(found))
    return 0


if __name__ == "__main__":
    sys.exit(main())
