"""utils/record_synthesis.py: the public drafter's warm-up records (a copier, in the synthesis prompt
format), the copy probe, one forward per choice, and the per-field temperature. The grammar and the
mechanism on records are tested in tests/test_synthesize_dp.py."""
import random
import re

import torch

import utils.private_prediction as P
import utils.record_synthesis as RS
from tests.conftest import tiny_model
from tests.test_synthesize_dp import DEPARTMENTS, CopyingLM, people, template
from utils import synthetic_utility as SU
from utils.checkpoint import save_checkpoint
from utils.secure_rng import RunSecret


def test_warmup_records_are_the_synthesis_prompts_with_the_loss_on_the_copied_values_only():
    tpl, rng = template(), random.Random(0)
    kinds = {"copy": 0, "draft": 0}
    for _ in range(200):
        ids, mask = tpl.warmup_record(rng)
        assert len(ids) == len(mask) and ids[-1] == tpl.tok.eot and mask[-1] == 0
        text = tpl.tok.decode(ids[:-1])
        taught = tpl.tok.decode([t for t, m in zip(ids, mask) if m])
        records = text.split(tpl.header)[1:]
        values = tpl.parse(tpl.header + records[-1])
        assert values is not None and taught == "".join(f"{values[f]}\n" for f in tpl.fields)  # values only
        if len(records) == 2:  # a private row: its record first (as prompt_ids writes it), then the copy
            kinds["copy"] += 1
            prompt = tpl.prompt_ids(tpl.person(values, "A. Person"), 10 ** 6)
            assert ids[:len(prompt)] == prompt and sum(mask[:len(prompt)]) == 0  # nothing taught on the prompt
        else:  # the public row: the header alone, then a record
            kinds["draft"] += 1
    assert 100 < kinds["copy"] < 190 and kinds["draft"] > 10


def test_warmup_makes_a_copier_and_the_probe_measures_it(tmp_path):
    """The base cannot copy (p(own Department) ~ 1/6: the six values' first letters differ); a short
    warm-up on public records alone lifts it well above chance."""
    tpl = template()
    base = tiny_model(block_size=256)
    before = RS.copy_probability(base, tpl, random.Random(1), n=32)
    assert abs(before["Department"] - 1 / len(DEPARTMENTS)) < 0.05
    ckpt = tmp_path / "base.pt"
    save_checkpoint(ckpt, base, config={"dataset": "pydocs"})
    records, masks = zip(*[tpl.warmup_record(random.Random(i)) for i in range(150 * 16)])
    torch.set_num_threads(1)
    model = SU.finetuned_on_records(list(records), tpl.tok, str(ckpt), 150, 16, 3e-3, loss_masks=list(masks))["model"]
    after = RS.copy_probability(model, tpl, random.Random(1), n=32)
    assert after["Department"] > 0.5, after


class CountingDecoder(P.BatchDecoder):
    forwards = 0

    def _forward(self, start, end):
        CountingDecoder.forwards += 1
        return super()._forward(start, end)


class OneAtATime(P.BatchDecoder):
    def extend(self, tokens):
        return [super(OneAtATime, self).extend([t]) for t in tokens][-1]


def test_one_forward_per_choice_and_the_same_records_as_token_by_token():
    tpl, crowd = template(), people(12)
    prompts = [tpl.prompt_ids(p, 200) for p in crowd] + [tpl.public_ids()]
    mech = P.Mechanism(s=12, c=3.0, tau=1.0, svt=False, sigma=1.0, theta=0.0, tau_pub=1.0)
    decoder = CountingDecoder(CopyingLM(tpl.header), prompts, tpl.max_new_tokens(), use_kv_cache=False)
    CountingDecoder.forwards = 0
    kept, _, _ = RS.synthesize_records(decoder, 12, mech, tpl, 200, torch.Generator().manual_seed(0), 5)
    choices = sum(c["private"] + c["public"] for _, c in kept)
    # labels and forced runs ride along with the next choice; + 1 per record: reset() without the cache
    assert len(kept) == 5 and CountingDecoder.forwards == choices + len(kept)
    # token by token (one forward per token, the old way) the logits and so the records are the same
    slow = OneAtATime(CopyingLM(tpl.header), prompts, tpl.max_new_tokens(), use_kv_cache=False)
    again, _, _ = RS.synthesize_records(slow, 12, mech, tpl, 200, torch.Generator().manual_seed(0), 5)
    assert [v for v, _ in again] == [v for v, _ in kept]


