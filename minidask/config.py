"""Configuration: one nested mapping of settings that every part reads.

The scheduler, workers, nannies, comms and clusters never hard-code a
timeout or a limit; they call ``get("comm.timeouts.connect")`` and friends.
This module builds that mapping once at import, from four layers, each
overriding the one before:

1. the package defaults in ``minidask/minidask.yaml``, which list and
   document every key;
2. YAML files: every ``*.yaml``/``*.yml`` in ``/etc/minidask``,
   ``{sys.prefix}/etc/minidask``, ``~/.config/minidask``, then the folder
   (or single file) named by ``$MINIDASK_CONFIG``; files are read in name
   order within a folder and nested mappings are merged, not replaced;
3. environment variables: ``MINIDASK_A__B=value`` sets ``a.b``, with the
   value read as a Python literal where it is one (``5``, ``None``,
   ``[1, 2]``) and kept as a string otherwise (``10s``);
4. calls to ``set()``, as a plain call or as a context manager.

Keys treat ``-`` and ``_`` as the same character; the stored form uses
``-`` (``allowed_failures`` and ``allowed-failures`` are one key).

The configuration is global to the process: a ``set()`` context manager
in one thread changes what every thread sees until it exits. The lock
only keeps each read and write whole.

Where minidask differs from dask: ``set({"comm": {"timeouts": {...}}})``
merges the nested mapping into the existing one instead of replacing the
whole ``comm`` section, so keys it does not mention keep their values.
"""

import ast
import copy
import difflib
import logging
import os
import sys
import threading

import yaml

logger = logging.getLogger(__name__)

DEFAULTS_FILE = os.path.join(os.path.dirname(__file__), "minidask.yaml")
ENV_PREFIX = "MINIDASK_"
PATH_VARIABLE = "MINIDASK_CONFIG"

# Held by every read and write of `config`. Re-entrant because copying a
# value under it may run a user's __deepcopy__, which may read the config.
_lock = threading.RLock()

# Marks "no value here": None is a legitimate configuration value.
_MISSING = object()

config = {}


class ConfigError(ValueError):
    """A configuration file could not be read as a mapping of settings."""


class ConfigKeyError(KeyError):
    """A key asked of ``get()`` is not in the configuration."""

    def __str__(self):
        # KeyError would show the message in quotes, as if it were a key.
        return str(self.args[0])


# Keys and mappings


def canonical_key(key):
    """Return ``key`` with every ``_`` written as ``-``."""
    return key.replace("_", "-") if isinstance(key, str) else key


def _key_parts(key):
    """Split a dotted key into its canonical parts."""
    if not isinstance(key, str) or not key:
        raise TypeError(f"config keys are non-empty strings, got {key!r}")
    return [canonical_key(part) for part in key.split(".")]


def _normalize(mapping):
    """Copy ``mapping`` with canonical keys at every level."""
    result = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            value = _normalize(value)
        result[canonical_key(key)] = value
    return result


def merge(base, update):
    """Deep-merge ``update`` into ``base`` in place and return ``base``.

    Nested mappings are merged key by key; any other value in ``update``
    replaces the one in ``base``.
    """
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


def _lookup(mapping, parts):
    """Return the value at ``parts`` in nested ``mapping``, or _MISSING."""
    node = mapping
    for part in parts:
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _assign(mapping, parts, value):
    """Store ``value`` at ``parts``, making (or replacing) parent mappings."""
    node = mapping
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def _remove(mapping, parts, created):
    """Delete the key at ``parts``, then the sections it leaves empty.

    Only sections from depth ``created`` down are removed: those were
    made to hold the key. One that another caller has since put a key in
    is no longer empty, and stays.
    """
    for end in range(len(parts), created, -1):
        parent = _lookup(mapping, parts[:end - 1])
        if not isinstance(parent, dict):
            return
        child = parent.get(parts[end - 1], _MISSING)
        is_leaf = end == len(parts)
        if not is_leaf and not (isinstance(child, dict) and not child):
            return
        parent.pop(parts[end - 1], None)


def _flat_keys(mapping, prefix=""):
    """List every dotted key in ``mapping``, sections as well as leaves."""
    keys = []
    for key, value in mapping.items():
        dotted = f"{prefix}{key}"
        keys.append(dotted)
        if isinstance(value, dict):
            keys.extend(_flat_keys(value, dotted + "."))
    return keys


