"""Command-line flags shared by the launch CLIs, and the one way they parse and run.

Every CLI keeps its flags in a FlagValues of its own (`FLAGS = flags.FlagValues()`), so CLIs imported into
one process (the tests) never collide, and its `main(argv)` parses its argv itself (`parse`), so a test calls
`main(["--x=1"])` exactly as a shell would. The shared flags:

    --experiment   a registry experiment (stage1, stage2, stage3)
    --model        a model size preset (test, tiny, 2b, 7b, 72b); `model_choice` is None when not given, so
                   a run that starts from a checkpoint takes that checkpoint's model
    --data         training data: launch.prepare_data's output folder or an ArrayRecord glob (stages.data_source)
    --set          KEY=VALUE overrides, repeatable; dotted paths into a frozen config, parsed by the
                   field's type (registry.apply_overrides)

Errors name the value and the valid choices: an unknown flag lists the flags, an enum lists its values.
`python -m launch.X` goes through `run`: absl's app.run (logging set-up), a ValueError or FileNotFoundError from
main becomes one `ERROR: ...` line and exit status 2, an int returned by main is the exit status.
"""
from __future__ import annotations

import sys
from typing import Callable, Sequence

from absl import app, flags

from experiments import registry, stages
from qwen2vl_jax.train import distributed

HELP_FLAGS = ("-h", "--help", "--helpshort", "--helpfull")
EXIT_USAGE = 2


def define_experiment(fv: flags.FlagValues, default: str = "stage1") -> None:
    flags.DEFINE_enum("experiment", default, list(registry.EXPERIMENTS), "registry experiment", flag_values=fv)


def define_model(fv: flags.FlagValues, default: str = "tiny", help: str = "model size preset") -> None:
    flags.DEFINE_enum("model", default, list(stages.MODELS), help, flag_values=fv)


def model_choice(fv: flags.FlagValues) -> str | None:
    """--model when given on the command line, else None (the default then depends on init_from)."""
    return fv.model if fv["model"].present else None


def define_data(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("data", None, "training data: launch.prepare_data's output folder (DIR/train, DIR/heldout), "
                        "a folder of *.array_record shards, or a glob; replaces the experiment's data mixture",
                        flag_values=fv)


def define_set(fv: flags.FlagValues, what: str = "the experiment config") -> None:
    flags.DEFINE_multi_string(
        "set", [], f"KEY=VALUE override of {what} (dotted path, e.g. optim.peak_lr=1e-4; repeatable; typed by "
                   "the field; tuples as Python literals)", flag_values=fv)


def define_list(fv: flags.FlagValues, name: str, default: Sequence[str], choices: Sequence[str], help: str) -> None:
    """A comma-separated list flag whose items must come from `choices` ('' = empty list)."""
    flags.DEFINE_list(name, list(default), f"{help}; comma list from {','.join(choices)}", flag_values=fv)
    flags.register_validator(
        name, lambda items: all(i in choices for i in items),
        message=f"each item must be one of {', '.join(choices)}", flag_values=fv)


def parse(fv: flags.FlagValues, argv: Sequence[str], doc: str | None = None,
          positional: Sequence[str] = ()) -> list[str]:
    """Parses `argv` (no program name) into `fv`, from the defaults up (a second call does not inherit the
    first's values), and returns the positional arguments, exactly len(positional) of them (their names,
    e.g. ("SRC", "DST")). --help prints `doc` and the flags and exits 0; a bad flag or a wrong number of
    positional arguments prints one ERROR line and exits 2."""
    argv = list(argv)
    if any(a in HELP_FLAGS for a in argv):
        print((doc or "").strip() + "\n\nflags:\n" + flags_help(fv))
        raise SystemExit(0)
    for name in fv:
        fv[name].unparse()           # back to the default (FlagValues.unparse_flags would also log about it)
    try:
        rest = fv(["prog", *argv])[1:]
    except flags.UnrecognizedFlagError as e:
        valid = ", ".join(f"--{name}" for name in sorted(fv) if name not in ("flagfile", "undefok"))
        _usage_error(f"{e}; valid: {valid}")
    except flags.Error as e:
        _usage_error(str(e))
    if len(rest) != len(positional):
        if not positional:
            _usage_error(f"unexpected arguments {rest}: every option is a --flag (see --help)")
        _usage_error(f"expected {' '.join(positional)}, got {rest}")
    return rest


def flags_help(fv: flags.FlagValues) -> str:
    """One entry per flag, alphabetical: `--name: help (default: value)`."""
    lines = []
    for name in sorted(fv):
        if name in ("flagfile", "undefok"):
            continue
        f = fv[name]
        kind = f"<{'|'.join(f.enum_values)}>: " if getattr(f, "enum_values", None) else ""
        prefix = "--[no]" if f.boolean else "--"
        lines.append(f"  {prefix}{name}: {kind}{f.help} (default: {f.default_as_str or 'none'})")
    return "\n".join(lines)


def _usage_error(message: str):
    print(f"ERROR: {message}", file=sys.stderr)
    raise SystemExit(EXIT_USAGE)


def run(main: Callable[[Sequence[str]], object]) -> None:
    """`python -m launch.X`: app.run(main) with main parsing its own flags (`parse`). main's int result is the
    exit status (anything else: 0); a ValueError (bad configuration) or FileNotFoundError (a path that is not
    there) prints `ERROR: ...` and exits 2."""
    def entry(argv):
        try:
            result = main(argv[1:])
        except (ValueError, FileNotFoundError) as e:
            print(f"ERROR: {e}", file=sys.stderr)
            return EXIT_USAGE
        return result if isinstance(result, int) else 0

    def mark_parsed(argv):       # absl's own flags (logging) keep their defaults; main parses the rest
        flags.FLAGS.mark_as_parsed()
        return argv

    distributed.quiet_cpu_host()        # before any backend starts: no libtpu probe on a CPU-only host
    app.run(entry, flags_parser=mark_parsed)
