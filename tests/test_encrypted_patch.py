"""Encrypted parameter deltas (finetune_encrypt_memmap.py and the utils/patch_* modules): what enters the patch,
bit-exact round trips, every failure refused with the model untouched, tenants, and no plaintext on disk."""
import copy
import os
import subprocess
import sys

import pytest
import torch

from utils import finetune as ft_loop
from tests.conftest import REPO, make_record_dataset, tiny_model
from utils import patch_apply as pa
from utils import patch_cipher as pc
from utils import patch_errors as pe
from utils import patch_format as pf
from utils import patch_keys as pk
from utils import patch_payload as pp
from utils import secure_memory as sm
from utils.delta_tracker import DeltaTracker
from utils.tenant_registry import TenantRegistry
from utils.checkpoint import save_checkpoint
from utils.tokenizer import ByteTokenizer

TEXTS = [f"Context: {n}. Question: salary? Answer: {s}" for n, s in
         zip(["Ana", "Bo", "Cy", "Di", "Ed", "Flo", "Gus", "Hal", "Ivy", "Jo"],
             [41250, 77310, 50480, 68020, 39990, 91230, 45670, 58800, 62340, 70110])]
FT = dict(dp=False, save=False, batch_size=4, microbatch_size=4, eval_interval=0, log_interval=1000, seed=0)


def bits(t):
    return t.detach().view(-1).view(torch.int32) if t.dtype == torch.float32 else t.detach().view(-1)


def state(model):
    """Everything a patch could change: tensors (bitwise), tying, LoRA, requires_grad, the global RNG."""
    return {"sd": {k: bits(v).clone() for k, v in model.state_dict().items()}, "tied": model.weights_tied,
            "lora": copy.deepcopy(model.lora_config), "grad": [p.requires_grad for p in model.parameters()],
            "rng": torch.get_rng_state()}


def same_state(a, b):
    return (a["sd"].keys() == b["sd"].keys() and all(torch.equal(a["sd"][k], b["sd"][k]) for k in a["sd"])
            and a["tied"] == b["tied"] and a["lora"] == b["lora"] and a["grad"] == b["grad"]
            and torch.equal(a["rng"], b["rng"]))


def equal_params(model, trained):
    mine = dict(model.named_parameters())
    return all(n in mine and torch.equal(bits(mine[n]), bits(p)) for n, p in trained.named_parameters())


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_record_dataset(tmp_path_factory.mktemp("records"), TEXTS[:8], TEXTS[8:], answer_prefix="Answer:")


def run(data_dir, base, dp=False, delta_dtype="exact", **cfg):
    """Fine-tune a copy of `base` through finetune_dp with a DeltaTracker; returns (tracker, trained, plain, report)."""
    tracker = DeltaTracker(base, dp=dp)
    res = ft_loop.finetune({**FT, "data_dir": data_dir, "dp": dp, **cfg}, model=copy.deepcopy(base).train(),
                               on_model_ready=tracker, log=lambda *a: None)
    plain, rep = tracker.build(res["model"], delta_dtype)
    return tracker, res["model"], plain, rep


def sealed_of(plain, key, base, tracker, tenant="alice", **kw):
    """Sealed as the CLI does: DeltaTracker's arena encrypted in place (the payloads are not needed again)."""
    try:
        return pc.seal(plain, key, tenant=tenant, base_fingerprint=pa.base_fingerprint(base),
                       structure=tracker.structure, consume=True, **kw)
    finally:
        for t in plain:
            t.close()


@pytest.fixture(scope="module")
def full(data_dir):
    """Full fine-tune (non-private, AdamW), sealed with small chunks so tensors span several chunks."""
    base = tiny_model().eval()
    tracker, trained, plain, rep = run(data_dir, base, max_steps=4, learning_rate=3e-3)
    key = os.urandom(32)
    sealed = sealed_of(plain, key, base, tracker, chunk_bytes=4096)
    return dict(base=base, trained=trained, rep=rep, key=key, raw=sealed.tobytes(), header=sealed.header,
                blobs=sealed.blobs(), signed_len=sealed.signed_len,
                sealed_in_place=plain[0].buffer.arena.buffer is None)


