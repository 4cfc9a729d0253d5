"""The employees dataset's schema (City of Chicago employee salaries), its deterministic synthetic
people, their rendering as Q/A examples, and canary secrets.

A person is a dict: "Name" + FIELDS (None where the schema leaves a cell empty) + "Phone" for canary
people only. Salaried people have an Annual Salary and no Hourly Rate or Typical Hours; hourly people
have an Hourly Rate and Typical Hours, and their Annual Salary is hourly rate x typical hours x 52
(the same rule fills a real CSV's empty cells). One Q/A example per present field:

    Context: Maria Lopez. Question: What is Maria Lopez's annual salary? Answer: 95028.00

The model completes qa_prompt(...) ("... Answer:") with " " + answer + "\\n". A record (one person, the
privacy unit) is the person's examples, one per line, the canary's Phone line first so the text before
a canary secret is exactly its prompt, the other fields in random order so that each is seen at varied
positions (probes ask at the start of a prompt)."""
import json
import os
import random

FIELDS = ["Job Titles", "Department", "Full or Part-Time", "Salary or Hourly", "Typical Hours",
          "Annual Salary", "Hourly Rate"]
CANARY_FIELD = "Phone"
SECRET_FORMAT = "###-####"
MONEY_FIELDS = ("Annual Salary", "Hourly Rate")
WEEKS_PER_YEAR = 52

# Paraphrased questions; template 0 is the canonical one. Every field has N_TEMPLATES of them.
QUESTIONS = {
    "Job Titles": ["What is {name}'s job title?", "What job does {name} hold?",
                   "What position does {name} have?", "What is the title of {name}'s job?"],
    "Department": ["Which department does {name} work in?", "What department employs {name}?",
                   "In which department is {name}?", "What is {name}'s department?"],
    "Full or Part-Time": ["Is {name} full-time or part-time?", "Does {name} work full or part time?",
                          "Is {name} employed full-time (F) or part-time (P)?",
                          "What is {name}'s full- or part-time status?"],
    "Salary or Hourly": ["Is {name} paid a salary or hourly?", "Is {name} salaried or hourly?",
                         "How is {name} paid, salary or hourly?", "Does {name} earn a salary or an hourly wage?"],
    "Typical Hours": ["How many hours a week does {name} typically work?",
                      "What are {name}'s typical weekly hours?",
                      "How many hours does {name} usually work per week?",
                      "What is {name}'s usual work week in hours?"],
    "Annual Salary": ["What is {name}'s annual salary?", "How much does {name} earn per year?",
                      "What does {name} make in a year?", "What is the yearly pay of {name}?"],
    "Hourly Rate": ["What is {name}'s hourly rate?", "How much is {name} paid per hour?",
                    "What does {name} earn an hour?", "What is the hourly wage of {name}?"],
    CANARY_FIELD: ["What is the phone number of {name}?", "What is {name}'s phone number?",
                   "At what number can {name} be reached?", "Which phone number belongs to {name}?"],
}
N_TEMPLATES = 4
CANARY_TEMPLATE = 0  # every canary is asked the same way, so their prompts share one format
MIDDLE_INITIALS = "ABCDEFGHJKLMNPRSTW"

