"""One typed configuration for every megadalle command.

    sections.py   the typed sections (one dataclass each) and `Config`, which holds them
    presets.py    named configurations as nested dicts over the defaults
    loading.py    defaults <- preset <- YAML file <- dotted overrides
    coerce.py     building dataclasses from plain dicts, with type checks and messages

Precedence is CLI > YAML file > preset > defaults. Each section is a dataclass validated in
``__post_init__`` with messages that say what to change; cross-section rules live in
``Config.__post_init__``. Defaults are the paper's hyper-parameters (Ramesh et al. 2021,
"Zero-Shot Text-to-Image Generation", sections 2.1-2.5 and appendices A, B, D, E; each section
says where its numbers come from, and where the paper is silent and we chose) with the model
sizes of the ``small`` preset, so that a bare ``Config()`` never allocates a 12B model.

The resolved config is written into every run folder and every checkpoint (``to_dict`` /
``save``), and ``Config.from_dict`` rebuilds it exactly.
"""

from megadalle.config.loading import load_config, parse_override
from megadalle.config.presets import PRESETS
from megadalle.config.sections import *  # noqa: F401,F403 - every section type, Config, ATTENTION_TYPES
from megadalle.config.sections import __all__ as _sections
from megadalle.errors import ConfigError

__all__ = ["ConfigError", "PRESETS", "load_config", "parse_override", *_sections]
