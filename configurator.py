"""
Configuration, nanoGPT style:  python train.py config/x.py --key=value --other_key value

Each script keeps its defaults as a dict at its top and calls `configure(defaults, argv)`:
- positional arguments are config files: Python (`key = value` lines, run as nanoGPT does: they are
  your own files) or YAML (.yaml/.yml);
- `--key=value` or `--key value` overrides, parsed as Python literals and never executed
  (a bare word that is not a literal stays a string);
- a key that is not a default, or a value of the wrong type, is refused naming the key and the valid keys;
- `-h` or `--help` prints a usage line, the calling script's docstring and every key with its default
  and the trailing comment of its line in the defaults' source (read with ast/tokenize, so the help
  cannot drift from the code), then exits 0 before anything else runs.
"""
import ast
import io
import os
import sys
import tokenize

from utils.cli import UserError

HELP_FLAGS = ("-h", "--help")


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


def _entry_comments(path):
    """[({key: literal value or None}, {key: comment})] for every dict display and dict(...) call in a
    source file: the comment is the one trailing the line where the key's value ends (or where the key
    starts)."""
    with open(path, encoding="utf-8") as f:
        source = f.read()
    comments = {t.start[0]: t.string.lstrip("#").strip()
                for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type == tokenize.COMMENT}
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Dict):
            items = [(k.value, k, v) for k, v in zip(node.keys, node.values)
                     if isinstance(k, ast.Constant) and isinstance(k.value, str)]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict":
            items = [(kw.arg, kw, kw.value) for kw in node.keywords if kw.arg]
        else:
            continue
        described, values = {}, {}
        for key, key_node, value in items:
            text = comments.get(value.end_lineno) or comments.get(key_node.lineno)
            if text:
                described[key] = text
            try:
                values[key] = ast.literal_eval(value)
            except (ValueError, SyntaxError, TypeError):
                values[key] = None  # computed (e.g. a path): matches no default
        found.append((values, described))
    return found


def _source_files(frame):
    """The calling script's file, then the project modules it imports anywhere (e.g. utils.finetune, whose
    DEFAULTS finetune_dp uses and finetune_encrypt_memmap merges): where the defaults are written. Found
    by path under the repository, never imported (help must not run anything)."""
    root = os.path.dirname(os.path.abspath(__file__))
    own = frame.f_globals.get("__file__")
    if not own or not os.path.isfile(own):
        return []
    files = [os.path.abspath(own)]
    with open(own, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    for node in ast.walk(tree):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] + [f"{node.module}.{a.name}" for a in node.names] \
            if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
        for name in names:
            path = os.path.join(root, *name.split("."))
            for candidate in (path + ".py", os.path.join(path, "__init__.py")):
                if os.path.isfile(candidate):
                    files.append(candidate)
    return list(dict.fromkeys(files))


def describe(defaults, files):
    """{key: one-line description}: the comment of the key in the dict it comes from, found in `files`:
    the dict whose literal value for the key is the default (the one a merge such as
    {**ft_loop.DEFAULTS, **DEFAULTS} kept), then the one sharing the most keys with defaults, then the
    first file. A key that dict leaves uncommented gets none, never a namesake's comment elsewhere."""
    best = {}
    for rank, path in enumerate(files):
        for values, described in _entry_comments(path):
            shared = set(values) & set(defaults)
            for key in shared:
                same = values[key] == defaults[key] and type(values[key]) is type(defaults[key])
                score = (same, len(shared), -rank)
                if key not in best or score > best[key][0]:
                    best[key] = (score, described.get(key))
    return {key: text for key, (_, text) in best.items() if text}


def _show(value):
    """A default as you would type it after --key=."""
    if isinstance(value, str) and value and not any(c.isspace() or c in "'\"\\" for c in value):
        return value
    if isinstance(value, (tuple, list)) and value and all(isinstance(v, str) and v and "," not in v for v in value):
        return ",".join(value)
    return repr(value)


def help_text(defaults, frame, argv):
    """Usage line, the script's docstring, then `--key=default  # description` for every key."""
    spec = frame.f_globals.get("__spec__")
    root = os.path.dirname(os.path.abspath(__file__))
    path = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else "script.py"
    script = f"-m {spec.name}" if spec is not None and frame.f_globals.get("__name__") == "__main__" \
        else os.path.relpath(path, root) if path.startswith(root + os.sep) else sys.argv[0]  # as the README writes it
    args = sys.argv[1:]
    command = args[:len(args) - len(argv)] if len(argv) <= len(args) and args[len(args) - len(argv):] == list(argv) \
        else []  # a subcommand the caller stripped off (e.g. `apply`)
    lines = [f"usage: python {' '.join([script] + command)} [CONFIG.py|CONFIG.yaml ...] [--key=value ...]", ""]
    doc = (frame.f_globals.get("__doc__") or "").strip("\n")
    if doc:
        lines += [doc.rstrip(), ""]
    lines.append("options (default shown; config files set the same keys; a bare --flag sets a boolean True):")
    described = describe(defaults, _source_files(frame))
    for key in defaults:
        option = f"  --{key}={_show(defaults[key])}"
        lines.append(f"{option:<34}  # {described[key]}" if key in described else option)
    return "\n".join(lines)


def configure(defaults, argv):
    """A new dict: defaults, then config files in order, then --overrides. -h/--help: print the help, exit 0."""
    if any(arg in HELP_FLAGS for arg in argv):
        print(help_text(defaults, sys._getframe(1), argv))
        raise SystemExit(0)
    config = dict(defaults)
    valid = ", ".join(sorted(defaults))

    def apply(key, value, source):
        if key not in defaults:
            raise UserError(f"unknown config key '{key}' (from {source}); valid keys: {valid} "
                            "(--help describes them)")
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
            elif isinstance(defaults.get(body.replace("-", "_")), bool):
                key, text = body, "True"  # a bare --flag switches a boolean on
            elif body.replace("-", "_") not in defaults:
                raise UserError(f"unknown option --{body}; valid keys: {valid} (--help describes them)")
            else:
                raise UserError(f"--{body} needs a value (--{body}=VALUE)")
            apply(key.replace("-", "_"), _literal(text), "command line")
        else:
            for key, value in _read_config_file(arg).items():
                apply(key, value, arg)
        i += 1
    return config
