"""The employees dataset (City of Chicago employee salaries): SCHEMA, its instance of the record schema
(utils/records.py), deterministic synthetic people, and canary secrets.

A person is a dict: "Name" + FIELDS (None where the schema leaves a cell empty) + "Phone" for canary
people only. Salaried people have an Annual Salary and no Hourly Rate or Typical Hours; hourly people
have an Hourly Rate and Typical Hours, and their Annual Salary is hourly rate x typical hours x 52
(the same rule fills a real CSV's empty cells). A person with several rows in a real CSV is one
person whose differing values are lists (utils/records.py). One Q/A example per present field:

    Context: Maria Lopez. Question: What is Maria Lopez's annual salary? Answer: 95028.00

The rendering (records, prompts, answers) is SCHEMA's; the module-level names below are its methods."""
from utils import records
from utils.records import CANARY_FIELD, N_TEMPLATES, Schema, read_people  # noqa: F401 (read_people: re-exported)

FIELDS = ["Job Titles", "Department", "Full or Part-Time", "Salary or Hourly", "Typical Hours",
          "Annual Salary", "Hourly Rate"]
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
    CANARY_FIELD: records.CANARY_QUESTIONS,
}
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


# The employees instance of the record schema (utils/records.py): the rendering every script uses.
SCHEMA = Schema("Name", FIELDS, QUESTIONS, sensitive=["Annual Salary", "Hourly Rate"],
                categorical=["Job Titles", "Department", "Full or Part-Time", "Salary or Hourly"],
                numeric=["Typical Hours", "Annual Salary", "Hourly Rate"], decimals={f: 2 for f in MONEY_FIELDS},
                canary_field=CANARY_FIELD, canary_template=CANARY_TEMPLATE)
format_value, context, question, answer = SCHEMA.format_value, SCHEMA.context, SCHEMA.question, SCHEMA.answer
qa_prompt, record_fields = SCHEMA.qa_prompt, SCHEMA.record_fields
render_examples, render_record = SCHEMA.render_examples, SCHEMA.render_record


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


def load_people(data_dir, split):
    """A prepared employees split's people, each once (utils.records.load_people with this schema)."""
    return records.load_people(data_dir, split, SCHEMA)
