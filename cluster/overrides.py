"""Hydra overrides checked before Hydra runs: each one it would refuse becomes one ConfigError line.

Hydra parses and applies overrides inside ``@hydra.main`` (and, for ``-m``, inside its sweeper, per run),
before our error handling, and reports a refusal in four lines or more with exit code 1. Here the same
overrides are parsed with Hydra's own grammar and composed against the real config (with ``-m``, one
composition per value of every sweep), and a refusal becomes one line naming the override and the fix:
a misspelt key with its close matches, a removed key with what replaces it, a value Hydra's grammar
cannot read with the quoting that works, a config group option that does not exist with the options.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator, Sequence

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cluster.config import CONF_DIR
from shards.errors import ConfigError

CONFIG_NAME = "config"

# Keys the config had and no longer has: what replaces each (the message says to drop the override).
REMOVED = {
    "shards.overlap": "box smoothing context is face.smooth_radius (boxes are smoothed over the whole video "
    "in preparation) and needs no setting",
}

_NOT_A_KEY = ("+", "~")


def compose(overrides: Sequence[str], *, hydra: bool = False) -> DictConfig:
    """The shipped config composed with ``overrides`` (``hydra``: with its ``hydra`` node); one-line
    ConfigError for an override Hydra refuses (:func:`explain`)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    overrides = list(overrides)
    parse(overrides)
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return hydra_compose(CONFIG_NAME, overrides=overrides, return_hydra_config=hydra)
    except (ConfigCompositionException, OverrideParseException, OmegaConfBaseException) as err:
        raise ConfigError(explain(err, overrides)) from None


def check_command_line(argv: Sequence[str]) -> None:
    """Check the overrides of a ``@hydra.main`` command line (``python -m cluster.render ...``) as Hydra
    would apply them, for a run and for every run of a ``-m`` sweep; ConfigError (one line) on the first
    refusal (``--cfg`` composes the same config). Command lines that are not a run (``--help``, ``--config-dir``,
    anything argparse refuses) are left to Hydra."""
    from hydra._internal.utils import get_args_parser

    try:
        args, extra = get_args_parser().parse_known_args(list(argv))
    except SystemExit:  # argparse's own refusal: Hydra prints it
        return
    other = (
        args.help,
        args.hydra_help,
        args.info,
        args.shell_completion,
        args.config_path,
        args.config_name,
        args.config_dir,
        args.experimental_rerun,
    )
    if extra or any(other):
        return
    overrides = list(args.overrides)
    parsed = parse(overrides, multirun=args.multirun)
    for runs in sweep_runs(overrides, parsed) if args.multirun else [overrides]:
        compose(runs, hydra=True)


def parse(overrides: Sequence[str], *, multirun: bool = True) -> list[Override]:
    """Each override through Hydra's grammar; ConfigError naming the one it cannot read. A sweep (a
    comma-separated value) is refused unless ``multirun``."""
    parser = OverridesParser.create()
    parsed = []
    for i, text in enumerate(overrides):
        try:
            (override,) = parser.parse_overrides([text])
        except OverrideParseException as err:
            raise ConfigError(_unparsable(text, overrides[i - 1] if i else None, err.message)) from None
        if override.is_sweep_override() and not multirun:
            raise ConfigError(_sweep_in_run(text))
        parsed.append(override)
    return parsed


def sweep_runs(overrides: Sequence[str], parsed: Sequence[Override]) -> Iterator[list[str]]:
    """Runs of a ``-m`` sweep that together use every value of every sweep at least once (run ``i`` takes
    value ``i`` of each sweep, cycling the shorter ones): as many compositions as the longest sweep has
    values, each one a run the sweep would make."""
    values = [
        [f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()]
        if o.is_sweep_override() and o.is_discrete_sweep()
        else [text]
        for text, o in zip(overrides, parsed, strict=True)
    ]
    for i in range(max((len(v) for v in values), default=1)):
        yield [v[i % len(v)] for v in values]


def explain(err: Exception, overrides: Sequence[str]) -> str:
    """One line for Hydra's refusal ``err`` of ``overrides``: the override, the problem, the fix."""
    text = str(err)
    if isinstance(err, OverrideParseException):
        return _unparsable(err.override, None, err.message)
    if isinstance(err, MissingConfigException) and err.missing_cfg_file:
        group, _, name = err.missing_cfg_file.rpartition("/")
        given = _given(group, overrides, value=name)
        options = ", ".join(err.options or []) or "none"
        return f"{given}: {group} has no option {name!r} (options: {options})"
    if m := re.match(r"Could not override '([^']+)'", text):
        return _unknown_key(m[1], overrides)
    if m := re.search(r"An item is already at '([^']+)'", text):
        given = _given(m[1], overrides, prefix="+")
        value = given.split("=", 1)[1] if "=" in given else "..."
        return (
            f"{given}: {m[1]} is already in the config, and + adds only keys it lacks; "
            f"write {m[1]}={value} (or ++{m[1]}={value} to add or override)"
        )
    if m := re.search(r"Could not delete from config\. '([^']+)' does not exist", text):
        return f"{_given(m[1], overrides, prefix='~')}: {m[1]} is not in the config, so there is nothing to delete"
    if m := re.match(r"Ambiguous value for argument '(.*)'$", text.splitlines()[0]):
        return _sweep_in_run(m[1])
    lines = [
        line.strip() for line in text.splitlines() if line.strip() and not line.startswith("Config search")
    ]
    cause = err.__cause__
    if isinstance(cause, OmegaConfBaseException):
        lines.append(str(cause).splitlines()[0])
    return f"invalid override: {'; '.join(lines) or type(err).__name__}"


