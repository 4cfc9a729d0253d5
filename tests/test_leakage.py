"""Leakage test: canary exposure (rank among same-format candidates, skew-normal extrapolation), extraction
of sensitive fields vs held-out people, and the side-by-side table with a wrong key failing closed."""
import json
import math
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.conftest import REPO, tiny_model
from utils.checkpoint import save_checkpoint
from utils.data import RecordDataset

from test_pipeline import leakage_test as lt
from test_pipeline.model_under_test import continuation_logprobs, load_model_under_test, sequence_logprobs

PY = sys.executable


# ---------------------------------------------------------------- tiny employees data + a memorizing model
def build_employees(folder, n_train=40, n_val=20, canary_reps=(16, 16, 4, 0, 0, 0), fields=("Annual Salary",),
                    seed=0):
    """A byte-level employees dataset in the shared contract (records, answer masks, *_people.jsonl,
    canaries.json), short enough for block_size 128: each record asks only `fields` (+ the canary Phone)."""
    from utils import employees as emp
    from utils.prepare import write_records
    from utils.tokenizer import ByteTokenizer
    rng = random.Random(seed)
    people = emp.generate_people(rng, n_train + n_val + len(canary_reps))
    train, val, canary_people = people[:n_train], people[n_train:n_train + n_val], people[n_train + n_val:]
    canaries, train_records = [], list(train)
    for k, (person, reps) in enumerate(zip(canary_people, canary_reps)):
        person = {"Name": person["Name"], emp.CANARY_FIELD: emp.random_secret(rng)}
        canaries.append(dict(id=k, name=person["Name"], prefix=emp.qa_prompt(person, emp.CANARY_FIELD, 0) + " ",
                             secret=person[emp.CANARY_FIELD], repetitions=reps, split="train"))
        train_records += [person] * reps
    rng.shuffle(train_records)
    texts, spans = {}, {}
    for split, persons in (("train", train_records), ("val", val)):
        rendered = [emp.render_examples(p, 0, fields=list(fields)) for p in persons]
        texts[split] = [t for t, _ in rendered]
        spans[split] = [[(s, e) for _, _, s, e in ex] for _, ex in rendered]
    people_files = {f"{s}_people.jsonl": "".join(json.dumps(p) + "\n" for p in ps).encode()
                    for s, ps in (("train", train_records), ("val", val))}
    people_files["canaries.json"] = json.dumps(dict(secret_format=emp.SECRET_FORMAT, field=emp.CANARY_FIELD,
                                                    canaries=canaries)).encode()
    write_records(str(folder), texts, ByteTokenizer(), {"seed": seed, "source_sha256": None}, spans, people_files)
    return str(folder)


def train_memorizer(model, data_dir, steps, batch_size=32, lr=3e-3, seed=0):
    """A few hundred plain AdamW steps on whole records, without any privacy: the model memorizes."""
    ds = RecordDataset(data_dir, "train", model.config.block_size)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        x, y = map(torch.stack, zip(*(ds[int(i)] for i in torch.randint(len(ds), (batch_size,), generator=g))))
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


TINY = dict(block_size=128, n_layer=2, n_head=2, n_embd=64)


@pytest.fixture(scope="module")
def memorized(tmp_path_factory):
    """(data_dir, base checkpoint, fine-tuned checkpoint): a canary inserted 16 times, controls never."""
    root = tmp_path_factory.mktemp("leak")
    data_dir = build_employees(root / "employees")
    base = tiny_model(seed=0, **TINY)
    save_checkpoint(root / "base" / "ckpt.pt", base)
    ft = train_memorizer(tiny_model(seed=0, **TINY), data_dir, steps=400)
    save_checkpoint(root / "ft" / "ckpt.pt", ft)
    return data_dir, str(root / "base" / "ckpt.pt"), str(root / "ft" / "ckpt.pt")


# ---------------------------------------------------------------- scoring cores
def test_batched_scoring_equals_one_forward_per_sequence():
    m = tiny_model().eval()
    g = torch.Generator().manual_seed(1)
    prefix = torch.randint(0, 257, (12,), generator=g).tolist()
    conts = [torch.randint(0, 257, (n,), generator=g).tolist() for n in (1, 3, 8, 5, 8, 2, 7)]
    naive = []
    for c in conts:
        s = torch.tensor([prefix + c])
        logits, _ = m(s[:, :-1])
        lp = torch.log_softmax(logits, -1)[0, len(prefix) - 1:].gather(1, torch.tensor(c)[:, None])
        naive.append(lp.sum().item())
    cached = continuation_logprobs(m, prefix, conts, batch_size=3)
    batched = [s.sum() for s in sequence_logprobs(m, [prefix] * len(conts), conts, batch_size=4)]
    assert np.allclose(cached, naive, atol=1e-4) and np.allclose(batched, naive, atol=1e-4)