def test_field_temperature_follows_the_domain_size_and_is_never_sharper_than_accounted():
    tpl = template()
    mech = P.Mechanism(s=10, c=3.0, tau=1.0, svt=False, sigma=1.0, theta=0.0, tau_pub=1.0)
    assert RS.field_tau(mech, tpl, "Full or Part-Time") == 3.0  # 2c / 2 values
    assert RS.field_tau(mech, tpl, "Department") == 1.0  # 2c / 6 = tau: the accounted one
    assert RS.field_tau(mech, tpl, "Annual Salary") == 1.0
    # a caller asking for a sharper tau than accounted gets the accounted one
    Z, g = torch.randn(10, 20), torch.Generator()
    draws = lambda tau: [mech.private_token(Z, Z[0], g.manual_seed(k), tau=tau) for k in range(50)]
    assert draws(0.01) == draws(None)


def test_whole_value_scores_are_the_grammar_probabilities_and_leave_the_decoder_as_it_was():
    tpl, crowd = template(), people(5)
    prompts = [tpl.prompt_ids(p, 200) for p in crowd] + [tpl.public_ids()]
    model = tiny_model(block_size=256).eval()
    for cache in (True, False):
        decoder = P.BatchDecoder(model, prompts, tpl.max_new_tokens(), cache)
        label = tpl.label_ids["Department"]
        Z = RS.whole_value_scores(decoder, tpl, "Department", label)
        assert torch.allclose(Z.exp().sum(1), torch.ones(6), atol=1e-4)  # a distribution over the values
        for k, value in enumerate(DEPARTMENTS):  # byte by byte under the mask, one token at a time
            step, text, total = P.BatchDecoder(model, prompts, tpl.max_new_tokens(), cache), "", 0.0
            logits = step.extend(label)
            for ch in value + "\n":
                ids = tpl.allowed("Department", text)
                total = total + P.masked(logits, tpl.mask(ids, logits.device)).log_softmax(-1)[:, ord(ch)]
                text, logits = text + ch, step.step(ord(ch))
            assert torch.allclose(Z[:, k], total, atol=1e-4)
        fresh = P.BatchDecoder(model, prompts, tpl.max_new_tokens(), cache)
        assert torch.allclose(decoder.step(ord("F")), fresh.extend(label + [ord("F")]), atol=1e-5)  # state kept


def test_whole_values_cost_one_private_token_per_categorical_field_and_parse():
    """whole_values=True: each categorical field is one choice among its public values (its tokens then
    ride along as forced), so it costs one private token; every kept record parses. (What it buys in
    fidelity is measured at full scale: bench/synthesis.py --parts=exact.)"""
    tpl, crowd = template(), people(16)
    prompts = [tpl.prompt_ids(p, 200) for p in crowd] + [tpl.public_ids()]
    mech = P.Mechanism(s=16, c=3.0, tau=1.0, svt=False, sigma=1.0, theta=0.0, tau_pub=1.0)
    decoder = P.BatchDecoder(tiny_model(block_size=256).eval(), prompts, tpl.max_new_tokens(), use_kv_cache=True)
    kept, _, _ = RS.synthesize_records(decoder, 16, mech, tpl, 100, torch.Generator().manual_seed(0), 4,
                                       whole_values=True)
    assert len(kept) == 4
    for values, counts in kept:
        assert tpl.parse(tpl.render(values)) == values
        salary_choices = counts["private"] - 2  # Department and Full or Part-Time: one private token each
        assert 1 <= salary_choices <= len(values["Annual Salary"]) + 1


# ----------------------------------------------------------------------------- the released joint
def joint_setup(n=6, cache=True):
    tpl, crowd = template(), people(n)
    prompts = [tpl.prompt_ids(p, 200) for p in crowd] + [tpl.public_ids()]
    return tpl, crowd, P.BatchDecoder(tiny_model(block_size=256).eval(), prompts, tpl.max_new_tokens(), cache)


