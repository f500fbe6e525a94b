"""cdtester warm pytest worker (the zygote of one Python environment): imports pytest once, then
forks one child per request.

Each child is exactly a fresh ``python -m pytest ARGS`` run from its project's root (the request's
``cwd``, else this process's; cwd on ``sys.path[0]``, ``sys.argv`` as ``-m pytest`` sets it, its own
session and process group, stdin from /dev/null, stdout+stderr into one pipe), minus the
interpreter and pytest start-up. Nothing of any project is imported here (no project root is on
this process's ``sys.path``, and it never runs in one), so one worker serves every project of its
environment and every module still runs alone. Before running anything, a child applies the
request's resource limits and, when given, drops to its uid/gid (with no supplementary groups),
so it cannot signal this server or whoever started it; only then does it enter its ``cwd``.

With ``--plugins``, the environment's third-party pytest plugins (``pytest11`` entry points) are
imported here too, the way pytest imports them: through pytest's assertion-rewriting import hook,
with every module of their distributions marked for rewriting first, so a child's pytest finds
them already rewritten (no "already imported" warning, asserts rewritten as in a fresh run).
Only the entry-point modules are imported, never what their hooks import later.

Also made once here: pytest's initial configuration (its plugin manager with the default plugins
registered and their options added, which depends on nothing of a project); a child's session
starts from its own copy of it instead of making it again (see ``_prebuild``).

Protocol (one JSON object per line):
  stdin : {"id": N, "args": [...], "env": {...}, "out": PATH, "cap": BYTES,
           "rlimits": {"cpu": [SOFT, HARD], ...}, "uid": U, "gid": G,    (optional)
           "cwd": DIR, "env_clear": true}                               (optional)
          With "env_clear", ``env`` is the child's whole environment; otherwise it is added.
  stdout: {"id": N, "pid": PID}            once the child is forked
          {"id": N, "exit": CODE, "dropped": BYTES} or {"id": N, "signal": SIG, "dropped": BYTES}
The child's output goes to PATH, at most CAP bytes; "dropped" counts the rest. When stdin closes,
every child's process group is killed and the server exits.
"""

import argparse
import errno
import importlib
import json
import os
import select
import signal
import sys


def _preload():
    import pytest  # noqa: F401
    from _pytest.config import default_plugins

    for name in default_plugins:
        try:
            importlib.import_module("_pytest." + name)
        except Exception:  # a plugin that cannot import here will fail the same way in the child
            pass
    # What every pytest session imports lazily before its first test: pdb (the debugging
    # plugin's configure), readline (capture's start-up workaround), the e-mail parser
    # (distribution metadata), the codec parametrized ids are escaped with, and cdtester's
    # reporting plugin (``-p cdtester_report``; its docstring opts out of assertion rewriting, so
    # pytest neither rewrites it nor warns that it was imported first). Importing them here
    # leaves a child's ``sys.modules`` as a fresh run's is once its session has started, minus
    # their import (and, for the plugin, compile) time in every child.
    for name in ("pdb", "readline", "email.parser", "_pytest._argcomplete", "cdtester_report"):
        try:
            importlib.import_module(name)
        except Exception:
            pass
    "".encode("unicode_escape")
    # inspect.getmodule (pytest's findsource calls it for every failure it reports) maps files
    # to modules by reading the file of every module in sys.modules once and keeping the map;
    # made here, a child reads only the files of the modules it imported itself.
    import inspect

    inspect.getmodule(None, "<cdtester-zygote>")
    try:
        _share_statement_trees()
    except Exception:  # reports are then made as pytest makes them
        pass
    # Warm importlib.metadata's path caches (pytest scans every distribution for `pytest11` entry
    # points at start-up) without importing any plugin: plugins must be imported by pytest itself,
    # which marks them for assertion rewriting first.
    try:
        import importlib.metadata

        importlib.metadata.entry_points(group="pytest11")
    except Exception:
        pass


# The arguments every cdtester run starts with that pytest reads before its configuration exists
# (plugins blocked with ``-p no:NAME``); see ``_prebuild``.
_BLOCKING_ARGS = ("-p", "no:cacheprovider")
# (configuration, the plugins it blocks, the other arguments it was made with), or None.
_prebuilt = None
# What the environment's `pytest11` entry points loaded here (see `_preload_plugins`).
_entry_point_plugins = []


