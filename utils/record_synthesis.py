"""
Structured records as structure, for private prediction (synthesize_dp.py): the program writes the
template (a header, each field's label, the newlines) for free, and the mechanism pays only for the
tokens of field values, and only where they are not forced.

A record in the prompts and in the output is the compact form

    Employee record:
    Department: POLICE
    Full or Part-Time: F
    Annual Salary: 95028.00

Each value follows a public grammar: a categorical field takes one of its listed values (the public
domain, from the config, never read off the records), a numeric field `lo`..`hi` integer digits (no
leading zero) and the schema's decimals. At each step the allowed tokens are those that keep the value
a valid prefix: a mask from public information, applied to every row before clipping
(utils/private_prediction.py); a step with one allowed token is forced and costs nothing. So every
finished record parses back into its fields, and an unfinished one (budget ran out mid-record, length
cap) is discarded and counted, never written.

Names are not private fields: each synthetic person gets a name drawn from the public name generator
(utils/employees' first names, middle initials and last names, always with two middle initials), so a
name never comes from the records. The canary field is never synthesized, so no canary can be reproduced.

The public drafter: the small base model knows no record format and cannot copy in context (measured:
p(own Department | prompt) 0.06 on the default byte base), so a few hundred steps teach it both jobs on
*public* records only (values drawn uniformly from the grammars), in exactly the synthesis prompt
formats (warmup_record): mostly a private row's (a record, then the header and the same record again,
the loss on the copied values alone), so it learns to copy the values of the record in its context;
sometimes the public row's (the header alone, then a record), so alone it drafts uniform values. It
learns nothing of the private distribution. copy_probability measures p(own value | prompt) on fresh
public records: the private rows' logits follow their records only as far as it is high.

Each categorical field decodes at a temperature of at least 2c / (its number of values) (field_tau):
see there; the accounting pays for the sharpest, the configured tau.

The released joint (release_share > 0): voting on a categorical field record by record asks the batch
the same question again and again, and the exponential mechanism's answer has the shape p ~ exp(2c f /
tau), not p ~ f (rare values over-drawn, common ones under-drawn). So the leading categorical fields
(released_fields) are instead released once per batch as a noisy joint table (release_joint): every
row's probability of every combination of their values (joint_log_probs: the product of its
whole-value grammar probabilities along the path), summed over the private rows, Gaussian noise per
cell; each record of the batch then draws its combination from that table (post-processing, free) and
the mechanism pays only for the remaining fields' tokens. The table is only as good as the drafter's
copying (85-96% per field on the public probe: the rest of each row spreads over other cells), so with
release_from='records' it counts each person's own values instead (record_counts: one-hot, the same
L2 sensitivity of 1): a DP contingency table, which is what a field with a public domain calls for.

Released bands (release_bands): the drafter copies no digits (p(own Annual Salary | prompt) ~ 5e-7 on
the public probe), so a salary voted digit by digit follows the drafter's uniform digits, sharpened:
worse than the drafter alone. A numeric field in release_bands is instead released once per batch as a
noisy table of its public bands given some released fields (release_band: each person's one-hot read
off the record, the joint's L2 sensitivity); each record draws its band given its drawn values, then a
value uniform within the band (post-processing).
"""
import itertools
import math
import random
from collections import Counter
from dataclasses import dataclass

import torch

from utils import employees
from utils.private_prediction import masked

NUMERIC_CHARS = set("0123456789.\n")


def numeric_prefix_ok(text, lo, hi, decimals):
    """Is `text` a prefix of `<lo..hi digits, no leading zero>[.<decimals digits>]\\n`?"""
    done = text.endswith("\n")
    body = text[:-1] if done else text
    if "\n" in body:
        return False
    whole, dot, frac = body.partition(".")
    if (whole and not whole.isdigit()) or whole[:1] == "0" or len(whole) > hi:
        return False
    if dot and (decimals == 0 or len(whole) < lo or (frac and not frac.isdigit()) or len(frac) > decimals):
        return False
    if done:
        return len(whole) >= lo and (len(frac) == decimals if decimals else not dot)
    return True


