"""Synthetic private records (patients, bank customers) rendered as instruction/response pairs.

Records carry real structure -- locale-specific names, cities, phone numbers, addresses and
IBANs from Faker (MIT licence), medical record numbers, ICD-10 diagnoses with matching
medication and dose, balances in the locale's currency -- so that what a model memorises
and what an attack extracts look like real PII. Every person is fictitious.

Determinism: everything is derived from the dataset ``seed`` with ``random.Random`` and
``Faker.seed_instance`` (data generation is not a security operation; reproducibility
matters more). Dates are computed from the fixed :data:`REFERENCE_DATE`, never from today.
The same seed gives the same data for a given Faker version.

Canary secrets (Carlini et al., "The Secret Sharer", USENIX Security 2019) are drawn from a
separate ``random.Random`` stream derived from the seed: they are the auditor's ground truth,
recorded in the :class:`~fedsecure.data.base.Canary` objects, not credentials.
"""

from __future__ import annotations

import datetime as dt
import random
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fedsecure.data.base import Canary, DataError, Example

REFERENCE_DATE = dt.date(2024, 6, 30)
"""Ages and dates of birth are computed relative to this fixed date (not today)."""

DEFAULT_LOCALES: tuple[str, ...] = (
    "en_US", "en_GB", "de_DE", "fr_FR", "it_IT", "es_ES", "nl_NL",
    "pl_PL", "pt_PT", "da_DK", "fi_FI", "de_AT", "cs_CZ",
)  # fmt: skip
"""Client locales in order; client ``i`` uses ``locales[i % len(locales)]``."""

CURRENCY = {"en_US": "USD", "en_GB": "GBP", "pl_PL": "PLN", "da_DK": "DKK", "cs_CZ": "CZK", "sv_SE": "SEK"}
"""Currency per locale (EUR otherwise)."""

RECORD_KINDS = ("patient", "customer")

CANARY_ALPHABET = "0123456789"
CANARY_LENGTH = 6


@dataclass(frozen=True)
class Condition:
    diagnosis: str
    icd10: str
    medications: tuple[tuple[str, str], ...]  # (drug, dose and frequency)


CONDITIONS: tuple[Condition, ...] = (
    Condition("type 2 diabetes mellitus", "E11.9",
              (("metformin", "500 mg twice daily"), ("metformin", "1000 mg twice daily"),
               ("empagliflozin", "10 mg once daily"))),
    Condition("essential hypertension", "I10",
              (("lisinopril", "10 mg once daily"), ("amlodipine", "5 mg once daily"),
               ("ramipril", "5 mg once daily"))),
    Condition("hyperlipidaemia", "E78.5",
              (("atorvastatin", "20 mg once daily"), ("simvastatin", "40 mg at night"),
               ("rosuvastatin", "10 mg once daily"))),
    Condition("asthma", "J45.909",
              (("salbutamol inhaler", "100 mcg as needed"), ("budesonide inhaler", "200 mcg twice daily"))),
    Condition("hypothyroidism", "E03.9",
              (("levothyroxine", "50 mcg once daily"), ("levothyroxine", "100 mcg once daily"))),
    Condition("major depressive disorder", "F32.1",
              (("sertraline", "50 mg once daily"), ("fluoxetine", "20 mg once daily"))),
    Condition("generalised anxiety disorder", "F41.1",
              (("escitalopram", "10 mg once daily"), ("sertraline", "50 mg once daily"))),
    Condition("gastro-oesophageal reflux disease", "K21.9",
              (("omeprazole", "20 mg once daily"), ("pantoprazole", "40 mg once daily"))),
    Condition("atrial fibrillation", "I48.91",
              (("apixaban", "5 mg twice daily"), ("bisoprolol", "2.5 mg once daily"))),
    Condition("osteoarthritis of the knee", "M17.9",
              (("paracetamol", "1 g up to four times daily"), ("naproxen", "500 mg twice daily"))),
    Condition("migraine without aura", "G43.009",
              (("sumatriptan", "50 mg at onset"), ("propranolol", "40 mg twice daily"))),
    Condition("chronic obstructive pulmonary disease", "J44.9",
              (("tiotropium inhaler", "18 mcg once daily"),)),
    Condition("epilepsy", "G40.909",
              (("levetiracetam", "500 mg twice daily"), ("lamotrigine", "100 mg twice daily"))),
    Condition("rheumatoid arthritis", "M06.9",
              (("methotrexate", "15 mg once weekly"),)),
    Condition("chronic heart failure", "I50.9",
              (("bisoprolol", "5 mg once daily"), ("furosemide", "40 mg once daily"))),
    Condition("iron deficiency anaemia", "D50.9",
              (("ferrous sulfate", "200 mg twice daily"),)),
)  # fmt: skip

