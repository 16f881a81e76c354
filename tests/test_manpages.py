"""The manual pages: clean roff, and every flag, command, key and operation of the code documented."""

from __future__ import annotations

import argparse
import inspect
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import msgspec
import pytest

from rbeed import cli, config, daemon, operations

ROOT = Path(__file__).resolve().parent.parent
MAN = ROOT / "man"
PAGES = ["rbeed.8", "rbee.1", "rbeed.toml.5"]

# -- reading roff -------------------------------------------------------------------------------

_FONT_MACROS = {"B", "I", "SM", "SB"}  # arguments joined with spaces
_ALTERNATING_MACROS = {"BR", "RB", "BI", "IB", "IR", "RI"}  # arguments joined without
_ARGUMENT = re.compile(r'"((?:[^"]|"")*)"?|(\S+)')
_SPECIALS = {r"\(dq": '"', r"\(aq": "'", r"\(ga": "`", r"\(em": "\u2014", r"\(en": "\u2013",
             r"\(lq": "\u201c", r"\(rq": "\u201d", r"\(pc": "\u00b7", r"\(bu": "\u2022"}  # fmt: skip


def _unescape(text: str) -> str:
    text = re.sub(r"\\f(\[[^]]*\]|\(..|.)", "", text)  # font changes
    for escape, char in _SPECIALS.items():
        text = text.replace(escape, char)
    return text.replace(r"\-", "-").replace(r"\&", "").replace(r"\e", "\\")


def _arguments(rest: str) -> list[str]:
    return [m[1].replace('""', '"') if m[1] is not None else m[2] for m in _ARGUMENT.finditer(rest)]


def plain_lines(page: str) -> list[str]:
    """The page's lines with font macros and escapes resolved to their text; other requests kept."""
    lines = []
    for line in (MAN / page).read_text().splitlines():
        if line.startswith(('.\\"', "'\\\"")):
            continue
        if line.startswith("."):
            macro, _, rest = line[1:].partition(" ")
            if macro in _FONT_MACROS:
                line = " ".join(_arguments(rest))
            elif macro in _ALTERNATING_MACROS:
                line = "".join(_arguments(rest))
            elif macro in ("SH", "SS"):
                line = f".{macro} " + " ".join(_arguments(rest))
        lines.append(_unescape(line))
    return lines


class Page:
    """A page split into sections (.SH and .SS titles); each section's tagged entries (.TP/.TQ)."""

    def __init__(self, name: str):
        self.name = name
        self.lines = plain_lines(name)
        self.sections: dict[str, list[str]] = {}
        current = ""
        for line in self.lines:
            if line.startswith((".SH ", ".SS ")):
                current = line[4:].strip()
                assert current not in self.sections, f"{name}: section {current!r} appears twice"
                self.sections[current] = []
            else:
                self.sections.setdefault(current, []).append(line)

    def section(self, title: str) -> list[str]:
        assert title in self.sections, f"{self.name} has no section {title!r}"
        return self.sections[title]

    def text(self, title: str | None = None) -> str:
        lines = self.lines if title is None else self.section(title)
        return " ".join(line for line in lines if not line.startswith("."))

    @staticmethod
    def entries(lines: list[str]) -> list[tuple[str, str]]:
        """(tag, body text) of each .TP/.TQ entry; .TQ tags share the body of their .TP."""
        entries: list[tuple[str, list[str]]] = []
        bodies: list[list[str]] = []
        expect_tag = False
        for line in lines:
            if line in (".TP", ".TQ"):
                if line == ".TP":
                    bodies.append([])
                expect_tag = True
            elif expect_tag:
                entries.append((line.strip(), bodies[-1]))
                expect_tag = False
            elif line.startswith((".PP", ".SH", ".SS")) and bodies:
                bodies.append([])  # a paragraph ends the entry
            elif bodies and not line.startswith("."):
                bodies[-1].append(line)
        return [(tag, " ".join(body)) for tag, body in entries]


def tagged(entries: list[tuple[str, str]], word: str) -> list[tuple[str, str]]:
    """The entries whose tag starts with `word` as a whole word."""
    return [(tag, body) for tag, body in entries if re.match(re.escape(word) + r"(\s|$|\[|=|,)", tag)]