class RecordTemplate:
    """The compact record format of `fields` with their public value grammars, for one tokenizer."""

    def __init__(self, schema, fields, domains, digits, tok, header="Record:\n"):
        self.schema, self.fields, self.tok, self.header = schema, list(fields), tok, header
        self.domains = {f: [str(v) for v in domains[f]] for f in self.fields if f in domains}
        self.digits = {f: tuple(digits[f]) for f in self.fields if f in digits}
        self.decimals = {f: int(schema.decimals.get(f, 0)) for f in self.digits}
        missing = [f for f in self.fields if (f in self.domains) == (f in self.digits)]
        if missing:
            raise ValueError(f"each field needs exactly one grammar (a list of values or a digit range): {missing}")
        self.vocab = tok.vocab_size
        self.strings = [tok.decode([t]) if t != tok.eot else "" for t in range(self.vocab)]
        self.id_of = {}
        for t, s in enumerate(self.strings):
            if s and s not in self.id_of:
                self.id_of[s] = t
        self.numeric_tokens = [t for t, s in enumerate(self.strings) if s and set(s) <= NUMERIC_CHARS]
        self.label_ids = {f: tok.encode(f"{f}: ") for f in self.fields}
        self._masks = {}

    # ------------------------------------------------------------------ text
    def render(self, values):
        return self.header + "".join(f"{f}: {values.get(f, '')}\n" for f in self.fields)

    def parse(self, text):
        """{field: value string} of a compact record, or None when it does not follow the template."""
        if not text.startswith(self.header):
            return None
        lines = text[len(self.header):].split("\n")
        if len(lines) != len(self.fields) + 1 or lines[-1]:
            return None
        values = {}
        for field, line in zip(self.fields, lines):
            if not line.startswith(f"{field}: "):
                return None
            values[field] = line[len(field) + 2:]
            if not self.value_ok(field, values[field] + "\n"):
                return None
        return values

    def value_ok(self, field, text):
        if field in self.digits:
            return numeric_prefix_ok(text, *self.digits[field], self.decimals[field])
        return any((v + "\n").startswith(text) for v in self.domains[field])

    def real_values(self, person):
        """A real person's values as the schema writes them ('' where absent), for a prompt."""
        return {f: self.schema.answer(person, f) if self.schema.has(person, f) else "" for f in self.fields}

    def prompt_ids(self, person, max_tokens):
        """One private prompt: the person's record (cut to max_tokens - header) then a new header."""
        record = self.tok.encode(self.render(self.real_values(person)) + "\n")
        return record[:max(0, max_tokens - len(self.tok.encode(self.header)))] + self.tok.encode(self.header)

    def public_ids(self):
        return self.tok.encode(self.header)

    def max_new_tokens(self):
        """Tokens one synthetic record can take at most (every value at its longest, byte by byte)."""
        longest = {f: max(len(v) for v in self.domains[f]) + 1 for f in self.domains}
        longest.update({f: hi + 1 + (d + 1 if d else 0) for f, (lo, hi) in self.digits.items()
                        for d in [self.decimals[f]]})
        return sum(len(self.label_ids[f]) + longest[f] for f in self.fields)

    # ------------------------------------------------------------------ the grammar as a token mask
    def allowed(self, field, text):
        """Token ids that keep `text` + token a valid prefix of the field's value (public: no data)."""
        key = (field, text)
        if key not in self._masks:
            if field in self.digits:
                ids = [t for t in self.numeric_tokens if self.value_ok(field, text + self.strings[t])]
            else:
                rest = [v + "\n" for v in self.domains[field] if (v + "\n").startswith(text)]
                ids = sorted({self.id_of[r[len(text):len(text) + k]] for r in rest for k in range(1, len(r) - len(text) + 1)
                              if r[len(text):len(text) + k] in self.id_of})
            self._masks[key] = ids
        return self._masks[key]

    def mask(self, ids, device):
        m = torch.zeros(self.vocab, dtype=torch.bool, device=device)
        m[ids] = True
        return m

    # ------------------------------------------------------------------ people
    def person(self, values, name):
        """A schema person from synthetic values (numbers as floats), every other field absent."""
        person = {self.schema.person_field: name, **{f: None for f in self.schema.fields}}
        for f, v in values.items():
            person[f] = float(v) if f in self.digits else v
        return person

    def random_values(self, rng):
        """Public records for the drafter's warm-up: every value uniform over its grammar."""
        values = {}
        for f in self.fields:
            if f in self.domains:
                values[f] = rng.choice(self.domains[f])
            else:
                lo, hi = self.digits[f]
                whole = str(rng.randint(1, 9)) + "".join(str(rng.randint(0, 9)) for _ in range(rng.randint(lo, hi) - 1))
                d = self.decimals[f]
                values[f] = whole + ("." + "".join(str(rng.randint(0, 9)) for _ in range(d)) if d else "")
        return values

    def encode_record(self, values):
        """(ids, value mask) of one compact record, piece by piece as the synthesis writes it: the header
        and the labels (mask 0: free there) and each value with its newline (mask 1: what it decodes)."""
        ids = self.public_ids()
        mask = [0] * len(ids)
        for f in self.fields:
            value = self.tok.encode(f"{values[f]}\n")
            ids, mask = ids + self.label_ids[f] + value, mask + [0] * len(self.label_ids[f]) + [1] * len(value)
        return ids, mask

    def warmup_record(self, rng, draft_share=0.25):
        """(ids, loss mask) of one public warm-up record, in exactly the synthesis prompt formats. Mostly a
        private row's: a record (prompt_ids' form), then the same record again with the loss on its values
        only, so the model learns to copy the values of the record in its context; with probability
        draft_share the public row's: the header alone, then a record (the loss on its values), so that
        alone it drafts values uniform over the grammars."""
        values = self.random_values(rng)
        ids, mask = self.encode_record(values)
        if rng.random() < draft_share:
            return ids + [self.tok.eot], mask + [0]
        shown = self.tok.encode(self.render(values) + "\n")
        return shown + ids + [self.tok.eot], [0] * len(shown) + mask + [0]


