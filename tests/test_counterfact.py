"""CounterFact/zsRE evaluation: the reader's errors, each metric against a hand computation on a
tiny model, the edit loop on the bundled toy model, and ``rome-edit eval``."""

import json
import math

import pytest
import torch

from rome_edit.cli.main import main
from rome_edit.evaluation.counterfact import (
    evaluate_benchmark,
    format_table,
    harmonic_mean,
    summarize_cases,
)
from rome_edit.evaluation.counterfact_data import (
    CounterFactCase,
    DatasetError,
    ZsreCase,
    read_dataset,
)
from rome_edit.evaluation.counterfact_metrics import (
    greedy_batch,
    measure_counterfact,
    measure_zsre,
    starts_with_target,
    token_hits,
)
from rome_edit.evaluation.evaluate import ngram_entropy
from rome_edit.models.scoring import generate


def cf_case(case_id=0, **rewrite):
    rw = {"prompt": "Name: {}. City:", "subject": "Ani", "target_new": {"str": "London"},
          "target_true": {"str": "Paris"}, **rewrite}
    return {"case_id": case_id, "requested_rewrite": rw,
            "paraphrase_prompts": ["Ani lives in", "The city of Ani is"],
            "neighborhood_prompts": ["Name: Bob. City:", "Name: Eve. City:", "Name: Ola. City:"],
            "attribute_prompts": ["Name: Kai. City:"],
            "generation_prompts": ["Ani is a person who"]}


ZSRE = {"subject": "Ani", "src": "Which city does Ani live in?", "alt": "Rome",
        "answers": ["London"], "rephrase": "Where does Ani live?",
        "loc": "nq question: who is the mayor", "loc_ans": "Bob Smith"}


