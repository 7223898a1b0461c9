"""mpxd.script.load_script and the mpxd command line (mpxd.cli.main).

Each kind of broken script must give one line naming the file and the cause;
``mpxd --check`` turns that into exit status 0 or 1.  The command line's own
errors follow click: usage errors exit 2, a taken port exits 1.
"""

from __future__ import annotations

import logging
import os
import py_compile
import signal
import socket
import subprocess
import sys
import types
import uuid

import click
import pytest
from click.testing import CliRunner

import mpxd
import mpxd.testing
from mpxd.cli import main
from mpxd.script import ScriptError, load_script

from conftest import HANDLERS, MPXD, ROOT

COUNTER = os.path.join(HANDLERS, "counter.py")


def load_error(path: str) -> str:
    with pytest.raises(ScriptError) as info:
        load_script(path)
    message = str(info.value)
    assert "\n" not in message, "one line, no traceback"
    assert os.path.abspath(path) in message, "names the file"
    return message


# ------------------------------------------------------------ load_script

def answer(handlers, request: str = "") -> str:
    """What ``handlers.handle_request`` answers to ``request``, on a stand-in session."""
    class Fake:
        response = ""
    s = Fake()
    s.request = request
    handlers.handle_request(s)
    return s.response


def test_a_good_script_gives_its_handlers(write_script):
    path = write_script("""
        opened = []
        def handle_open(s): opened.append(s)
        def handle_request(s): s.response = s.request.upper()
    """)
    handlers = load_script(path)
    assert handlers.path == path
    assert handlers.handle_open is handlers.module.handle_open
    assert handlers.handle_close is None
    assert answer(handlers, "hi") == "HI"


def test_each_load_is_a_fresh_module_under_a_private_name(write_script):
    path = write_script("state = []\ndef handle_request(s): state.append(1)\n")
    first, second = load_script(path), load_script(path)
    assert first.module is not second.module
    assert first.module.state is not second.module.state
    assert first.module.__name__ != second.module.__name__
    assert first.module.__name__.startswith("_mpxd")


def test_the_example_counter_loads():
    handlers = load_script(COUNTER)
    assert callable(handlers.handle_request) and callable(handlers.handle_close)


def test_a_missing_file(tmp_path):
    assert "no such file" in load_error(str(tmp_path / "absent.py"))


def test_a_directory(tmp_path):
    assert "directory" in load_error(str(tmp_path))


def test_a_syntax_error_names_the_line(write_script):
    path = write_script("def handle_request(s):\n    pass\n\ndef broken(:\n")
    message = load_error(path)
    assert "syntax error" in message and "line 4" in message


def test_an_indentation_error_names_the_line(write_script):
    message = load_error(write_script("def handle_request(s):\npass\n"))
    assert "line 2" in message


def test_an_exception_at_import_names_the_line_and_the_exception(write_script):
    path = write_script("x = 1\n\nvalue = {}['missing']\n\ndef handle_request(s): pass\n")
    message = load_error(path)
    assert "line 3" in message
    assert "KeyError" in message and "missing" in message


def test_an_exception_raised_inside_a_function_called_at_import(write_script):
    path = write_script("def setup():\n    raise RuntimeError('no database')\n\n"
                        "setup()\ndef handle_request(s): pass\n")
    message = load_error(path)
    assert "RuntimeError: no database" in message
    assert "line 2" in message


def test_a_failing_import_names_the_module(write_script):
    message = load_error(write_script("import no_such_module_for_mpxd\n"
                                      "def handle_request(s): pass\n"))
    assert "no_such_module_for_mpxd" in message and "line 1" in message


def test_a_relative_import_says_how_to_import_helpers(tmp_path, write_script):
    (tmp_path / "helpers.py").write_text("X = 1\n")
    message = load_error(write_script("from .helpers import X\n"
                                      "def handle_request(s): pass\n"))
    assert message.endswith("ImportError: attempted relative import with no known parent "
                            "package (a script is no package's module: import helpers "
                            "beside it absolutely, as 'from helpers import ...'; its "
                            "directory is importable)")