@torch.no_grad()
def copy_probability(model, template, rng, n=64):
    """{field: mean p(own value | prompt)} on n fresh public records in the private rows' format (a
    record, then the header): the probability that the model, decoding under the value grammar, writes
    back the value of the record in its context (teacher-forced, forced tokens p = 1). Amin et al.'s
    aggregate tracks the private records only as far as this is high: it is the drafter's report card."""
    model.eval()
    device = model.lm_head.weight.device
    own = {f: [] for f in template.fields}
    for _ in range(n):
        values = template.random_values(rng)
        ids, _ = template.encode_record(values)
        shown = template.tok.encode(template.render(values) + "\n")
        logits, _ = model(torch.tensor([shown + ids], device=device))
        logp = logits[0, len(shown) - 1:-1].float().log_softmax(-1).cpu()  # logp[t] predicts ids[t]
        t = len(template.public_ids())
        for f in template.fields:
            t += len(template.label_ids[f])
            text, total = "", 0.0
            while not text.endswith("\n"):
                allowed = template.allowed(f, text)
                total += float(logp[t, ids[t]] - logp[t, allowed].logsumexp(0))
                text, t = text + template.strings[ids[t]], t + 1
            own[f].append(math.exp(total))
    return {f: float(sum(v) / len(v)) for f, v in own.items()}


def public_names(rng, n):
    """n names 'First M. N. Last' from the public generator's lists: never derived from the records, and
    with two middle initials, a form the employees generator never writes (it writes 'First Last', or
    'First M. Last' for a repeat), so no synthetic name is a generated person's by chance. Checking the
    private names instead would make the output depend on who is in the data."""
    return [f"{rng.choice(employees.FIRST_NAMES)} {rng.choice(employees.MIDDLE_INITIALS)}. "
            f"{rng.choice(employees.MIDDLE_INITIALS)}. {rng.choice(employees.LAST_NAMES)}" for _ in range(n)]


# ---------------------------------------------------------------------- decoding
def field_tau(mech, template, field):
    """A categorical field's temperature: at least 2c / (its number of public values). The batch's vote
    gives p ~ exp(2c f / tau) (f: the share of the batch holding a value); near f = 1/K that follows
    p ~ f when 2c/tau ~ K (d log f / df = K there), while a two-valued field at 2c/tau = 6 turns 70/30
    into 92/8. A public rule (domain sizes), and never below the accounted tau: never sharper than paid."""
    return max(mech.tau, 2 * mech.c / len(template.domains[field])) if field in template.domains else mech.tau


