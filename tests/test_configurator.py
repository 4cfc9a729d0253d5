"""configurator.configure: config files (Python, YAML) then --overrides parsed as literals, never executed."""
import pytest

from configurator import configure
from utils.cli import UserError

DEFAULTS = dict(out_dir="out/base", batch_size=16, learning_rate=1e-3, compile=False, dropout=0.0,
                targets=("attn",), init_from="scratch", note=None)


def test_no_arguments_gives_a_copy_of_the_defaults():
    cfg = configure(DEFAULTS, [])
    assert cfg == DEFAULTS and cfg is not DEFAULTS
    cfg["batch_size"] = 1
    assert DEFAULTS["batch_size"] == 16


def test_overrides_are_parsed_as_literals_of_the_defaults_type():
    cfg = configure(DEFAULTS, ["--batch_size=32", "--learning_rate=3e-4", "--out_dir=out/x", "--dropout", "1",
                               "--targets=attn,mlp", "--init-from=gpt2", "--note=[1, 2]"])
    assert cfg["batch_size"] == 32 and type(cfg["batch_size"]) is int
    assert cfg["learning_rate"] == 3e-4
    assert cfg["dropout"] == 1.0 and type(cfg["dropout"]) is float  # an int literal widens to float
    assert cfg["out_dir"] == "out/x"
    assert cfg["targets"] == ("attn", "mlp")
    assert cfg["init_from"] == "gpt2"  # dashes in keys read as underscores
    assert cfg["note"] == [1, 2]  # a None default takes any literal
    assert configure(DEFAULTS, ["--out_dir='quoted dir'"])["out_dir"] == "quoted dir"


@pytest.mark.parametrize("argv, expected", [
    (["--compile"], True),
    (["--compile=True"], True),
    (["--compile=true"], True),
    (["--compile=False"], False),
    (["--compile=false"], False),
    (["--compile=0"], False),
    (["--compile", "--batch_size=2"], True),
])
def test_bool_flags(argv, expected):
    assert configure(DEFAULTS, argv)["compile"] is expected


def test_overrides_are_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    payload = f"__import__('os').system('touch {marker}')"
    cfg = configure(DEFAULTS, [f"--out_dir={payload}"])
    assert cfg["out_dir"] == payload  # stays a plain string
    with pytest.raises(UserError, match="batch_size"):
        configure(DEFAULTS, [f"--batch_size={payload}"])
    assert not marker.exists()


def test_unknown_key_names_the_key_and_the_valid_keys():
    with pytest.raises(UserError) as e:
        configure(DEFAULTS, ["--bacth_size=4"])
    message = str(e.value)
    assert "'bacth_size'" in message and "batch_size" in message and "learning_rate" in message


@pytest.mark.parametrize("arg, key", [
    ("--batch_size=abc", "batch_size"),
    ("--batch_size=1.5", "batch_size"),
    ("--batch_size=True", "batch_size"),  # a bool is not an int here
    ("--learning_rate=fast", "learning_rate"),
    ("--compile=2", "compile"),
    ("--out_dir=3", "out_dir"),
])
def test_wrong_type_is_refused_naming_the_key(arg, key):
    with pytest.raises(UserError, match=f"--{key}="):
        configure(DEFAULTS, [arg])


def test_missing_value_is_refused():
    with pytest.raises(UserError, match="--batch_size needs a value"):
        configure(DEFAULTS, ["--batch_size"])


def test_python_config_file_then_overrides_in_order(tmp_path):
    path = tmp_path / "cfg.py"
    path.write_text("import math\nbatch_size = 8\nlearning_rate = math.sqrt(1e-6)\n_private = 1\n"
                    "def helper():\n    pass\n")
    cfg = configure(DEFAULTS, [str(path)])
    assert cfg["batch_size"] == 8 and cfg["learning_rate"] == pytest.approx(1e-3)  # modules, _names, functions skipped
    assert configure(DEFAULTS, [str(path), "--batch_size=4"])["batch_size"] == 4
    assert configure(DEFAULTS, ["--batch_size=4", str(path)])["batch_size"] == 8  # later wins


def test_python_config_file_errors(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("batch_size = 1 / 0\n")
    with pytest.raises(UserError, match="ZeroDivisionError"):
        configure(DEFAULTS, [str(bad)])
    unknown = tmp_path / "unknown.py"
    unknown.write_text("batch_sise = 3\n")
    with pytest.raises(UserError, match=f"'batch_sise' \\(from {unknown}\\)"):
        configure(DEFAULTS, [str(unknown)])
    with pytest.raises(UserError, match="does not exist"):
        configure(DEFAULTS, [str(tmp_path / "missing.py")])


def test_yaml_config_files(tmp_path):
    good = tmp_path / "cfg.yaml"
    good.write_text("batch_size: 12\ncompile: true\ntargets: [attn, mlp]\nlearning_rate: 2\n")
    cfg = configure(DEFAULTS, [str(good)])
    assert cfg["batch_size"] == 12 and cfg["compile"] is True and cfg["targets"] == ("attn", "mlp")
    assert cfg["learning_rate"] == 2.0
    (tmp_path / "empty.yml").write_text("")
    assert configure(DEFAULTS, [str(tmp_path / "empty.yml")]) == DEFAULTS
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match="mapping"):
        configure(DEFAULTS, [str(tmp_path / "list.yaml")])
    (tmp_path / "broken.yaml").write_text("batch_size: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        configure(DEFAULTS, [str(tmp_path / "broken.yaml")])
    (tmp_path / "typed.yaml").write_text("batch_size: many\n")
    with pytest.raises(UserError, match="--batch_size="):
        configure(DEFAULTS, [str(tmp_path / "typed.yaml")])


def test_yaml_is_loaded_safely(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.yaml"
    path.write_text(f"out_dir: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(UserError, match="not valid YAML"):
        configure(DEFAULTS, [str(path)])
    assert not marker.exists()


def test_help_lists_each_key_with_its_default_and_comment_then_exits_0(tmp_path, capsys):
    script = tmp_path / "tool.py"
    script.write_text('"""A tool that does one thing."""\n'
                      "from configurator import configure\n"
                      "DEFAULTS = dict(\n"
                      "    out_dir='out/x',  # where results go\n"
                      "    steps=3,  # how many steps\n"
                      "    tags=('a', 'b'),\n"
                      ")\n"
                      "OTHER = {'steps': 9}  # a namesake in another dict is not its description\n"
                      "def main(argv):\n"
                      "    configure(DEFAULTS, argv)\n"
                      "    raise AssertionError('help must stop before the work')\n")
    import runpy
    namespace = runpy.run_path(str(script))
    for flag in ("--help", "-h"):
        with pytest.raises(SystemExit) as e:
            namespace["main"](["--steps=5", flag])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith("usage: python ") and "A tool that does one thing." in out
        assert "  --out_dir=out/x" in out and "# where results go" in out
        assert "  --steps=3" in out and "# how many steps" in out
        tags_line = next(line for line in out.splitlines() if line.startswith("  --tags="))
        assert tags_line.strip() == "--tags=a,b"  # listed, with no description to show


def test_unknown_bare_option_is_refused_as_unknown():
    with pytest.raises(UserError, match="unknown option --bogus; valid keys: .*batch_size"):
        configure(DEFAULTS, ["--bogus"])