def write(tmp_path, data, name="d.json"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_reader_reads_both_formats(tmp_path):
    fmt, cases = read_dataset(write(tmp_path, [cf_case(0), cf_case(1, subject="Bo")]))
    assert fmt == "counterfact" and [c.case_id for c in cases] == [0, 1]
    c = cases[0]
    assert c.request.target_new == " London" and c.request.target_true == " Paris"
    assert c.rewrite_prompt == "Name: Ani. City:" and c.attribute_prompts == ("Name: Kai. City:",)
    fmt, cases = read_dataset(write(tmp_path, [ZSRE]))
    assert fmt == "zsre" and cases[0].prompt == "Which city does {} live in?"
    assert cases[0].target_new == "London"  # the reference writes answers[0]
    assert read_dataset(write(tmp_path, [ZSRE]), target="alt")[1][0].target_new == "Rome"


def _without(d, *keys):
    d = json.loads(json.dumps(d))
    inner = d
    for k in keys[:-1]:
        inner = inner[k]
    del inner[keys[-1]]
    return d


@pytest.mark.parametrize("data, message", [
    ("[]", "holds no cases"),
    ("{not json", "not valid JSON"),
    ([{"x": 1}], "neither CounterFact"),
    ([cf_case(0), _without(cf_case(7), "requested_rewrite", "target_true")],
     "case 1 (case_id 7): missing ['requested_rewrite']['target_true']"),
    ([_without(cf_case(0), "paraphrase_prompts")], "missing ['paraphrase_prompts']"),
    ([_without(cf_case(0), "case_id")], "missing ['case_id']"),
    ([cf_case(0, prompt="Name: Ani. City:")], "exactly one '{}'"),
    ([cf_case(0, target_new={"str": "Paris"})], "must change the answer"),
    ([cf_case(0), cf_case(0)], "appears twice"),
    ([{**ZSRE, "subject": "Zed"}], "does not occur in src"),
    ([_without(ZSRE, "loc_ans")], "missing ['loc_ans']"),
])
def test_reader_names_the_case_and_the_fix(tmp_path, data, message):
    with pytest.raises(DatasetError, match=None) as err:
        read_dataset(write(tmp_path, data))
    assert message in str(err.value), str(err.value)


def _p(lm, prompt, target):
    """P[target] by hand: one unbatched forward per token, exp of the mean log-prob."""
    ids = lm.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    tgt = lm.tokenizer(" " + target, add_special_tokens=False)["input_ids"]
    total = 0.0
    with torch.no_grad():
        for i, t in enumerate(tgt):
            logits = lm.model(torch.tensor([ids + tgt[:i]])).logits[0, -1]
            total += torch.log_softmax(logits, -1)[t].item()
    return math.exp(total / len(tgt))


def test_counterfact_metrics_match_a_hand_computation(tiny_gptj):
    c = cf_case()
    case = CounterFactCase(0, "Ani", "Name: {}. City:", "London", "Paris",
                           tuple(c["paraphrase_prompts"]), tuple(c["neighborhood_prompts"]),
                           tuple(c["attribute_prompts"]), tuple(c["generation_prompts"]))
    got, texts = measure_counterfact(tiny_gptj, case, generation_tokens=5)
    new, true = "London", "Paris"
    pn = {p: _p(tiny_gptj, p, new) for p in
          ["Name: Ani. City:", *case.paraphrase_prompts, *case.neighborhood_prompts,
           *case.attribute_prompts]}
    pt = {p: _p(tiny_gptj, p, true) for p in pn}
    r = "Name: Ani. City:"
    assert got["efficacy_score"] == float(pn[r] > pt[r])
    assert got["efficacy_magnitude"] == pytest.approx(pn[r] - pt[r], abs=1e-5)
    para = case.paraphrase_prompts
    assert got["paraphrase_score"] == pytest.approx(sum(pn[p] > pt[p] for p in para) / 2)
    assert got["paraphrase_magnitude"] == pytest.approx(
        sum(pn[p] - pt[p] for p in para) / 2, abs=1e-5)
    nb = case.neighborhood_prompts
    assert got["neighborhood_score"] == pytest.approx(sum(pt[p] > pn[p] for p in nb) / 3)
    assert got["neighborhood_magnitude"] == pytest.approx(
        sum(pt[p] - pn[p] for p in nb) / 3, abs=1e-5)
    assert got["attribute_score"] == float(pn["Name: Kai. City:"] > pt["Name: Kai. City:"])
    g = "Ani is a person who"
    assert texts == [g + generate(tiny_gptj.model, tiny_gptj.tokenizer, g, 5)]
    assert got["generation_entropy"] == pytest.approx(ngram_entropy(texts))
    cont = generate(tiny_gptj.model, tiny_gptj.tokenizer, r, 3)
    assert got["generated_efficacy"] == float(starts_with_target(cont, new))


@pytest.mark.parametrize("family", ["gptj", "llama"])
def test_batched_greedy_generation_is_each_prompts_own(tokenizer, family):
    """Left padding under the attention mask changes nothing: each row is what the prompt
    generates alone (prompts of different lengths, so some rows are padded)."""
    from conftest import make_tiny

    lm = make_tiny(family, tokenizer)
    prompts = ["Ani is a person who", "Name: Bob. City:", "The weather was cold and"]
    alone = [generate(lm.model, lm.tokenizer, p, 6) for p in prompts]
    assert greedy_batch(lm, prompts, 6) == alone


def test_metric_definitions_on_chosen_probabilities(tiny_gptj, monkeypatch):
    """ES/EM, PS/PM, NS/NM and the attribute score from probabilities chosen by hand."""
    import rome_edit.evaluation.counterfact_metrics as metrics

    p_new = [0.6, 0.5, 0.1, 0.2, 0.7, 0.1, 0.9]  # rewrite, 2 paraphrases, 3 neighbours, attr
    p_true = [0.2, 0.3, 0.4, 0.5, 0.1, 0.3, 0.05]

    def fake(model, tokenizer, prompts, continuations):
        assert continuations == [" London"] * 7 + [" Paris"] * 7
        return torch.tensor(p_new + p_true).log()

    monkeypatch.setattr(metrics, "sequence_logprob", fake)
    c = cf_case()
    case = CounterFactCase(0, "Ani", "Name: {}. City:", "London", "Paris",
                           tuple(c["paraphrase_prompts"]), tuple(c["neighborhood_prompts"]),
                           tuple(c["attribute_prompts"]), ())
    got, _ = measure_counterfact(tiny_gptj, case)
    want = {"efficacy_score": 1.0, "efficacy_magnitude": 0.4, "paraphrase_score": 0.5,
            "paraphrase_magnitude": (0.2 - 0.3) / 2, "neighborhood_score": 2 / 3,
            "neighborhood_magnitude": (0.3 - 0.6 + 0.2) / 3, "attribute_score": 1.0,
            "generation_entropy": None}
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-6), key


def test_generation_check_and_score_definitions():
    assert starts_with_target(" London is big", "London")
    assert starts_with_target(" New York.", "New York")
    assert not starts_with_target(" Romeo", "Rome") and not starts_with_target(" Paris", "Rome")
    assert harmonic_mean([1.0, 0.5, 0.25]) == pytest.approx(3 / (1 + 2 + 4))
    assert harmonic_mean([1.0, 0.0]) == 0.0 and harmonic_mean([1.0, None]) is None