def test_a_circular_import_says_so_and_how_to_write_the_helper(tmp_path, write_script):
    game, helper = (f"mpxd_test_{kind}_{uuid.uuid4().hex}" for kind in ("game", "helper"))
    (tmp_path / f"{helper}.py").write_text(f"from {game} import players\n")
    message = load_error(write_script(f"import {helper}\nplayers = []\n"
                                      "def handle_request(s): pass\n", name=f"{game}.py"))
    assert "(line 1): ImportError: cannot import name 'players'" in message
    assert message.endswith(f"(a circular import: a helper imports from the script while "
                            f"the script is still importing that helper; in the helper, "
                            f"write 'import {game}' and use '{game}.NAME' inside its "
                            f"functions)")


def test_a_relative_file_missing_in_slash_says_to_build_the_path_from_file(
        write_script, monkeypatch):
    # Under --daemon the working directory is /: open("words.txt") at import
    # worked in the foreground and failed there, with no word why.
    path = write_script("WORDS = open('words.txt').read()\n"
                        "def handle_request(s): pass\n")
    monkeypatch.chdir("/")
    assert load_error(path).endswith(
        "FileNotFoundError: [Errno 2] No such file or directory: 'words.txt' (the "
        "working directory is /, as under --daemon: build the path from the script's "
        "own, os.path.join(os.path.dirname(__file__), 'words.txt'))")


def test_a_missing_module_says_which_python_needs_it(write_script):
    # The classic: installed with another Python than the one running mpxd.
    message = load_error(write_script("import surely_not_installed_anywhere\n"
                                      "def handle_request(s): pass\n"))
    assert message.endswith(
        f"ModuleNotFoundError: No module named 'surely_not_installed_anywhere' (not "
        f"installed for the Python that runs mpxd, {sys.executable}: install it there, "
        f"e.g. with {sys.executable} -m pip, or put surely_not_installed_anywhere.py "
        f"beside the script)")


def test_a_missing_handle_request(write_script):
    message = load_error(write_script("def handle_close(s): pass\n"))
    assert "handle_request" in message


@pytest.mark.parametrize("name", ["handle_request", "handle_close", "handle_open",
                                  "on_start", "on_stopping", "on_stop", "on_reload"])
def test_a_handler_that_is_not_callable(write_script, name):
    source = "def handle_request(s): pass\n" if name != "handle_request" else ""
    message = load_error(write_script(source + f"{name} = 42\n"))
    assert name in message and "not callable (it is an int)" in message


@pytest.mark.parametrize("name", ["handle_request", "handle_close", "handle_open",
                                  "on_start", "on_stopping", "on_stop", "on_reload"])
@pytest.mark.parametrize("kind, body, said", [
    ("async def", "    pass", "is an async def"),
    ("async def", "    yield", "is an async def"),
    ("def", "    yield", "is a generator function"),
])
def test_a_handler_that_would_never_run_is_refused(write_script, name, kind, body, said):
    # Calling one only makes a coroutine or generator: the code inside
    # never ran, and nothing said so (asyncio users write async def).
    source = "def handle_request(s): pass\n" if name != "handle_request" else ""
    message = load_error(write_script(source + f"{kind} {name}(x):\n{body}\n"))
    assert f"{name} {said}" in message and "plain def" in message


@pytest.mark.parametrize("name, argument", [
    ("handle_request", "s"), ("handle_close", "s"), ("handle_open", "s"),
    ("on_start", "server"), ("on_stopping", "server"), ("on_stop", "server"),
    ("on_reload", "old_module")])
@pytest.mark.parametrize("parameters", ["", "a, b", "*, s", "**options"])
def test_a_handler_that_cannot_take_its_one_argument_is_refused(
        write_script, name, argument, parameters):
    # It passed --check, then raised TypeError on every call.
    source = "def handle_request(s): pass\n" if name != "handle_request" else ""
    message = load_error(write_script(source + f"def {name}({parameters}):\n    pass\n"))
    assert message.endswith(f"{name} must take one argument: mpxd calls {name}({argument}), "
                            f"and it is defined as {name}({parameters})")


def test_handlers_with_defaults_or_star_args_are_accepted(write_script):
    handlers = load_script(write_script(
        "def handle_request(s, verbose=False): pass\n"
        "def handle_open(*args): pass\n"
        "def on_reload(old_module, /): pass\n"
        "handle_close = lambda s, *rest, **options: None\n"))
    assert handlers.handle_open is not None and handlers.on_reload is not None