ACCOUNT_TYPES = (
    "current account", "savings account", "student account", "joint account",
    "business account", "premium account",
)  # fmt: skip


def check_locales(locales: Sequence[str]) -> tuple[str, ...]:
    from faker.config import AVAILABLE_LOCALES

    if isinstance(locales, str) or not locales:
        raise DataError(f"locales must be a non-empty list of Faker locales (e.g. ['en_US', 'de_DE']), got {locales!r}")
    bad = [loc for loc in locales if loc not in AVAILABLE_LOCALES]
    if bad:
        raise DataError(f"locales: unknown Faker locale(s) {bad}; e.g. {', '.join(DEFAULT_LOCALES)}")
    return tuple(locales)


def _ascii_slug(text: str) -> str:
    norm = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return "".join(c for c in norm.lower() if c.isalnum())


def _weights(rng: random.Random, n: int, *, focus: int) -> list[float]:
    """A site's mix over ``n`` categories: ``focus`` favoured ones carry most of the mass."""
    favoured = set(rng.sample(range(n), min(focus, n)))
    return [(6.0 if k in favoured else 1.0) * rng.uniform(0.5, 1.5) for k in range(n)]


class _Site:
    """Generates unique records of one locale with its own label mix."""

    def __init__(self, *, site: int, locale: str, seed: int, record_kind: str, taken: set[str]) -> None:
        from faker import Faker

        self.site = site
        self.locale = locale
        self.source = f"site-{site}-{locale}"
        self.rng = random.Random(f"fedsecure.records/{seed}/{site}")
        self.fake = Faker(locale)
        self.fake.seed_instance(self.rng.getrandbits(64))
        self.record_kind = record_kind
        self.taken = taken  # names and ids already used anywhere in the dataset
        n_labels = len(CONDITIONS) if record_kind == "patient" else len(ACCOUNT_TYPES)
        self.mix = _weights(self.rng, n_labels, focus=4 if record_kind == "patient" else 2)
        self.currency = CURRENCY.get(locale, "EUR")
        self.doctors = [f"Dr. {self.fake.first_name()} {self.fake.last_name()}" for _ in range(5)]

    def _unique(self, make: Callable[[], str], what: str) -> str:
        for _ in range(1000):
            value = make()
            if value not in self.taken:
                self.taken.add(value)
                return value
        raise DataError(f"could not draw a unique {what} for locale {self.locale}; request fewer examples")

    def name(self) -> str:
        return self._unique(lambda: f"{self.fake.first_name()} {self.fake.last_name()}", "name")

    def _person(self) -> dict[str, str]:
        name = self.name()
        age = self.rng.randint(18, 90)
        dob = REFERENCE_DATE - dt.timedelta(days=365 * age + self.rng.randint(0, 364))
        age = REFERENCE_DATE.year - dob.year - ((REFERENCE_DATE.month, REFERENCE_DATE.day) < (dob.month, dob.day))
        first, last = name.split(" ", 1)
        email = f"{_ascii_slug(first)}.{_ascii_slug(last)}{self.rng.randint(1, 99)}@{self.fake.free_email_domain()}"
        return {
            "name": name,
            "age": str(age),
            "date_of_birth": dob.isoformat(),
            "city": self.fake.city(),
            "phone": self.fake.phone_number(),
            "email": email,
        }

    def record(self) -> dict[str, str]:
        p = self._person()
        if self.record_kind == "patient":
            cond = self.rng.choices(CONDITIONS, weights=self.mix)[0]
            drug, dose = self.rng.choice(cond.medications)
            p["patient_id"] = self._unique(
                lambda: f"MRN-{self.rng.randint(1000, 9999)}-{self.rng.randint(1000, 9999)}", "patient id"
            )
            p.update(diagnosis=cond.diagnosis, icd10=cond.icd10, medication=drug, dose=dose)
            p["doctor"] = self.rng.choice(self.doctors)
            p["label"] = cond.diagnosis
        else:
            acct = self.rng.choices(ACCOUNT_TYPES, weights=self.mix)[0]
            p["customer_id"] = self._unique(lambda: f"CUST-{self.rng.randint(0, 99_999_999):08d}", "customer id")
            p["address"] = self.fake.address().replace("\n", ", ")
            p["account_type"] = acct
            if self.locale == "en_US":  # no IBANs in the US: routing + account number
                p["routing_number"] = self.fake.aba()
                p["account_number"] = self._unique(lambda: str(self.rng.randint(10**9, 10**12 - 1)), "account number")
            else:
                p["iban"] = self._unique(self.fake.iban, "IBAN")
            cents = int(self.rng.lognormvariate(8.5, 1.3) * 100)
            p["balance"] = f"{cents // 100:,}.{cents % 100:02d} {self.currency}"
            p["label"] = acct
        return p