def test_token_hits_are_teacher_forced_argmaxes(tiny_gptj):
    lm = tiny_gptj
    prompts, answers = ["Where does Ani live?", "nq question: who?"], [" London", " Bob Smith"]
    got = token_hits(lm.model, lm.tokenizer, prompts, answers)
    for prompt, answer, row in zip(prompts, answers, got):
        ids = lm.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        tgt = lm.tokenizer(answer, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            want = [int(lm.model(torch.tensor([ids + tgt[:i]])).logits[0, -1].argmax()) == t
                    for i, t in enumerate(tgt)]
        assert row == want
    case = ZsreCase(0, "Ani", "Which city does {} live in?", "London",
                    ("Where does Ani live?",), "nq question: who?", "Bob Smith")
    m = measure_zsre(lm, case)
    assert m["paraphrase_accuracy"] == pytest.approx(sum(got[0]) / len(got[0]))
    assert m["specificity_accuracy"] == pytest.approx(sum(got[1]) / len(got[1]))


def test_edit_loop_on_the_toy_model_reverts_and_summarises(tmp_path):
    from dataclasses import replace

    from rome_edit import Editor

    ed = Editor.load(progress=False, context_templates=["{}", "The weather was cold. {}"])
    ed.hparams = replace(ed.hparams, v_num_grad_steps=10, mom2_adjustment=False)
    before = {k: v.clone() for k, v in ed.lm.model.state_dict().items()}
    cases = [CounterFactCase(i, s, "Name: {}. Gender:", new, true,
                             (f"{s} said that",), ("Name: Ani. Gender:",), (), (f"{s} is",))
             for i, (s, new, true) in enumerate([("Brittany", "Male", "Female"),
                                                 ("Ani", "Female", "Male")])]
    result = evaluate_benchmark(ed, "counterfact", cases, generation_tokens=8, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in ed.lm.model.state_dict().items())
    s = result.summary
    assert s["n_cases"] == 2 and s["post"]["efficacy_score"] == 1.0
    assert s["post"]["efficacy_magnitude"] > s["pre"]["efficacy_magnitude"]
    assert s["post"]["score"] == pytest.approx(harmonic_mean(
        [s["post"]["efficacy_score"], s["post"]["paraphrase_score"],
         s["post"]["neighborhood_score"]]))
    assert summarize_cases("counterfact", result.cases) == s
    assert "ES  efficacy score" in format_table(result)
    batched = evaluate_benchmark(ed, "counterfact", cases, generation_tokens=8, batch_size=2,
                                 progress=False)  # computed together, applied alone: the same
    for one, two in zip(result.cases, batched.cases):
        assert two.post == pytest.approx(one.post, abs=1e-4)
    zsre = [ZsreCase(0, "Brittany", "Name: {}. Gender:", "Male", ("Brittany said that",),
                     "Name: Ani. Gender:", "Male")]
    z = evaluate_benchmark(ed, "zsre", zsre, progress=False).summary
    assert set(z["post"]) == {"efficacy_accuracy", "paraphrase_accuracy",
                              "specificity_accuracy", "generated_efficacy",
                              "generated_paraphrase"}
    assert z["pre"]["efficacy_accuracy"] == 0.0 and z["post"]["efficacy_accuracy"] == 1.0
    result.write(tmp_path / "r.json", {"model": "toy"})
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["model"] == "toy" and len(saved["cases"]) == 2


@pytest.fixture
def eval_args(tmp_path):
    hp = {"layers": [1], "v_loss_layer": 5, "v_num_grad_steps": 4, "mom2_adjustment": False,
          "context_template_length_params": [[3, 1]]}
    (tmp_path / "hp.json").write_text(json.dumps(hp))
    (tmp_path / "ctx.json").write_text(json.dumps(["{}"]))
    return ["--hparams", str(tmp_path / "hp.json"), "--context-templates",
            str(tmp_path / "ctx.json")]


def test_cli_eval_writes_cases_and_summary(tmp_path, eval_args, capsys):
    data = write(tmp_path, [cf_case(0, prompt="Name: {}. City:")])
    out = tmp_path / "r.json"
    assert main(["eval", "--dataset", str(data), "--out", str(out), "--generation-tokens", "4",
                 *eval_args]) == 0
    printed = capsys.readouterr().out
    assert "S   harmonic mean of ES, PS, NS" in printed and "generated efficacy" in printed
    saved = json.loads(out.read_text())
    assert saved["format"] == "counterfact" and saved["hparams"]["layers"] == [1]
    assert set(saved["summary"]["post"]) >= {"efficacy_score", "score", "generated_efficacy"}
    assert "note:" not in printed
    # hparams that protect a pool (SmolLM2's preset does): eval edits plain and says so
    hp = json.loads((tmp_path / "hp.json").read_text())
    hp["protect"] = {"source": "other-names", "form": "null-space", "positions": "all"}
    (tmp_path / "hp.json").write_text(json.dumps(hp))
    again = tmp_path / "r2.json"
    assert main(["eval", "--dataset", str(data), "--out", str(again), "--generation-tokens",
                 "4", *eval_args]) == 0
    assert "note: the hparams protect other-names, null-space" in capsys.readouterr().out
    assert json.loads(again.read_text())["summary"]["post"] == saved["summary"]["post"]


@pytest.mark.parametrize("data, message", [
    ([], "holds no cases"),
    ([cf_case(3, prompt="Name: Ani. City:")], "case 0 (case_id 3)"),
    ([{**ZSRE, "subject": "Zed"}], "does not occur in src"),
])
def test_cli_eval_bad_input_exits_2_and_writes_nothing(tmp_path, eval_args, capsys, data,
                                                       message):
    out = tmp_path / "r.json"
    code = main(["eval", "--dataset", str(write(tmp_path, data)), "--out", str(out),
                 *eval_args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()