def test_signal_handlers_set_at_import_are_undone_with_a_warning(write_script, caplog):
    before = signal.getsignal(signal.SIGHUP)
    with caplog.at_level(logging.WARNING, logger="mpxd"):
        load_script(write_script("import signal\n"
                                 "signal.signal(signal.SIGHUP, signal.SIG_IGN)\n"
                                 "def handle_request(s): pass\n"))
    assert signal.getsignal(signal.SIGHUP) == before
    assert "set its own handler for SIGHUP at import; mpxd keeps its own" in caplog.text


def test_a_compiled_file_is_not_taken_for_source(tmp_path):
    compiled = tmp_path / "counter.pyc"
    py_compile.compile(os.path.join(HANDLERS, "counter.py"), cfile=str(compiled))
    message = load_error(str(compiled))
    assert "cannot compile" in message and "not Python source?" in message
    assert "line None" not in message


@pytest.mark.parametrize("call, said", [
    ("async def __call__(self, s):\n        pass", "handle_request.__call__ is an async def"),
    ("def __call__(self, s):\n        yield", "handle_request.__call__ is a generator"),
])
def test_a_callable_object_that_would_never_run_is_refused(write_script, call, said):
    message = load_error(write_script(f"class Handler:\n    {call}\n"
                                      "handle_request = Handler()\n"))
    assert said in message and "plain def" in message


def test_callable_objects_and_partials_that_run_are_accepted(write_script):
    handlers = load_script(write_script(
        "import functools\n"
        "class Handler:\n"
        "    def __call__(self, s):\n"
        "        s.response = 'object'\n"
        "def opened(greeting, s):\n"
        "    s.response = greeting\n"
        "handle_request = Handler()\n"
        "handle_open = functools.partial(opened, 'hi')\n"
        "handle_close = print\n"))
    assert callable(handlers.handle_request) and handlers.handle_close is print


@pytest.mark.parametrize("source, said", [
    ("class Handler:\n    def __call__(self):\n        pass\nhandle_request = Handler()\n",
     "defined as handle_request()"),
    ("import functools\ndef h(a, s): pass\nhandle_request = functools.partial(h, 1, 2)\n",
     "defined as handle_request()"),
])
def test_callable_objects_and_partials_are_held_to_one_argument_too(write_script, source, said):
    assert said in load_error(write_script(source))


def test_a_timer_started_at_import_is_refused_with_where_to_start_it(write_script):
    message = load_error(write_script("import mpxd\nmpxd.call_every(1, print)\n"
                                      "def handle_request(s): pass\n"))
    assert "line 2" in message and "on_start(server)" in message


def test_sys_exit_at_import(write_script):
    message = load_error(write_script("import sys\nsys.exit(3)\n"
                                      "def handle_request(s): pass\n"))
    assert "exit" in message and "3" in message


def test_keyboard_interrupt_at_import_is_a_script_error_only_when_not_interruptible(
        write_script):
    path = write_script("raise KeyboardInterrupt\n")
    with pytest.raises(KeyboardInterrupt):      # start-up: the user's ^C stops it
        load_script(path)
    with pytest.raises(ScriptError, match="exception at import .*KeyboardInterrupt"):
        load_script(path, interruptible=False)   # a daemon's reload


def test_a_failed_load_leaves_no_module_behind(write_script):
    stem = f"mpxd_test_broken_{uuid.uuid4().hex}"
    path = write_script("raise ValueError('nope')\n", name=f"{stem}.py")
    before = {name for name in sys.modules if name.startswith("_mpxd")}
    load_error(path)
    assert {name for name in sys.modules if name.startswith("_mpxd")} == before
    assert stem not in sys.modules


def test_a_symlinked_script_imports_the_helpers_beside_its_target(tmp_path):
    # As "python SCRIPT" does.  The directory of the link was put on the
    # path, and "import helper" failed with a hint to put helper.py beside
    # the script, where it was.
    helper, app = (f"mpxd_test_{kind}_{uuid.uuid4().hex}" for kind in ("helper", "app"))
    (tmp_path / "real").mkdir()
    (tmp_path / "etc").mkdir()
    (tmp_path / "real" / f"{helper}.py").write_text("X = 'helped'\n")
    (tmp_path / "real" / f"{app}.py").write_text(
        f"import {helper}, {app}\n"
        "def handle_request(s):\n"
        f"    s.response = {helper}.X + ' ' + str({app}.handle_request is handle_request)\n")
    link = tmp_path / "etc" / f"{app}.py"
    link.symlink_to(tmp_path / "real" / f"{app}.py")
    loaded = load_script(str(link))
    assert answer(loaded) == "helped True"      # and the script is one module
    assert loaded.module.__file__ == str(link)  # as given, like Python's


