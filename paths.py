"""Where the plugin's own files are (no imports: the provider, the dock and plugin.py all read it)."""

import os

PLUGIN_DIR = os.path.dirname(os.path.abspath(__file__))
ICON = os.path.join(PLUGIN_DIR, "resources", "icon.png")
README = os.path.join(PLUGIN_DIR, "README.md")
#: One HTML help page per algorithm: help/<algorithm name>.html.
HELP_DIR = os.path.join(PLUGIN_DIR, "help")
