"""The record schema: which column names a person, which fields a record asks about, which are
sensitive, how each is asked (paraphrase templates) and how answers are written. One schema serves
every dataset of people (utils/employees.py is one instance; data/records/prepare.py builds one from a
user's CSV/JSONL) and travels in meta.json, so every script reads it from the data, never from code.

A person is a dict {person_field: name, field: value, ...}: a value is None (absent), a scalar, or a
list of values when the source had several rows for the person that disagree (all values stay in the
person's one record; a person is never split, since a person is the privacy unit). One Q/A example
per present field:

    Context: Maria Lopez. Question: What is Maria Lopez's annual salary? Answer: 95028.00

The model completes qa_prompt(...) ("... Answer:") with " " + answer + "\\n". A record is the person's
examples, one per line: the canary line first (so the text before a canary secret is exactly its
prompt), the other fields in random order (every field seen at varied positions: probes ask at the
start of a prompt), then the person's raw text lines (text_field), which carry no answer span.

meta.json's "schema" (JSON only):
    {"person_field": "Name", "fields": [...], "sensitive": [...], "categorical": [...], "numeric": [...],
     "decimals": {field: digits}, "questions": {field: [template with {name}, ...]},
     "canary_field": "Phone" or null, "canary_template": 0, "text_field": null or a column name}
"""
import json
import os
import random

from utils.cli import UserError

N_TEMPLATES = 4
VALUE_SEPARATOR = "; "  # between a person's conflicting values of one field, in source order
CANARY_FIELD = "Phone"
CANARY_QUESTIONS = ["What is the phone number of {name}?", "What is {name}'s phone number?",
                    "At what number can {name} be reached?", "Which phone number belongs to {name}?"]


def label(field):
    """'annual_salary' / 'Annual Salary' -> 'annual salary' (how a question names the field)."""
    words = " ".join(field.replace("_", " ").replace("-", " ").split())
    return words.lower() if not words.isupper() or len(words) > 4 else words


def derived_questions(field):
    """N_TEMPLATES paraphrases of a question about `field`, derived from its name. Template 0 is the
    canonical one. Braces in a field name are escaped (templates are format strings over {name})."""
    what = label(field).replace("{", "{{").replace("}", "}}")
    return [f"What is {{name}}'s {what}?", f"What is the {what} of {{name}}?",
            f"Which {what} is recorded for {{name}}?", f"What {what} does {{name}} have?"]