# Reading files


def search_paths():
    """Return the folders (and files) read for configuration, in order."""
    paths = [
        "/etc/minidask",
        os.path.join(sys.prefix, "etc", "minidask"),
        os.path.join(os.path.expanduser("~"), ".config", "minidask"),
    ]
    if os.environ.get(PATH_VARIABLE):
        paths.append(os.environ[PATH_VARIABLE])
    # sys.prefix may be "/", naming /etc/minidask twice.
    return list(dict.fromkeys(paths))


def _files_in(path):
    """Return the YAML files that ``path`` names: itself, or its contents."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        if path == os.environ.get(PATH_VARIABLE):
            logger.warning(
                "%s=%r is neither a file nor a folder; ignoring it",
                PATH_VARIABLE, path,
            )
        return []
    names = sorted(os.listdir(path))
    files = [os.path.join(path, name) for name in names
             if name.endswith((".yaml", ".yml"))]
    return [file for file in files if os.path.isfile(file)]


def read_file(path):
    """Read one YAML file as a mapping with canonical keys.

    Raises ConfigError naming the file (and the line, for YAML syntax
    errors) when it cannot be read or does not hold a mapping.
    """
    try:
        with open(path, encoding="utf-8") as file:
            data = yaml.safe_load(file)
    except yaml.YAMLError as exc:
        raise ConfigError(_yaml_error_message(path, exc)) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"cannot read configuration file {path}: {exc}; "
            f"fix its permissions or encoding, or remove it"
        ) from exc

    if data is None:  # an empty file, or one holding only comments
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"configuration file {path} holds a {type(data).__name__}, "
            f"not a mapping of settings; write it as 'key: value' lines "
            f"(such as 'scheduler: {{allowed-failures: 5}}') or remove it"
        )
    logger.debug("read configuration file %s", path)
    return _normalize(data)


def _yaml_error_message(path, exc):
    """Describe a YAML syntax error with its file and line."""
    mark = getattr(exc, "problem_mark", None)
    where = f"{path}, line {mark.line + 1}" if mark is not None else path
    problem = getattr(exc, "problem", None) or str(exc)
    return (
        f"configuration file {where} is not valid YAML ({problem}); "
        f"fix the file or remove it"
    )


def collect_files(paths=None):
    """Read and deep-merge the YAML files under ``paths``, later winning."""
    result = {}
    for path in search_paths() if paths is None else paths:
        for file in _files_in(path):
            merge(result, read_file(file))
    return result


# Reading the environment


def parse_env_value(text):
    """Read ``text`` as a Python literal, or keep it as a string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text


def collect_env(environ=None):
    """Build a nested mapping from ``MINIDASK_A__B=value`` variables."""
    environ = os.environ if environ is None else environ
    result = {}
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or name == PATH_VARIABLE:
            continue
        parts = name[len(ENV_PREFIX):].lower().split("__")
        if not all(parts):
            logger.warning(
                "ignoring environment variable %s: write keys as "
                "MINIDASK_SECTION__KEY, with no empty parts", name,
            )
            continue
        parts = [canonical_key(part) for part in parts]
        _assign(result, parts, parse_env_value(environ[name]))
    return result


# The public API


def refresh():
    """Rebuild ``config`` from the package defaults, files and environment.

    Values given to ``set()`` are dropped, as in dask: afterwards the
    configuration is what a fresh import would see. The ``config`` dict
    keeps its identity, so references to it stay valid.
    """
    fresh = read_file(DEFAULTS_FILE)
    merge(fresh, collect_files())
    merge(fresh, collect_env())
    with _lock:
        config.clear()
        config.update(fresh)


def get(key, default=_MISSING):
    """Return the value of a dotted key, such as ``"comm.timeouts.connect"``.

    Without a ``default``, a missing key raises ConfigKeyError (a KeyError)
    that suggests the closest existing keys. The value is a copy: changing
    it does not change the configuration.
    """
    parts = _key_parts(key)
    with _lock:
        value = _lookup(config, parts)
        if value is _MISSING:
            if default is not _MISSING:
                return default
            raise ConfigKeyError(_missing_key_message(".".join(parts)))
        return copy.deepcopy(value)


