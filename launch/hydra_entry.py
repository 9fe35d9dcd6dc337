"""The shape every Hydra entry point shares: `--help` prints the script's docstring first, logs are set
up, and the job runs with user errors turned into one line and exit code 2 (launch/errors.py)."""

import os
import sys

import hydra
from omegaconf import DictConfig

from launch.errors import exit_on_user_error


def hydra_entry(config_name: str, doc: str, run):
    """main() of a launcher over conf/CONFIG_NAME.yaml that calls ``run(cfg)``."""

    conf = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")

    @hydra.main(version_base="1.3", config_path=conf, config_name=config_name)
    def _main(cfg: DictConfig) -> None:
        from framework.runtime.logs import setup_logging

        setup_logging()
        with exit_on_user_error():
            run(cfg)

    def main():
        if "--help" in sys.argv[1:] or "-h" in sys.argv[1:]:
            print(doc)
        _main()

    return main
