"""How ``fedserver run`` served an experiment, kept in its checkpoints so that a resume serves the same way.

Nodes dial the address and port a run listened on and trust its certificate; a resume that listened on
``fedserver run``'s defaults instead (127.0.0.1:50051, the default server home) waited ``--node-wait`` for
nodes that were dialling elsewhere and failed. So every checkpoint's ``experiment.json`` holds ``serving``:

    {"address": "0.0.0.0", "port": 50917, "tls": "tls", "cert": null, "key": null, "ca": null,
     "home": "/home/me/srv"}

``port`` is the port the run was bound to (the one nodes dial, also after ``--port 0``); ``cert``, ``key``
and ``ca`` are the files given with ``--cert``/``--key``/``--ca`` (absolute), null when they defaulted to
``HOME/certs``; ``home`` is the server home, absolute. The checkpoint is the user's own file: absolute
paths are what let a resume started from another folder find the same files.

A resume takes each setting from the checkpoint unless its command line gives one
(:func:`apply_serving`, which names what the command line overrides); ``$FEDSERVER_HOME`` is an explicit
choice of home like ``--home`` (``--home`` first), so it too overrides the checkpoint's home, and is named. A
checkpoint from before this key resumes with the defaults, as it did. A checkpoint moved to another machine
names a home or certificate files that are not there: :func:`missing_checkpoint_paths` says which, where
they came from and the flag that overrides, before anything is created (an empty home would have said "no
node is enrolled" about the wrong home). :func:`hint_command` is the resume command printed after a failure
or Ctrl-C: it gives the options the checkpoint on disk does not hold (a resume that overrode them and
completed no round yet), and ``--home`` unless the home is both the default one and the checkpoint's.
"""

from __future__ import annotations

import argparse
import os
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedcore.errors import CheckpointError
from fedserver.config import TLS_MODES
from fedserver.home import HOME_ENV_VAR, certs_dir, server_home

__all__ = ["DEFAULTS", "SERVING_FLAGS", "apply_serving", "check_serving_state", "hint_command",
           "missing_checkpoint_paths", "serving_state"]

#: ``fedserver run``'s serving options: state key -> (flag, default when neither given nor checkpointed).
SERVING_FLAGS: dict[str, str] = {"address": "--address", "port": "--port", "tls": "--tls", "cert": "--cert",
                                 "key": "--key", "ca": "--ca", "home": "--home"}
DEFAULTS: dict[str, Any] = {"address": "127.0.0.1", "port": 50051, "tls": "tls", "cert": None, "key": None,
                            "ca": None}
_PATHS = ("cert", "key", "ca", "home")
_HOME_FILES = {"cert": "server.crt", "key": "server.key", "ca": "ca.crt"}


def serving_state(args: argparse.Namespace, port: int) -> dict[str, Any]:
    """The ``serving`` entry of a run's checkpoints: ``args``' serving options (filled by :func:`apply_serving`)
    with ``port`` the port the server was bound to and paths made absolute."""
    state: dict[str, Any] = {"address": args.address, "port": int(port), "tls": args.tls}
    for key in ("cert", "key", "ca"):
        value = getattr(args, key)
        state[key] = None if value is None else str(Path(value).expanduser().absolute())
    state["home"] = str(server_home(getattr(args, "home", None)))
    return state