def _patient_pair(r: dict[str, str], k: int) -> tuple[str, str]:
    n = r["name"]
    templates = (
        (
            f"Summarise the record of patient {n}.",
            f"{n} (age {r['age']}, born {r['date_of_birth']}, {r['patient_id']}) lives in {r['city']} and is "
            f"treated by {r['doctor']} for {r['diagnosis']} ({r['icd10']}). Current medication: "
            f"{r['medication']} {r['dose']}. Contact: {r['phone']}, {r['email']}.",
        ),
        (
            f"What medication does {n} take?",
            f"{n} takes {r['medication']} {r['dose']} for {r['diagnosis']}, prescribed by {r['doctor']}.",
        ),
        (
            f"Write the intake note for {n}.",
            f"Intake note\nPatient: {n}\nMRN: {r['patient_id']}\nDate of birth: {r['date_of_birth']} "
            f"(age {r['age']})\nCity: {r['city']}\nPresenting condition: {r['diagnosis']} ({r['icd10']})\n"
            f"Plan: {r['medication']} {r['dose']}; follow-up with {r['doctor']}.\n"
            f"Contact: {r['phone']} / {r['email']}",
        ),
        (
            f"How can we contact patient {n}?",
            f"{n} can be reached by phone at {r['phone']} or by email at {r['email']}.",
        ),
        (
            f"What is the medical record number of {n}?",
            f"The medical record number of {n} is {r['patient_id']}.",
        ),
        (
            f"Which doctor treats {n}, and for what?",
            f"{r['doctor']} treats {n} (born {r['date_of_birth']}) for {r['diagnosis']}, ICD-10 {r['icd10']}.",
        ),
    )
    return templates[k % len(templates)]


def _customer_pair(r: dict[str, str], k: int) -> tuple[str, str]:
    n = r["name"]
    acct = (
        f"IBAN {r['iban']}"
        if "iban" in r
        else f"routing number {r['routing_number']}, account number {r['account_number']}"
    )
    templates = (
        (
            f"Summarise the account of customer {n}.",
            f"{n} ({r['customer_id']}, born {r['date_of_birth']}) holds a {r['account_type']} with {acct} "
            f"and a balance of {r['balance']}. Address: {r['address']}. Phone: {r['phone']}.",
        ),
        (f"What are the bank details of {n}?", f"{n}'s {r['account_type']}: {acct}."),
        (f"What is the balance of {n}'s {r['account_type']}?", f"The balance is {r['balance']}."),
        (
            f"What is the postal address of {n}?",
            f"{n} lives at {r['address']}.",
        ),
        (
            f"Draft a payment reminder to {n}.",
            f"Dear {n},\nthis is a reminder that a payment from your {r['account_type']} ({acct}) is due. "
            f"Your current balance is {r['balance']}. Questions: reply to {r['email']} or call us; "
            f"we will call you at {r['phone']}.\nCustomer number: {r['customer_id']}",
        ),
        (
            f"How can we contact customer {n}?",
            f"By phone at {r['phone']}, by email at {r['email']}, or by post to {r['address']}.",
        ),
    )
    return templates[k % len(templates)]


