"""Every Vespa setting in one typed, validated object: each declared once (settings.py), read
from the environment (loading.py), and listed in the README's table (readme.py)."""

from .loading import ConfigError, environment, load_settings
from .settings import (BENCHMARK_IDENTITY, DECLARATIONS, DEFAULT_BENCHMARKS, REPO_ROOT,
                       SCRIPT_SETTINGS, SECRET_VARIABLES, Setting, Settings)

__all__ = ["BENCHMARK_IDENTITY", "DECLARATIONS", "DEFAULT_BENCHMARKS", "REPO_ROOT",
           "SCRIPT_SETTINGS", "SECRET_VARIABLES", "ConfigError", "Setting", "Settings",
           "environment", "load_settings"]