def _blocked(args):
    """The ``-p no:NAME`` arguments of ``args``, read as pytest's ``consider_preparse`` reads them."""
    out = []
    i = 0
    while i < len(args):
        opt = args[i]
        i += 1
        if not isinstance(opt, str):
            continue
        if opt == "-p":
            if i >= len(args):
                break
            parg = args[i]
            i += 1
        elif opt.startswith("-p"):
            parg = opt[2:]
        else:
            continue
        parg = parg.strip()
        if parg.startswith("no:"):
            out.append(parg)
    return tuple(out)


def _prebuild():
    """Makes pytest's initial configuration once, here: what ``get_config`` does at the start of
    every session (a plugin manager, the default plugins imported and registered, their options
    added), none of which depends on the project, its folder or the environment. A child whose
    pytest asks for exactly this configuration gets its own copy (see ``_adopt_prebuilt``)."""
    global _prebuilt
    from _pytest import config as pc

    # What `python -m pytest` passes on this pytest (`prog` since pytest 9.1).
    kwargs = {"prog": "python -m pytest"}
    try:
        made = pc.get_config(list(_BLOCKING_ARGS), None, **kwargs)
    except TypeError:
        kwargs = {}
        made = pc.get_config(list(_BLOCKING_ARGS), None)
    _prebuilt = (made, _blocked(_BLOCKING_ARGS), kwargs)


def _adopt_prebuilt():
    """In a child: pytest's next ``get_config`` call returns the prebuilt configuration, with the
    child's own invocation (arguments, folder), when the call asks for what it was made for;
    anything else (other blocked plugins, ``PYTEST_DEBUG`` tracing, another program name) gets a
    fresh one, as does every later call."""
    if _prebuilt is None or os.environ.get("PYTEST_DEBUG"):
        return
    import pathlib

    from _pytest import config as pc

    made, blocked, kwargs = _prebuilt
    original = pc.get_config

    def get_config(args=None, plugins=None, **kw):
        pc.get_config = original
        if plugins is not None or kw != kwargs or _blocked(list(args or ())) != blocked:
            return original(args, plugins, **kw)
        made.invocation_params = pc.Config.InvocationParams(
            args=args or (), plugins=plugins, dir=pathlib.Path.cwd()
        )
        return made

    pc.get_config = get_config


def _share_statement_trees():
    """To show a failing test's statement, pytest parses the test's whole file again for every
    failure (its cache of trees lasts one report). With this, each child keeps the tree of every
    file text it has parsed: the same text gives the same tree, so reports are unchanged; a file
    that changes gets a new tree. Skipped on a pytest without this function."""
    from _pytest._code import code, source

    original = getattr(source, "getstatementrange_ast", None)
    if original is None or getattr(code, "getstatementrange_ast", None) is not original:
        return
    trees = {}  # file text -> tree, per child (the server itself never reports a failure)

    def getstatementrange_ast(lineno, src, assertion=False, astnode=None):
        if astnode is None:
            text = str(src)
            astnode = trees.get(text)
            if astnode is None:
                found = original(lineno, src, assertion)
                trees[text] = found[0]
                return found
        return original(lineno, src, assertion, astnode)

    code.getstatementrange_ast = getstatementrange_ast
    source.getstatementrange_ast = getstatementrange_ast


