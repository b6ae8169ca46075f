"""MkDocs hooks that make the site from the project's own data (``hooks:`` in mkdocs.yml).

* ``cli.md`` is generated from ``aace.cli.build_parser()``: every subcommand (found by walking
  the subparsers, so a new one appears by itself), its usage, and every flag with its help,
  default and choices. Nothing of the parser is retyped in the docs.
* ``<!-- results: NAME.md -->`` in a page is replaced by ``benchmarks/results/NAME.md`` (its
  title dropped, its headings placed under the page's current heading, its figures linked), and
  every ``benchmarks/results/*.png`` and ``*.md`` is published under ``results/``; rerunning a
  benchmark updates its page. ``<!-- results: NAME.md | Prefix one | Prefix two -->`` keeps
  only the sections whose heading starts with one of the prefixes.
* Math written as ``$...$`` or ``$$...$$`` (pymdownx.arithmatex, generic mode) is converted to
  MathML at build time (latex2mathml), which browsers render natively: no JavaScript, no CDN.

Everything here runs offline; any error (an unknown results file, a formula that does not
parse) raises, so ``mkdocs build --strict`` fails on it.
"""

from __future__ import annotations

import argparse
import html
import os
import posixpath
import re
from pathlib import Path

from latex2mathml.converter import convert as latex_to_mathml
from mkdocs.structure.files import File, Files, InclusionLevel

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
RESULTS_URI = "results"  # where the results files appear in the site

_DIRECTIVE = re.compile(r"^<!--\s*results:\s*(?P<args>[^>]*?)\s*-->\s*$", re.MULTILINE)
_HEADING = re.compile(r"^(#{1,6})\s+(.*)$")
_IMAGE = re.compile(r"!\[(?P<alt>[^\]]*)\]\((?P<src>[^)\s]+)\)")


# --- the command-line page ---------------------------------------------------------------------


def _escape(text: str) -> str:
    """Help text as literal Markdown: ``wrn{depth}_{width}`` must not turn italic."""
    for char in "\\`*_[]":
        text = text.replace(char, "\\" + char)
    return text.replace("<", "&lt;").replace(">", "&gt;").replace("|", "&#124;")


def _invocation(action: argparse.Action) -> str:
    if not action.option_strings:
        return action.metavar or action.dest
    if action.nargs == 0:
        return ", ".join(action.option_strings)
    metavar = action.metavar or action.dest.upper()
    if isinstance(metavar, tuple):
        metavar = " ".join(metavar)
    return ", ".join(f"{option} {metavar}" for option in action.option_strings)


def _describe_action(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    formatter = parser._get_formatter()
    help_text = formatter._expand_help(action) if action.help else ""
    facts = []
    if action.choices is not None and not isinstance(action, argparse._SubParsersAction):
        facts.append("choices: " + ", ".join(f"`{choice}`" for choice in action.choices))
    default = action.default
    if (
        default is not None
        and default is not argparse.SUPPRESS
        and not isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction)
        and action.nargs != 0
    ):
        facts.append(f"default: `{default}`")
    if action.required and action.option_strings:
        facts.append("required")
    body = _escape(help_text.strip())
    if body and not body.endswith("."):
        body += "."
    body = " ".join(part for part in [body, "; ".join(facts).capitalize()] if part)
    return f"`{_invocation(action)}`\n:   {body or '(no help text)'}\n"


def _subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {c.dest: (c.help or "").replace("%%", "%") for c in action._choices_actions}
            for name, subparser in action.choices.items():
                found.append((name, helps.get(name) or "", subparser))
    return found


def _parser_section(parser: argparse.ArgumentParser, level: int) -> list[str]:
    lines = []
    if parser.description:
        lines += [_escape(parser.description), ""]
    usage = parser.format_usage().strip().removeprefix("usage: ")
    lines += ["```text", usage, "```", ""]
    for group in parser._action_groups:
        actions = [
            action
            for action in group._group_actions
            if action.help is not argparse.SUPPRESS
            and not isinstance(action, argparse._HelpAction | argparse._SubParsersAction)
        ]
        if not actions:
            continue
        title = {"options": "Options", "positional arguments": "Arguments"}.get(
            group.title or "", group.title or "Options"
        )
        lines += [f"{'#' * (level + 1)} {title}", ""]
        if group.description:
            lines += [_escape(group.description), ""]
        lines += [_describe_action(parser, action) for action in actions]
    return lines


def cli_page() -> str:
    from aace.cli import build_parser

    parser = build_parser()
    commands = _subcommands(parser)
    lines = [
        "# Command line reference",
        "",
        "Generated from the argument parser of `aace` (`aace.cli.build_parser()`) when the site",
        "is built, so it is the `--help` of the installed version: every subcommand, every flag,",
        "its help and its default. `aace` is the console script the package installs;",
        "`python -m aace` is the same. How the pieces fit together is in",
        "[Training runs](training.md).",
        "",
        "| command | what it does |",
        "| :--- | :--- |",
    ]
    lines += [
        f"| [`aace {name}`](#aace-{name}) | {_escape(help_)} |" for name, help_, _ in commands
    ]
    lines += ["", "## aace", ""] + _parser_section(parser, 2)
    for name, help_, subparser in commands:
        lines += [f"## aace {name}", ""]
        if help_ and not subparser.description:
            lines += [_escape(help_[0].upper() + help_[1:]) + ".", ""]
        lines += _parser_section(subparser, 2)
    return "\n".join(lines) + "\n"