def test_a_rows_joint_is_the_product_of_its_whole_value_scores_and_sums_to_one():
    """Each row's probability of (Department, Full or Part-Time) = p(Department) x p(F/P | that
    Department): a distribution over all 12 combinations (so one person moves the released sum by at most
    1 in L2), with or without the cache, and the decoder is back at the record's start."""
    for cache in (True, False):
        tpl, crowd, decoder = joint_setup(cache=cache)
        assert RS.released_fields(tpl) == ["Department", "Full or Part-Time"]  # Annual Salary is numeric
        fields, probs, combos = RS.row_joint(decoder, tpl)
        assert fields == RS.released_fields(tpl) and probs.shape == (7, 12) and combos[:3] == [("POLICE", "F"), ("POLICE", "P"), ("FIRE", "F")]
        assert torch.allclose(probs.sum(1), torch.ones(7, dtype=torch.float64), atol=1e-6)
        first = RS.whole_value_scores(decoder, tpl, "Department", tpl.label_ids["Department"]).double().exp()
        decoder.reset()
        after_fire = tpl.label_ids["Department"] + tpl.tok.encode("FIRE\n") + tpl.label_ids["Full or Part-Time"]
        then = RS.whole_value_scores(decoder, tpl, "Full or Part-Time", after_fire).double().exp()
        assert torch.allclose(probs[:, 2:4], first[:, 1:2] * then, atol=1e-5)
        decoder.reset()
        fresh = P.BatchDecoder(decoder.model, [tpl.prompt_ids(p, 200) for p in crowd] + [tpl.public_ids()],
                               tpl.max_new_tokens(), cache)
        RS.row_joint(decoder, tpl)
        assert decoder.n == 0 and torch.allclose(decoder.step(ord("D")), fresh.step(ord("D")), atol=1e-5)


class FixedStream:
    """A stand-in for the DP stream: noise given by the test."""

    def __init__(self, noise):
        self.noise, self.calls = noise, []

    def normal(self, shape, std, dtype=torch.float32, device="cpu"):
        self.calls.append((shape, std, dtype))
        return self.noise(shape, std).to(dtype)


def test_the_release_is_the_noisy_sum_of_the_private_rows_then_post_processing_only():
    """The table the records draw from: the private rows' summed probabilities plus the stream's noise at
    sigma (the public row left out), cells under 2 sigma dropped, normalised; all dropped -> the public
    row's joint. The noise is drawn once per batch, in float64, at the accounted sigma."""
    tpl, crowd, decoder = joint_setup()
    _, probs, combos = RS.row_joint(decoder, tpl)
    exact = probs[:6].sum(0)
    quiet = FixedStream(lambda shape, std: torch.zeros(shape))
    joint = RS.release_joint(decoder, 6, tpl, 0.01, quiet)
    assert quiet.calls == [((12,), 0.01, torch.float64)] and joint.combos == combos
    kept = torch.where(exact >= 0.02, exact, torch.zeros_like(exact))
    assert torch.allclose(joint.probs, kept / kept.sum()) and int((joint.probs > 0).sum()) == int((exact >= 0.02).sum())
    loud = RS.release_joint(decoder, 6, tpl, 1e6, FixedStream(lambda shape, std: torch.zeros(shape)))
    assert torch.allclose(loud.probs, probs[6] / probs[6].sum())  # nothing above 2 sigma: the public row's
    shifted = RS.release_joint(decoder, 6, tpl, 0.01, FixedStream(lambda shape, std: torch.full(shape, 5.0)))
    assert torch.allclose(shifted.probs, (exact + 5) / (exact + 5).sum())  # the noise is added to the sums