def test_a_hup_after_switching_a_release_symlink_loads_the_new_helpers(tmp_path):
    # current -> releases/v1, then current -> releases/v2, then HUP.
    helper = f"mpxd_test_helper_{uuid.uuid4().hex}"
    for version in ("v1", "v2"):
        release = tmp_path / "releases" / version
        release.mkdir(parents=True)
        (release / f"{helper}.py").write_text(f"VERSION = {version!r}\n")
        (release / "app.py").write_text(f"import {helper}\n"
                                        "def handle_request(s):\n"
                                        f"    s.response = {helper}.VERSION\n")
    current = tmp_path / "current"
    current.symlink_to(tmp_path / "releases" / "v1")
    first = load_script(str(current / "app.py"))
    assert answer(first) == "v1"
    current.unlink()
    current.symlink_to(tmp_path / "releases" / "v2")
    second = load_script(str(current / "app.py"))
    assert answer(second) == "v2"
    assert answer(first) == "v1"                # the old version keeps its own
    current.unlink()
    current.symlink_to(tmp_path / "releases" / "v1")   # and a rollback
    assert answer(load_script(str(current / "app.py"))) == "v1"


def test_a_helper_importing_the_script_gets_the_running_module_not_a_copy(tmp_path):
    # Its "import game" used to run game.py again as a second module, and the
    # helper saw that copy's globals: an empty player list, silently.
    game, helper = (f"mpxd_test_{kind}_{uuid.uuid4().hex}" for kind in ("game", "helper"))
    (tmp_path / f"{helper}.py").write_text(f"import {game}\n"
                                           "def count():\n"
                                           f"    return len({game}.players)\n")
    path = tmp_path / f"{game}.py"
    path.write_text(f"import {helper}\n"
                    "players = []\n"
                    "def handle_request(s):\n"
                    "    players.append(s.request)\n"
                    f"    s.response = str({helper}.count())\n")

    first = load_script(str(path))
    assert sys.modules[game] is first.module
    assert [answer(first, "ann"), answer(first, "bob")] == ["1", "2"]
    second = load_script(str(path))             # a HUP reload
    assert sys.modules[game] is second.module
    assert answer(second, "ann") == "1"
    with open(path, "a") as f:
        f.write("raise ValueError('broken version')\n")
    load_error(str(path))
    assert sys.modules[game] is second.module   # the version still serving


def test_the_script_takes_no_name_that_import_finds_elsewhere_first(tmp_path, monkeypatch):
    # An installed package of that name earlier on the path is what a
    # helper's import gets; the script must not take its place.
    stem = f"mpxd_test_installed_{uuid.uuid4().hex}"
    installed, scripts = tmp_path / "site-packages", tmp_path / "scripts"
    installed.mkdir()
    scripts.mkdir()
    (installed / f"{stem}.py").write_text("WHO = 'the package'\n")
    script = scripts / f"{stem}.py"
    script.write_text("def handle_request(s): pass\n")
    monkeypatch.setattr(sys, "path", [str(installed), str(scripts)] + sys.path)
    load_script(str(script))
    assert stem not in sys.modules
    assert __import__(stem).WHO == "the package"
    del sys.modules[stem]


VERSIONED = """\
import builtins, weakref
class Marker:
    pass
MARKER = Marker()
builtins.__dict__.setdefault({key!r}, []).append(weakref.ref(MARKER))
def handle_request(s):
    s.response = str(sum(ref() is not None for ref in getattr(builtins, {key!r})))
"""