def help_output(*argv: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, *argv, "--help"], capture_output=True, text=True, env=env, check=True)
    return result.stdout


def long_options(help_text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", help_text)) - {"--help"}


def environment_variables(source: str) -> set[str]:
    """Environment variables that Python source reads or sets by name."""
    calls = re.findall(r'(?:environ\.get|environ\.pop|getenv|_first_dir)\(\s*"([A-Z][A-Z0-9_]*)"', source)
    items = re.findall(r'environ\["([A-Z][A-Z0-9_]*)"\]', source)
    tests = re.findall(r'"([A-Z][A-Z0-9_]*)"\s+(?:not\s+)?in\s+(?:os\.)?environ', source)
    tuples = [name for group in re.findall(r"_ENV_VARIABLES = \(([^)]*)\)", source)
              for name in re.findall(r'"([A-Z][A-Z0-9_]*)"', group)]  # fmt: skip
    return {*calls, *items, *tests, *tuples}


# -- every page ---------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("groff") is None, reason="groff is not installed")
@pytest.mark.parametrize("device", [[], ["-Tutf8"]], ids=["ps", "utf8"])
@pytest.mark.parametrize("page", PAGES)
def test_groff_reports_nothing(page, device):
    result = subprocess.run(["groff", "-man", "-ww", "-z", *device, str(MAN / page)], capture_output=True, text=True)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


@pytest.mark.parametrize("page", PAGES)
def test_page_header_and_standard_sections(page):
    name, section = page.rsplit(".", 1)
    first = [line for line in (MAN / page).read_text().splitlines() if not line.startswith('.\\"')][0]
    assert first.startswith(f".TH {name.upper()} {section} ")
    sections = [title for title in Page(page).sections if title]  # "": the lines before NAME
    assert sections[:2] == ["NAME", "SYNOPSIS"] and sections[-1] == "SEE ALSO", sections


@pytest.mark.parametrize("page", PAGES)
def test_see_also_pages_refer_to_each_other(page):
    see_also = Page(page).text("SEE ALSO")
    for other in PAGES:
        if other != page:
            name, section = other.rsplit(".", 1)
            assert f"{name}({section})" in see_also


# -- rbeed(8) -----------------------------------------------------------------------------------


def test_rbeed_documents_every_serve_flag():
    page = Page("rbeed.8")
    flags = long_options(help_output("-m", "rbeed", "serve"))
    assert {"--config", "--listen", "--no-tcp", "--log-level"} <= flags  # the help was parsed
    options = page.entries(page.section("OPTIONS"))
    synopsis = page.text("SYNOPSIS")
    for flag in flags | {"--version"}:
        assert tagged(options, flag), f"OPTIONS has no entry for {flag}"
    for flag in flags:
        assert flag in synopsis, f"SYNOPSIS lacks {flag}"
    for choice in re.search(r"--log-level \{([^}]*)\}", help_output("-m", "rbeed", "serve"))[1].split(","):
        assert choice in tagged(options, "--log-level")[0][1]


def test_rbeed_documents_the_worker_command():
    flags = long_options(help_output("-m", "rbeed", "worker"))
    assert {"--id", "--model", "--device", "--n-batch"} <= flags
    synopsis = Page("rbeed.8").text("SYNOPSIS")
    for flag in flags:
        assert flag in synopsis, f"SYNOPSIS lacks rbeed worker {flag}"


def _documented_default(field: msgspec.structs.FieldInfo) -> str:
    if field.required:
        return "required"
    default = field.default if field.default is not msgspec.NODEFAULT else field.default_factory()
    if default is None:
        return "optional"
    return "default " + msgspec.json.encode(default).decode()


@pytest.mark.parametrize("operation", operations.AnyOperation.__args__, ids=lambda op: op.__struct_config__.tag)
def test_rbeed_documents_every_operation_and_field(operation):
    name = operation.__struct_config__.tag
    page = Page("rbeed.8")
    entries = page.entries(page.section(name))
    fields = msgspec.structs.fields(operation)
    documented = {tag.split()[0] for tag, _ in entries}
    assert documented == {field.name for field in fields}, f"{name}: fields in the page differ from the code"
    for field in fields:
        [(tag, body)] = tagged(entries, field.name)
        assert _documented_default(field) in tag, f"{name}.{field.name}: {tag!r}"
        assert body, f"{name}.{field.name} has no description"


def test_rbeed_operations_section_counts_them_all():
    page = Page("rbeed.8")
    assert len(operations.NAMES) == 20  # the seed's 16, model_copy, embed, tokenize and detokenize
    assert f"{len(operations.NAMES)} operations" in page.text("OPERATIONS")
    order = [title for title in page.sections if title in operations.NAMES]
    assert order == list(operations.NAMES)


def test_rbeed_signals_name_every_setting_a_reload_cannot_change():
    signals = Page("rbeed.8").text("SIGNALS")
    for key in daemon.RESTART_ONLY:
        assert key in signals, key


def test_rbeed_documents_every_environment_variable_it_uses():
    sources = "\n".join(path.read_text() for path in (ROOT / "rbeed").glob("*.py") if path.name != "cli.py")
    variables = environment_variables(sources)
    assert {"NOTIFY_SOCKET", "LISTEN_FDS", "JOURNAL_STREAM", "RBEED_WORKER_TOKEN_DELAY"} <= variables
    page = Page("rbeed.8")
    documented = {tag for tag, _ in page.entries(page.section("ENVIRONMENT"))}
    assert variables <= documented, f"undocumented: {sorted(variables - documented)}"
    [(_, body)] = tagged(page.entries(page.section("ENVIRONMENT")), "RBEED_WORKER_TOKEN_DELAY")
    assert "tests only" in body


def test_rbeed_exit_status():
    page = Page("rbeed.8")
    assert {tag for tag, _ in page.entries(page.section("EXIT STATUS"))} == {"0", "1", "2"}


# -- rbee(1) ------------------------------------------------------------------------------------


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(command words, parser) of every leaf command of rbee."""
    subparsers = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    if not subparsers:
        yield path, parser
        return
    for name, child in subparsers[0].choices.items():
        yield from _commands(child, (*path, name))


_GLOBAL = {"--url", "--socket", "--json", "--help", "--version"}
COMMANDS = list(_commands(cli.make_parser()))


def test_rbee_parser_walk_finds_the_commands():
    names = {" ".join(words) for words, _ in COMMANDS}
    assert {"infer", "submit", "hive list", "model download", "worker spawn", "job follow"} <= names
    assert len(names) == len(COMMANDS) == 25


def _command_blocks(page: Page) -> dict[str, str]:
    """Each `rbee WORDS ...` entry under COMMANDS: its tag, and the text up to the next command."""
    start = page.lines.index(".SH COMMANDS")
    end = next(i for i in range(start + 1, len(page.lines)) if page.lines[i].startswith(".SH "))
    blocks: dict[str, str] = {}
    current = None
    for tag, body in page.entries(page.lines[start:end]):
        if tag.startswith("rbee "):
            current = tag
            blocks[tag] = body
        elif current is not None:  # an option of the current command
            blocks[current] += f" {tag} {body}"
    return blocks


@pytest.mark.parametrize("words,parser", COMMANDS, ids=[" ".join(words) for words, _ in COMMANDS])
def test_rbee_documents_every_command_and_option(words, parser):
    page = Page("rbee.1")
    command = "rbee " + " ".join(words)
    pattern = re.compile(re.escape(command) + r"(\s|$)")
    matches = [(tag, text) for tag, text in _command_blocks(page).items() if pattern.match(tag)]
    assert len(matches) == 1, f"rbee.1 has {len(matches)} entries for {command!r}"
    [(tag, text)] = matches
    for action in parser._actions:
        if not action.option_strings:
            metavar = action.metavar or action.dest
            assert metavar in tag, f"{command}: the entry {tag!r} lacks {metavar}"
        for option in action.option_strings:
            if option.startswith("--") and option not in _GLOBAL:
                assert option in text, f"{command}: {option} is not documented"
                default = re.search(r"\(default ([^):]+)\)", action.help or "")
                if default:
                    assert f"default {default[1]}" in text, f"{command} {option}: default {default[1]}"
    synopsis = page.text("SYNOPSIS")
    assert all(word in synopsis for word in words), f"SYNOPSIS lacks {command}"


def test_rbee_documents_the_global_options():
    page = Page("rbee.1")
    options = page.entries(page.section("OPTIONS"))
    for option in _GLOBAL:
        assert any(option in re.split(r"[\s,]+", tag) for tag, _ in options), option
    synopsis = page.text("SYNOPSIS")
    for option in _GLOBAL - {"--help"}:
        assert option in synopsis


def test_rbee_documents_every_exit_status():
    page = Page("rbee.1")
    documented = {tag for tag, _ in page.entries(page.section("EXIT STATUS"))}
    codes = {str(value) for name, value in vars(cli).items() if name.startswith("EXIT_")}
    assert documented == codes == {"0", "1", "2", "3", "129", "130", "143"}


def test_rbee_documents_its_environment():
    variables = environment_variables(inspect.getsource(cli)) | environment_variables(
        inspect.getsource(config.default_runtime_dir)
    )
    assert {"RBEE_URL", "RBEE_MODEL", "NO_COLOR", "XDG_RUNTIME_DIR"} <= variables
    page = Page("rbee.1")
    environment = page.text("ENVIRONMENT") + " ".join(tag for tag, _ in page.entries(page.section("ENVIRONMENT")))
    for variable in variables:
        assert variable in environment, variable


# -- rbeed.toml(5) ------------------------------------------------------------------------------


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | list):
        return msgspec.json.encode(value).decode()
    return repr(value)


def _sections(struct_type: type = config.Config, prefix: str = ""):
    """(section title in the page, dotted prefix, fields) for the plain keys of each table."""
    plain = []
    for field in msgspec.structs.fields(struct_type):
        if isinstance(field.type, type) and issubclass(field.type, msgspec.Struct):
            yield from _sections(field.type, f"{prefix}{field.name}.")
        else:
            plain.append(field)
    if plain:
        yield (f"[{prefix[:-1]}]" if prefix else "TOP-LEVEL KEYS"), prefix, plain


SECTIONS = list(_sections())


@pytest.mark.parametrize("title,prefix,fields", SECTIONS, ids=[title for title, _, _ in SECTIONS])
def test_toml_documents_every_key_with_its_default_and_reload(title, prefix, fields):
    page = Page("rbeed.toml.5")
    entries = page.entries(page.section(title))
    assert {tag.split()[0] for tag, _ in entries} == {field.name for field in fields}
    defaults = config.Config()
    for part in prefix.split(".")[:-1]:
        defaults = getattr(defaults, part)
    for field in fields:
        [(tag, body)] = tagged(entries, field.name)
        default = getattr(defaults, field.name)
        if default is None:
            assert "not set" in tag, tag
        else:
            shown = {f"= {_toml_value(default)}"}
            if field.name == "socket_mode":
                shown.add(f"= 0o{default:o}")
            assert any(tag.endswith(form) for form in shown), f"{tag!r}: expected one of {shown}"
        assert "SIGHUP:" in body, f"{prefix}{field.name}: reload behaviour not stated"
        restart = "restart needed" in body.split("SIGHUP:", 1)[1]
        assert restart == (prefix + field.name in daemon.RESTART_ONLY), f"{prefix}{field.name}: reload"


def _example_blocks() -> list[str]:
    blocks, block = [], None
    for line in plain_lines("rbeed.toml.5"):
        if line == ".EX":
            block = []
        elif line == ".EE":
            blocks.append("\n".join(block))
            block = None
        elif block is not None:
            block.append(line)
    return blocks


def test_toml_examples_are_valid_and_the_first_is_the_defaults(tmp_path):
    blocks = _example_blocks()
    assert len(blocks) >= 2
    for number, block in enumerate(blocks):
        path = tmp_path / f"example{number}.toml"
        path.write_text(block)
        loaded = config.load(path)
        if number == 0:
            assert msgspec.to_builtins(loaded) == msgspec.to_builtins(config.Config())
    contrib = tomllib.loads((ROOT / "contrib" / "rbeed.toml").read_text())
    assert tomllib.loads(blocks[0]) == contrib
