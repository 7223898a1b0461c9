"""Load and validate a user's handler script.

The script is a plain Python file given by path.  It is compiled from its
source text (never from a cached ``.pyc``: a script rewritten within the same
second must reload as written), executed once as a module under a private
name (and known by its file's name too, for helpers that import it), and
checked for what it must define.  Its directory is put on
``sys.path`` so it can import helpers that live beside it.

Every failure becomes a ``ScriptError`` whose message names the file and the
cause in one line; the CLI prints it and exits 1.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import importlib.machinery
import inspect
import itertools
import keyword
import logging
import os
import sys
import traceback
import types
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from .privileges import unreadable_python, user_name
from .signals import StopDuringImport, Wakeup, signal_handlers_kept

log = logging.getLogger("mpxd")

__all__ = ["ScriptError", "Handlers", "load_script", "retire"]

_load_counter = itertools.count(1)


class ScriptError(Exception):
    """The handler script cannot be used; the message says which file and why."""


@dataclass(frozen=True)
class Handlers:
    """The callables mpxd uses from one loaded version of a script."""

    path: str
    module: types.ModuleType
    handle_request: Callable[[Any], Any]
    handle_open: Callable[[Any], Any] | None
    handle_close: Callable[[Any], Any] | None
    on_start: Callable[[Any], Any] | None
    on_stop: Callable[[Any], Any] | None
    on_reload: Callable[[Any], Any] | None
    on_stopping: Callable[[Any], Any] | None = None
    # What loading this version did to sys.modules and sys.path, to undo
    # should it be refused after all (``retire(version, serving)``).
    helpers: HelperSwap | None = None


def _kind(value: Any) -> str:
    """``a str``, ``an int``: what a value is, for error messages."""
    name = type(value).__name__
    return f"{'an' if name[:1] in 'aeiouAEIOU' else 'a'} {name}"


def _optional(module: types.ModuleType, path: str, name: str) -> Callable | None:
    value = getattr(module, name, None)
    if value is not None and not callable(value):
        raise ScriptError(f"{path}: {name} is defined but not callable "
                          f"(it is {_kind(value)})")
    if value is not None:
        _refuse_deferred(path, name, value)
        _refuse_wrong_arity(path, name, value)
    return value


# What mpxd passes to each function it calls: always one argument.
ARGUMENT = {"handle_request": "s", "handle_open": "s", "handle_close": "s",
            "on_start": "server", "on_stopping": "server", "on_stop": "server",
            "on_reload": "old_module"}


def _refuse_wrong_arity(path: str, name: str, fn: Callable) -> None:
    """Refuse a function that cannot take the one argument mpxd passes.

    ``def handle_request():`` would otherwise pass ``--check`` and then fail
    every request with a TypeError.
    """
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):     # some built-ins have none: trust them
        return
    try:
        signature.bind(None)
    except TypeError:
        argument = ARGUMENT[name]
        raise ScriptError(f"{path}: {name} must take one argument: mpxd calls "
                          f"{name}({argument}), and it is defined as "
                          f"{name}{signature}") from None


def _refuse_deferred(path: str, name: str, fn: Callable) -> None:
    """Refuse ``async def`` and generator functions, which would never run.

    mpxd calls a handler and reads ``s.response`` when it returns; calling
    either kind only makes a coroutine or generator object, so the code
    inside would silently never run (asyncio users write ``async def``).
    A callable object is judged by its ``__call__``.
    """
    if not inspect.isroutine(fn) and not isinstance(fn, functools.partial):
        fn = getattr(type(fn), "__call__", fn)
        name += ".__call__"
    if inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn):
        raise ScriptError(f"{path}: {name} is an async def; mpxd calls handlers "
                          f"directly and never awaits them: write a plain def "
                          f"(mpxd.run_in_thread runs blocking work)")
    if inspect.isgeneratorfunction(fn):
        raise ScriptError(f"{path}: {name} is a generator function (it contains "
                          f"yield) and would never run: write a plain def")


def _run_without_a_server(code: types.CodeType, module: types.ModuleType,
                          stoppable_by: Wakeup | None) -> None:
    """Run the module's code as at start-up, when no server runs yet.

    On a HUP reload a server does run; ``mpxd.call_every`` at module level
    would work then and fail at the next start, so it fails on reload too.
    A stop signal to ``stoppable_by`` interrupts the code (and only it, not
    mpxd's bookkeeping around it).
    """
    from . import core          # core imports this module: not at the top
    running, core._current = core._current, None
    core._importing_over = running     # its script's threads may still hand work over
    pid = os.getpid()
    stoppable = stoppable_by.interrupting() if stoppable_by else contextlib.nullcontext()
    try:
        with stoppable, signal_handlers_kept(module.__file__, "at import"):
            exec(code, module.__dict__)
    except BaseException:
        _end_a_forked_child(pid, module.__file__, 1)
        raise
    finally:
        core._current = running
        core._importing_over = None
    _end_a_forked_child(pid, module.__file__, 0)


def _end_a_forked_child(pid: int, path: str, status: int) -> None:
    """End a process the script forked at import once it reaches the import's end.

    ``if os.fork() == 0: work()`` without ``os._exit`` lets the child run on,
    through the rest of mpxd's start-up: a second daemon on the first one's
    sockets.  It ends here instead (an import that raised in it: status 1).
    """
    if os.getpid() == pid:
        return
    log.warning("process %d, forked by %s at import, reached the end of the import: "
                "it exits here rather than start a second mpxd (end it with os._exit)",
                os.getpid(), path)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass
    for handler in logging.getLogger("mpxd").handlers:
        handler.flush()
    os._exit(status)


def _describe_exception(path: str, exc: BaseException) -> str:
    """One line naming where in the script an exception at import came from."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if os.path.abspath(f.filename) == path]
    where = f" (line {frames[-1].lineno})" if frames else ""
    return f"{path}: exception at import{where}: {type(exc).__name__}: {exc}{_hint(exc, path)}"


def _hint(exc: BaseException, path: str) -> str:
    """What to do about the import errors that do not say it themselves."""
    if isinstance(exc, ImportError) and (exc.name or "").startswith("_mpxd_script_"):
        # "cannot import name 'x' from '_mpxd_script_1'": a circular import,
        # which Python names as such only for modules that have a spec.
        stem = os.path.splitext(os.path.basename(path))[0]
        return (f" (a circular import: a helper imports from the script while the script "
                f"is still importing that helper; in the helper, write 'import {stem}' "
                f"and use '{stem}.NAME' inside its functions)")
    filename = getattr(exc, "filename", None)
    if isinstance(exc, FileNotFoundError) and isinstance(filename, str) \
            and not os.path.isabs(filename) and os.getcwd() == "/":
        # --daemon (and many a unit) runs in /: "words.txt" is /words.txt.
        return (" (the working directory is /, as under --daemon: build the path "
                "from the script's own, os.path.join(os.path.dirname(__file__), "
                f"{filename!r}))")
    if isinstance(exc, ImportError) and "relative import" in str(exc):
        return (" (a script is no package's module: import helpers beside it "
                "absolutely, as 'from helpers import ...'; its directory is importable)")
    if isinstance(exc, ModuleNotFoundError) and (problem := unreadable_python()):
        return f" ({problem})"      # installed, but not for the user of --user
    if isinstance(exc, ModuleNotFoundError) and exc.name and "." not in exc.name:
        # The classic: installed for another Python than the one running mpxd.
        return (f" (not installed for the Python that runs mpxd, {sys.executable}: "
                f"install it there, e.g. with {sys.executable} -m pip, or put "
                f"{exc.name}.py beside the script)")
    return ""


def load_script(path: str, interruptible: bool = True,
                stoppable_by: Wakeup | None = None) -> Handlers:
    """Compile, execute and validate the script at ``path``.

    Raises ``ScriptError`` with a one-line message for a missing or
    unreadable file, a syntax error (with its line number), an exception
    while the module runs, or a missing or non-callable ``handle_request``.
    A KeyboardInterrupt (the user's ^C) goes through, unless not
    ``interruptible``: a daemon's SIGINT does not raise one, so there it is
    the script's own error too.  ``StopDuringImport`` always goes through:
    a stop signal to ``stoppable_by`` (the daemon's ``Wakeup``) raises it
    in the script's code, or as it ends, never in mpxd's own steps.
    """
    path = os.path.abspath(path)
    try:
        with open(path, "rb") as f:
            source = f.read()
    except FileNotFoundError:
        raise ScriptError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ScriptError(f"{path}: is a directory, not a Python file") from None
    except PermissionError as e:
        # After --user the script is read as that user: say which one.
        raise ScriptError(f"{path}: cannot read as user {user_name()}: "
                          f"{e.strerror}") from None
    except OSError as e:
        raise ScriptError(f"{path}: cannot read: {e.strerror}") from None

    try:
        code = compile(source, path, "exec", dont_inherit=True)
    except SyntaxError as e:
        if e.lineno is None:    # NUL bytes, in recent Pythons: no line to name
            raise ScriptError(f"{path}: cannot compile: {e.msg} (not Python "
                              f"source?)") from None
        raise ScriptError(f"{path}: syntax error at line {e.lineno}: {e.msg}") from None
    except ValueError as e:  # NUL bytes, in older Pythons
        raise ScriptError(f"{path}: cannot compile: {e} (not Python source?)") from None

    _warn_if_named_like_the_standard_library(path)
    # The directory the file really is in, as "python SCRIPT" has it: a
    # script symlinked from /etc/mpxd imports the helpers beside its target.
    # Found anew on each load, so a HUP after a "current -> releases/v2"
    # switch imports v2's helpers.
    directory = os.path.dirname(os.path.realpath(path))
    helpers = HelperSwap(path, directory)
    try:
        handlers = _run_and_check(path, code, interruptible, stoppable_by)
    except BaseException:
        helpers.put_back()
        raise
    return dataclasses.replace(handlers, helpers=helpers)


def _warn_if_named_like_the_standard_library(path: str) -> None:
    stem = os.path.splitext(os.path.basename(path))[0]
    if stem in sys.stdlib_module_names:
        # Its directory goes first on sys.path: "import csv", here or in any
        # library imported later, finds this file instead of the real module.
        log.warning("%s has the name of the standard library module %s: "
                    "'import %s' (in the script or any library) may load this "
                    "file instead; rename it", path, stem, stem)


class HelperSwap:
    """Let one load import afresh the modules that live beside the script.

    So a HUP reload picks up an edited helper as a restart would, not only
    an edited script.  A helper is a module whose file (or package
    directory) is in the script's directory, whether the script imported
    it at its top or a handler did later; the modules mpxd itself ran
    with before any script was loaded are not.  ``put_back`` undoes the
    load for a version that is refused (it failed to load, or its
    ``on_reload`` raised): the version still serving gets its own helpers
    and ``sys.path`` again.  ``keep`` lets go of those once the new version
    serves.
    """

    def __init__(self, path: str, directory: str) -> None:
        global _before_any_script
        if _before_any_script is None:
            _before_any_script = frozenset(sys.modules)
        self.path = path
        self.sys_path: list[str] | None = list(sys.path)
        self.inserted = _inserted.get(path)
        # On the path, first, instead of the directory an earlier load of
        # this script put there (a rollback from releases/v2 to v1 must
        # import v1's helpers, not v2's).  A directory that was on the path
        # already stays where it was.
        self.directories = {directory}
        if self.inserted not in (None, directory):
            self.directories.add(self.inserted)
            if self.inserted in sys.path:
                sys.path.remove(self.inserted)
            del _inserted[path]
        if directory not in sys.path:
            sys.path.insert(0, directory)
            _inserted[path] = directory
        self.taken = {name: sys.modules.pop(name) for name in self._helpers_loaded()}
        for module in self.taken.values():
            _forget_bytecode_older_than_its_source(module)
        self.before = set(sys.modules)

    def _helpers_loaded(self, among: Iterable[str] | None = None) -> list[str]:
        names = list(sys.modules) if among is None else list(among)
        return [name for name in names
                if name not in _before_any_script          # type: ignore[operator]
                and any(_lives_in(name, each) for each in self.directories)]

    def put_back(self) -> None:
        """Give ``sys.modules`` and ``sys.path`` back to the version loaded before."""
        if self.sys_path is None:
            return              # that version is gone: this one serves
        for name in self._helpers_loaded(sys.modules.keys() - self.before):
            sys.modules.pop(name, None)
        sys.modules.update(self.taken)
        sys.path[:] = self.sys_path
        if self.inserted is None:
            _inserted.pop(self.path, None)
        else:
            _inserted[self.path] = self.inserted
        self.keep()

    def keep(self) -> None:
        """The version this load made serves: let the one it replaced go."""
        self.taken = {}
        self.sys_path = None


def _forget_bytecode_older_than_its_source(module: types.ModuleType) -> None:
    """Remove a helper's cached ``.pyc`` if its source was written since.

    Python trusts a ``.pyc`` whose recorded source time (in whole seconds)
    and size match: a helper edited within the second it was imported in,
    keeping its size (``LIMIT = 5`` to ``LIMIT = 7``), would reload as it
    was.  Python writes a fresh one on the import that follows.
    """
    cached, source = getattr(module, "__cached__", None), getattr(module, "__file__", None)
    if not (isinstance(cached, str) and isinstance(source, str) and source.endswith(".py")):
        return
    try:
        if os.stat(cached).st_mtime_ns <= os.stat(source).st_mtime_ns:
            os.unlink(cached)
    except OSError:
        pass        # no cache, or one we may not remove: Python compares as usual


# The modules loaded before the first script was: mpxd's own and its libraries'
_before_any_script: frozenset[str] | None = None
# script -> the directory its load put on sys.path
_inserted: dict[str, str] = {}


def _lives_in(name: str, directory: str) -> bool:
    """Whether module ``name`` is a ``NAME.py`` or ``NAME/`` package in ``directory``."""
    top_name = name.partition(".")[0]
    if top_name == "mpxd" or name.startswith("_mpxd_script_"):
        return False
    top = sys.modules.get(top_name)
    file = getattr(top, "__file__", None)
    if not file:
        # A directory without __init__.py (a namespace package) has no
        # file, only its directories.
        places = getattr(top, "__path__", None) or ()
        try:
            return os.path.join(directory, top_name) in {os.path.abspath(p) for p in places}
        except TypeError:
            return False
    file = os.path.abspath(file)
    if os.path.basename(file) == "__init__.py":
        file = os.path.dirname(file)
    elif not file.endswith(".py"):          # compiled extensions cannot be re-imported
        return False
    return os.path.dirname(file) == directory


def _run_and_check(path: str, code: types.CodeType, interruptible: bool,
                   stoppable_by: Wakeup | None) -> Handlers:
    """Execute the compiled script as a new module and collect its handlers."""
    # A private, unique name: reloads and several scripts never collide, and
    # nothing the user imports can shadow it.
    name = f"_mpxd_script_{next(_load_counter)}"
    module = types.ModuleType(name)
    module.__file__ = path
    names = [name] + _natural_name(path)
    for each in names:
        sys.modules[each] = module
    try:
        return _execute_and_collect(path, code, module, interruptible, stoppable_by)
    except BaseException:
        for each in names:
            if sys.modules.get(each) is module:
                del sys.modules[each]
        raise


def retire(version: Handlers, serving: Handlers | None = None) -> None:
    """Let a version of the script that no longer serves go from ``sys.modules``.

    Every load registers its module (under its private name, and its file's
    name), and nothing took old versions out: each HUP kept the previous
    version and all its globals for good, so a daemon reloaded daily grew
    by its script's data every day.  After a reload, ``version`` is the old
    one.  When the new one is refused instead (its ``on_reload`` raised),
    ``version`` is that one and ``serving`` the old: the file's name then
    goes back to the version that serves.  Whatever still uses a retired
    module (its timers, say) keeps it alive; nothing else does.
    """
    if serving is not None and version.helpers is not None:
        version.helpers.put_back()      # the helpers and sys.path the serving version had
    for name, module in list(sys.modules.items()):
        if module is version.module:
            if serving is not None and not name.startswith("_mpxd_script_"):
                sys.modules[name] = serving.module
            else:
                del sys.modules[name]


def _natural_name(path: str) -> list[str]:
    """``[NAME]`` if ``import NAME`` would find the script at ``path``, and NAME is free.

    The module is then known by that name too, so a helper's ``import game``
    (for ``game.py``) gets the very module mpxd runs, globals and all.
    Without it, the import ran the file a second time as a separate copy,
    and the helper silently saw other globals (an empty player list, say).
    """
    stem, extension = os.path.splitext(os.path.basename(path))
    if extension != ".py" or not stem.isidentifier() or keyword.iskeyword(stem) \
            or stem in sys.stdlib_module_names:
        return []
    holder = sys.modules.get(stem)
    if holder is not None:
        # Imported already: this script (an earlier version), or another
        # module of that name, which import keeps finding.
        return [stem] if getattr(holder, "__file__", None) == path else []
    # Not imported yet: only if the search would find this very file, not
    # an installed package of that name earlier on the path.
    found = importlib.machinery.PathFinder.find_spec(stem)
    origin = getattr(found, "origin", None)
    return [stem] if origin and os.path.realpath(origin) == os.path.realpath(path) else []


HOOKS = ("handle_request", "handle_open", "handle_close", "on_start", "on_stopping",
         "on_stop", "on_reload")


def _near_misses(module: types.ModuleType) -> dict[str, str]:
    """Hooks the script lacks -> a function of its own named much like one.

    ``handle_opne`` or ``on_startup`` would never be called, silently.
    """
    own = [name for name, value in vars(module).items()
           if isinstance(value, types.FunctionType) and name not in HOOKS
           and value.__module__ == module.__name__]
    near = {}
    for hook in HOOKS:
        if not hasattr(module, hook):
            match = difflib.get_close_matches(hook, own, n=1, cutoff=0.8)
            if match:
                near[hook] = match[0]
    return near


def _execute_and_collect(path: str, code: types.CodeType, module: types.ModuleType,
                         interruptible: bool, stoppable_by: Wakeup | None) -> Handlers:
    """Run the module's code; collect and check its handlers, or raise ScriptError."""
    try:
        _run_without_a_server(code, module, stoppable_by)
    except SystemExit as e:
        raise ScriptError(f"{path}: called exit({e.code}) at import") from None
    except BaseException as e:  # noqa: BLE001 - any failure is the script's
        if isinstance(e, StopDuringImport) or (isinstance(e, KeyboardInterrupt)
                                                and interruptible):
            raise
        raise ScriptError(_describe_exception(path, e)) from None

    near = _near_misses(module)
    handle_request = getattr(module, "handle_request", None)
    if handle_request is None:
        hint = f" (it defines {near['handle_request']}: misspelled?)" \
            if "handle_request" in near else ""
        raise ScriptError(f"{path}: does not define handle_request(s){hint}")
    for hook, name in near.items():
        log.warning("%s defines %s but no %s: misspelled? mpxd calls only %s",
                    path, name, hook, hook)
    if not callable(handle_request):
        raise ScriptError(f"{path}: handle_request is not callable "
                          f"(it is {_kind(handle_request)})")
    _refuse_deferred(path, "handle_request", handle_request)
    _refuse_wrong_arity(path, "handle_request", handle_request)
    return Handlers(
        path=path,
        module=module,
        handle_request=handle_request,
        handle_open=_optional(module, path, "handle_open"),
        handle_close=_optional(module, path, "handle_close"),
        on_start=_optional(module, path, "on_start"),
        on_stop=_optional(module, path, "on_stop"),
        on_reload=_optional(module, path, "on_reload"),
        on_stopping=_optional(module, path, "on_stopping"),
    )