FIRST_NAMES = """Aaliyah Adam Ahmed Aisha Alejandro Alex Alicia Amir Ana Andre Angela Anthony Ashley Bao Beatriz
Benjamin Brandon Brian Carlos Carmen Catherine Chen Christopher Daniel Darnell David Deborah Diana Dmitri
Elena Elijah Emily Emma Eric Fatima Felipe Grace Hannah Hector Isabel Jamal James Jasmine Javier Jennifer
Jessica John Jorge Joseph Juan Kateryna Keisha Kevin Kim Latoya Laura Linda Lucia Luis Malik Marcus Maria
Mark Marta Matthew Mei Michael Michelle Miguel Mohammed Nadia Nicole Olga Omar Patricia Patrick Paul Priya
Rafael Rashad Rebecca Ricardo Robert Rosa Ryan Samuel Sandra Sarah Sean Sofia Stephanie Tamika Thomas
Tyrone Valentina Victor William Xavier Yolanda Yusuf Zoe""".split()
LAST_NAMES = """Abbott Adams Ali Allen Alvarez Anderson Baker Banks Bell Brooks Brown Bui Burke Butler Campbell
Carter Castillo Chavez Chen Clark Coleman Collins Cruz Davis Diaz Dubois Edwards Evans Flores Foster Garcia
Gomez Gonzalez Gordon Green Greene Gutierrez Hall Harris Hernandez Hill Hughes Ivanov Jackson James Jenkins
Johnson Jones Kaminski Kelly Khan Kim Kowalski Lee Lewis Lopez Martin Martinez Medina Miller Mitchell Moore
Morales Morris Murphy Nguyen Novak O'Brien Ortiz Park Patel Perez Peterson Phillips Price Ramirez Reed Reyes
Rivera Roberts Robinson Rodriguez Rogers Ruiz Sanchez Scott Shah Singh Smith Stewart Sullivan Taylor Thomas
Thompson Torres Turner Walker Washington Williams Wilson Wright Young Zielinski""".split()

# Department abbreviations as in the Chicago data; weights ~ department sizes. Jobs:
# (title, salary or hourly, full or part-time, typical hours, pay low, pay high) with pay per year for
# salaried jobs and per hour for hourly ones.
DEPARTMENTS = {
    "POLICE": (30, [("POLICE OFFICER", "Salary", "F", None, 60000, 100000),
                    ("SERGEANT", "Salary", "F", None, 100000, 125000),
                    ("LIEUTENANT", "Salary", "F", None, 120000, 140000),
                    ("DETENTION AIDE", "Salary", "F", None, 50000, 80000),
                    ("CROSSING GUARD", "Hourly", "P", 20, 17, 21)]),
    "FIRE": (12, [("FIREFIGHTER-EMT", "Salary", "F", None, 75000, 110000),
                  ("FIRE ENGINEER-EMT", "Salary", "F", None, 95000, 115000),
                  ("PARAMEDIC", "Salary", "F", None, 70000, 105000),
                  ("LIEUTENANT-EMT", "Salary", "F", None, 110000, 130000)]),
    "STREETS & SAN": (8, [("MOTOR TRUCK DRIVER", "Hourly", "F", 40, 35, 40),
                          ("SANITATION LABORER", "Hourly", "F", 40, 36, 40),
                          ("FOREMAN OF SANITATION", "Salary", "F", None, 85000, 95000),
                          ("MACHINIST (AUTOMOTIVE)", "Hourly", "F", 40, 48, 52)]),
    "WATER MGMNT": (7, [("OPERATING ENGINEER-GROUP A", "Hourly", "F", 40, 45, 50),
                        ("CONSTRUCTION LABORER", "Hourly", "F", 40, 44, 46),
                        ("WATER CHEMIST II", "Salary", "F", None, 75000, 95000),
                        ("PLUMBER", "Hourly", "F", 40, 50, 53),
                        ("CIVIL ENGINEER IV", "Salary", "F", None, 95000, 120000)]),
    "AVIATION": (6, [("AVIATION SECURITY OFFICER", "Salary", "F", None, 50000, 80000),
                     ("CUSTODIAN", "Hourly", "F", 40, 19, 24),
                     ("AIRPORT OPERATIONS SUPVSR I", "Salary", "F", None, 70000, 90000),
                     ("EQUIPMENT OPERATOR", "Hourly", "F", 40, 48, 50)]),
    "OEMC": (5, [("POLICE COMMUNICATIONS OPERATOR II", "Salary", "F", None, 60000, 85000),
                 ("TRAFFIC CONTROL AIDE-HOURLY", "Hourly", "P", 20, 18, 22),
                 ("FIRE COMMUNICATIONS OPERATOR I", "Salary", "F", None, 65000, 90000)]),
    "TRANSPORTN": (5, [("POOL MOTOR TRUCK DRIVER", "Hourly", "F", 40, 35, 40),
                       ("CIVIL ENGINEER III", "Salary", "F", None, 85000, 105000),
                       ("ELECTRICAL MECHANIC", "Hourly", "F", 40, 50, 52)]),
    "PUBLIC LIBRARY": (4, [("LIBRARIAN I", "Salary", "F", None, 60000, 80000),
                           ("LIBRARY ASSOCIATE", "Salary", "F", None, 50000, 70000),
                           ("LIBRARY PAGE", "Hourly", "P", 20, 15, 17)]),
    "HEALTH": (3, [("PUBLIC HEALTH NURSE II", "Salary", "F", None, 80000, 100000),
                   ("EPIDEMIOLOGIST II", "Salary", "F", None, 75000, 95000),
                   ("PUBLIC HEALTH AIDE", "Hourly", "P", 20, 18, 22)]),
    "FAMILY & SUPPORT": (3, [("CASEWORKER", "Salary", "F", None, 50000, 70000),
                             ("FOSTER GRANDPARENT", "Hourly", "P", 20, 3, 4)]),
    "FINANCE": (3, [("ACCOUNTANT III", "Salary", "F", None, 65000, 90000),
                    ("AUDITOR II", "Salary", "F", None, 60000, 85000),
                    ("REVENUE INVESTIGATOR I", "Salary", "F", None, 55000, 75000)]),
    "BUILDINGS": (2, [("BUILDING INSPECTOR", "Salary", "F", None, 85000, 105000),
                      ("PLUMBING INSPECTOR", "Salary", "F", None, 90000, 110000)]),
    "LAW": (2, [("ASST CORPORATION COUNSEL", "Salary", "F", None, 70000, 120000),
                ("PARALEGAL II", "Salary", "F", None, 55000, 75000),
                ("LAW CLERK", "Hourly", "P", 20, 13, 16)]),
    "ANIMAL CONTRL": (1, [("ANIMAL CONTROL OFFICER", "Salary", "F", None, 45000, 65000),
                          ("ANIMAL CARE AIDE I", "Hourly", "F", 40, 18, 24)]),
}


