"""Which luigi.cfg a `ganymede*` command reads: exactly one, `--config`, else LUIGI_CONFIG_PATH, else DEFAULT_PATH.

Luigi layers /etc/luigi/luigi.cfg, ./luigi.cfg and LUIGI_CONFIG_PATH, so a command started in a checkout
mailed the checkout's [email] receiver; here Luigi's parser is emptied and filled from the one file.
"""
import configparser
import os

import luigi.configuration

from .errors import ConfigError

DEFAULT_PATH = "/etc/ganymede/luigi.cfg"


def chosen_path(option=None, environ=None):
    """(path, where the name came from)."""
    environ = os.environ if environ is None else environ
    if option:
        return option, "--config"
    if environ.get("LUIGI_CONFIG_PATH"):
        return environ["LUIGI_CONFIG_PATH"], "LUIGI_CONFIG_PATH"
    return DEFAULT_PATH, "the default"


def use(option=None):
    """Make the chosen file the only configuration of this process and of the commands it starts."""
    path, source = chosen_path(option)
    if not os.path.isfile(path):
        hint = "" if source != "the default" else "; give --config FILE or set LUIGI_CONFIG_PATH"
        raise ConfigError(f"config file {path} ({source}) does not exist{hint}")
    parser = luigi.configuration.get_config()
    parser[parser.default_section].clear()
    for section in parser.sections():
        parser.remove_section(section)
    try:
        read = parser.read([path])
    except (configparser.Error, OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} ({source}): {exc}") from None
    if not read:
        raise ConfigError(f"config file {path} ({source}) cannot be read")
    os.environ["LUIGI_CONFIG_PATH"] = os.path.abspath(path)
    return path