@pytest.fixture(scope="module")
def lora(data_dir):
    base = tiny_model().eval()
    tracker, trained, plain, rep = run(data_dir, base, max_steps=3, lora_rank=4, learning_rate=3e-3)
    key = os.urandom(32)
    return dict(base=base, trained=trained, rep=rep, key=key,
                raw=sealed_of(plain, key, base, tracker, tenant="bob").tobytes())


# ----------------------------------------------------------------------------- what enters the patch
def test_full_round_trip_is_bit_exact_and_revert_restores_the_base(full):
    base, trained = full["base"], full["trained"]
    before = state(base)
    assert full["sealed_in_place"]  # DeltaTracker's payloads became the image: this is what the in-place seal gives
    applied = pa.apply_sealed_patch(base, full["raw"], full["key"], tenant="alice")
    assert not base.weights_tied  # finetune_dp untied lm_head; the patch rebuilt that
    assert equal_params(base, trained)
    applied.revert()
    assert same_state(before, state(base)) and base.weights_tied


def test_only_rows_that_saw_data_enter_the_patch(full):
    entries = {e["name"]: e for e in full["header"]["tensors"]}
    wte = entries["transformer.wte.weight"]
    assert wte["kind"] == "rows" and 0 < wte["rows"] < 257
    seen = set(b for t in TEXTS[:8] for b in ByteTokenizer().encode(t))  # inputs x (the eot is only a target)
    opened = pc.open_patch(pf.SealedPatch.from_bytes(full["raw"]), full["key"], "alice")
    i = list(entries).index("transformer.wte.weight")
    rows = set(opened.segments(i)[0].tolist())
    opened.plain.close()
    assert rows <= seen  # an untouched row can never be in the patch
    longest = max(len(t) for t in TEXTS[:8])
    assert entries["transformer.wpe.weight"]["kind"] == "rows" and entries["transformer.wpe.weight"]["rows"] <= longest


def test_payload_is_within_5_percent_of_the_changed_parameters(full):
    payload = sum(e["plain_bytes"] for e in full["header"]["tensors"])
    changed_bytes = full["rep"]["changed_values"] * 4
    assert full["rep"]["drift_values"] == 0
    assert changed_bytes <= payload <= 1.05 * changed_bytes


def test_an_embedding_with_no_candidate_rows_stores_nothing():
    base = torch.randn(16, 4)
    assert pp.delta_tensor("wte", base, base + 1.0, rows=[]) is None  # e.g. no row of it got a gradient
    entry = pp.delta_tensor("wte", base, base.index_add(0, torch.tensor([2]), torch.ones(1, 4)), rows=[2, 5])
    try:
        assert entry.kind == "rows" and entry.rows == 1
    finally:
        entry.close()


