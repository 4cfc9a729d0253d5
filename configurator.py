"""
Configuration, nanoGPT style:  python train.py config/x.py --key=value --other_key value

Each script keeps its defaults as a dict at its top and calls `configure(defaults, argv)`:
- positional arguments are config files: Python (`key = value` lines, run as nanoGPT does: they are
  your own files) or YAML (.yaml/.yml);
- `--key=value` or `--key value` overrides, parsed as Python literals and never executed
  (a bare word that is not a literal stays a string);
- a key that is not a default, or a value of the wrong type, is refused naming the key and the valid keys.
"""
import ast
import os

from utils.cli import UserError


def _literal(text):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if text in ("true", "false"):
            return text == "true"
        return text  # a plain string such as out/base or cuda


def _check_type(key, value, default):
    """Return value converted to default's type, or raise a UserError."""
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if value in (0, 1):
            return bool(value)
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(default, (tuple, list)):
        if isinstance(value, (tuple, list)):
            return type(default)(value)
        if isinstance(value, str):  # --targets=attn,mlp
            return type(default)(v for v in value.split(",") if v)
        if isinstance(value, (int, float)) and not isinstance(value, bool):  # --canary_reps=16
            return type(default)([value])
    elif isinstance(value, type(default)):
        return value
    raise UserError(f"--{key}={value!r} has type {type(value).__name__}, expected {type(default).__name__}")


def _read_config_file(path):
    if not os.path.isfile(path):
        raise UserError(f"config file {path} does not exist")
    with open(path) as f:
        text = f.read()
    if path.endswith((".yaml", ".yml")):
        import yaml
        try:
            values = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise UserError(f"config file {path} is not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(values, dict):
            raise UserError(f"config file {path} must hold a mapping of keys to values")
        return values
    scope = {}
    try:
        exec(compile(text, path, "exec"), scope)  # the user's own config file, as in nanoGPT
    except Exception as e:
        raise UserError(f"config file {path} failed: {type(e).__name__}: {e}") from None
    return {k: v for k, v in scope.items() if not k.startswith("_") and not callable(v)
            and not isinstance(v, type(os))}


def configure(defaults, argv):
    """A new dict: defaults, then config files in order, then --overrides."""
    config = dict(defaults)
    valid = ", ".join(sorted(defaults))

    def apply(key, value, source):
        if key not in defaults:
            raise UserError(f"unknown config key '{key}' (from {source}); valid keys: {valid}")
        config[key] = _check_type(key, value, defaults[key])

    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--"):
            body = arg[2:]
            if "=" in body:
                key, text = body.split("=", 1)
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                key, text = body, argv[i + 1]
                i += 1
            elif isinstance(defaults.get(body), bool):
                key, text = body, "True"  # a bare --flag switches a boolean on
            else:
                raise UserError(f"--{body} needs a value (--{body}=VALUE)")
            apply(key.replace("-", "_"), _literal(text), "command line")
        else:
            for key, value in _read_config_file(arg).items():
                apply(key, value, arg)
        i += 1
    return config