# --- results files ------------------------------------------------------------------------------


def _results_file(name: str) -> Path:
    path = RESULTS / name
    if path.suffix != ".md" or not path.is_file():
        known = ", ".join(sorted(p.name for p in RESULTS.glob("*.md")))
        raise FileNotFoundError(f"results directive: no file {path}; known: {known}")
    return path


def _sections(lines: list[str], prefixes: list[str]) -> list[str]:
    """Keep the preamble and the sections whose heading starts with one of ``prefixes``."""
    kept, keep = [], True
    for line in lines:
        heading = _HEADING.match(line)
        if heading:
            keep = any(heading.group(2).strip().startswith(prefix) for prefix in prefixes)
        if keep:
            kept.append(line)
    return kept


def include_results(markdown: str, page_uri: str) -> str:
    """Replace every results directive of a page's Markdown by the file it names."""
    page_dir = posixpath.dirname(page_uri)

    def link(target: str) -> str:
        return posixpath.relpath(f"{RESULTS_URI}/{target}", page_dir or ".")

    def replace(match: re.Match[str]) -> str:
        name, *prefixes = [part.strip() for part in match.group("args").split("|")]
        text = _results_file(name).read_text()
        before = markdown[: match.start()]
        levels = [len(h.group(1)) for h in map(_HEADING.match, before.splitlines()) if h]
        base = levels[-1] if levels else 1
        body, provenance = [], []
        lines = text.splitlines()
        if lines and lines[0].startswith("# "):
            lines = lines[1:]
        if prefixes:
            lines = _sections(lines, prefixes)
        sub_levels = [len(h.group(1)) for h in map(_HEADING.match, lines) if h]
        shift = base + 1 - min(sub_levels) if sub_levels else 0
        for line in lines:
            heading = _HEADING.match(line)
            if line.startswith(("Command:", "Machine:")):
                provenance.append(line)
            elif heading:
                # "Title: a long explanation" -> a short heading (and table of contents entry)
                # with the explanation as the paragraph under it.
                title, _, explanation = heading.group(2).partition(": ")
                body.append(f"{'#' * min(6, len(heading.group(1)) + shift)} {title}")
                if explanation:
                    body += ["", explanation[0].upper() + explanation[1:] + "."]
            else:
                body.append(
                    _IMAGE.sub(
                        lambda m: (
                            f"![{m.group('alt')}]({link(m.group('src'))})"
                            if "/" not in m.group("src")
                            else m.group(0)
                        ),
                        line,
                    )
                )
        command = [p for p in provenance if p.startswith("Command:")]
        machine = [p for p in provenance if p.startswith("Machine:")]
        out = []
        for line in command:
            out += [f"**Command**: {line.removeprefix('Command:').strip()}", ""]
        out += [
            f'??? info "Machine and source: `benchmarks/results/{name}`"',
            "",
            *[f"    {line}" for line in machine],
            "",
            f"    The whole file: [{name}]({link(name)}).",
            "",
        ]
        return "\n".join(out + body).strip() + "\n"

    return _DIRECTIVE.sub(replace, markdown)


# --- math --------------------------------------------------------------------------------------

_INLINE_MATH = re.compile(r'<span class="arithmatex">\\\((?P<tex>.+?)\\\)</span>', re.DOTALL)
_BLOCK_MATH = re.compile(r'<div class="arithmatex">\\\[(?P<tex>.+?)\\\]</div>', re.DOTALL)


def _mathml(match: re.Match[str], display: str) -> str:
    tex = html.unescape(match.group("tex")).strip()
    return latex_to_mathml(tex, display=display)


def render_math(content: str) -> str:
    content = _BLOCK_MATH.sub(lambda m: _mathml(m, "block"), content)
    return _INLINE_MATH.sub(lambda m: _mathml(m, "inline"), content)


# --- MkDocs events -----------------------------------------------------------------------------


def on_files(files: Files, config) -> Files:
    files.append(File.generated(config, "cli.md", content=cli_page()))
    for path in sorted(RESULTS.glob("*")):
        if path.suffix in (".png", ".md"):
            uri = f"{RESULTS_URI}/{path.name}"
            # a page of its own, reached from the pages that include it, not from the nav
            inclusion = (
                InclusionLevel.NOT_IN_NAV if path.suffix == ".md" else InclusionLevel.UNDEFINED
            )
            files.append(
                File.generated(config, uri, abs_src_path=os.fspath(path), inclusion=inclusion)
            )
    return files


def on_page_markdown(markdown: str, page, config, files) -> str:
    return include_results(markdown, page.file.src_uri)


def on_page_content(html_content: str, page, config, files) -> str:
    return render_math(html_content)