def test_weight_decay_and_untouched_tensors_stay_out():
    """Only wte rows 3 and 7 get a gradient; weight decay then moves every weight: none of that enters."""
    base = tiny_model().eval()
    model = copy.deepcopy(base)
    model.transformer.h[0].requires_grad_(False)  # frozen
    tracker = DeltaTracker(base)
    tracker(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    model.transformer.wte(torch.tensor([[3, 7, 3]])).pow(2).sum().backward()
    opt.step()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.mul_(1 - 1e-3)  # decay of every trainable weight, gradient or not
    plain, rep = tracker.build(model)
    try:
        assert [(t.name, t.kind, t.rows) for t in plain] == [("transformer.wte.weight", "rows", 2)]
        assert rep["frozen"] == len(list(model.transformer.h[0].parameters()))
        assert rep["drift_values"] > 0 and "transformer.ln_f.weight" in rep["untouched"]
    finally:
        for t in plain:
            t.close()


def test_lora_patch_holds_adapters_and_rebuilds_them(lora):
    base, trained = lora["base"], lora["trained"]
    names = [e["name"] for e in pf.SealedPatch.from_bytes(lora["raw"]).header["tensors"]]
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    before = state(base)
    applied = pa.apply_sealed_patch(base, lora["raw"], lora["key"], "bob")
    assert base.lora_config == trained.lora_config and equal_params(base, trained)
    applied.revert()
    assert same_state(before, state(base))


def test_dp_patch_holds_every_trainable_tensor_and_round_trips(data_dir):
    base = tiny_model().eval()
    tracker, trained, plain, rep = run(data_dir, base, dp=True, max_steps=2, noise_multiplier=1.0,
                                       target_epsilon=None, freeze_first_blocks=1)
    assert sorted(t.name for t in plain) == sorted(tracker.trainable)  # noise touched all of them
    assert all(t.kind == "delta" for t in plain)  # every embedding row moved too
    key = os.urandom(32)
    raw = sealed_of(plain, key, base, tracker).tobytes()
    pa.apply_sealed_patch(base, raw, key, "alice")
    assert equal_params(base, trained)


def test_bfloat16_deltas_halve_the_size_with_the_reported_error(data_dir):
    base = tiny_model().eval()
    tracker, trained, plain, rep = run(data_dir, base, max_steps=2, delta_dtype="bfloat16")
    assert all(t.stored_dtype == "bfloat16" for t in plain) and rep["max_error"] > 0
    key = os.urandom(32)
    raw = sealed_of(plain, key, base, tracker).tobytes()
    pa.apply_sealed_patch(base, raw, key, "alice")
    err = max(float((dict(base.named_parameters())[n] - p).detach().abs().max()) for n, p in trained.named_parameters())
    assert 0 < err <= rep["max_error"]


# ----------------------------------------------------------------------------- every failure refused
def flip(raw, pos):
    b = bytearray(raw)
    b[pos] ^= 0x01
    return bytes(b)


def swap(raw, a, b, n):
    out = bytearray(raw)
    out[a:a + n], out[b:b + n] = raw[b:b + n], raw[a:a + n]
    return bytes(out)


def failure_cases(full):
    raw, blobs, signed = full["raw"], full["blobs"], full["signed_len"]
    name, pos, size = blobs[1]
    hdr = raw.index(b'"tenant":"alice"')
    rec = 12 + 4096 + 16  # one full chunk record of the multi-chunk tensor
    multi = next((p, s) for n, p, s in blobs if s > 2 * rec)
    small = [(p, s) for n, p, s in blobs if s == blobs[1][2]]
    other = tiny_model(seed=1)
    return {
        "wrong key": (raw, os.urandom(32), None, None, pe.WrongKeyError),
        "passphrase for a raw key": (raw, pk.Passphrase("hunter2"), None, None, pe.KeyInputError),
        "header byte": (flip(raw, hdr + 12), full["key"], None, None, pe.TamperedError),
        "header MAC": (flip(raw, signed + 5), full["key"], None, None, pe.TamperedError),
        "nonce": (flip(raw, pos + 3), full["key"], None, None, pe.TamperedError),
        "ciphertext": (flip(raw, pos + 12 + 7), full["key"], None, None, pe.TamperedError),
        "tag": (flip(raw, pos + size - 1), full["key"], None, None, pe.TamperedError),
        "truncated in header": (raw[:signed - 10], full["key"], None, None, pe.TruncatedError),
        "truncated in blobs": (raw[:len(raw) - 100], full["key"], None, None, pe.TruncatedError),
        "last byte missing": (raw[:-1], full["key"], None, None, pe.TruncatedError),
        "trailing bytes": (raw + b"\0", full["key"], None, None, pe.TamperedError),
        "blobs swapped": (swap(raw, small[0][0], small[1][0], small[0][1]), full["key"], None, None, pe.SwappedBlobError),
        "chunks reordered": (swap(raw, multi[0], multi[0] + rec, rec), full["key"], None, None, pe.SwappedBlobError),
        "wrong tenant": (raw, full["key"], "bob", None, pe.WrongTenantError),
        "wrong base": (raw, full["key"], None, other, pe.WrongBaseError),
        "not a patch": (b"PK\x03\x04" + raw[4:], full["key"], None, None, pe.PatchFormatError),
    }


CASES = ["wrong key", "passphrase for a raw key", "header byte", "header MAC", "nonce", "ciphertext", "tag",
         "truncated in header", "truncated in blobs", "last byte missing", "trailing bytes", "blobs swapped",
         "chunks reordered", "wrong tenant", "wrong base", "not a patch"]
EXIT = {pe.WrongKeyError: 3, pe.TamperedError: 3, pe.TruncatedError: 3, pe.SwappedBlobError: 3, pe.KeyInputError: 2,
        pe.WrongTenantError: 4, pe.WrongBaseError: 4, pe.PatchFormatError: 2}


@pytest.mark.parametrize("case", CASES)
def test_every_failure_is_refused_and_leaves_the_model_bit_exact(full, case):
    data, key, tenant, model, error = failure_cases(full)[case]
    model = model or full["base"]
    before = state(model)
    with pytest.raises(error) as info:
        pa.apply_sealed_patch(model, data, key, tenant or "alice")
    assert type(info.value) is error and info.value.exit_code == EXIT[error]
    assert full["key"].hex() not in str(info.value)  # keys never reach messages
    assert same_state(before, state(model))


def test_every_region_of_the_file_is_authenticated(full):
    """Flip one byte at 48 spots spread over the whole file: each must be refused, never applied."""
    raw, base = full["raw"], full["base"]
    before = state(base)
    for pos in range(len(pf.MAGIC) + 2, len(raw), max(1, len(raw) // 48)):
        with pytest.raises(pe.PatchError) as info:
            pa.apply_sealed_patch(base, flip(raw, pos), full["key"], "alice")
        assert info.value.exit_code in (2, 3)
    assert same_state(before, state(base))


def test_passphrase_patch(full):
    base = full["base"]
    opened = pc.open_patch(pf.SealedPatch.from_bytes(full["raw"]), full["key"], "alice")  # re-seal the same payloads
    plain = []
    for i, e in enumerate(opened.header["tensors"]):
        buf = sm.SecureBuffer(e["plain_bytes"])
        buf.view()[:] = opened.plain.view(opened.offsets[i], e["plain_bytes"])
        plain.append(pp.PlainTensor(e["name"], e["kind"], e["dtype"], e["stored_dtype"], tuple(e["shape"]),
                                    e["rows"], e["exceptions"], buf))
    opened.plain.close()
    raw = pc.seal(plain, pk.Passphrase("correct horse"), tenant="alice", base_fingerprint=opened.header["base_fingerprint"],
                  structure=opened.header["structure"], scrypt_params={"n": 1 << 10}).tobytes()
    with pytest.raises(pe.WrongKeyError):
        pa.apply_sealed_patch(base, raw, pk.Passphrase("correct horsf"), "alice")
    with pytest.raises(pe.KeyInputError):
        pa.apply_sealed_patch(base, raw, full["key"], "alice")
    pa.apply_sealed_patch(base, raw, pk.Passphrase("correct horse"), "alice").revert()


# ----------------------------------------------------------------------------- many tenants over one base
def test_registry_switches_tenants_and_a_failed_switch_changes_nothing(full, lora):
    base = full["base"]
    before = state(base)
    reg = TenantRegistry(base)
    reg.add(full["raw"], "alice")
    reg.add(lora["raw"], "bob")
    with pytest.raises(pe.WrongTenantError):
        reg.add(full["raw"], "carol")
    for tenant, run_ in [("alice", full), ("bob", lora), ("alice", full)]:
        reg.switch(tenant, run_["key"])
        assert reg.active == tenant and equal_params(base, run_["trained"])
    during = state(base)
    with pytest.raises(pe.WrongKeyError):
        reg.switch("bob", full["key"])  # alice's key for bob's patch
    assert reg.active == "alice" and same_state(during, state(base))
    reg.revert()
    assert same_state(before, state(base))
    reg.close()


# ----------------------------------------------------------------------------- across processes, on disk
@pytest.fixture(scope="module")
def exported(data_dir, tmp_path_factory):
    """One real CLI run in its own process, TMPDIR pointing into the test's folder; the patch is exported."""
    root = tmp_path_factory.mktemp("cli")
    tmp, out = root / "tmp", root / "out"
    tmp.mkdir()
    save_checkpoint(root / "base.pt", tiny_model(), config={})
    save_checkpoint(root / "other.pt", tiny_model(seed=1), config={})
    pk.generate_key_file(root / "key.hex")
    env = {**os.environ, "TMPDIR": str(tmp), "PYTHONPATH": REPO}
    cmd = [sys.executable, os.path.join(REPO, "finetune_encrypt_memmap.py"), "--base_ckpt", str(root / "base.pt"),
           "--data_dir", data_dir, "--key_file", str(root / "key.hex"), "--tenant", "alice", "--export",
           str(out / "alice.patch"), "--max_steps", "3", "--batch_size", "4", "--microbatch_size", "4",
           "--eval_interval", "0", "--out_dir", str(out / "ft")]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(root), timeout=300)
    assert r.returncode == 0, r.stderr
    return dict(root=root, tmp=tmp, out=out, env=env, stdout=r.stdout, patch=out / "alice.patch")


def secret_windows(patch, key_file, base_ckpt):
    """32-byte windows of every tensor's plaintext delta and of the fine-tuned values they give."""
    from utils.checkpoint import load_model
    sealed = pf.SealedPatch.from_file(patch)
    key = pk.load_key(key_file=str(key_file))
    opened = pc.open_patch(sealed, key, "alice")
    windows = []
    for i, e in enumerate(opened.header["tensors"]):
        values = opened.segments(i)[1].float()
        for start in range(0, values.numel() - 7):
            if bool((values[start:start + 8] != 0).all()):  # never a run of zeros: those are everywhere
                windows.append(opened.segments(i)[1][start:start + 8].numpy().tobytes())
                break
    opened.plain.close()
    model, _ = load_model(str(base_ckpt))
    base = {n: p.detach().clone() for n, p in model.state_dict().items()}
    pa.apply_sealed_patch(model, sealed, key, "alice")
    for name, p in model.named_parameters():
        flat, ref = p.detach().reshape(-1), base[name].reshape(-1)
        moved = (bits(flat) != bits(ref)).unfold(0, 8, 1).all(1).nonzero()
        if len(moved):  # 8 consecutive fine-tuned values, none of them a base value
            i = int(moved[0])
            windows.append(flat[i:i + 8].numpy().tobytes())
    return windows


def found_in(folder, windows):
    hits = []
    for dirpath, _, files in os.walk(folder):
        for f in files:
            data = open(os.path.join(dirpath, f), "rb").read()
            hits += [os.path.join(dirpath, f) for w in windows if w in data]
    return hits


def test_no_plaintext_delta_on_disk_after_fine_tune_and_export(exported):
    assert not (exported["out"] / "ft").exists()  # finetune ran with save=False
    assert sorted(os.listdir(exported["out"])) == ["alice.patch", "alice.patch.privacy.json"]
    windows = secret_windows(exported["patch"], exported["root"] / "key.hex", exported["root"] / "base.pt")
    assert len(windows) > 10
    assert found_in(exported["root"], windows) == []
    leak = exported["tmp"] / "control.bin"  # the scan must find a delta that did reach the disk
    leak.write_bytes(b"x" * 100 + windows[0] + b"y" * 100)
    assert found_in(exported["root"], windows) == [str(leak)]
    leak.unlink()


def apply_cli(exported, *args):
    cmd = [sys.executable, os.path.join(REPO, "finetune_encrypt_memmap.py"), "apply", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=exported["env"], timeout=120)


def test_apply_in_another_process_exit_codes(exported, tmp_path):
    root = exported["root"]
    common = ["--patch", str(exported["patch"]), "--tenant", "alice"]
    ok = apply_cli(exported, "--base_ckpt", str(root / "base.pt"), "--key_file", str(root / "key.hex"), *common)
    assert ok.returncode == 0 and "tenant alice" in ok.stdout, ok.stderr
    wrong_key = tmp_path / "wrong.hex"
    pk.generate_key_file(wrong_key)
    for args, code, words in [  # (tampering, truncation, swaps: in process above, and decrypt_failure_test.py)
            (["--base_ckpt", str(root / "base.pt"), "--key_file", str(wrong_key), *common], 3, "wrong key"),
            (["--base_ckpt", str(root / "other.pt"), "--key_file", str(root / "key.hex"), *common], 4, "another base")]:
        r = apply_cli(exported, *args)
        assert r.returncode == code and words in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_unit_script_passes():
    r = subprocess.run([sys.executable, os.path.join(REPO, "test_pipeline", "decrypt_unit_test.py")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


# ----------------------------------------------------------------------------- the CLI: DP by default, errors before work
def test_sealing_is_private_by_default_and_says_so(exported):
    """No --dp given: finetune_dp's settings (target_epsilon 8). Header, progress line, summary and
    privacy.json state it; the epsilon matches dp-accounting's RDP accountant for the run's q, sigma, steps."""
    from dp_accounting import dp_event, rdp
    import json
    sealed = pf.SealedPatch.from_file(exported["patch"])
    meta = sealed.header["meta"]
    info = json.loads((exported["out"] / "alice.patch.privacy.json").read_text())
    p = info["privacy"]
    assert meta["dp"] is True and info["dp"] is True and 0 < meta["epsilon"] <= 8.0 and meta["epsilon"] == p["epsilon"]
    acc = rdp.RdpAccountant()
    acc.compose(dp_event.PoissonSampledDpEvent(p["sample_rate"], dp_event.GaussianDpEvent(p["noise_multiplier"])),
                p["steps"])
    assert abs(acc.get_epsilon(p["delta"]) - p["epsilon"]) <= 0.05 * p["epsilon"]
    assert "DP on (target epsilon 8.0" in exported["stdout"] and f"DP on, epsilon {meta['epsilon']:.3f}" in exported["stdout"]


@pytest.fixture
def no_finetune(monkeypatch):
    """Fails the test if a fine-tune starts: the errors below must come before any work."""
    def refuse(*a, **k):
        raise AssertionError("the fine-tune started before the bad input was refused")
    monkeypatch.setattr(ft_loop, "finetune", refuse)


def seal_cli(data_dir, root, *extra):
    import finetune_encrypt_memmap as fem
    base = root / "base.pt"
    if not base.exists():
        save_checkpoint(base, tiny_model(), config={})
    key = pk.generate_key_file(root / "key.hex", tenant="alice")
    return fem.main(["--base_ckpt", str(base), "--data_dir", data_dir, "--key_file", str(key), "--max_steps", "1",
                     "--batch_size", "4", "--microbatch_size", "4", "--eval_interval", "0", *extra])


def test_privacy_settings_without_dp_are_an_error(data_dir, tmp_path, no_finetune):
    from utils.cli import UserError
    for extra in (["--target_epsilon", "3"], ["--noise_multiplier", "1.0"], ["--max_grad_norm", "0.5"]):
        with pytest.raises(UserError, match="--dp=False but privacy settings were given"):
            seal_cli(data_dir, tmp_path, "--dp=False", *extra)
    config = tmp_path / "dp_config.py"
    config.write_text("target_epsilon = 8.0\n")  # e.g. the README's config/finetune_dp_employees.py
    with pytest.raises(UserError, match="target_epsilon"):
        seal_cli(data_dir, tmp_path, str(config), "--dp=False")


def test_bad_input_is_refused_before_the_fine_tune(data_dir, tmp_path, no_finetune):
    from utils.cli import UserError
    bad_prompts = tmp_path / "prompts.txt"
    bad_prompts.write_bytes(b"Context: caf\xe9\n")  # latin-1, not UTF-8
    for extra, words in [(["--export", str(tmp_path)], "is a directory"),
                         (["--export", str(tmp_path / "base.pt" / "p.patch")], "not a directory"),
                         (["--prompt_file", str(bad_prompts)], "not UTF-8"),
                         (["--max_new_tokens", "-1"], "max_new_tokens"),
                         (["--max_new_tokens", "10000000"], "max_new_tokens"),
                         (["--tenant", "bob"], "bound to tenant alice")]:
        with pytest.raises(UserError, match=words):
            seal_cli(data_dir, tmp_path, *extra)


def test_the_apply_cli_lets_the_patch_it_read_be_opened_in_place_and_applies_it_bit_exactly(exported, monkeypatch):
    import finetune_encrypt_memmap as fem
    from utils.checkpoint import load_model
    root = exported["root"]
    calls = []
    monkeypatch.setattr(fem, "apply_sealed_patch", lambda *a, **kw: calls.append(kw) or pa.apply_sealed_patch(*a, **kw))
    applied = fem.main(["apply", "--base_ckpt", str(root / "base.pt"), "--key_file", str(root / "key.hex"),
                        "--patch", str(exported["patch"]), "--tenant", "alice"])
    assert [kw.get("consume") for kw in calls] == [True]  # it reads the file for this apply alone
    model, _ = load_model(str(root / "base.pt"))
    kept = pf.SealedPatch.from_file(exported["patch"])
    pa.apply_sealed_patch(model, kept, pk.load_key(key_file=str(root / "key.hex")), "alice", consume=False)
    assert not kept.consumed and equal_params(applied.model, model)
    kept.close()


def test_apply_refuses_bad_input_with_one_line(exported, tmp_path):
    import finetune_encrypt_memmap as fem
    from utils.cli import UserError
    root = exported["root"]
    bad_prompts = tmp_path / "prompts.txt"
    bad_prompts.write_bytes(b"\xff\xfe bad\n")
    common = ["--base_ckpt", str(root / "base.pt"), "--key_file", str(root / "key.hex"), "--patch", str(exported["patch"])]
    for extra, words in [(["--tenant", "alice", "--prompt_file", str(bad_prompts)], "not UTF-8"),
                         (["--tenant", "alice", "--prompt", "x", "--max_new_tokens", "-5"], "max_new_tokens"),
                         (["--tenant", "alice", "--prompt", "x", "--max_new_tokens", "99999999"], "max_new_tokens"),
                         (["--tenant", "alice", "--max_patch_mb", "0"], "max_patch_mb")]:
        with pytest.raises(UserError, match=words) as info:
            fem.main(["apply", *common, *extra])
        assert info.value.exit_code == 2
    huge = tmp_path / "huge.patch"
    with open(huge, "wb") as f:
        f.write(exported["patch"].read_bytes())
        f.truncate(20 << 30)  # 20 GB sparse: refused from its size, nothing allocated
    for extra, words, code in [(common, "give --tenant", 4),  # a key file bound to no tenant, no --tenant: never "any tenant"
                               (common[:4] + ["--patch", str(huge), "--tenant", "alice"], "size limit", 2)]:
        r = apply_cli(exported, *extra)
        assert r.returncode == code and words in r.stderr, (extra, r.stderr)
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- no "accept any tenant", in-place apply
def test_apply_without_an_expected_tenant_is_refused_before_the_patch_is_read(monkeypatch):
    from tests.sealed_fixtures import sealed_patch, tiny_pair
    base, ft = tiny_pair()
    key = os.urandom(32)
    sealed = sealed_patch(base, ft, key)
    before = state(base)
    read = []
    monkeypatch.setattr(pc, "authenticate", lambda *a: read.append(a) or pytest.fail("the patch was read"))
    for tenant in (None, ""):
        with pytest.raises(pe.WrongTenantError, match="no expected tenant") as info:
            pa.apply_sealed_patch(base, sealed, key, tenant)
        assert info.value.exit_code == 4
        with pytest.raises(pe.WrongTenantError):
            pc.open_patch(sealed, key, tenant)
    assert not read and same_state(before, state(base))
    sealed.close()


def test_a_cold_apply_decrypts_values_straight_into_the_locked_patched_weights():
    """One buffer the size of the model, not a plaintext copy beside the patched weights; still bit-exact,
    exceptions included."""
    from tests.sealed_fixtures import sealed_patch, tiny_pair
    base, ft = tiny_pair()
    with torch.no_grad():  # weights that shrink to ~0 cannot be base + delta: the exception bitmap carries them
        ft.transformer.h[0].mlp.c_fc.weight[:4] = base.transformer.h[0].mlp.c_fc.weight[:4] * 1e-9
    key = os.urandom(32)
    sealed = sealed_patch(base, ft, key)
    assert any(e["exceptions"] for e in sealed.header["tensors"])
    payload = sum(e["plain_bytes"] for e in sealed.header["tensors"])
    applied = pa.apply_sealed_patch(base, sealed, key, "alice")
    assert equal_params(base, ft)
    assert applied.storage.nbytes >= sum(p.numel() * p.element_size() for p in ft.parameters())
    assert applied.plain_status["bytes"] < payload / 8  # only the exception bitmaps went through the plaintext buffer
    applied.revert()
    sealed.close()


def test_a_failed_in_place_apply_leaves_no_plaintext_in_the_storage(monkeypatch):
    """The last chunk is tampered: the values decrypted before it (into the patched storage) are zeroed."""
    from tests.sealed_fixtures import sealed_patch, tiny_pair
    base, ft = tiny_pair()
    key = os.urandom(32)
    raw = bytearray(sealed_patch(base, ft, key, chunk_bytes=256).tobytes())
    raw[-20] ^= 1  # inside the last record's ciphertext
    made = []
    real = pa.PatchedStorage.tensors_for
    monkeypatch.setattr(pa.PatchedStorage, "tensors_for", lambda self, layout: made.extend(real(self, layout)) or made)
    before = state(base)
    with pytest.raises(pe.TamperedError):
        pa.apply_sealed_patch(base, bytes(raw), key, "alice")
    assert made and same_state(before, state(base))
    assert all(int(t.count_nonzero()) == 0 for t in made)  # decrypted deltas were there: now zeros


def test_an_apply_from_bytes_decrypts_in_the_image_where_a_plaintext_buffer_is_needed():
    """bfloat16 deltas cannot go straight into the float32 weights: they pass through a plaintext buffer,
    which for a patch read for this apply alone is the image itself (open_patch(consume=True)). A
    SealedPatch the caller keeps (a registry's) is never consumed."""
    from tests.sealed_fixtures import tiny_pair
    base, ft = tiny_pair()
    bp = dict(base.named_parameters())
    plain = [pp.delta_tensor(n, bp[n], p, stored_dtype="bfloat16") for n, p in ft.named_parameters()]
    key = os.urandom(32)
    sealed = pc.seal(plain, key, tenant="alice", base_fingerprint=pa.base_fingerprint(base), chunk_bytes=1000)
    for t in plain:
        t.close()
    raw = sealed.tobytes()
    before = state(base)
    kept = pa.apply_sealed_patch(base, sealed, key, "alice")
    assert not sealed.consumed and kept.plain_status["bytes"] < len(raw)  # a fresh plaintext buffer
    expected = {n: bits(p).clone() for n, p in base.named_parameters()}
    kept.revert()
    assert sealed.tobytes() == raw
    applied = pa.apply_sealed_patch(base, raw, key, "alice")
    assert applied.plain_status["bytes"] == len(raw) and applied.plain_status["mlocked"]  # the image
    assert all(torch.equal(bits(p), expected[n]) for n, p in base.named_parameters())
    applied.revert()
    assert same_state(before, state(base))
    damaged = bytearray(raw)
    damaged[-20] ^= 1  # the last chunk: every other one was decrypted and moved in the image first
    with pytest.raises(pe.TamperedError):
        pa.apply_sealed_patch(base, bytes(damaged), key, "alice")
    assert same_state(before, state(base))
    one_shot = pf.SealedPatch.from_bytes(raw)  # read by the caller, who says it is not needed again
    pa.apply_sealed_patch(base, one_shot, key, "alice", consume=True).revert()
    assert one_shot.consumed
    with pytest.raises(pe.PatchFormatError, match="consumed"):
        pa.apply_sealed_patch(base, one_shot, key, "alice")
    assert same_state(before, state(base))
    one_shot.close()
    sealed.close()