def _unknown_key(key: str, overrides: Sequence[str]) -> str:
    """A key without ``+`` that the config lacks: removed (and what replaces it), misspelt (close
    matches), or new (add it with ``+``)."""
    given = _given(key, overrides)
    value = given.split("=", 1)[1] if "=" in given else "..."
    for removed, instead in REMOVED.items():
        if key == removed or key.startswith(removed + "."):
            return f"{given}: {removed} was removed: {instead}; drop {given}"
    known = _known_keys(key, [o for o in overrides if o != given])
    parent, _, leaf = key.rpartition(".")
    here = [k for k in known if k.rpartition(".")[0] == parent]
    elsewhere = [k for k in known if k.rpartition(".")[0] != parent]
    siblings = sorted(k.rpartition(".")[2] for k in here)
    # The same name in another group (render.smooth_radius -> face.smooth_radius), else a close name in
    # the same group (render.bacth_size -> render.batch_size), else a very close one in another group.
    close = _close(leaf, elsewhere, 1.0) or _close(leaf, here, 0.6) or _close(leaf, elsewhere, 0.8)
    if close:
        hint = f"did you mean {' or '.join(close)}?"
    elif siblings:
        more = ", ..." if len(siblings) > 16 else ""
        hint = f"{parent or 'the top level'} has {', '.join(siblings[:16])}{more}"
    else:
        hint = "see the README's table of overrides"
    return (
        f"{given}: {key} is not a known setting ({hint}); to add a key the config lacks, write +{key}={value}"
    )


def _close(leaf: str, keys: list[str], cutoff: float) -> list[str]:
    """``keys`` whose last part is among the (at most 3) closest to ``leaf``, closest first."""
    names = difflib.get_close_matches(leaf, sorted({k.rpartition(".")[2] for k in keys}), n=3, cutoff=cutoff)
    return [k for name in names for k in keys if k.rpartition(".")[2] == name]


def _known_keys(key: str, overrides: Sequence[str]) -> list[str]:
    """Every key (dotted) of the config the other overrides compose, the ``hydra`` node only for a
    ``hydra.`` key; the shipped config's when those overrides fail too."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with_hydra = key.startswith("hydra.")
    for attempt in (list(overrides), []):
        try:
            with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
                cfg = hydra_compose(CONFIG_NAME, overrides=attempt, return_hydra_config=with_hydra)
        except Exception:  # noqa: BLE001 - only a list of suggestions depends on it
            continue
        tree = OmegaConf.to_container(cfg, resolve=False)
        if not with_hydra:
            tree.pop("hydra", None)
        return list(_leaves(tree, ""))
    return []


def _leaves(node: dict, prefix: str) -> Iterator[str]:
    """Every key of a nested dict, dotted (a node's own key too: ``render``, ``render.batch_size``)."""
    for k, v in node.items():
        yield f"{prefix}{k}"
        if isinstance(v, dict):
            yield from _leaves(v, f"{prefix}{k}.")


def _given(key: str, overrides: Sequence[str], prefix: str = "", value: str | None = None) -> str:
    """The last override, as typed, that sets ``key`` (to ``value`` when given); ``key`` when none does."""
    for text in reversed(overrides):
        name, _, val = text.partition("=")
        if name.lstrip("+~") == key and name.startswith(prefix) and value in (None, val):
            return text
    return prefix + key if value is None else f"{prefix}{key}={value}"


def _unparsable(text: str, previous: str | None, problem: str) -> str:
    """An override Hydra's grammar cannot read: a word split off a value at a space, or a value with
    characters the grammar reserves (spaces before brackets, parentheses, quotes, ``=``)."""
    problem = problem.strip().splitlines()[0] if problem.strip() else "not Hydra's override grammar"
    if problem.startswith("LexerNoViableAltException"):
        problem = "a character its grammar reserves"
    key, eq, value = text.partition("=")
    if not eq:
        if previous is not None and "=" in previous:
            pkey, _, pvalue = previous.partition("=")
            return (
                f"{text!r} is not an override (key=value): it looks like the rest of {pkey}={pvalue} "
                f"split at a space; quote a value with spaces for Hydra inside the shell's quotes: "
                f"{_quoted(pkey, f'{pvalue} {text}')}"
            )
        return f"{text!r} is not an override: write key=value (e.g. render.batch_size=4, or +key=value to add one)"
    return (
        f"{text}: Hydra cannot read this value ({problem}); quote it for Hydra inside the shell's quotes: "
        f"{_quoted(key, value)}"
    )


def _sweep_in_run(text: str) -> str:
    key, _, value = text.partition("=")
    return (
        f"{text}: a comma makes a sweep (one run per value: cluster.render -m); for a value with a comma, "
        f"quote it: {_quoted(key, value)}"
    )


def _quoted(key: str, value: str) -> str:
    """How to type ``key=value`` in a POSIX shell so that Hydra reads ``value`` as one string."""
    if "'" not in value:
        return f"{key}=\"'{value}'\""
    if '"' not in value:
        return f"'{key}=\"{value}\"'"
    return f"{key}=... with the value in Hydra's quotes (README: paths with spaces or special characters)"