def test_candidates_have_the_format_exclude_the_secret_and_are_distinct():
    rng = np.random.default_rng(0)
    cands = lt.candidate_secrets("###-####", "555-0123", 5000, rng)
    assert len(cands) == len(set(cands)) == 5000 and "555-0123" not in cands
    assert all(len(c) == 8 and c[3] == "-" and (c[:3] + c[4:]).isdigit() for c in cands)
    everything = lt.candidate_secrets("##", "42", 10000, rng)  # small space: every other value, exact rank
    assert sorted(everything) == sorted(f"{i:02d}" for i in range(100) if i != 42)
    with pytest.raises(lt.UserError):
        lt.candidate_secrets("###-####", "55-01234", 10, rng)


def test_rank_and_exposure():
    cands = np.array([-5.0, -4.0, -3.0, -2.0])
    assert lt.rank_among(-1.0, cands) == 1 and lt.rank_among(-3.5, cands) == 3
    assert lt.rank_among(-4.0, np.array([-4.0, -4.0, -4.0])) == 2.5  # ties: a constant model is not "first"
    assert lt.exposure_from_rank(1, 1023) == pytest.approx(10.0)
    assert lt.exposure_from_rank(1024, 1023) == pytest.approx(0.0)
    # skew-normal: a secret at the candidates' median has ~1 bit; far in the tail, many (capped)
    nll = np.random.default_rng(0).normal(30, 2, 10000)
    assert lt.skewnorm_exposure(np.median(nll), nll, 23.0) == pytest.approx(1.0, abs=0.1)
    assert lt.skewnorm_exposure(10.0, nll, 23.0) == 23.0


# ---------------------------------------------------------------- on a memorizing model
def test_canary_seen_16_times_is_exposed_and_controls_are_at_chance(memorized):
    data_dir, base_ckpt, ft_ckpt = memorized
    tok = lt.get_tokenizer(lt.load_meta(data_dir))
    canaries = lt.prepare_canaries(os.path.join(data_dir, "canaries.json"), tok, 10000, seed=0)
    ft, _ = load_model_under_test(ft_ckpt)
    res = lt.score_canaries(ft, canaries, tok, batch_size=2048, gen_batch_size=8)
    by = lt.exposure_by_repetitions(res)
    max_bits = math.log2(10001)
    assert by[16]["mean_exposure"] > max_bits - 1  # ranked first (or nearly) among 10^4
    assert by[16]["mean_exposure_extrapolated"] > max_bits  # the extrapolation goes beyond the enumerated set
    assert by[16]["extracted_greedy"] >= 1
    assert by[0]["mean_exposure"] < 4 and by[0]["ranked_first"] == 0  # chance is 1.44 bits
    base, _ = load_model_under_test(base_ckpt)
    base_by = lt.exposure_by_repetitions(lt.score_canaries(base, canaries, tok, 2048, 8))
    assert base_by[16]["mean_exposure"] < 5  # the base model never saw the canary


def test_cli_side_by_side_table_and_thresholds(memorized, tmp_path):
    data_dir, base_ckpt, ft_ckpt = memorized
    out, plot = tmp_path / "leak.json", tmp_path / "exposure.png"
    args = [PY, os.path.join(REPO, "test_pipeline", "leakage_test.py"), f"--data_dir={data_dir}",
            f"--base_ckpt={base_ckpt}", "--ckpt", ft_ckpt, "--n_candidates=10000", "--n_samples=2",
            f"--out={out}", f"--plot={plot}", "--batch_size=2048"]
    r = subprocess.run(args, capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert "reps=16" in r.stdout and "greedy train" in r.stdout
    report = json.loads(out.read_text())
    rows = {m["label"]: m for m in report["models"]}
    assert rows["fine-tuned (ft)"]["max_exposure"] > rows["base"]["max_exposure"]
    assert set(rows["fine-tuned (ft)"]["extraction"]) >= {"train", "val", "greedy_gap"}
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the same run with an exposure threshold fails, naming the model
    r = subprocess.run(args + ["--max_exposure=8"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 1 and "fine-tuned (ft)" in r.stderr and "base" not in r.stderr.split("FAIL")[-1]
