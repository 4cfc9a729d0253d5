"""utils/records.py: the record schema every script reads from meta.json, its rendering (the employees
instance included), its JSON round trip, and the refusals."""
import json
import random

import pytest

from utils.cli import UserError
from utils.records import (CANARY_QUESTIONS, Schema, VALUE_SEPARATOR, derived_questions, load_people, load_schema,
                           read_people)

PATIENT = {"name": "Ann Lee", "diagnosis": "asthma", "dose_mg": [5.0, 7.5], "Phone": "555-0101",
           "note": ["first visit", "  second   visit "]}


def patients_schema():
    questions = {f: derived_questions(f) for f in ("diagnosis", "dose_mg")}
    questions["Phone"] = CANARY_QUESTIONS
    return Schema("name", ["diagnosis", "dose_mg"], questions, sensitive=["diagnosis"], numeric=["dose_mg"],
                  decimals={"dose_mg": 1}, canary_field="Phone", text_field="note")


def test_derived_questions_name_the_field_and_the_person():
    qs = derived_questions("dose_mg")
    assert len(qs) == 4 and len(set(qs)) == 4
    assert all("{name}" in q and "dose mg" in q for q in qs)
    assert derived_questions("odd {field}")[0].format(name="X") == "What is X's odd {field}?"  # braces escaped


def test_render_examples_canary_first_values_joined_and_raw_text_last():
    schema = patients_schema()
    text, examples = schema.render_examples(PATIENT, random.Random(0))
    assert [e[0] for e in examples][0] == "Phone"
    assert sorted(e[0] for e in examples[1:]) == ["diagnosis", "dose_mg"]
    for field, t, start, end in examples:
        assert text[start:end] == f" {schema.answer(PATIENT, field)}\n"
        assert text[:start].endswith(schema.qa_prompt(PATIENT, field, t))
    assert schema.answer(PATIENT, "dose_mg") == f"5.0{VALUE_SEPARATOR}7.5"  # both visits' doses, in row order
    assert text.endswith("first visit\nsecond visit\n")  # raw text after the Q/A lines, outside every span
    assert examples[-1][3] == len(text) - len("first visit\nsecond visit\n")
    assert schema.context(PATIENT) == "Context: Ann Lee."


def test_json_round_trip_and_select():
    schema = patients_schema()
    again = Schema.from_json(json.loads(json.dumps(schema.to_json())))
    assert again.to_json() == schema.to_json()
    assert again.render_record(PATIENT, 1) == schema.render_record(PATIENT, 1)
    only = schema.select(["dose_mg"])
    assert only.fields == ["dose_mg"] and only.sensitive == [] and only.decimals == {"dose_mg": 1}
    with pytest.raises(UserError, match="unknown or no field"):
        schema.select(["weight"])
    with pytest.raises(UserError, match="this data asks about diagnosis, dose_mg"):
        schema.check_fields(["weight"])
    with pytest.raises(UserError, match="same number"):
        Schema("name", ["a"], {"a": ["Q {name}?"], "Phone": CANARY_QUESTIONS}, canary_field="Phone")
    with pytest.raises(UserError, match="not among the fields"):
        Schema("name", ["a"], {"a": derived_questions("a")}, sensitive=["b"])


def test_employees_is_one_instance_of_the_schema():
    from utils import employees
    person = employees.generate_people(random.Random(3), 1)[0]
    assert employees.render_examples is not None and employees.SCHEMA.person_field == "Name"
    text, examples = employees.render_examples(person, 0)
    for line, (field, t, _, _) in zip(text.splitlines(), examples):
        question = employees.QUESTIONS[field][0].format(name=person["Name"])
        assert line == f"Context: {person['Name']}. Question: {question} Answer: {employees.answer(person, field)}"
    assert employees.SCHEMA.answer({"Name": "X", "Annual Salary": 1000.0}, "Annual Salary") == "1000.00"
    assert employees.SCHEMA.answer({"Name": "X", "Typical Hours": 40.0}, "Typical Hours") == "40"
    assert Schema.from_json(employees.SCHEMA.to_json()).render_record(person, 2) == employees.render_record(person, 2)


def test_load_schema_and_people_from_meta(tmp_path):
    from utils.data import write_meta
    write_meta(str(tmp_path), {"tokenizer": "byte", "vocab_size": 257, "dtype": "uint16"})
    with pytest.raises(UserError, match="no record schema.*data/records/prepare.py"):
        load_schema(str(tmp_path))
    schema = patients_schema()
    write_meta(str(tmp_path), {"tokenizer": "byte", "vocab_size": 257, "dtype": "uint16", "schema": schema.to_json()})
    assert load_schema(str(tmp_path)).to_json() == schema.to_json()
    assert read_people(str(tmp_path), "train") is None
    with pytest.raises(UserError, match="no train_people.jsonl"):
        load_people(str(tmp_path), "train")
    canary = {"name": "Cy", "Phone": "555-0000"}
    (tmp_path / "train_people.jsonl").write_text("".join(json.dumps(p) + "\n" for p in [PATIENT, canary, canary]))
    assert [p["name"] for p in load_people(str(tmp_path), "train")] == ["Ann Lee", "Cy"]  # a canary's copies: once