def test_a_reload_lets_the_old_version_and_its_data_go(tmp_path):
    # Every version stayed in sys.modules, globals and all: a daemon reloaded
    # daily grew by its script's data every day.
    import builtins
    key = f"_mpxd_test_versions_{uuid.uuid4().hex}"
    path = tmp_path / "versioned.py"
    path.write_text(VERSIONED.format(key=key))
    try:
        with mpxd.testing.Harness(str(path)) as h:
            for _ in range(3):
                h.reload()                  # no gc.collect() here: the reload does it
            assert h.connect().send("x") == ["1"]
            path.write_text(VERSIONED.format(key=key) +
                            "def on_reload(old):\n    raise ValueError('refused')\n")
            with pytest.raises(ScriptError, match="on_reload failed"):
                h.reload()
            # (h.errors holds the refusal's traceback, and so that version.)
            assert sys.modules["versioned"] is h.module     # the one that serves
    finally:
        delattr(builtins, key)


def test_the_script_takes_no_name_another_module_has(write_script):
    stem = f"mpxd_test_taken_{uuid.uuid4().hex}"
    other = sys.modules[stem] = types.ModuleType(stem)
    try:
        load_script(write_script("def handle_request(s): pass\n", name=f"{stem}.py"))
        assert sys.modules[stem] is other
    finally:
        del sys.modules[stem]


def test_a_helper_module_beside_the_script_is_importable(tmp_path, write_script):
    helper = f"mpxd_test_helper_{uuid.uuid4().hex}"
    (tmp_path / f"{helper}.py").write_text("def shout(text):\n    return text.upper() + '!'\n")
    path = write_script(f"from {helper} import shout\n"
                        "def handle_request(s):\n    s.response = shout(s.request)\n")
    assert answer(load_script(path), "hey") == "HEY!"


def test_helpers_beside_the_script_are_imported_afresh_on_every_load(tmp_path, write_script):
    # So a HUP reload picks up an edited helper, as a restart would.
    helper = f"mpxd_test_helper_{uuid.uuid4().hex}"
    package = f"mpxd_test_package_{uuid.uuid4().hex}"
    (tmp_path / f"{helper}.py").write_text("WORD = 'one'\n")
    (tmp_path / package).mkdir()
    (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / package / "words.py").write_text("WORD = 'uno'\n")
    path = write_script(f"import {helper}\nfrom {package} import words\n"
                        "def handle_request(s):\n"
                        f"    s.response = {helper}.WORD + ' ' + words.WORD\n")

    first = load_script(path)
    (tmp_path / f"{helper}.py").write_text("WORD = 'two'\n")
    (tmp_path / package / "words.py").write_text("WORD = 'dos'\n")
    second = load_script(path)
    assert answer(second) == "two dos"
    assert answer(first) == "one uno"           # the old version keeps its own

    (tmp_path / f"{helper}.py").write_text("WORD = 'three'\n")
    with open(path, "a") as f:
        f.write("raise ValueError('broken version')\n")
    load_error(path)
    assert sys.modules[helper].WORD == "two"    # a failed load puts them back
    assert sys.modules[f"{package}.words"] is second.module.words


def test_a_helper_edited_within_the_second_of_its_import_reloads_as_edited(
        tmp_path, write_script, monkeypatch):
    # Python trusts a .pyc whose recorded source time, to the second, and
    # size match: "WORD = 'one'" edited to "WORD = 'two'" within the second
    # it was imported in reloaded as 'one'.
    monkeypatch.setattr(sys, "dont_write_bytecode", False)     # as for users
    helper = f"mpxd_test_helper_{uuid.uuid4().hex}"
    source = tmp_path / f"{helper}.py"
    source.write_text("WORD = 'one'\n")
    second = 1_700_000_000 * 10**9
    os.utime(source, ns=(second, second + 100_000_000))
    path = write_script(f"import {helper}\n"
                        f"def handle_request(s):\n    s.response = {helper}.WORD\n")
    first = load_script(path)
    cached = first.module.__dict__[helper].__cached__
    assert os.path.exists(cached)
    os.utime(cached, ns=(second, second + 200_000_000))
    source.write_text("WORD = 'two'\n")
    os.utime(source, ns=(second, second + 500_000_000))
    assert answer(load_script(path)) == "two"


def test_a_helper_a_handler_imported_is_imported_afresh_on_reload(tmp_path, write_script):
    # Imported lazily, inside a handler: the reload did not know it was a
    # helper, and the new version went on with the old one.
    helper = f"mpxd_test_helper_{uuid.uuid4().hex}"
    (tmp_path / f"{helper}.py").write_text("WORD = 'one'\n")
    path = write_script("def handle_request(s):\n"
                        f"    import {helper}\n"
                        f"    s.response = {helper}.WORD\n")
    first = load_script(path)
    assert answer(first) == "one"
    (tmp_path / f"{helper}.py").write_text("WORD = 'two, edited'\n")
    assert answer(load_script(path)) == "two, edited"