def _share_fixture_scans():
    """Every session scans each registered plugin module for fixtures (the fixture manager's
    ``pytest_plugin_registered`` calls ``parsefactories``: every name of the module, unwrapping
    decorators), although the default plugins and the environment's own are the same modules in
    every child. They are scanned once here, with pytest's own code, and when a child's session
    registers a plugin module that still holds exactly the objects it held here (a conftest may
    have added or replaced some), its fixture manager registers the fixtures found here instead
    of scanning again; any other plugin (a conftest, a plugin object, a changed module) is
    handled by pytest as usual, and nothing else calls through this code. Skipped on a pytest
    without this API, and for a module whose scan warns (the warning must come from the
    session)."""
    import types
    import warnings

    from _pytest import fixtures

    manager = fixtures.FixtureManager
    scan = manager.parsefactories
    registered = manager.pytest_plugin_registered
    if not hasattr(manager, "_register_fixture"):
        return
    notset = scan.__kwdefaults__.get("holder") if scan.__kwdefaults__ else None
    if notset is None or "node" not in scan.__kwdefaults__:
        return
    # pluggy calls the hook by these argument names, and the replacement below does what this
    # pytest does for a plugin that is not a conftest (another pytest keeps its own hook).
    if registered.__code__.co_varnames[: registered.__code__.co_argcount] != ("self", "plugin", "plugin_name"):
        return
    import inspect

    try:
        if "self.parsefactories(holder=plugin, node=self.session)" not in inspect.getsource(registered):
            return
    except (OSError, TypeError):
        return

    class Recorder(manager):
        def __init__(self):  # noqa: D107 (no session: it only records what a scan finds)
            self.found = []

        def _register_fixture(self, **kwargs):
            self.found.append(kwargs)

    candidates = [p for p in _prebuilt[0].pluginmanager.get_plugins()] if _prebuilt else []
    candidates += _entry_point_plugins + [sys.modules.get("cdtester_report")]
    scans = {}  # id(module) -> (module, its namespace when scanned, what the scan registered)
    for module in candidates:
        if not isinstance(module, types.ModuleType) or id(module) in scans:
            continue
        recorder = Recorder()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            scan(recorder, holder=module, node=notset)
        if not caught:
            scans[id(module)] = (module, dict(module.__dict__), recorder.found)

    def found_here(holder):
        known = scans.get(id(holder))
        if known is None or known[0] is not holder:
            return None
        try:  # the same objects compare equal by identity; a replaced one may raise
            return known[2] if holder.__dict__ == known[1] else None
        except Exception:
            return None

    def pytest_plugin_registered(self, plugin, plugin_name):
        found = None if str(plugin_name).endswith("conftest.py") else found_here(plugin)
        if found is None:
            return registered(self, plugin, plugin_name)
        # What pytest does for a plugin that is not a conftest: its fixtures are global.
        for kwargs in found:
            self._register_fixture(**{**kwargs, "node": self.session})
        return None

    manager.pytest_plugin_registered = pytest_plugin_registered


def _preload_plugins():
    """Imports the ``pytest11`` entry points under pytest's rewrite hook, then removes the hook."""
    import importlib.metadata

    from _pytest.config import get_config

    config = get_config()
    # What `_consider_importhook` reads of the command line: the default `--assert=rewrite`.
    config.known_args_namespace = argparse.Namespace(assertmode="rewrite")
    config._consider_importhook()
    hook = getattr(config.pluginmanager, "rewrite_hook", None)
    try:
        for ep in importlib.metadata.entry_points(group="pytest11"):
            try:
                _entry_point_plugins.append(ep.load())
            except Exception:  # it fails the same way in the child, where pytest reports it
                pass
    finally:
        if hook is not None and hook in sys.meta_path:
            sys.meta_path.remove(hook)


def _confine(req):
    """Resource limits, then the unprivileged uid/gid when the request names one."""
    import resource

    for name, (soft, hard) in (req.get("rlimits") or {}).items():
        resource.setrlimit(getattr(resource, "RLIMIT_" + name.upper()), (soft, hard))
    if req.get("uid") is not None:
        gid = req["gid"]
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(req["uid"], req["uid"], req["uid"])


def _child(req, out_w, close_fds, ready_w):
    try:
        os.setsid()
        os.close(ready_w)  # tells the server the child leads its own process group
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for fd in close_fds:
            os.close(fd)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        os.dup2(out_w, 1)
        os.dup2(out_w, 2)
        os.close(out_w)
        if req.get("env_clear"):
            os.environ.clear()
        os.environ.update(req.get("env") or {})
        if "tempfile" in sys.modules:
            sys.modules["tempfile"].tempdir = None  # TMPDIR is the request's
        _confine(req)
        if req.get("cwd") is not None:
            os.chdir(req["cwd"])
        # `python -m` puts the working directory first on sys.path.
        sys.path[0] = os.getcwd()
        import random

        random.seed()
        _adopt_prebuilt()
        import runpy

        # What `python -m pytest ARGS` does: argv[0] and __main__ are pytest's __main__.py.
        sys.argv = ["-m"] + list(req["args"])
        code = 0
        try:
            runpy.run_module("pytest", run_name="__main__", alter_sys=True)
        except SystemExit as e:
            code = e.code
        if code is None:
            code = 0
        elif not isinstance(code, int):
            print(code, file=sys.stderr)
            code = 1
        import atexit

        atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)
    except BaseException:
        import traceback

        traceback.print_exc()
        os._exit(70)