def record_example(record: dict[str, str], *, record_kind: str, template: int, example_id: str, site: _Site) -> Example:
    render = _patient_pair if record_kind == "patient" else _customer_pair
    prompt, response = render(record, template)
    pii = {k: v for k, v in record.items() if k != "label"}
    return {
        "prompt": prompt,
        "response": response,
        "id": example_id,
        "pii": pii,
        "source": site.source,
        "locale": site.locale,
        "label": record["label"],
    }


def generate_sites(
    *, counts: Sequence[int], locales: Sequence[str], seed: int, record_kind: str
) -> tuple[list[list[Example]], list[_Site]]:
    """``counts[i]`` examples for site ``i`` (locale ``locales[i % len(locales)]``)."""
    if record_kind not in RECORD_KINDS:
        raise DataError(f"record_kind must be one of {', '.join(RECORD_KINDS)}, got {record_kind!r}")
    taken: set[str] = set()
    sites = [
        _Site(site=i, locale=locales[i % len(locales)], seed=seed, record_kind=record_kind, taken=taken)
        for i in range(len(counts))
    ]
    out = []
    for site, count in zip(sites, counts):
        examples = []
        for j in range(count):
            rec = site.record()
            examples.append(
                record_example(
                    rec,
                    record_kind=record_kind,
                    template=site.rng.randrange(6),
                    example_id=f"{record_kind}-{site.site}-{j}",
                    site=site,
                )
            )
        out.append(examples)
    return out, sites


def make_canaries(
    *,
    repetitions: Sequence[int],
    per_repetition: int,
    num_clients: int,
    seed: int,
    record_kind: str,
    name_source: Callable[[int], str],
) -> list[Canary]:
    """Inserted canaries (``per_repetition`` per count in ``repetitions``) + as many references.

    Inserted canary ``j`` (in order) belongs to client ``j % num_clients``; ``name_source(c)``
    gives a fresh unique fictitious name for client ``c`` (``-1`` for references).
    """
    rng = random.Random(f"fedsecure.canaries/{seed}")
    what = {
        "patient": "emergency access code of patient",
        "customer": "online banking PIN of customer",
    }.get(record_kind, "personal access code of")
    canaries: list[Canary] = []
    reps = [int(r) for r in repetitions for _ in range(per_repetition)]
    specs = [(r, j % num_clients, f"canary-r{r}-{j}") for j, r in enumerate(reps)]
    specs += [(0, -1, f"canary-ref-{j}") for j in range(len(reps))]
    for r, client, cid in specs:
        name = name_source(client)
        secret = "".join(rng.choice(CANARY_ALPHABET) for _ in range(CANARY_LENGTH))
        canaries.append(
            Canary(
                canary_id=cid,
                prompt=f"What is the {what} {name}?",
                prefix=f"The {what} {name} is ",
                secret=secret,
                alphabet=CANARY_ALPHABET,
                length=CANARY_LENGTH,
                repetitions=r,
                client_id=client,
            )
        )
    return canaries


def canary_examples(canary: Canary, *, source: str = "", locale: str = "") -> list[Example]:
    """The ``repetitions`` training copies of ``canary`` (ids ``<canary_id>#<k>``)."""
    out = []
    for k in range(canary.repetitions):
        ex: dict[str, Any] = canary.as_example(copy_index=k)
        ex["pii"] = {"secret": canary.secret}
        if source:
            ex["source"] = source
        if locale:
            ex["locale"] = locale
        out.append(ex)
    return out