def format_value(field, value):
    if field in MONEY_FIELDS:
        return f"{value:.2f}"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def context(person):
    return f"Context: {person['Name']}."


def question(person, field, template_index=0):
    return QUESTIONS[field][template_index].format(name=person["Name"])


def answer(person, field):
    value = person.get(field)
    if value is None:
        raise ValueError(f"{person['Name']} has no {field}")
    return format_value(field, value)


def qa_prompt(person, field, template_index=0):
    """The text a model completes with ' ' + answer + '\\n'."""
    return f"{context(person)} Question: {question(person, field, template_index)} Answer:"


def record_fields(person, fields=None):
    """The fields a record asks about, in order: the canary Phone first, then the schema fields (or
    those in `fields`) the person has a value for."""
    keep = FIELDS if fields is None else [f for f in FIELDS if f in fields]
    head = [CANARY_FIELD] if person.get(CANARY_FIELD) is not None else []
    return head + [f for f in keep if person.get(f) is not None]


def render_examples(person, rng_or_template_choice, fields=None, templates=None):
    """(record text, [(field, template_index, answer_start, answer_end), ...]). An answer span covers
    ' ' + answer + '\\n' (the completion of its qa_prompt). rng_or_template_choice: a random.Random (the
    fields in random order after the canary line, and a template per field drawn from `templates`, default
    all; the canary question is always CANARY_TEMPLATE), an int (that template for every field, schema
    order) or a dict {field: index} (default 0, schema order)."""
    choice = rng_or_template_choice
    pool = list(range(N_TEMPLATES)) if templates is None else list(templates)
    order = record_fields(person, fields)
    if isinstance(choice, random.Random):  # every field at varied positions: a probe asks at position 0
        head = order[:1] if order[:1] == [CANARY_FIELD] else []
        rest = order[len(head):]
        choice.shuffle(rest)
        order = head + rest
    text, examples = "", []
    for field in order:
        if isinstance(choice, random.Random):
            t = CANARY_TEMPLATE if field == CANARY_FIELD else choice.choice(pool)
        elif isinstance(choice, dict):
            t = choice.get(field, 0)
        else:
            t = int(choice)
        text += qa_prompt(person, field, t)
        start = len(text)
        text += f" {answer(person, field)}\n"
        examples.append((field, t, start, len(text)))
    return text, examples