class Server:
    def __init__(self):
        self.children = {}  # pid -> state
        self.by_fd = {}  # output pipe fd -> pid
        self.inbuf = b""
        self.wake_r, wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(wake_w, False)
        self.wake_w = wake_w
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.set_wakeup_fd(wake_w)

    def send(self, obj):
        data = (json.dumps(obj) + "\n").encode()
        while data:
            data = data[os.write(1, data):]

    def spawn(self, req):
        out_r, out_w = os.pipe()
        ready_r, ready_w = os.pipe()
        close = [0, self.wake_r, self.wake_w, out_r, ready_r]
        for st in self.children.values():
            close.append(st["fd"])
            if st["out"] is not None:
                close.append(st["out"].fileno())
        pid = os.fork()
        if pid == 0:
            _child(req, out_w, close, ready_w)
        os.close(ready_w)
        # Wait until the child has its own session, so its group exists before anyone can be
        # asked to kill it (end of file: setsid done, or the child is already gone).
        os.read(ready_r, 1)
        os.close(ready_r)
        os.close(out_w)
        os.set_blocking(out_r, False)
        try:
            out = open(req["out"], "wb")
        except OSError:
            out = None
        self.children[pid] = {"id": req["id"], "fd": out_r, "out": out, "cap": int(req.get("cap", 0)),
                              "written": 0, "dropped": 0, "eof": False}
        self.by_fd[out_r] = pid
        self.send({"id": req["id"], "pid": pid})

    def pump(self, pid):
        """Moves what the child's pipe holds into its capped file; False at end of file."""
        st = self.children[pid]
        while True:
            try:
                data = os.read(st["fd"], 65536)
            except BlockingIOError:
                return True
            except OSError:
                return False
            if not data:
                return False
            room = max(0, st["cap"] - st["written"])
            keep = data[:room]
            if keep and st["out"] is not None:
                st["out"].write(keep)
            st["written"] += len(keep)
            st["dropped"] += len(data) - len(keep)

    def finish(self, pid, status):
        st = self.children[pid]
        if not st["eof"]:
            self.pump(pid)
        del self.children[pid]
        self.by_fd.pop(st["fd"], None)
        os.close(st["fd"])
        if st["out"] is not None:
            st["out"].close()
        msg = {"id": st["id"], "dropped": st["dropped"]}
        if os.WIFSIGNALED(status):
            msg["signal"] = os.WTERMSIG(status)
        else:
            msg["exit"] = os.waitstatus_to_exitcode(status)
        self.send(msg)

    def reap(self):
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid in self.children:
                self.finish(pid, status)

    def shutdown(self):
        for pid in list(self.children):
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass
        sys.exit(0)

    def serve(self):
        while True:
            try:
                ready, _, _ = select.select([0, self.wake_r] + list(self.by_fd), [], [])
            except InterruptedError:
                continue
            for fd in ready:
                if fd == 0:
                    data = os.read(0, 65536)
                    if not data:
                        self.shutdown()
                    self.inbuf += data
                    while b"\n" in self.inbuf:
                        line, self.inbuf = self.inbuf.split(b"\n", 1)
                        if line.strip():
                            self.spawn(json.loads(line))
                elif fd == self.wake_r:
                    try:
                        while os.read(self.wake_r, 4096):
                            pass
                    except BlockingIOError:
                        pass
                elif fd in self.by_fd:
                    pid = self.by_fd[fd]
                    if not self.pump(pid):
                        # End of output: the child is exiting; stop selecting on the pipe.
                        self.by_fd.pop(fd)
                        self.children[pid]["eof"] = True
            self.reap()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--plugins", action="store_true")
    _preload()
    if parser.parse_args().plugins:
        _preload_plugins()
    try:
        _prebuild()
    except Exception:  # every child then makes its own, as a fresh run does
        pass
    try:
        _share_fixture_scans()
    except Exception:  # every session then scans every plugin, as a fresh run does
        pass
    # Everything imported so far lives as long as the server: keep it out of the children's
    # garbage collections (pytest collects several times per session) and off their copied pages.
    import gc

    gc.collect()
    gc.freeze()
    Server().serve()


if __name__ == "__main__":
    try:
        main()
    except OSError as e:
        if e.errno != errno.EPIPE:
            raise