class Schema:
    def __init__(self, person_field, fields, questions, sensitive=(), categorical=(), numeric=(), decimals=None,
                 canary_field=None, canary_template=0, text_field=None):
        self.person_field, self.fields = person_field, list(fields)
        self.sensitive, self.categorical, self.numeric = list(sensitive), list(categorical), list(numeric)
        self.decimals = dict(decimals or {})
        self.canary_field, self.canary_template, self.text_field = canary_field, canary_template, text_field
        self.questions = {f: list(questions[f]) for f in self.fields + ([canary_field] if canary_field else [])}
        counts = {len(q) for q in self.questions.values()}
        if len(counts) != 1 or 0 in counts:
            raise UserError(f"schema: every field needs the same number (>= 1) of question templates, got {counts}")
        self.n_templates = counts.pop()
        if not self.fields:
            raise UserError("schema: no fields")
        stray = [f for f in self.sensitive + self.categorical + self.numeric + list(self.decimals) if f not in self.fields]
        if stray:
            raise UserError(f"schema: {stray} are not among the fields {self.fields}")
        if person_field in self.fields:
            raise UserError(f"schema: the person column {person_field!r} cannot also be a field")

    # ------------------------------------------------------------------ persistence
    def to_json(self):
        return {"person_field": self.person_field, "fields": self.fields, "sensitive": self.sensitive,
                "categorical": self.categorical, "numeric": self.numeric, "decimals": self.decimals,
                "questions": self.questions, "canary_field": self.canary_field,
                "canary_template": self.canary_template, "text_field": self.text_field}

    @classmethod
    def from_json(cls, d):
        try:
            return cls(d["person_field"], d["fields"], d["questions"], d.get("sensitive", ()),
                       d.get("categorical", ()), d.get("numeric", ()), d.get("decimals"), d.get("canary_field"),
                       d.get("canary_template", 0), d.get("text_field"))
        except (KeyError, TypeError) as e:
            raise UserError(f"meta.json's schema is malformed ({e!r}); rerun the dataset's prepare.py") from None

    def select(self, fields):
        """The same schema asking only `fields` (kept in schema order)."""
        keep = [f for f in self.fields if f in set(fields)]
        unknown = [f for f in fields if f not in self.fields]
        if unknown or not keep:
            raise UserError(f"unknown or no field(s) {unknown}; valid fields: {', '.join(self.fields)}")
        d = self.to_json()
        d.update(fields=keep, sensitive=[f for f in self.sensitive if f in keep],
                 categorical=[f for f in self.categorical if f in keep], numeric=[f for f in self.numeric if f in keep],
                 decimals={f: v for f, v in self.decimals.items() if f in keep})
        return Schema.from_json(d)

    def check_fields(self, fields, what="--fields"):
        """Refuse fields the schema does not ask about (the canary field is allowed: it is asked too)."""
        unknown = [f for f in fields if f not in self.fields and f != self.canary_field]
        if unknown:
            raise UserError(f"{what}: unknown field(s) {unknown}; this data asks about {', '.join(self.fields)}")
        return list(fields)

    # ------------------------------------------------------------------ rendering
    def name(self, person):
        return person[self.person_field]

    def has(self, person, field):
        value = person.get(field)
        return value is not None and value != "" and value != []

    def format_value(self, field, value):
        if field in self.decimals and isinstance(value, (int, float)) and not isinstance(value, bool):
            return f"{value:.{self.decimals[field]}f}"
        if isinstance(value, float) and value.is_integer():
            return str(int(value))
        return str(value)

    def context(self, person):
        return f"Context: {self.name(person)}."

    def question(self, person, field, template_index=0):
        return self.questions[field][template_index].format(name=self.name(person))

    def answer(self, person, field):
        if not self.has(person, field):
            raise ValueError(f"{self.name(person)} has no {field}")
        value = person[field]
        values = value if isinstance(value, list) else [value]
        return VALUE_SEPARATOR.join(self.format_value(field, v) for v in values)

    def qa_prompt(self, person, field, template_index=0):
        """The text a model completes with ' ' + answer + '\\n'."""
        return f"{self.context(person)} Question: {self.question(person, field, template_index)} Answer:"

    def record_fields(self, person, fields=None):
        """The fields a record asks about, in order: the canary field first, then the schema fields (or
        those in `fields`) the person has a value for."""
        keep = self.fields if fields is None else [f for f in self.fields if f in fields]
        head = [self.canary_field] if self.canary_field and self.has(person, self.canary_field) else []
        return head + [f for f in keep if self.has(person, f)]

    def render_examples(self, person, choice, fields=None, templates=None, shuffle_fields=True):
        """(record text, [(field, template_index, answer_start, answer_end), ...]). An answer span covers
        ' ' + answer + '\\n' (the completion of its qa_prompt). choice: a random.Random (the fields in
        random order after the canary line unless shuffle_fields=False, and a template per field drawn from
        `templates`, default all; the canary question is always canary_template), an int (that template for
        every field, schema order) or a dict {field: index} (default 0, schema order). Raw text lines
        (text_field) follow."""
        pool = list(range(self.n_templates)) if templates is None else list(templates)
        order = self.record_fields(person, fields)
        shuffled = isinstance(choice, random.Random)
        if shuffled and shuffle_fields:
            head = order[:1] if order[:1] == [self.canary_field] else []
            rest = order[len(head):]
            choice.shuffle(rest)
            order = head + rest
        text, examples = "", []
        for field in order:
            if shuffled:
                t = self.canary_template if field == self.canary_field else choice.choice(pool)
            elif isinstance(choice, dict):
                t = choice.get(field, 0)
            else:
                t = int(choice)
            text += self.qa_prompt(person, field, t)
            start = len(text)
            text += f" {self.answer(person, field)}\n"
            examples.append((field, t, start, len(text)))
        if self.text_field and self.has(person, self.text_field):
            raw = person[self.text_field]
            text += "".join(" ".join(str(line).split()) + "\n" for line in (raw if isinstance(raw, list) else [raw]))
        return text, examples

    def render_record(self, person, choice, fields=None, templates=None):
        return self.render_examples(person, choice, fields, templates)[0]


# ---------------------------------------------------------------------- reading prepared data
def load_schema(data_dir):
    """The schema in data_dir/meta.json, or a UserError naming the command that writes one."""
    from utils.data import load_meta, prepare_hint
    meta = load_meta(data_dir)
    if "schema" not in meta:
        raise UserError(f"{data_dir}/meta.json has no record schema (these metrics need records of people): "
                        f"rerun `{prepare_hint(data_dir)}`, or prepare your own with "
                        f"`python data/records/prepare.py --input FILE --person_column COL --fields a,b`")
    return Schema.from_json(meta["schema"])


def read_people(data_dir, split):
    """A prepared split's people, one per record in record order ({split}_people.jsonl), or None."""
    path = os.path.join(data_dir, f"{split}_people.jsonl")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def load_people(data_dir, split, schema=None):
    """A split's people, each once (a canary inserted k times is k identical records), in record order."""
    people = read_people(data_dir, split)
    if not people:
        raise UserError(f"{data_dir} has no {split}_people.jsonl: these metrics need records of people "
                        f"(python data/employees/prepare.py, or data/records/prepare.py for your own file)")
    key = (schema or load_schema(data_dir)).person_field
    return list({p[key]: p for p in people}.values())