def whole_value_scores(decoder, template, field, pending):
    """(rows, K): each row's log-probability of each of the field's public values under the value grammar
    (the product of its masked next-token probabilities at the grammar's branch points; forced tokens
    count 1), after `pending`. One forward per branch point, as byte by byte would take."""
    values = [v + "\n" for v in template.domains[field]]
    logits = decoder.extend(pending)[:, :template.vocab]
    scores = torch.zeros(logits.size(0), len(values), device=logits.device)

    def walk(tokens, text, logits, members):
        ids = template.allowed(field, text)
        while len(ids) == 1 and not text.endswith("\n"):
            tokens, text, logits = tokens + ids, text + template.strings[ids[0]], None
            ids = template.allowed(field, text)
        if text.endswith("\n"):
            return
        if logits is None:
            logits = decoder.peek(tokens)[:, :template.vocab]
        logp = masked(logits, template.mask(ids, logits.device)).log_softmax(-1)
        for t in ids:
            below = [k for k in members if values[k].startswith(text + template.strings[t])]
            scores[:, below] += logp[:, t:t + 1]
            walk(tokens + [t], text + template.strings[t], None, below)

    walk([], "", logits, list(range(len(values))))
    return scores


def leading_categorical(fields, domains):
    """The fields before the first one without public values: those the released joint covers."""
    out = []
    for field in fields:
        if field not in domains:
            break
        out.append(field)
    return out


def released_fields(template):
    return leading_categorical(template.fields, template.domains)


def joint_log_probs(decoder, template, fields, pending=()):
    """(rows, M) log-probabilities of every combination of `fields`' public values (itertools.product
    order) for every row: the product of its whole-value grammar probabilities along the path, so each
    row's probabilities sum to 1. Returns (scores, combinations); the decoder is left as it was."""
    field, rest, mark = fields[0], fields[1:], decoder.n
    prefix = list(pending) + template.label_ids[field]
    scores = whole_value_scores(decoder, template, field, prefix)
    decoder.rewind(mark)
    values = template.domains[field]
    if not rest:
        return scores, [(v,) for v in values]
    blocks, combos = [], []
    for k, value in enumerate(values):
        below, tails = joint_log_probs(decoder, template, rest, prefix + template.tok.encode(value + "\n"))
        blocks.append(scores[:, k:k + 1] + below)
        combos += [(value, *tail) for tail in tails]
    return torch.cat(blocks, 1), combos


@dataclass
class JointRelease:
    """What the records of one batch draw their leading categorical fields from."""
    fields: list
    combos: list  # value tuples, one per cell
    probs: torch.Tensor  # float64 distribution over the cells (post-processing of the noisy sums)


def row_joint(decoder, template):
    """(released fields, (rows, M) probabilities over their combinations, each row renormalised to sum
    <= 1 so one person moves the sum by at most 1 in L2 whatever the float rounding, the combinations).
    The decoder is reset first: the fields start the record."""
    decoder.reset()
    fields = released_fields(template)
    logp, combos = joint_log_probs(decoder, template, fields)
    probs = logp.double().exp()
    return fields, probs / probs.sum(1, keepdim=True).clamp(min=1.0), combos


def release_joint(decoder, n_private, template, sigma, stream, people=None):
    """The batch's released joint: the private rows' probabilities summed (people given: their own
    values, read off their records, record_counts), plus N(0, sigma^2) per cell from the DP stream (the
    only look at the rows); then post-processing: cells under 2 sigma are dropped (the noise alone passes
    2 sigma in 2.3% of empty cells, and clamping at 0 would spread ~0.4 sigma over every one of them) and
    the rest normalised; with none left, the public row's joint (from records: uniform cells)."""
    if people is None:
        fields, probs, combos = row_joint(decoder, template)
        sums, public = probs[:n_private].sum(0), probs[n_private]
    else:
        fields = released_fields(template)
        sums, combos = record_counts(people, template, fields)
        public = torch.ones(len(combos), dtype=torch.float64)
    noisy = sums + stream.normal((len(combos),), sigma, dtype=torch.float64)
    kept = torch.where(noisy >= 2 * sigma, noisy, torch.zeros_like(noisy))
    if not kept.sum() > 0:
        kept = public
    return JointRelease(fields, combos, kept / kept.sum())


def public_joint(decoder, template):
    """The joint of the decoder's last row (the public one: the drafter alone), for the plan's dry run
    and the epsilon-0 drafter."""
    fields, probs, combos = row_joint(decoder, template)
    return JointRelease(fields, combos, probs[-1] / probs[-1].sum())


@dataclass
class BandRelease:
    """What the records of one batch draw a numeric field from: its band given their released fields."""
    field: str
    given: list  # the released fields it is conditioned on
    combos: list  # value tuples of `given`, one per row of probs
    edges: torch.Tensor  # float64 public band edges (bins + 1)
    probs: torch.Tensor  # float64 (len(combos), bins), each row a distribution (post-processing)


