"""train.py's command line, sample.py, utils/inspect_ckpt.py and utils/plot.py on tiny byte-level runs (the
loop itself, utils/pretrain.py, is tested in tests/test_pretrain.py, whose tiny runs these tests share)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import sample
import train
from tests.conftest import REPO, make_record_dataset
from tests.test_pretrain import TINY, data_dir, run, texts, trained  # noqa: F401 (data_dir, trained: fixtures)
from utils.checkpoint import load_checkpoint
from utils import inspect_ckpt, plot
from utils.cli import UserError, run_cli
from utils.data import write_meta, write_split

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny models: threads only add contention


def cli_error(main, argv, capsys):
    """Run a script's main as its __main__ does; return (exit code, stderr)."""
    capsys.readouterr()  # drop what earlier steps printed
    with pytest.raises(SystemExit) as e:
        run_cli(main, argv)
    return e.value.code, capsys.readouterr().err


def assert_one_line_error(code, err, *needles):
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    for needle in needles:
        assert needle in err, err


def script(*args, cwd=REPO):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=ENV, cwd=cwd, timeout=120)


# ---------------------------------------------------------------------------- the command line
@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs the gloo backend")
def test_ddp_two_ranks_equal_one_process_with_twice_the_batch(data_dir, tmp_path):
    args = [f"--{k}={v}" for k, v in {**TINY, "data_dir": data_dir, "max_iters": 3, "eval_interval": 100}.items()]
    r = script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *args,
               f"--out_dir={tmp_path / 'ddp'}", "--batch_size=2", "--gradient_accumulation_steps=2")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "2 process(es)" in r.stdout
    single = run(data_dir, tmp_path / "single", max_iters=3, eval_interval=100, batch_size=4)
    ddp = load_checkpoint(tmp_path / "ddp" / "ckpt.pt")
    assert ddp["iter_num"] == 3 and len(ddp["rng"]) == 2
    ref = single["model"].state_dict()
    assert max((ddp["model"][k] - ref[k]).abs().max().item() for k in ref) < 1e-5