def test_a_joint_from_the_records_is_their_exact_counts_plus_noise_whatever_the_model_reads():
    """release_from='records': the joint counts each private person's own (Department, Full or
    Part-Time), one-hot (removing a person moves one count by 1), so with no noise it is the private
    joint exactly, even under a model that reads nothing (blind), where the drafter's sums miss it;
    nothing survives 2 sigma of a huge noise: uniform cells (public)."""
    tpl, crowd = template(), people(60)
    counts, combos = RS.record_counts(crowd, tpl, ["Department", "Full or Part-Time"])
    assert counts.sum() == 60 and (counts - RS.record_counts(crowd[1:], tpl, ["Department", "Full or Part-Time"])[0]).norm() == 1
    prompts = [tpl.prompt_ids(p, 200) for p in crowd] + [tpl.public_ids()]
    decoder = P.BatchDecoder(CopyingLM("Record:\n", blind=True), prompts, tpl.max_new_tokens(), use_kv_cache=False)
    quiet = FixedStream(lambda shape, std: torch.zeros(shape))
    exact = RS.release_joint(decoder, 60, tpl, 0.01, quiet, people=crowd)
    assert exact.combos == combos and torch.allclose(exact.probs, counts / 60)
    real = SU.distribution([(p["Department"], p["Full or Part-Time"]) for p in crowd])
    blind = RS.release_joint(decoder, 60, tpl, 0.01, quiet)
    as_dist = lambda joint: {repr(c): float(q) for c, q in zip(joint.combos, joint.probs)}  # noqa: E731
    assert SU.total_variation(as_dist(exact), real) < 1e-9 < 0.3 < SU.total_variation(as_dist(blind), real)
    loud = RS.release_joint(decoder, 60, tpl, 1e6, quiet, people=crowd)
    assert torch.allclose(loud.probs, torch.full((12,), 1 / 12, dtype=torch.float64))


# ----------------------------------------------------------------------------- released bands
BANDS = (0.0, 100000.0, 10)  # 10,000-wide public bands