def render_record(person, rng_or_template_choice, fields=None, templates=None):
    """The person's whole record: one Q/A example per field, one per line."""
    return render_examples(person, rng_or_template_choice, fields, templates)[0]


def random_secret(rng, secret_format=SECRET_FORMAT):
    """secret_format with every '#' replaced by a random digit, e.g. '###-####' -> '305-8841'."""
    return "".join(str(rng.randrange(10)) if c == "#" else c for c in secret_format)


def name_capacity():
    """How many distinct names unique_names can draw (first [middle initial.] last)."""
    return len(FIRST_NAMES) * len(LAST_NAMES) * (1 + len(MIDDLE_INITIALS))


def unique_names(rng, n, taken=()):
    """n distinct 'First Last' names (a middle initial where the plain name is used), none in `taken`."""
    seen = set(taken)
    if n + len(seen) > name_capacity() // 2:
        raise ValueError(f"cannot draw {n} distinct names from {name_capacity()} combinations")
    names = []
    while len(names) < n:
        first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
        name = f"{first} {last}"
        if name in seen:
            name = f"{first} {rng.choice(MIDDLE_INITIALS)}. {last}"
        if name not in seen:
            seen.add(name)
            names.append(name)
    return names


def complete(person):
    """Fill an empty Annual Salary of an hourly person as hourly rate x typical hours x 52."""
    if (person.get("Annual Salary") is None and person.get("Hourly Rate") is not None
            and person.get("Typical Hours") is not None):
        person["Annual Salary"] = round(person["Hourly Rate"] * person["Typical Hours"] * WEEKS_PER_YEAR, 2)
    return person


def random_person(rng, name):
    departments = list(DEPARTMENTS)
    department = rng.choices(departments, weights=[DEPARTMENTS[d][0] for d in departments])[0]
    title, pay, full_part, hours, low, high = rng.choice(DEPARTMENTS[department][1])
    person = {"Name": name, "Job Titles": title, "Department": department, "Full or Part-Time": full_part,
              "Salary or Hourly": pay, "Typical Hours": hours, "Annual Salary": None, "Hourly Rate": None}
    if pay == "Salary":
        person["Annual Salary"] = float(rng.randint(low // 12, high // 12) * 12)  # a whole monthly amount
    else:
        person["Hourly Rate"] = rng.randint(low * 100, high * 100) / 100
    return complete(person)


def generate_people(rng, n, taken=()):
    """n synthetic people with distinct names (none in `taken`), deterministic for a seeded rng."""
    return [random_person(rng, name) for name in unique_names(rng, n, taken)]


def read_people(data_dir, split):
    """A prepared split's people, one per record in record order ({split}_people.jsonl), or None."""
    path = os.path.join(data_dir, f"{split}_people.jsonl")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def load_people(data_dir, split):
    """A split's people, each once (a canary inserted k times is k identical records), in record order."""
    people = read_people(data_dir, split)
    if not people:
        from utils.cli import UserError
        raise UserError(f"{data_dir} has no {split}_people.jsonl: these metrics need the employees dataset "
                        f"(python data/employees/prepare.py)")
    return list({p["Name"]: p for p in people}.values())