def gpt2_records(folder):
    """A GPT-2-tokenized records dataset (ids only: no BPE ranks needed)."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        records = [rng.integers(0, 50256, 60).tolist() + [50256] for _ in range(10)]
        write_split(folder, split, records, 50257)
    write_meta(folder, {"tokenizer": "gpt2", "vocab_size": 50257, "dtype": "uint16", "splits": {}})
    return folder


def test_init_from_huggingface_dir(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=64))
    hf.save_pretrained(tmp_path / "hf")
    gpt2_data = gpt2_records(tmp_path / "gpt2_data")
    result = run(str(gpt2_data), tmp_path / "ft", init_from=str(tmp_path / "hf"), max_iters=2, n_layer=4)
    ckpt = load_checkpoint(tmp_path / "ft" / "ckpt.pt")
    assert ckpt["model_args"]["vocab_size"] == 50257 and ckpt["model_args"]["block_size"] == 64
    assert ckpt["config"]["n_layer"] == 1 and ckpt["config"]["tokenizer"]["tokenizer"] == "gpt2"
    assert result["iter_num"] == 2
    resumed = run(str(gpt2_data), tmp_path / "ft", init_from="resume", max_iters=3)  # its own shape, not n_layer=4
    assert resumed["iter_num"] == 3

    byte_data = make_record_dataset(tmp_path / "bytes", texts(20, 2))
    code, err = cli_error(train.main, [f"--data_dir={byte_data}", f"--out_dir={tmp_path / 'x'}",
                                       f"--init_from={tmp_path / 'hf'}", "--device=cpu"], capsys)
    assert_one_line_error(code, err, "vocabulary mismatch")
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------- bad input
def test_bad_input_exits_2_through_the_real_cli(tmp_path):
    missing = tmp_path / "data" / "nothing_here"
    r = script("train.py", f"--data_dir={missing}", f"--out_dir={tmp_path / 'out'}")
    assert_one_line_error(r.returncode, r.stderr, "no prepared data", "prepare")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, needles", [
    (["--data_dir={empty}"], ["no prepared data", "prepare"]),
    (["--data_dir={data}", "--bacth_size=3"], ["unknown config key 'bacth_size'", "batch_size"]),
    (["--data_dir={data}", "--batch_size=abc"], ["--batch_size", "expected int"]),
    (["--data_dir={data}", "--batch_size=0"], ["--batch_size must be at least 1"]),
    (["--data_dir={data}", "--dtype=float8"], ["dtype must be"]),
    (["--data_dir={data}", "--init_from=no_such_model"], ["--init_from"]),
    (["--data_dir={data}", "--block_size=100000"], ["block_size 100000 is larger than"]),
])
def test_bad_config_or_data_refused_before_writing(data_dir, tmp_path, capsys, argv, needles):
    (tmp_path / "empty").mkdir()
    argv = [a.format(empty=tmp_path / "empty", data=data_dir) for a in argv]
    code, err = cli_error(train.main, argv + [f"--out_dir={tmp_path / 'out'}", "--device=cpu"], capsys)
    assert_one_line_error(code, err, *needles)
    assert not (tmp_path / "out").exists()


@pytest.fixture
def resumable(data_dir, tmp_path):
    out = tmp_path / "out"
    run(data_dir, out, max_iters=3)
    return out


def resume_error(resumable, capsys, data_dir, *extra):
    before = sorted(os.listdir(resumable)), (resumable / "ckpt.pt").read_bytes()
    argv = [f"--{k}={v}" for k, v in TINY.items()] + [f"--data_dir={data_dir}", f"--out_dir={resumable}",
                                                       "--init_from=resume", "--max_iters=6", *extra]
    code, err = cli_error(train.main, argv, capsys)
    assert (sorted(os.listdir(resumable)), (resumable / "ckpt.pt").read_bytes()) == before  # untouched
    return code, err


def test_resume_refuses_another_architecture(resumable, data_dir, capsys):
    code, err = resume_error(resumable, capsys, data_dir, "--n_layer=2")
    assert_one_line_error(code, err, "another architecture", "n_layer 1 != 2")


def test_resume_refuses_corrupt_or_truncated_checkpoint(resumable, data_dir, capsys):
    path = resumable / "ckpt.pt"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert_one_line_error(*resume_error(resumable, capsys, data_dir), "corrupt or truncated")
    path.write_bytes(b"not a checkpoint at all")
    assert_one_line_error(*resume_error(resumable, capsys, data_dir), "corrupt or truncated")


def test_resume_refuses_missing_checkpoint(data_dir, tmp_path, capsys):
    code, err = cli_error(train.main, [f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'none'}",
                                       "--init_from=resume", "--device=cpu"], capsys)
    assert_one_line_error(code, err, "does not exist")
    assert not (tmp_path / "none").exists()


def test_resume_refuses_data_with_another_vocabulary(resumable, tmp_path, capsys):
    words = tmp_path / "words"  # a word-level dataset: 6 tokens, another tokenizer
    write_split(words, "train", [[1, 2, 3, 4, 5, 0]] * 30, 6)
    write_split(words, "val", [[5, 4, 3, 2, 1, 0]] * 30, 6)
    write_meta(words, {"tokenizer": "word", "vocab_size": 6, "dtype": "uint16", "words": list("abcde")})
    code, err = resume_error(resumable, capsys, str(words))
    assert_one_line_error(code, err, "vocabulary mismatch", "'byte'", "'word'")


# ---------------------------------------------------------------------------- sample, inspect, plot
def test_sample_cli_greedy_identical_with_and_without_kv_cache(trained, capsys):
    argv = [f"--ckpt={trained[0] / 'ckpt.pt'}", "--start=the city", "--greedy", "--num_samples=2",
            "--max_new_tokens=40", "--device=cpu"]
    r = script("sample.py", *argv, "--use_kv_cache=True")
    assert r.returncode == 0, r.stderr
    sample.main(argv + ["--use_kv_cache=False"])
    assert capsys.readouterr().out == r.stdout
    samples = r.stdout.split("---------------\n")
    assert len(samples) == 3 and samples[0] == samples[1] and samples[0].startswith("the city")
    assert len(samples[0]) > len("the city") + 10


def test_sample_prompt_file_seed_and_errors(trained, tmp_path, capsys):
    out = trained[0]
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("salary of")
    argv = [f"--ckpt={out / 'ckpt.pt'}", f"--start=FILE:{prompt}", "--max_new_tokens=20", "--device=cpu",
            "--num_samples=2", "--top_k=10", "--top_p=0.9", "--temperature=1.0"]
    runs = []
    for seed in (1, 1, 2):
        sample.main(argv + [f"--seed={seed}"])
        runs.append(capsys.readouterr().out)
    assert runs[0] == runs[1] != runs[2] and runs[0].startswith("salary of")
    code, err = cli_error(sample.main, argv + ["--start=FILE:/no/such/prompt"], capsys)
    assert_one_line_error(code, err, "cannot read the prompt file")
    code, err = cli_error(sample.main, [f"--ckpt={tmp_path / 'missing.pt'}"], capsys)
    assert_one_line_error(code, err, "does not exist")


def test_checkpoint_tokenizer_fallbacks(tiny_ckpt):
    ckpt = load_checkpoint(tiny_ckpt)  # no tokenizer recorded, dataset 'records' not under data/: vocab 257
    assert sample.checkpoint_tokenizer(ckpt).name == "byte"
    words = {"tokenizer": "word", "vocab_size": 3, "words": ["hello", "world"]}
    assert sample.checkpoint_tokenizer({**ckpt, "config": {"tokenizer": words}}).decode([1, 2]) == "hello world"
    with pytest.raises(UserError, match="tokenizer"):
        sample.checkpoint_tokenizer({**ckpt, "model_args": {**ckpt["model_args"], "vocab_size": 1000}})


def test_inspect_ckpt_cli(trained, capsys):
    out, result = trained[0], trained[1]
    r = script("utils/inspect_ckpt.py", f"--ckpt={out / 'ckpt.pt'}", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    model = result["model"]
    assert info["params"]["total"] == model.get_num_params(non_embedding=False) == info["params"]["trainable"]
    assert info["params"]["embedding"] == 257 * 32 + 32 * 32  # token + position embeddings
    assert info["weights_tied"] and info["iter_num"] == 6
    shapes = {t["name"]: t["shape"] for t in info["tensors"]}
    assert shapes["transformer.wte.weight"] == [257, 32] and shapes["lm_head.weight"] == [257, 32]
    assert info["bytes_by_dtype"]["model"]["float32"] == 4 * info["params"]["total"]  # tied weight counted once
    n_tensors = len(list(model.parameters()))  # Adam: two moments per weight + a float step per tensor
    assert info["bytes_by_dtype"]["optimizer"]["float32"] == 2 * 4 * info["params"]["total"] + 4 * n_tensors
    inspect_ckpt.main([f"--ckpt={out / 'ckpt.pt'}"])
    text = capsys.readouterr().out
    assert "parameters: total" in text and "transformer.h.0.attn.c_attn.weight" in text


def test_plot_cli_writes_png(trained, tmp_path, capsys):
    out = trained[0]
    png = tmp_path / "plots" / "loss.png"
    r = script("utils/plot.py", f"--logs={out / 'log.jsonl'}", f"--out={png}")
    assert r.returncode == 0, r.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    argv = [f"--logs={out / 'log.jsonl'},{tmp_path / 'nope.jsonl'}", f"--out={tmp_path / 'x.png'}"]
    code, err = cli_error(plot.main, argv, capsys)
    assert_one_line_error(code, err, "nope.jsonl does not exist")
    assert not (tmp_path / "x.png").exists()


# ---------------------------------------------------------------------------- clear errors before the work
OOM_RUNNER = r'''
import resource, sys
import torch
torch.set_num_threads(1)
import train
from utils.cli import run_cli
# the address space in use now plus 1 GiB: the tiny model fits, a micro-batch of 20,000 windows does not
in_use = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (in_use + 2 ** 30, resource.RLIM_INFINITY))
run_cli(train.main, sys.argv[1:])
'''


def test_a_batch_too_large_for_memory_is_one_line_and_leaves_nothing(data_dir, tmp_path):
    out = tmp_path / "out"
    argv = [f"--{k}={v}" for k, v in TINY.items() if k != "batch_size"]
    r = subprocess.run([sys.executable, "-c", OOM_RUNNER, *argv, f"--data_dir={data_dir}", f"--out_dir={out}",
                        "--batch_size=20000"], capture_output=True, text=True, env=ENV, cwd=REPO, timeout=300)
    assert_one_line_error(r.returncode, r.stderr, "out of memory", "--batch_size")
    assert not out.exists()  # no log, no folder, no checkpoint


def pickled_weights_dir(folder, marker):
    """A GPT-2 save_pretrained-looking folder whose pytorch_model.bin is a pickle that would run code."""
    transformers = pytest.importorskip("transformers")
    transformers.GPT2Config(n_layer=1, n_head=2, n_embd=8, n_positions=32).save_pretrained(folder)

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"transformer.wte.weight": Payload()}, os.path.join(folder, "pytorch_model.bin"))
    return str(folder)


def test_init_from_a_pickle_that_runs_code_is_refused_in_one_line(data_dir, tmp_path, capsys):
    import finetune_dp
    marker = tmp_path / "code-ran"
    weights_dir = pickled_weights_dir(tmp_path / "evil", marker)
    out, gpt2_data = tmp_path / "out", gpt2_records(tmp_path / "gpt2_data")
    for main, argv in ((train.main, [f"--data_dir={gpt2_data}", f"--out_dir={out}", "--device=cpu"]),
                       (finetune_dp.main, [f"--data_dir={gpt2_data}", f"--out_dir={out}", "--base_ckpt="]),
                       (sample.main, ["--start=x"])):
        code, err = cli_error(main, argv + [f"--init_from={weights_dir}"], capsys)
        assert_one_line_error(code, err, "pickle that would run code", "refused")
    assert not marker.exists() and not out.exists()


def test_out_dir_that_is_a_file_is_refused_before_work(data_dir, tmp_path, capsys):
    import finetune_dp
    a_file = tmp_path / "not_a_dir"
    a_file.write_text("mine")
    for main, extra in ((train.main, []), (finetune_dp.main, ["--base_ckpt=/no/such.pt"])):
        code, err = cli_error(main, [f"--data_dir={data_dir}", f"--out_dir={a_file}", *extra], capsys)
        assert_one_line_error(code, err, f"--out_dir={a_file} is a file")
    assert a_file.read_text() == "mine"


def test_sample_refuses_a_non_utf8_prompt_and_absurd_lengths_before_loading(tmp_path, capsys):
    latin1 = tmp_path / "prompt.txt"
    latin1.write_bytes("Jos\xe9 Pe\xf1a".encode("latin-1"))
    missing = f"--ckpt={tmp_path / 'missing.pt'}"  # never read: the prompt is refused first
    code, err = cli_error(sample.main, [missing, f"--start=FILE:{latin1}"], capsys)
    assert_one_line_error(code, err, "is not UTF-8")
    for n in (-1, 10 ** 9):
        code, err = cli_error(sample.main, [missing, f"--max_new_tokens={n}"], capsys)
        assert_one_line_error(code, err, "--max_new_tokens must be in 0..")