def test_record_counts_are_one_hot_per_person_so_one_person_moves_one_count_by_one():
    """Each private person adds 1 at (its Full or Part-Time, the band of its salary): the counts sum to
    the crowd, and removing any one person changes exactly one cell by exactly 1 (L2 sensitivity 1)."""
    tpl, crowd = template(), people(60)
    edges = RS.band_edges(BANDS)
    counts, combos = RS.record_counts(crowd, tpl, ["Full or Part-Time"], ("Annual Salary", edges))
    assert combos == [("F",), ("P",)] and counts.shape == (2, 10) and counts.sum() == 60
    for p in crowd:
        assert counts[combos.index((p["Full or Part-Time"],)), int(p["Annual Salary"] // 10000)] >= 1
    for i in (0, 17, 59):
        fewer, _ = RS.record_counts(crowd[:i] + crowd[i + 1:], tpl, ["Full or Part-Time"], ("Annual Salary", edges))
        diff = counts - fewer
        assert diff.abs().sum() == 1 and diff.norm() == 1
    assert RS.band_of(edges, -5.0) == 0 and RS.band_of(edges, 1e9) == 9 and RS.band_of(edges, 10000.0) == 1


def test_the_band_release_is_the_noisy_count_then_post_processing_only():
    """The stream's noise is drawn once per table, in float64, at the accounted sigma; cells under 2 sigma
    are dropped and each row normalised; a row with nothing left takes the table's band marginal, and a
    table with nothing left uniform bands."""
    tpl, crowd = template(), people(60)
    edges = RS.band_edges(BANDS)
    counts, _ = RS.record_counts(crowd, tpl, ["Full or Part-Time"], ("Annual Salary", edges))
    quiet = FixedStream(lambda shape, std: torch.zeros(shape))
    band = RS.release_band(crowd, tpl, "Annual Salary", ["Full or Part-Time"], BANDS, 0.01, quiet)
    assert quiet.calls == [((2, 10), 0.01, torch.float64)]
    assert torch.allclose(band.probs, counts / counts.sum(1, keepdim=True))
    shifted = RS.release_band(crowd, tpl, "Annual Salary", ["Full or Part-Time"], BANDS, 0.01,
                              FixedStream(lambda shape, std: torch.full(shape, 5.0)))
    assert torch.allclose(shifted.probs, (counts + 5) / (counts + 5).sum(1, keepdim=True))
    only_f = RS.release_band([p for p in crowd if p["Full or Part-Time"] == "F"], tpl, "Annual Salary",
                             ["Full or Part-Time"], BANDS, 0.01, FixedStream(lambda shape, std: torch.zeros(shape)))
    assert torch.allclose(only_f.probs[1], only_f.probs[0])  # no P row left: the band marginal
    loud = RS.release_band(crowd, tpl, "Annual Salary", ["Full or Part-Time"], BANDS, 1e6,
                           FixedStream(lambda shape, std: torch.zeros(shape)))
    assert torch.allclose(loud.probs, torch.full((2, 10), 0.1, dtype=torch.float64))


def test_band_values_lie_in_their_band_inside_the_grammar_and_follow_the_table():
    """A drawn value is in the drawn band, clipped to the digit grammar (4-5 digits: >= 1000.00, <=
    99999.99), at the schema's two decimals, and parses; the bands are drawn in the table's proportions."""
    tpl, gen = template(), torch.Generator().manual_seed(0)
    probs = torch.zeros(2, 10, dtype=torch.float64)
    probs[0, 0], probs[0, 9], probs[1, 3] = 0.25, 0.75, 1.0
    band = RS.BandRelease("Annual Salary", ["Full or Part-Time"], [("F",), ("P",)], RS.band_edges(BANDS), probs)
    drawn = [RS.draw_band_value(band, {"Full or Part-Time": "F"}, tpl, gen) for _ in range(2000)]
    assert all(tpl.value_ok("Annual Salary", v + "\n") and re.fullmatch(r"[1-9]\d{3,4}\.\d\d", v) for v in drawn)
    low = [float(v) for v in drawn if float(v) < 10000]
    assert all(1000 <= v < 10000 for v in low) and all(90000 <= float(v) <= 99999.99 for v in drawn if float(v) >= 10000)
    assert abs(len(low) / 2000 - 0.25) < 0.04
    assert all(30000 <= float(RS.draw_band_value(band, {"Full or Part-Time": "P"}, tpl, gen)) < 40000 for _ in range(50))


def test_released_bands_follow_the_private_salaries_where_the_drafter_cannot_and_the_test_can_fail():
    """Records whose Department and Full or Part-Time come from the released joint and whose salary from
    the released bands spend no private token (r = 0) and follow the private salaries (KS) closer than the
    drafter alone, which writes digits it cannot copy; bands released from other people's salaries (a
    stand-in for a release that ignores the private records) fail the same check."""
    tpl, crowd = template(), people(60)
    mech = P.Mechanism(s=60, c=3.0, tau=1.0, svt=False, sigma=0.5, theta=0.5, tau_pub=1.0)
    prompts = [tpl.prompt_ids(p, 200) for p in crowd] + [tpl.public_ids()]
    decoder = P.BatchDecoder(CopyingLM("Record:\n"), prompts, tpl.max_new_tokens(), use_kv_cache=False)
    joint = RS.release_joint(decoder, 60, tpl, 1.0, RunSecret.reproducible(0).stream("t"))
    real = [p["Annual Salary"] for p in crowd]

    def salaries(source, public_only=False):
        bands = [] if public_only else [RS.release_band(source, tpl, "Annual Salary", ["Full or Part-Time"], BANDS, 1.0,
                                                        RunSecret.reproducible(1).stream("b"))]
        kept, _, spent = RS.synthesize_records(decoder, 60, mech, tpl, 0, torch.Generator().manual_seed(2), 60,
                                               public_only=public_only, whole_values=True, joint=joint, bands=bands)
        assert len(kept) == 60 and (public_only or (spent == 0 and all(c["released"] == 3 for _, c in kept)))
        return [float(v["Annual Salary"]) for v, _ in kept]

    others = [{**p, "Annual Salary": p["Annual Salary"] / 20 + 1000} for p in crowd]  # 2,500-6,000
    ours, drafter, blind = (SU.ks(salaries(crowd), real), SU.ks(salaries(crowd, public_only=True), real),
                            SU.ks(salaries(others), real))
    assert ours < 0.25 and ours < 0.5 * drafter and blind > drafter * 0.9, (ours, drafter, blind)


def test_public_names_never_take_the_form_of_a_generated_persons_name():
    """The employees generator writes 'First Last' or, for a repeat, 'First M. Last'; synthetic names
    have two middle initials, so even 10,000 of them share no name with 20,000 generated people (one
    middle initial, as before, shares some by chance)."""
    from utils import employees
    real = set(employees.unique_names(random.Random(1), 20000))
    names = RS.public_names(random.Random(2), 10000)
    assert all(re.fullmatch(r"\S+ [A-Z]\. [A-Z]\. .+", n) for n in names) and not real & set(names)
    one_initial = {re.sub(r" [A-Z]\. ", " ", n, count=1) for n in names}
    assert real & one_initial