def test_a_helper_directory_without_init_is_imported_afresh(tmp_path, write_script):
    # A namespace package has no __file__: it was never taken for a helper.
    package = f"mpxd_test_namespace_{uuid.uuid4().hex}"
    (tmp_path / package).mkdir()
    (tmp_path / package / "words.py").write_text("WORD = 'uno'\n")
    path = write_script(f"from {package} import words\n"
                        "def handle_request(s):\n    s.response = words.WORD\n")
    first = load_script(path)
    (tmp_path / package / "words.py").write_text("WORD = 'dos, edited'\n")
    assert answer(load_script(path)) == "dos, edited"
    assert answer(first) == "uno"


def test_a_version_refused_by_on_reload_gives_back_the_helpers_and_path(
        tmp_path, write_script):
    # Only a failed load put them back: after an on_reload that raised, the
    # version still serving imported the refused version's helpers, and its
    # sys.path entries stayed.
    helper = f"mpxd_test_helper_{uuid.uuid4().hex}"
    (tmp_path / f"{helper}.py").write_text("WORD = 'one'\n")
    serving = ("def handle_request(s):\n"
               f"    import {helper}\n"
               f"    s.response = {helper}.WORD\n")
    path = write_script(serving)
    path_before = list(sys.path)
    with mpxd.testing.Harness(path) as h:
        c = h.connect()
        assert c.send("x") == ["one"]
        (tmp_path / f"{helper}.py").write_text("WORD = 'two'\n")
        write_script(f"import sys, {helper}\n"
                     "sys.path.insert(0, '/nonexistent/vendor')\n" + serving +
                     "def on_reload(old):\n    raise ValueError('refused')\n")
        with pytest.raises(ScriptError, match="on_reload failed"):
            h.reload()
        assert sys.modules[helper].WORD == "one"
        assert c.send("x") == ["one"]
        assert "/nonexistent/vendor" not in sys.path
        write_script(serving)
        h.reload()                              # and the next one imports afresh
        assert c.send("x") == ["two"]
    assert [p for p in sys.path if p != str(tmp_path)] == \
        [p for p in path_before if p != str(tmp_path)]


# ------------------------------------------------------------------ --check