def band_edges(bins):
    """The public band edges of (low, high, count)."""
    lo, hi, k = bins
    return torch.linspace(float(lo), float(hi), int(k) + 1, dtype=torch.float64)


def band_of(edges, value):
    """The band holding `value`; values outside (low, high) go to the first or the last band."""
    k = len(edges) - 1
    at = int(torch.searchsorted(edges, torch.tensor([float(value)], dtype=torch.float64), right=True))
    return min(max(at - 1, 0), k - 1)


def record_counts(people, template, fields, band=None):
    """(counts, combinations): every person's one-hot at its own values of `fields` (and, with band =
    (numeric field, edges), the band of that field's value), read off its record, over the combinations
    of the fields' public values (x the bands). One person moves one count by 1: L2 1, the released
    joint's sensitivity. A value outside the public domains, or none, counts nowhere."""
    combos = list(itertools.product(*[template.domains[f] for f in fields]))
    row_of = {c: i for i, c in enumerate(combos)}
    counts = torch.zeros((len(combos),) + ((len(band[1]) - 1,) if band else ()), dtype=torch.float64)
    for person in people:
        key = tuple(template.real_values(person)[f] for f in fields)
        if key in row_of and band is None:
            counts[row_of[key]] += 1
        elif key in row_of and person.get(band[0]) is not None:
            counts[row_of[key], band_of(band[1], person[band[0]])] += 1
    return counts, combos


def release_band(people, template, field, given, bins, sigma, stream):
    """A numeric field's released table for one batch: record_counts (the drafter copies no digits, its
    probe says so, so the band is read off the record) plus N(0, sigma^2) per cell from the DP stream.
    Then post-processing only: cells under 2 sigma dropped, each row normalised; a row with nothing left
    falls back to the table's band marginal, then to uniform bands."""
    edges = band_edges(bins)
    counts, combos = record_counts(people, template, given, (field, edges))
    noisy = counts + stream.normal(tuple(counts.shape), sigma, dtype=torch.float64)
    kept = torch.where(noisy >= 2 * sigma, noisy, torch.zeros_like(noisy))
    marginal = kept.sum(0)
    marginal = marginal / marginal.sum() if marginal.sum() > 0 else torch.full_like(marginal, 1.0 / len(marginal))
    rows = kept.sum(1, keepdim=True)
    probs = torch.where(rows > 0, kept / rows.clamp(min=1e-300), marginal.expand_as(kept))
    return BandRelease(field, list(given), combos, edges, probs)


def public_band(template, field, given, bins):
    """Uniform bands, no data: the plan's dry run (the released fields cost no token)."""
    edges = band_edges(bins)
    combos = list(itertools.product(*[template.domains[f] for f in given]))
    return BandRelease(field, list(given), combos, edges,
                       torch.full((len(combos), len(edges) - 1), 1.0 / (len(edges) - 1), dtype=torch.float64))


def draw_band_value(band, values, template, gen):
    """A value for band.field given the record's released values: a band from its row of the table, then
    uniform within it (public post-processing), inside the field's digit grammar, at the schema's decimals."""
    row = band.probs[band.combos.index(tuple(values[f] for f in band.given))]
    b = int(torch.multinomial(row, 1, generator=gen))
    d, (lo_digits, hi_digits) = template.decimals[band.field], template.digits[band.field]
    scale = 10 ** d  # values in units of 10^-d, inside the grammar: lo_digits..hi_digits integer digits
    smallest, largest = 10 ** (lo_digits - 1) * scale, 10 ** hi_digits * scale - 1
    lo = min(max(math.ceil(float(band.edges[b]) * scale), smallest), largest)
    hi = min(max(math.ceil(float(band.edges[b + 1]) * scale), lo + 1), largest + 1)
    units = lo + int(torch.randint(hi - lo, (), generator=gen))
    return f"{units // scale}.{units % scale:0{d}d}" if d else str(units)