def source(key):
    """Say where the current value of ``key`` was set, for messages.

    Returns ``"config.set"``, ``"environment variable MINIDASK_..."``,
    ``"config file PATH"``, ``"the package defaults"``, or None when the
    key has no value. The layers are read again from the disk and the
    environment and compared with the value in use, highest layer first;
    a ``config.set`` of the very value a file holds is reported as the
    file, which is where a user would go to change it.
    """
    parts = _key_parts(key)
    current = get(key, _MISSING)
    if current is _MISSING or current is None:
        return None
    for where, value in reversed(_layers(parts)):
        if value == current:
            return where
    return "config.set"


def _layers(parts):
    """List (where, value) for each layer that sets ``parts``, lowest first."""
    found = []
    defaults = _lookup(read_file(DEFAULTS_FILE), parts)
    if defaults is not _MISSING:
        found.append(("the package defaults", defaults))
    for path in search_paths():
        for file in _files_in(path):
            try:
                value = _lookup(read_file(file), parts)
            except ConfigError:
                continue  # refresh() reports a broken file; not our job
            if value is not _MISSING:
                found.append((f"config file {file}", value))
    for name in sorted(os.environ):
        if not name.startswith(ENV_PREFIX) or name == PATH_VARIABLE:
            continue
        names = name[len(ENV_PREFIX):].lower().split("__")
        if [canonical_key(n) for n in names] == parts:
            found.append((f"environment variable {name}",
                          parse_env_value(os.environ[name])))
    return found


def _missing_key_message(key):
    """Explain that ``key`` is missing and suggest the nearest keys."""
    matches = difflib.get_close_matches(key, _flat_keys(config))
    close = [repr(match) for match in matches]
    if len(close) > 1:
        close[-2:] = [f"{close[-2]} or {close[-1]}"]
    hint = f"; did you mean {', '.join(close)}?" if close else "."
    return (
        f"no configuration key {key!r}{hint} Every key is listed in "
        f"{DEFAULTS_FILE}; pass a default to get() to allow a missing key"
    )


def _flatten_updates(mapping, prefix=()):
    """Turn a (possibly nested) mapping into (key parts, value) pairs.

    Dotted keys are split; non-empty nested mappings are walked into so
    that their leaves are merged rather than whole sections replaced.
    """
    pairs = []
    for key, value in mapping.items():
        parts = prefix + tuple(_key_parts(key))
        if isinstance(value, dict) and value:
            pairs.extend(_flatten_updates(value, parts))
        else:
            pairs.append((parts, value))
    return pairs


# Named as in dask, though the name hides the builtin set in this module.
class set:
    """Set configuration values, for good or for a ``with`` block.

    ``set({"scheduler.allowed-failures": 5})`` and
    ``set(scheduler__allowed_failures=5)`` are the same: in keyword
    arguments ``__`` stands for the dot. Used as a context manager, the
    previous values (or their absence) come back on exit::

        with config.set({"comm.timeouts.connect": "2s"}):
            ...
    """

    def __init__(self, mapping=None, **kwargs):
        updates = _flatten_updates(mapping or {})
        updates += _flatten_updates(
            {key.replace("__", "."): value for key, value in kwargs.items()}
        )
        # Each entry is (key parts, previous value or _MISSING, depth of
        # the first section this call had to create).
        self._undo = []
        with _lock:
            for parts, value in updates:
                self._undo.append(self._remember(parts))
                # A copy, so that changing the caller's list later does
                # not change the configuration behind set()'s back.
                _assign(config, list(parts), copy.deepcopy(value))

    @staticmethod
    def _remember(parts):
        """Return what restore() needs to undo setting ``parts``."""
        node = config
        for depth, part in enumerate(parts[:-1]):
            if part not in node:
                return parts, _MISSING, depth
            if not isinstance(node[part], dict):
                # A leaf in the way is replaced by a section: keep it.
                return parts[:depth + 1], copy.deepcopy(node[part]), depth
            node = node[part]
        if parts[-1] not in node:
            return parts, _MISSING, len(parts) - 1
        return parts, copy.deepcopy(node[parts[-1]]), len(parts) - 1

    def restore(self):
        """Put back the values that were there before this call."""
        with _lock:
            # Newest first, so overlapping keys unwind in order.
            for parts, previous, created in reversed(self._undo):
                if previous is _MISSING:
                    _remove(config, parts, created)
                else:
                    _assign(config, list(parts), previous)
            self._undo = []

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.restore()


refresh()