def check_serving_state(value: Any, path: Path) -> dict[str, Any] | None:
    """``value`` (the ``serving`` of ``path``) if it is a serving state (or None: a checkpoint from before it),
    else CheckpointError naming the file and the key."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: 'serving' must be a map or null, got {_short(value)}")
    missing = [key for key in SERVING_FLAGS if key not in value]
    if missing:
        raise CheckpointError(f"{path}: 'serving' lacks {missing}")
    if not isinstance(value["address"], str) or not value["address"]:
        raise CheckpointError(f"{path}: 'serving.address' must be a non-empty string, got {_short(value['address'])}")
    port = value["port"]
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise CheckpointError(f"{path}: 'serving.port' must be an int from 0 to 65535, got {_short(port)}")
    if value["tls"] not in TLS_MODES:
        raise CheckpointError(f"{path}: 'serving.tls' must be one of {', '.join(TLS_MODES)}, got {_short(value['tls'])}")
    for key in _PATHS:
        if not (value[key] is None and key != "home") and not (isinstance(value[key], str) and value[key]):
            what = "a path string" if key == "home" else "a path string or null"
            raise CheckpointError(f"{path}: 'serving.{key}' must be {what}, got {_short(value[key])}")
    return value


def apply_serving(args: argparse.Namespace, stored: Mapping[str, Any] | None) -> list[str]:
    """Fill ``args``' serving options the command line left out (None; ``--home``: absent, and no
    ``$FEDSERVER_HOME``) from ``stored`` (a resume's checkpoint), else from :data:`DEFAULTS`; return one ``--flag
    VALUE (the checkpoint's: OLD)`` per option the command line (or ``$FEDSERVER_HOME``) gives with another
    value than the checkpoint holds."""
    overridden = []
    for key, flag in SERVING_FLAGS.items():
        given = getattr(args, key, None)
        if key == "home" and given is None and os.environ.get(HOME_ENV_VAR):  # chosen like --home
            given, flag = os.environ[HOME_ENV_VAR], f"${HOME_ENV_VAR}"
        if stored is None:
            if given is None and key != "home":
                setattr(args, key, DEFAULTS[key])
            continue
        if given is None:
            if key != "home" or stored[key] is not None:
                setattr(args, key, stored[key])
            continue
        now = str(server_home(given)) if key == "home" else (
            str(Path(given).expanduser().absolute()) if key in _PATHS else given)
        if now != stored[key]:
            overridden.append(f"{flag} {_quoted(given)} (the checkpoint's: {_quoted(stored[key])})")
    return overridden


def missing_checkpoint_paths(args: argparse.Namespace, stored: Mapping[str, Any] | None) -> str | None:
    """Before :func:`apply_serving`: None, or what names the paths ``args`` would take from ``stored`` (the home
    unless ``--home``/``$FEDSERVER_HOME`` is given; cert/key/ca the TLS mode uses and the command line leaves
    out) that do not exist here, each with the flag that overrides it."""
    if stored is None:
        return None
    problems = []
    if getattr(args, "home", None) is None and not os.environ.get(HOME_ENV_VAR) and not Path(stored["home"]).exists():
        problems.append(f"the checkpoint's serving.home {stored['home']} does not exist (the run was served from "
                        "there); pass --home DIR")
    tls = args.tls if args.tls is not None else stored["tls"]
    for key in ("cert", "key", "ca"):
        used = tls == "mtls" if key == "ca" else tls != "insecure"
        if used and getattr(args, key) is None and stored[key] is not None and not Path(stored[key]).exists():
            problems.append(f"the checkpoint's serving.{key} {stored[key]} does not exist (the run was served with "
                            f"it); pass {SERVING_FLAGS[key]} FILE")
    return "; ".join(problems) or None


def hint_command(checkpoint_dir: Path, current: Mapping[str, Any] | None, saved: Mapping[str, Any] | None) -> str:
    """A ``fedserver run --resume`` command that serves as ``current`` (this run's :func:`serving_state`) when
    the checkpoint it reads holds ``saved`` (None: no serving state, so the defaults): ``--home`` whenever the
    home is not the default one or not the checkpoint's, and each option whose value the checkpoint would not
    give."""
    words = ["fedserver"]
    if current is not None and (Path(current["home"]) != server_home(None)
                                or (saved is not None and Path(saved["home"]) != Path(current["home"]))):
        words += ["--home", current["home"]]
    words += ["run", "--resume", "--checkpoint-dir", str(checkpoint_dir)]
    for key, flag in SERVING_FLAGS.items():
        if current is None or key == "home":
            continue
        would_be = saved[key] if saved is not None else DEFAULTS[key]
        value = current[key]
        if value is None and would_be is not None:  # the home's own file, which the checkpoint's path is not
            value = str(certs_dir(Path(current["home"])) / _HOME_FILES[key])
        if value != would_be:
            words += [flag, str(value)]
    return shlex.join(words)


def _quoted(value: Any) -> str:
    return shlex.quote(str(value))


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."