def decode_record(decoder, n_private, mech, template, gen, budget, max_value_tokens=40, public_only=False,
                  whole_values=False, joint=None, bands=()):
    """One synthetic record: labels free, forced tokens free, other value tokens through the mechanism
    (public_only: all from the public row, the epsilon-0 drafter). Rows 0..n_private-1 are private, row
    n_private the public one. `budget` = private tokens left. Returns (values or None, why, counts).
    Tokens known in advance (a label, a forced run, the token just drawn) go to the decoder in one
    forward when the next choice needs logits: the same logits as one at a time, a third of the forwards.
    whole_values: a categorical field is one choice among its public values, each row scoring each value
    by its sequence log-probability (a vector clipped and averaged like a logit row: the same bounds, one
    private token). Byte by byte, a value decided at an inner byte (F -> I or A) is voted on by every row,
    also the ~90% whose record starts otherwise and whose prior then outweighs the records.
    joint: a JointRelease; its fields are drawn from it first, free (counted as 'released'). bands:
    BandReleases; each field is drawn from its table given the joint's values, free."""
    counts = Counter()
    decoder.reset()
    values, pending = {}, []
    if joint is not None:
        combo = joint.combos[int(torch.multinomial(joint.probs, 1, generator=gen))]
        for field, value in zip(joint.fields, combo):
            pending += template.label_ids[field] + template.tok.encode(value + "\n")
            values[field] = value
        counts["released"] += len(joint.fields)
    banded = {band.field: band for band in bands}
    for field in template.fields:
        if field in values:
            continue
        pending += template.label_ids[field]
        if field in banded:
            values[field] = draw_band_value(banded[field], values, template, gen)
            pending += template.tok.encode(values[field] + "\n")
            counts["released"] += 1
            continue
        if whole_values and field in template.domains and len(template.domains[field]) > 1:
            Z = whole_value_scores(decoder, template, field, pending)
            if public_only:
                k, private = mech.public_token(Z[n_private], gen), False
            elif counts["private"] >= budget:
                return None, "budget ran out mid-record", counts
            else:
                k, private = mech.choose(Z[:n_private], Z[n_private], gen, None, field_tau(mech, template, field))
            counts["private" if private else "public"] += 1
            value = template.domains[field][k]
            pending = template.tok.encode(value + "\n")
            counts["forced"] += len(pending) - 1
            values[field] = value
            continue
        text = ""
        for _ in range(max_value_tokens):
            ids = template.allowed(field, text)
            if len(ids) == 1:
                token = ids[0]
                counts["forced"] += 1
            else:
                logits, pending = decoder.extend(pending), []
                mask = template.mask(ids, logits.device)
                z_pub = logits[n_private, :template.vocab]
                if public_only:
                    token, private = mech.public_token(z_pub, gen, mask), False
                elif counts["private"] >= budget:
                    return None, "budget ran out mid-record", counts
                else:
                    token, private = mech.choose(logits[:n_private, :template.vocab], z_pub, gen, mask,
                                                 field_tau(mech, template, field))
                counts["private" if private else "public"] += 1
            pending.append(token)
            text += template.strings[token]
            if text.endswith("\n"):
                break
        else:
            return None, "length cap", counts
        values[field] = text[:-1]
    if template.parse(template.render(values)) != values:
        return None, "parse failure", counts
    return values, "", counts


def synthesize_records(decoder, n_private, mech, template, r, gen, max_records, public_only=False,
                       max_value_tokens=40, on_record=None, whole_values=False, joint=None, bands=()):
    """Records from one batch until r private tokens are spent (r = 0: every field released, none to
    spend) or max_records are kept (at most 2 * max_records attempts). Returns (kept [(values, counts)],
    discards Counter(why), private spent)."""
    kept, discards, spent = [], Counter(), 0
    mech.start(gen)
    for _ in range(2 * max_records):
        if len(kept) >= max_records or (0 < r <= spent and not public_only):
            break
        values, why, counts = decode_record(decoder, n_private, mech, template, gen, r - spent,
                                            max_value_tokens, public_only, whole_values, joint, bands)
        spent += counts["private"]
        if values is None:
            discards[why] += 1
        else:
            kept.append((values, counts))
        if on_record:
            on_record()
    return kept, discards, spent


def qa_records(template, records, rng, names=None):
    """Synthetic people (public names) and their records in the schema's Q/A form, for fine-tuning."""
    names = names or public_names(rng, len(records))
    people = [template.person(values, name) for values, name in zip(records, names)]
    return people, [template.schema.render_record(p, rng, fields=template.fields) for p in people]


def seeded(seed):
    """A random.Random for the public parts (names, Q/A templates): from the OS unless seed >= 0."""
    return random.Random(None if seed < 0 else seed)
