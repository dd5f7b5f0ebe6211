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

The other server options ``fedserver run`` takes (limits, chunk sizes, windows, waits: :data:`OPTION_FIELDS`)
live in ``serving.options``, by their :class:`~fedserver.config.ServerConfig` field names, as JSON values::

    "options": {"max_payload_size": 1048576, "max_poll_wait_seconds": 2.0, "receive_window_bytes": null}

Only the options the run's command line chose are kept (given, or remembered by a resume), so an option left
to its default takes the default of the fedserver that resumes. :func:`apply_server_options` applies them on
a resume unless the command line gives the option again (it wins, and is named). Not given is told from given
as for the serving options: ``fedserver run``'s parser defaults them to None; the two options whose value may
itself be None (``--reconnect-grace none``, ``--receive-window bdp``) keep that word (:data:`NONE_WORDS`)
until :func:`apply_serving` fills the defaults. A checkpoint without ``options`` resumes with the defaults, as
before; a key this fedserver does not know (written by a newer one) is reported and ignored (no flag could
override it, so refusing would leave the run unresumable); a known key with a bad value is a CheckpointError.

:func:`server_from_args` is how ``fedserver run`` builds its server from those options (the certificates
default to ``HOME/certs``, the node store is ``HOME/nodes.db``). An ``Experiment`` given neither ``server=`` nor
``server_config=`` serves the same way through :func:`run_serving`: as ``fedserver run`` with no serving
option, or, resumed, as ``fedserver run --resume`` with none (the checkpoint's ``serving``, ``$FEDSERVER_HOME``
overriding its home), refused with an ExperimentError naming what is missing and the ways out. A port in use is
refused naming ``server_config=ServerConfig(port=...)``, the Experiment's way to another port
(:meth:`RunServing.bind_refused`; the server's own text says to choose one, as ``fedserver run --port`` can).
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from fedcore.errors import CheckpointError, ExperimentError, ServerConfigError
from fedcore.wire.flow_control import AUTO_WINDOW, MIN_RECEIVE_WINDOW, valid_receive_window
from fedserver.auth import NodeStore
from fedserver.cli_serve import config_from_args
from fedserver.config import TLS_MODES, ServerConfig
from fedserver.home import HOME_ENV_VAR, certs_dir, home_from_args, nodes_db, server_home

__all__ = ["DEFAULTS", "NONE_WORDS", "OPTION_FIELDS", "SERVING_FLAGS", "RememberedOptions", "RunServing",
           "apply_server_options", "apply_serving", "check_serving_state", "enrolled_node_store", "hint_command",
           "missing_checkpoint_paths", "none_as_word", "run_serving", "server_from_args", "serving_state"]

#: ``fedserver run``'s serving options: state key -> (flag, default when neither given nor checkpointed).
SERVING_FLAGS: dict[str, str] = {"address": "--address", "port": "--port", "tls": "--tls", "cert": "--cert",
                                 "key": "--key", "ca": "--ca", "home": "--home"}
DEFAULTS: dict[str, Any] = {"address": "127.0.0.1", "port": 50051, "tls": "tls", "cert": None, "key": None,
                            "ca": None}
_PATHS = ("cert", "key", "ca", "home")
_HOME_FILES = {"cert": "server.crt", "key": "server.key", "ca": "ca.crt"}

#: ``fedserver run``'s other server options (``fedserver.cli_serve.add_server_options``): args dest -> the
#: ServerConfig field ``config_from_args`` gives it, the name ``serving.options`` keeps it by.
OPTION_FIELDS: dict[str, str] = {
    "max_payload_size": "max_payload_size", "max_chunk_size": "max_chunk_size", "chunk_size": "chunk_size",
    "max_concurrent_uploads": "max_concurrent_uploads", "max_upload_buffer": "max_upload_buffer_bytes",
    "receive_window": "receive_window_bytes", "upload_line_wait": "upload_line_wait_seconds",
    "upload_place_kept": "upload_place_kept_seconds", "max_poll_wait": "max_poll_wait_seconds",
    "reconnect_grace": "reconnect_grace_seconds"}
#: The options whose value may be None, as the word that gives it on the command line (args dest -> word).
NONE_WORDS: dict[str, str] = {"reconnect_grace": "none", "receive_window": "bdp"}
_FIELD_DESTS = {name: dest for dest, name in OPTION_FIELDS.items()}
_FIELD_DEFAULTS = {f.name: f.default for f in fields(ServerConfig) if f.name in _FIELD_DESTS}


def _positive_int(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and value > 0


def _seconds(value: Any, *, zero_ok: bool = False) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an int no float holds (a hand-edited checkpoint): no number of seconds
        return False
    return finite and (value >= 0 if zero_ok else value > 0)


#: What each option's stored value must be: (test, what it is for the message).
_VALID: dict[str, tuple[Callable[[Any], bool], str]] = {
    **{name: (_positive_int, "an int > 0") for name in ("max_payload_size", "max_chunk_size", "chunk_size",
                                                         "max_concurrent_uploads", "max_upload_buffer_bytes")},
    **{name: (_seconds, "a finite number of seconds > 0") for name in (
        "upload_line_wait_seconds", "upload_place_kept_seconds", "max_poll_wait_seconds")},
    "receive_window_bytes": (valid_receive_window, f"'{AUTO_WINDOW}', null (BDP probing) or an int >= {MIN_RECEIVE_WINDOW}"),
    "reconnect_grace_seconds": (lambda v: v is None or _seconds(v, zero_ok=True),
                                "null or a finite number of seconds >= 0"),
}


def none_as_word(parse: Callable[[str], Any], word: str) -> Callable[[str], Any]:
    """``parse`` (an argparse type) returning ``word`` where it returns None: ``fedserver run``'s parser keeps
    None for "not given", so ``--reconnect-grace none`` must stay apart from an omitted ``--reconnect-grace``."""
    def parse_keeping_word(text: str) -> Any:
        value = parse(text)
        return word if value is None else value
    parse_keeping_word.__name__ = getattr(parse, "__name__", "value")  # argparse names it in 'invalid ... value'
    return parse_keeping_word


@dataclass
class RememberedOptions:
    """What :func:`apply_server_options` did with a checkpoint's ``serving.options``: ``applied`` and
    ``overridden`` (``--flag VALUE (the checkpoint's: OLD)``) as command-line text, ``unknown`` the keys this
    fedserver does not know (ignored)."""

    applied: list[str] = field(default_factory=list)
    overridden: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)

    def line(self) -> str | None:
        """One stderr line naming what was applied and overridden, or None when nothing was remembered."""
        parts = ([f"applied {', '.join(self.applied)}"] if self.applied else []) + (
            [f"overridden by the command line: {', '.join(self.overridden)}"] if self.overridden else [])
        return f"fedserver: the checkpoint's server options: {'; '.join(parts)}" if parts else None


def serving_state(args: argparse.Namespace, port: int) -> dict[str, Any]:
    """The ``serving`` entry of a run's checkpoints: ``args``' serving options (filled by :func:`apply_serving`)
    with ``port`` the port the server was bound to and paths made absolute, and ``options`` the other server
    options the command line chose (recorded by :func:`apply_serving`)."""
    state: dict[str, Any] = {"address": args.address, "port": int(port), "tls": args.tls}
    for key in ("cert", "key", "ca"):
        value = getattr(args, key)
        state[key] = None if value is None else str(Path(value).expanduser().absolute())
    state["home"] = str(server_home(getattr(args, "home", None)))
    state["options"] = dict(getattr(args, "server_options", {}))
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
    _check_options(value.get("options", {}), path)
    return value


def _check_options(options: Any, path: Path) -> None:
    """CheckpointError unless ``options`` (``serving.options``) maps known fields to values ServerConfig takes
    (each, then together: e.g. chunk_size within max_chunk_size). Unknown keys pass (reported on use)."""
    if not isinstance(options, dict):
        raise CheckpointError(f"{path}: 'serving.options' must be a map, got {_short(options)}")
    known = {name: value for name, value in options.items() if name in _VALID}
    for name, value in known.items():
        valid, what = _VALID[name]
        if not valid(value):
            raise CheckpointError(f"{path}: 'serving.options.{name}' must be {what}, got {_short(value)}")
    try:
        ServerConfig(tls="insecure", **known)
    except ServerConfigError as exc:
        raise CheckpointError(f"{path}: 'serving.options': {exc}") from None


def apply_serving(args: argparse.Namespace, stored: Mapping[str, Any] | None) -> list[str]:
    """Fill ``args``' serving options the command line left out (None; ``--home``: absent, and no
    ``$FEDSERVER_HOME``) from ``stored`` (a resume's checkpoint), else from :data:`DEFAULTS`; return one ``--flag
    VALUE (the checkpoint's: OLD)`` per option the command line (or ``$FEDSERVER_HOME``) gives with another
    value than the checkpoint holds. The other server options (:data:`OPTION_FIELDS`; on a resume
    :func:`apply_server_options` first) are recorded as chosen when set (``args.server_options``, for
    :func:`serving_state`), then the rest get ServerConfig's defaults and the words of :data:`NONE_WORDS` None."""
    _fill_server_options(args)
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


def apply_server_options(args: argparse.Namespace, stored: Mapping[str, Any] | None) -> RememberedOptions:
    """Before :func:`apply_serving` on a resume: set ``args``' server options the command line left out (None)
    to ``stored``'s (a checked serving state; None or without ``options``: nothing is remembered) and say what
    was applied, what the command line overrides and which stored keys this fedserver does not know."""
    report = RememberedOptions()
    options = (stored or {}).get("options") or {}
    for name, value in options.items():
        dest = _FIELD_DESTS.get(name)
        if dest is None:
            report.unknown.append(name)
            continue
        flag = f"--{dest.replace('_', '-')}"
        given = getattr(args, dest, None)
        if given is None:
            setattr(args, dest, NONE_WORDS[dest] if value is None else value)
            report.applied.append(f"{flag} {_option_text(dest, value)}")
        elif _stored_value(dest, given) != value:
            report.overridden.append(f"{flag} {_option_text(dest, _stored_value(dest, given))} "
                                     f"(the checkpoint's: {_option_text(dest, value)})")
    return report


def _fill_server_options(args: argparse.Namespace) -> None:
    """Record the server options ``args`` holds (given or remembered) as ``args.server_options`` (field ->
    JSON value), then give the others ServerConfig's defaults and turn :data:`NONE_WORDS` into None."""
    chosen = {}
    for dest, name in OPTION_FIELDS.items():
        value = getattr(args, dest, None)
        if value is None:
            setattr(args, dest, _FIELD_DEFAULTS[name])
            continue
        chosen[name] = _stored_value(dest, value)
        if dest in NONE_WORDS and value == NONE_WORDS[dest]:
            setattr(args, dest, None)
    args.server_options = chosen


def _stored_value(dest: str, value: Any) -> Any:
    """The JSON value of option ``dest`` as ``args`` holds it (the word of :data:`NONE_WORDS` is None)."""
    return None if dest in NONE_WORDS and value == NONE_WORDS[dest] else value


def _option_text(dest: str, value: Any) -> str:
    """A stored value as the command line gives it (None: its word)."""
    return NONE_WORDS[dest] if value is None else str(value)


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
    home is not the default one or not the checkpoint's, and each option (serving or ``options``) whose value
    the checkpoint would not give."""
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
    if current is not None:  # options this run used that a resume of ``saved`` would not take from it
        now, then = current.get("options") or {}, (saved or {}).get("options") or {}
        for dest, name in OPTION_FIELDS.items():
            value = now.get(name, _FIELD_DEFAULTS[name])
            if value != then.get(name, _FIELD_DEFAULTS[name]):
                words += [f"--{dest.replace('_', '-')}", _option_text(dest, value)]
    return shlex.join(words)


def enrolled_node_store(config: ServerConfig, path: Path) -> NodeStore:
    """The node store at ``path``; in the token modes ServerConfigError unless a node is enrolled there (none
    could connect)."""
    store = NodeStore(path)
    if config.tls != "mtls" and not store.list():
        raise ServerConfigError("no node is enrolled, so no node could connect: run `fedserver nodes enroll ID`")
    return store


def server_from_args(args: argparse.Namespace) -> tuple[ServerConfig, NodeStore]:
    """``fedserver run``'s server from its options once :func:`apply_serving` filled them: the ServerConfig of
    ``fedserver serve`` (certificates default to ``HOME/certs``) and the home's node store (ServerConfigError:
    a certificate is missing, or no node is enrolled in a token mode)."""
    config = config_from_args(args)
    return config, enrolled_node_store(config, nodes_db(home_from_args(args)))


@dataclass
class RunServing:
    """How an Experiment without ``server=`` or ``server_config=`` serves (:func:`run_serving`): ``args`` as
    ``fedserver run``'s would be (for :func:`serving_state` once bound), the server's ``config`` and
    ``node_store``, ``notes``: what to log (options applied or overridden from the stored serving), and
    ``where``: how and where it serves, as its errors say."""

    args: argparse.Namespace
    config: ServerConfig
    node_store: NodeStore
    notes: list[str] = field(default_factory=list)
    where: str = ""

    def bind_refused(self) -> ExperimentError:
        """What to raise when FedServer.start could not bind (a ServerStateError). The server's text says
        to choose another port, which ``fedserver run`` does with --port; an Experiment has no port option,
        so this names the way it has: a ``server_config`` with another port (and this node store)."""
        cfg = self.config
        given = [f"address={cfg.address!r}"] if cfg.address != DEFAULTS["address"] else []
        given += [f"tls={cfg.tls!r}"] if cfg.tls != "tls" else []
        given += [f"{name}={str(value)!r}" for name, value in (("cert_file", cfg.cert_file),
                                                               ("key_file", cfg.key_file),
                                                               ("ca_file", cfg.ca_file)) if value is not None]
        tls_files = (f"; else check that the address is local and that key_file {cfg.key_file} is the key of "
                     f"cert_file {cfg.cert_file}") if cfg.tls != "insecure" else ""
        return ExperimentError(
            f"Experiment without server= or server_config= serves {self.where}, but could not bind {cfg.target}: "
            "is another server (an earlier fedserver run or Experiment?) using the port? Stop it, or serve on "
            f"another port: pass server_config=ServerConfig(port=..., {', '.join(given)}) and "
            f"node_store=NodeStore({str(self.node_store.path)!r}){tls_files}")


def run_serving(stored: Mapping[str, Any] | None, node_store: NodeStore | None = None) -> RunServing:
    """Serve as ``fedserver run`` with no serving option would (``stored`` None: 127.0.0.1:50051, TLS, the home
    ``$FEDSERVER_HOME`` or ``./fedserver-home``), or as ``fedserver run --resume`` with none would for a
    checkpoint holding ``stored`` (a checked serving state): the same functions fill the same options.
    ``node_store`` replaces the home's. ExperimentError, before anything is bound or created, names what is
    missing (the checkpoint's home or files, a certificate, an enrolled node) and the ways out."""
    args = argparse.Namespace(**{key: None for key in SERVING_FLAGS if key != "home"},
                              **dict.fromkeys(OPTION_FIELDS))
    what = ("as the checkpoint's run did (its serving)" if stored is not None
            else "as `fedserver run` does with no server option")
    missing = missing_checkpoint_paths(args, stored)
    if missing:
        raise ExperimentError(f"Experiment without server= or server_config= serves {what}, but {missing} "
                              f"(from Python: ${HOME_ENV_VAR}=DIR for --home); or pass "
                              "server_config=ServerConfig(...) and node_store=NodeStore(...)")
    remembered = apply_server_options(args, stored)
    overridden = apply_serving(args, stored)
    notes = [line for line in (remembered.line(),) if line]
    if remembered.unknown:
        notes.append(f"serving.options {remembered.unknown} are not server options of this fedserver: ignored")
    if overridden:
        notes.append(f"serving as the checkpoint's run did, except: {'; '.join(overridden)}")
    home = home_from_args(args)
    from_checkpoint = stored is not None and not os.environ.get(HOME_ENV_VAR)
    origin = ("the checkpoint's serving.home" if from_checkpoint else f"${HOME_ENV_VAR}"
              if os.environ.get(HOME_ENV_VAR) else f"the default home: ${HOME_ENV_VAR} is unset")
    fedserver = f"fedserver --home {_quoted(home)}" if from_checkpoint else "fedserver"
    where = f"{what}: on {args.address}:{args.port} ({args.tls}) from the server home {home} ({origin})"
    try:
        config = config_from_args(args)
    except ServerConfigError as exc:
        raise ExperimentError(
            f"Experiment without server= or server_config= serves {where}, but {exc}: create the certificates "
            f"there (`{fedserver} certs init`, then `{fedserver} certs server`), or pass "
            "server_config=ServerConfig(...) and node_store=NodeStore(...)") from None
    if node_store is not None:
        return RunServing(args, config, node_store, notes, where)
    try:
        store = enrolled_node_store(config, nodes_db(home))
    except ServerConfigError:
        raise ExperimentError(
            f"Experiment without server= or server_config= serves {where}, but no node is enrolled in "
            f"{nodes_db(home)}, so no node could connect: run `{fedserver} nodes enroll ID`, or pass "
            "node_store=NodeStore(...)") from None
    return RunServing(args, config, store, notes, where)


def _quoted(value: Any) -> str:
    return shlex.quote(str(value))


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."