def run_cli(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_check_accepts_a_good_script():
    result = run_cli("--check", COUNTER)
    assert result.exit_code == 0, result.output
    assert COUNTER in result.output and "ok" in result.output


def test_check_rejects_a_broken_script_naming_the_file(write_script):
    path = write_script("def handle_request(s):\n    return (\n")
    result = run_cli("--check", path)
    assert result.exit_code == 1
    assert path in result.output and "line" in result.output
    assert "Traceback" not in result.output


def test_check_rejects_a_missing_file(tmp_path):
    path = str(tmp_path / "nope.py")
    result = run_cli("--check", path)
    assert result.exit_code == 1
    assert path in result.output


def test_check_as_a_real_command(write_script):
    good = subprocess.run([*MPXD, "--check", COUNTER], capture_output=True,
                          text=True, timeout=30, cwd=ROOT)
    assert good.returncode == 0, good.stderr
    bad_path = write_script("def handle_request(s) pass\n", name="bad.py")
    bad = subprocess.run([*MPXD, "--check", bad_path], capture_output=True,
                         text=True, timeout=30, cwd=ROOT)
    assert bad.returncode == 1
    assert bad_path in bad.stderr and "syntax error at line 1" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_a_broken_script_stops_start_up_with_exit_1(write_script):
    path = write_script("raise SystemError('broken on purpose')\n")
    result = subprocess.run([*MPXD, "--port", "0", "--host", "127.0.0.1", path],
                            capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert result.returncode == 1
    assert path in result.stderr and "broken on purpose" in result.stderr
    assert "Traceback" not in result.stderr
    assert "listening on" not in result.stderr


# -------------------------------------------------------------- the command

@pytest.mark.parametrize("args", [
    ["--port", "70000"], ["--port", "http"], ["--eol", "cr"], ["--poller", "kqueue"],
    ["--max-line", "0"], ["--idle-timeout", "-1"], ["--no-such-option"],
    ["--idle-timeout", "nan"], ["--idle-timeout", "inf"], ["--drain-timeout", "nan"],
    ["--drain-timeout", "inf"], ["--max-rate", "nan"], ["--max-rate", "inf"],
    ["--max-rate", "-1"], ["--tls-handshake-timeout", "inf"], ["--host", ""],
    ["--host", "127.0.0.1", "--host", " "], ["--pidfile", ""], ["--log-file", " "],
])
def test_a_bad_option_value_is_a_usage_error(args):
    # --check: with good values this exits 0 (no --port needed, no server
    # started), so only the value under test can make it a usage error.
    assert run_cli("--check", COUNTER).exit_code == 0
    result = run_cli(*args, "--check", COUNTER)
    assert result.exit_code == 2, result.output
    assert "Usage:" in result.output or "Error" in result.output


def test_choices_are_taken_in_any_case():
    result = run_cli("--eol", "CRLF", "--log-level", "DEBUG", "--poller", "Epoll",
                     "--check", COUNTER)
    assert result.exit_code == 0, result.output


def test_no_port_is_a_usage_error(monkeypatch):
    monkeypatch.delenv("LISTEN_FDS", raising=False)
    monkeypatch.delenv("MPXD_PORT", raising=False)
    result = run_cli(COUNTER)
    assert result.exit_code == 2
    assert "--port" in result.output


def test_no_script_is_a_usage_error():
    assert run_cli("--port", "0").exit_code == 2


def test_version():
    result = run_cli("--version")
    assert result.exit_code == 0
    assert mpxd.__version__ in result.output and "mpxd" in result.output


def test_help_lists_the_options():
    result = run_cli("--help")
    assert result.exit_code == 0
    for option in ("--port", "--host", "--eol", "--poller", "--check", "--max-line",
                   "--max-output", "--max-connections", "--idle-timeout", "--version"):
        assert option in result.output
    assert result.output.startswith("Usage:")


def test_options_can_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("MPXD_EOL", "cr")
    assert run_cli("--port", "0", COUNTER).exit_code == 2   # read, and rejected


def test_every_option_comes_from_mpxd_and_its_own_name():
    # --host and --daemon are held as "hosts" and "daemonize", and click
    # names the variable after those: MPXD_HOST=0.0.0.0 in an env file was
    # ignored without a word, and the daemon stayed on loopback.
    for param in main.params:
        if isinstance(param, click.Option) and not param.hidden and param.expose_value:
            long = next(o for o in param.opts if o.startswith("--"))
            want = "MPXD_" + long[2:].replace("-", "_").upper()
            assert (param.envvar or f"MPXD_{param.name.upper()}") == want, long


def test_a_bad_value_from_the_environment_is_named_as_such(monkeypatch):
    # "Invalid value for '--port'" sent the operator looking for a --port
    # that only their env file held.
    monkeypatch.setenv("MPXD_PORT", "abc")
    result = run_cli(COUNTER)
    assert result.exit_code == 2
    assert "Invalid value for MPXD_PORT (from the environment): 'abc'" in result.output
    result = run_cli("--port", "abc", COUNTER)          # on the command line: as it was
    assert "Invalid value for '--port' / '-p': 'abc'" in result.output


def test_a_usage_error_names_the_options_that_came_from_the_environment(monkeypatch):
    # "--unix and --control cannot be used with --workers", when only the
    # env file said MPXD_WORKERS=2.
    monkeypatch.setenv("MPXD_WORKERS", "2")
    result = run_cli("--unix", "/tmp/mpxd-test-never-bound.sock", COUNTER)
    assert result.exit_code == 2
    assert ("Error: --unix and --control cannot be used with --workers (--workers from "
            "MPXD_WORKERS in the environment)") in result.output
    monkeypatch.delenv("MPXD_WORKERS")
    result = run_cli("--workers", "2", "--unix", "/tmp/mpxd-test-never-bound.sock", COUNTER)
    assert result.output.rstrip().endswith("cannot be used with --workers")


def test_mpxd_host_from_the_environment(tmp_path):
    env = dict(os.environ, MPXD_HOST="127.0.0.1", MPXD_PORT="0")
    child = subprocess.Popen([*MPXD, COUNTER], stderr=subprocess.PIPE, text=True,
                             env=env, cwd=ROOT)
    try:
        first = child.stderr.readline()
        assert "listening on 127.0.0.1:" in first
        assert "::1" not in first
    finally:
        child.terminate()
        child.wait(timeout=10)
    assert "listening on [::1]" not in child.stderr.read()


def test_a_port_in_use_exits_1_naming_address_and_port():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [*MPXD, "--port", str(port), "--host", "127.0.0.1", COUNTER],
            capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert result.returncode == 1
    assert f"127.0.0.1:{port}" in result.stderr
    assert "in use" in result.stderr
    assert "Traceback" not in result.stderr


def test_python_dash_m_mpxd_is_the_same_command():
    result = subprocess.run([*MPXD, "--version"], capture_output=True, text=True,
                            timeout=30, cwd=ROOT)
    assert result.returncode == 0 and mpxd.__version__ in result.stdout


# ------------------------------------------- threads the script leaves running

STRAY_THREAD = """
import threading, time

def poll_forever():
    while True:
        time.sleep(0.1)

threading.Thread(target=poll_forever, name="poller").start()   # not daemon=True

def handle_request(s):
    s.response = "ok"
"""


def test_check_does_not_wait_for_a_thread_the_script_started(write_script):
    # Python waits at exit for every non-daemon thread: --check said "ok"
    # and then never returned.
    path = write_script(STRAY_THREAD)
    result = subprocess.run([*MPXD, "--check", path], capture_output=True, text=True,
                            timeout=20, cwd=ROOT)
    assert result.returncode == 0
    assert f"{path}: ok" in result.stdout
    assert "not waiting for 1 thread the script started (poller)" in result.stderr


def test_the_daemon_exits_on_term_despite_a_thread_the_script_started(mpxd, write_script):
    # It used to log "stopped", let its pidfile go, and run on until killed.
    m = mpxd(["--port", "0", "--host", "127.0.0.1", write_script(STRAY_THREAD)])
    m.wait_listening()
    assert m.stop(timeout=10) == 0
    log = m.stderr()
    assert log.index("INFO stopped") < log.index(
        "WARNING not waiting for 1 thread the script started (poller)")


def test_a_script_named_like_a_standard_module_is_warned_about(tmp_path):
    # csv.py doing "import csv" imported itself (its directory comes first on
    # sys.path), passed --check, and failed on every request.
    script = tmp_path / "csv.py"
    script.write_text("import csv\n"
                      "def handle_request(s):\n"
                      "    s.response = ','.join(next(csv.reader([s.request])))\n")
    result = subprocess.run([*MPXD, "--check", str(script)], capture_output=True,
                            text=True, timeout=20, cwd=ROOT)
    assert result.returncode == 0
    assert (f"WARNING {script} has the name of the standard library module csv: "
            f"'import csv' (in the script or any library) may load this file instead; "
            f"rename it") in result.stderr
    plain = subprocess.run([*MPXD, "--check", COUNTER], capture_output=True, text=True,
                           timeout=20, cwd=ROOT)
    assert plain.returncode == 0 and plain.stderr == ""


@pytest.mark.parametrize("name, hook", [("handle_opne", "handle_open"),
                                        ("on_startup", "on_start"),
                                        ("on_stopped", "on_stop"),
                                        ("on_stoping", "on_stopping")])
def test_a_hook_name_misspelled_is_warned_about(write_script, caplog, name, hook):
    # It would never be called, without a word.
    path = write_script(f"def {name}(x):\n    pass\n"
                        "def handle_request(s):\n    s.response = 'ok'\n")
    load_script(path)
    assert f"defines {name} but no {hook}: misspelled? mpxd calls only {hook}" \
        in caplog.text


def test_no_warning_for_helpers_named_unlike_a_hook(write_script, caplog):
    path = write_script("def handle_line(s):\n    pass\n"
                        "def handle_connect(s):\n    pass\n"
                        "from os.path import join as handle_opne\n"   # not its own
                        "def handle_request(s):\n    s.response = 'ok'\n")
    load_script(path)
    assert "misspelled" not in caplog.text


def test_handle_request_misspelled_says_so(write_script):
    message = load_error(write_script("def handle_requests(s):\n    pass\n"))
    assert message.endswith("does not define handle_request(s) (it defines "
                            "handle_requests: misspelled?)")
