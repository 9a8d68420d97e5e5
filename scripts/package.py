"""Build the release ZIP of the plugin, as QGIS's "Install from ZIP" and the plugin repository expect it.

Usage: python scripts/package.py [OUT.zip]        (default: outputs/geocate.zip; `make package`)

The ZIP holds one folder, ``geocate/``, with the plugin's runtime files only,
taken from what git tracks, or would track (new files not yet committed;
nothing .gitignore leaves out; a walk of the folder where git is missing):
the plugin's modules, metadata.txt, LICENSE, README.md (the dock's help),
requirements.txt, resources/ (icon, demo imagery), help/ when present, and
scripts/export_encoder.py (the errors about encoders name it). Tests,
benchmarks, docs, the venv, the profile, outputs, dotfiles and caches stay out.

metadata.txt is checked first as plugins.qgis.org checks an upload
(qgis/QGIS-Django, plugins/validator.py): the required fields, a [general]
section, real URLs, the icon, LICENSE, the folder name and the size; a missing
field stops the build with a message naming it.
"""

import argparse
import configparser
import os
import re
import subprocess
import sys
import zipfile
from urllib.parse import urlparse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOLDER = "geocate"
DEFAULT_OUT = os.path.join(ROOT, "outputs", "geocate.zip")

#: What goes in: files at the top, whole folders, and single files elsewhere.
TOP_FILES = ("__init__.py", "plugin.py", "paths.py", "metadata.txt", "LICENSE", "README.md", "requirements.txt")
FOLDERS = ("core", "provider", "ui", "resources", "help")
EXTRA_FILES = ("scripts/export_encoder.py",)
#: Never in the ZIP, wherever they are (the plugin repository refuses .pyc, __pycache__, .git and __MACOSX).
SKIP_PARTS = ("__pycache__", "__MACOSX", ".git")
SKIP_SUFFIXES = (".pyc", ".pyo", ".aux.xml")

#: The fields plugins.qgis.org requires in metadata.txt's [general] section.
REQUIRED_METADATA = ("name", "qgisMinimumVersion", "description", "about", "version", "author", "email",
                     "repository", "tracker")
URL_FIELDS = ("repository", "tracker", "homepage")
PLACEHOLDER_URLS = ("http://bugs", "http://repo", "http://homepage")
MAX_SIZE = 25_000_000  # bytes, the plugin repository's upload limit


class PackageError(Exception):
    pass


def tracked_files(root=ROOT):
    """Paths (relative, with '/') under ``root`` that git tracks or would track (new files not yet committed,
    not those .gitignore leaves out: the ZIP is the work tree as tested); a walk of the folder where git is missing.
    """
    try:
        done = subprocess.run(["git", "-C", root, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                              capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        done = None
    if done is not None and done.returncode == 0:
        return [p for p in done.stdout.decode("utf-8").split("\0") if p]
    paths = []
    for folder, dirs, files in os.walk(root):
        top = os.path.abspath(folder) == os.path.abspath(root)  # only the folders that can hold runtime files
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in SKIP_PARTS
                         and (not top or d in FOLDERS or d in {p.split("/")[0] for p in EXTRA_FILES}))
        for name in sorted(files):
            paths.append(os.path.relpath(os.path.join(folder, name), root).replace(os.sep, "/"))
    return paths


def is_runtime_file(path):
    """Whether the plugin needs ``path`` (relative, with '/') when installed."""
    parts = path.split("/")
    if any(part.startswith(".") or part in SKIP_PARTS for part in parts) or path.endswith(SKIP_SUFFIXES):
        return False
    if len(parts) == 1:
        return path in TOP_FILES
    return parts[0] in FOLDERS or path in EXTRA_FILES


def plugin_files(root=ROOT):
    """The runtime files to package, sorted; tracked files deleted from the work tree are left out."""
    return sorted({p for p in tracked_files(root) if is_runtime_file(p) and os.path.isfile(os.path.join(root, p))})


def read_metadata(text):
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str  # keys are case-sensitive (qgisMinimumVersion)
    try:
        parser.read_string(text)
    except configparser.Error as exc:
        raise PackageError(f"metadata.txt cannot be parsed: {exc}") from exc
    if not parser.has_section("general"):
        raise PackageError("metadata.txt has no [general] section.")
    return dict(parser.items("general"))


def check_metadata(metadata, files):
    """Raise PackageError naming what the plugin repository would refuse in ``metadata`` (a dict of [general])."""
    missing = [key for key in REQUIRED_METADATA if not metadata.get(key, "").strip()]
    if missing:
        raise PackageError(f"metadata.txt lacks required field(s): {', '.join(missing)} (the QGIS plugin "
                           "repository refuses the upload; add them under [general]).")
    for key in URL_FIELDS:
        url = metadata.get(key, "").strip()
        if key == "homepage" and not url:
            continue
        parsed = urlparse(url)
        if url in PLACEHOLDER_URLS or not (parsed.scheme in ("http", "https") and parsed.netloc):
            raise PackageError(f"metadata.txt: {key}={url!r} is not a web address (http:// or https://).")
    if "/" in metadata["author"]:
        raise PackageError("metadata.txt: author cannot contain '/'.")
    if not re.match(r"^\d+(\.\d+)*$", metadata["qgisMinimumVersion"].strip()):
        raise PackageError(f"metadata.txt: qgisMinimumVersion={metadata['qgisMinimumVersion']!r} is not a version "
                           "such as 3.22.")
    if "@" not in metadata["email"]:
        raise PackageError(f"metadata.txt: email={metadata['email']!r} is not an e-mail address.")
    for key in ("experimental", "deprecated", "server"):
        if key in metadata and metadata[key].strip().lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise PackageError(f"metadata.txt: {key}={metadata[key]!r} should be True or False.")
    icon = metadata.get("icon", "").strip()
    if icon and icon.lstrip("./") not in files:
        raise PackageError(f"metadata.txt: icon={icon} is not among the packaged files.")
    for needed in ("__init__.py", "LICENSE"):
        if needed not in files:
            raise PackageError(f"{needed} is missing: the plugin repository requires it.")


def build(out=DEFAULT_OUT, root=ROOT):
    """Write the ZIP to ``out``; returns (out, number of files)."""
    files = plugin_files(root)
    if "metadata.txt" not in files:
        raise PackageError("metadata.txt is missing (or not tracked by git).")
    with open(os.path.join(root, "metadata.txt"), encoding="utf-8") as handle:
        check_metadata(read_metadata(handle.read()), files)
    out = os.path.abspath(out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = out + ".tmp"
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(zipfile.ZipInfo(FOLDER + "/", date_time=(1980, 1, 1, 0, 0, 0)), "")
        for path in files:
            archive.write(os.path.join(root, path), f"{FOLDER}/{path}")
    if os.path.getsize(tmp) > MAX_SIZE:
        size = os.path.getsize(tmp)
        os.remove(tmp)
        raise PackageError(f"The ZIP is {size / 1e6:.1f} MB; the plugin repository accepts up to {MAX_SIZE / 1e6:.0f} MB.")
    os.replace(tmp, out)
    return out, len(files)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default=DEFAULT_OUT, help="the ZIP to write (default: outputs/geocate.zip)")
    args = parser.parse_args(argv)
    try:
        out, count = build(args.out)
    except PackageError as exc:
        print(f"package: {exc}", file=sys.stderr)
        return 1
    print(f"{out}: {count} files, {os.path.getsize(out) / 1e6:.1f} MB, folder {FOLDER}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
